"""Stage `benchmark`: the benchmark table into data/benchmark.

``benchmark.source: synthetic`` renders the embedded synthetic benchmark; ``hones_coco``
imports the paper's COCO data (params section ``coco_import``: JSON file and image folder).
"""

from pathlib import Path

from pipeline.tasks.benchmark import BenchmarkSpec, build_benchmark
from pipeline.tasks.coco_import import CocoImportConfig, import_hones_coco
from stages.params import BenchmarkConfig
from stages._common import entry, load_params, parser, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "benchmark", BenchmarkConfig)
    if cfg.source == "hones_coco":
        coco = section(params, "coco_import", CocoImportConfig)
        import_hones_coco(
            Path(coco.json_path), Path(coco.image_root), args.out, seed=coco.seed, n_discovery=coco.n_discovery,
            n_dev=coco.n_dev, n_test=coco.n_test, n_negatives=coco.n_negatives, max_images=coco.max_images,
        )
        return
    build_benchmark(BenchmarkSpec(**cfg.model_dump(exclude={"source"})), args.out)


if __name__ == "__main__":
    main()
