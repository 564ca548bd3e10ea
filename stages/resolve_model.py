"""Stage `resolve_model@<model>`: pin what a pretrained model's stages will load -> data/models/<model>/source.json.

Checks, before any weight is read, that the folder or hub id exists, holds a vision-language
model whose decoder the adapter can find, and that the configured device is there; records the
sha256 of its files (and the hub commit). The record is the dependency of the model's stages.
"""

from pathlib import Path

from pipeline.io import atomic_directory
from pipeline.model.source import resolve_folder, resolve_hub, write_source
from stages._common import entry, parser
from stages._device import model_device
from stages._load import file_hashes
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
    if not isinstance(cfg, PretrainedModelConfig):
        raise ConfigError(f"models.{args.model} has source 'train': its folder comes from train_default_model")
    model_device(params, args.model)
    hashes = file_hashes()
    if cfg.hub_id is not None:
        source = resolve_hub(cfg.hub_id, cfg.revision, args.model, hashes)
    else:
        source = resolve_folder(cfg.path, args.model, hashes)
    with atomic_directory(args.out) as tmp:
        write_source(source, tmp)


if __name__ == "__main__":
    main()
