"""Stage `ood_benchmark@<name>`: an out-of-distribution set you bring -> data/ood/<name>/.

Imports ``ood_benchmarks.<name>`` (TextVQA, GQA or Flickr30k records and their image folder,
under ``data/inputs``) into the benchmark table format, every row in the split ``ood``: its
``annotations.parquet``, ``images.parquet`` and ``import.json`` (items per task, images, and
the reason of every record left out where ``skip_bad`` allows it). A record that cannot be used
stops the stage with one line naming the file, the record and the field; nothing is written.
Nothing is trained, steered or selected on it: the transfer_ood stages measure on it.
"""

from pathlib import Path

from pipeline.tasks.ood_import import import_ood
from stages._common import entry, parser, report_rows
from stages.params import read_params

READS = ("ood_benchmarks.{ood_benchmark}",)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--name", required=True, help="name under 'ood_benchmarks' in params.yaml")
    p.add_argument("--out", type=Path, required=True, help="the set's folder, data/ood/<name>")
    args = p.parse_args()
    params = read_params(args.params, READS, ood_benchmark=args.name)
    cfg = params.ood_benchmarks[args.name]
    imported = import_ood(
        cfg.format,
        Path(cfg.records),
        Path(cfg.images),
        args.out,
        split="ood",
        skip_bad=cfg.skip_bad,
        max_records=cfg.max_records,
    )
    report_rows(len(imported.records), "items")


if __name__ == "__main__":
    main()
