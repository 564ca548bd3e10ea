"""Stage `model_quality`: task utilities of each model on the held-out split -> metrics JSON."""

from pathlib import Path


from stages.params import ModelQualityConfig
from pipeline.model.evaluation import evaluate_model_quality
from pipeline.io import write_json
from stages._common import entry, load_images, load_items, load_model, load_params, parser, runtime, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "model_quality", ModelQualityConfig)
    rt = runtime(params)
    annotations = load_items(args.benchmark, (cfg.split,), tuple(cfg.tasks))
    images = load_images(args.benchmark)
    result = {}
    for name in cfg.models or params.get("trained_models", []):
        adapter = load_model(params, name)
        result[name] = evaluate_model_quality(
            adapter, annotations, images, tasks=cfg.tasks, split=cfg.split, batch_size=rt.batch_size,
            max_new_tokens=rt.max_new_tokens, max_items=cfg.max_items,
        )
    write_json(result, args.out)


if __name__ == "__main__":
    main()
