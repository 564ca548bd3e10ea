"""Stage `benchmark`: the benchmark table into data/benchmark.

``benchmark.source: synthetic`` renders the embedded synthetic benchmark
(``benchmark.synthetic``); ``hones_coco`` imports the paper's COCO data (``benchmark.hones_coco``:
JSON file and image folder, under ``data/inputs``). The stage reads only the subsection named
by ``source``, and dvc.yaml declares only that one.
"""

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.tasks.benchmark import BenchmarkSpec, build_benchmark
from pipeline.tasks.coco_import import CocoSizeError, import_hones_coco
from pipeline.tasks.items import BenchmarkError
from stages._common import entry, parser, report_rows
from stages.params import read_params

READS = ("benchmark.source", "benchmark.{benchmark.source}")


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = read_params(args.params, READS)
    if params.benchmark.source == "hones_coco":
        coco = params.benchmark.hones_coco
        try:
            import_hones_coco(
                Path(coco.json_path),
                Path(coco.image_root),
                args.out,
                seed=coco.seed,
                n_discovery=coco.n_discovery,
                n_dev=coco.n_dev,
                n_test=coco.n_test,
                n_negatives=coco.n_negatives,
                max_images=coco.max_images,
            )
        except CocoSizeError as exc:
            keys = ", ".join(f"benchmark.hones_coco.{a}" for a in exc.arguments)
            raise BenchmarkError(f"{exc} (params: {keys})") from None
    else:
        build_benchmark(BenchmarkSpec(**params.benchmark.synthetic.model_dump()), args.out)
    report_rows(pq.ParquetFile(args.out / "images.parquet").metadata.num_rows, "images")


if __name__ == "__main__":
    main()
