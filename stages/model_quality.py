"""Stage `model_quality@<model>`: task utilities of one model on the held-out split -> metrics JSON."""

from pathlib import Path

from pipeline.model.quality import evaluate_model_quality
from pipeline.outcomes.records import QualityRecord, as_record, write_record
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model
from stages.params import read_params

READS = (
    "model_quality.split",
    "model_quality.max_items",
    "model_quality.tasks",
    "runtime.threads",
    "runtime.batch_sequences",
    "runtime.max_new_tokens",
    "models.{model}",
)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg, rt = params.model_quality, params.runtime
    annotations = load_items(args.benchmark, (cfg.split,), tuple(cfg.tasks))
    adapter = load_model(params, args.model)
    result = evaluate_model_quality(
        adapter,
        annotations,
        load_images(args.benchmark),
        tasks=cfg.tasks,
        split=cfg.split,
        batch_size=rt.batch_sequences,
        max_new_tokens=rt.max_new_tokens,
        max_items=cfg.max_items,
    )
    write_record(as_record(QualityRecord, result, f"model quality of {args.model}"), args.out)


if __name__ == "__main__":
    main()
