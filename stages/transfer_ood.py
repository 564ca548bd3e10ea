"""Stage `transfer_ood@<model>-<name>`: the in-domain HONES masks and steering scales of a model
applied zero-shot to an out-of-distribution set you brought (data/ood/<name>, the ood_benchmark
stage's import) -> data/transfer_ood/<model>-<name>/, as the transfer stage writes for the
benchmark's own ood split.

Only the tasks the set has are measured (TextVQA: ocr and vqa; GQA: vqa; Flickr30k: caption),
with those tasks' masks; with a single task there is no cross-task effect to report.
"""

import shutil
from pathlib import Path

from pipeline.tasks.items import read_annotations
from pipeline.tasks.ood_import import IMPORT_SUMMARY
from stages._common import entry, parser
from stages.params import ConfigError, read_params
from stages.transfer import measure_transfer

READS = (
    "transfer.max_items",
    "transfer.methods",
    "steer.train_split",
    "steer.utility",
    "statistics.bootstrap_resamples",
    "statistics.seed",
    "statistics.confidence",
    "statistics.equivalence_margin",
    "runtime.threads",
    "runtime.workers",
    "runtime.batch_sequences",
    "runtime.max_new_tokens",
    "tasks",
    "models.{model}",
)
SPLIT = "ood"


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True, help="the set's name under 'ood_benchmarks' in params.yaml")
    p.add_argument("--benchmark", type=Path, required=True, help="the imported set's folder, data/ood/<name>")
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--steer", type=Path, required=True, help="the steer stage's folder of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: per-item scores, statistics JSON")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model, ood_benchmark=args.name)
    present = set(read_annotations(args.benchmark / "annotations.parquet")["task"])
    tasks = [t for t in params.tasks if t in present]
    if not tasks:
        raise ConfigError(
            f"{args.benchmark} has items of {sorted(present)} only, none of the studied tasks {list(params.tasks)}"
        )
    measure_transfer(params, args.model, args.benchmark, SPLIT, tasks, args.masks, args.steer, args.out)
    # What was measured on: the import's summary (items per task, records left out) travels along.
    shutil.copyfile(args.benchmark / IMPORT_SUMMARY, args.out / IMPORT_SUMMARY)


if __name__ == "__main__":
    main()
