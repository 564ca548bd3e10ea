"""Stage `import_coco`: import the HONES unified COCO JSON (params section `coco_import`) as the benchmark."""

from pathlib import Path

from pipeline.coco_import import CocoImportConfig, import_hones_coco
from stages._common import entry, load_params, parser, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory (annotations.parquet, images.parquet)")
    args = p.parse_args()
    cfg = section(load_params(args.params), "coco_import", CocoImportConfig)
    import_hones_coco(
        Path(cfg.json_path),
        Path(cfg.image_root),
        args.out,
        seed=cfg.seed,
        n_discovery=cfg.n_discovery,
        n_dev=cfg.n_dev,
        n_test=cfg.n_test,
        n_negatives=cfg.n_negatives,
        max_images=cfg.max_images,
    )


if __name__ == "__main__":
    main()
