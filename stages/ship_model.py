"""Stage `ship_model@<model>`: pin the weights the repository ships for a recipe -> data/models/<model>/source.json.

The embedded default models are trained once by their recipe (``train_default_model``; see
profiles/train.yaml) and the resulting folder is committed under data/shipped/<model>/, so a
fresh clone's run spends no time on training. This stage checks that the folder was trained
with exactly the recipe ``models.<model>`` gives (its training.json), that it holds a model the
adapter can load, and records the sha256 of its files, like ``resolve_model`` does for a model
you bring; the analysis stages load those exact files.
"""

from pathlib import Path

from pipeline.io import atomic_directory
from pipeline.model.default_spec import check_trained_with
from pipeline.model.source import resolve_folder, write_source
from stages._common import entry, parser
from stages._load import SHIPPED_DIR, file_hashes
from stages.params import ConfigError, PretrainedModelConfig, read_params

READS = ("models.{model}",)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="name under 'models' in params.yaml")
    p.add_argument("--out", type=Path, required=True, help="the model's folder, data/models/<model>")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg = params.models[args.model]
    if isinstance(cfg, PretrainedModelConfig):
        raise ConfigError(f"models.{args.model} has source 'pretrained': its files are pinned by resolve_model")
    folder = SHIPPED_DIR / args.model
    check_trained_with(folder, cfg.spec, args.model)
    source = resolve_folder(str(folder), args.model, file_hashes())
    with atomic_directory(args.out) as tmp:
        write_source(source, tmp)


if __name__ == "__main__":
    main()
