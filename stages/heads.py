"""Stage `heads@<model>-<task>`: S_t(l, h) for every head -> scores.parquet + heatmap.png."""

from pathlib import Path

import torch

from pipeline.adapter import ModelAdapter
from pipeline.benchmark import ImageTable, read_annotations
from pipeline.config import HeadsConfig
from pipeline.heads import plot_head_scores, score_heads
from pipeline.io import write_parquet
from stages._common import entry, load_params, model_location, parser, runtime, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "heads", HeadsConfig)
    rt = runtime(params)
    torch.set_num_threads(rt.threads)
    items = read_annotations(args.benchmark / "annotations.parquet", splits=(cfg.split,), tasks=(args.task,))
    if cfg.max_items is not None:
        items = items.head(cfg.max_items)
    images = ImageTable(args.benchmark / "images.parquet")
    path, revision, dtype, device = model_location(params, args.model)
    adapter = ModelAdapter.load(path, dtype=dtype, device=device, revision=revision)
    scores = score_heads(adapter, args.task, items, images, batch_size=rt.batch_size,
                         max_new_tokens=rt.max_new_tokens, utility=cfg.utility)
    args.out.mkdir(parents=True, exist_ok=True)
    write_parquet(scores, args.out / "scores.parquet")
    plot_head_scores(scores, args.out / "heatmap.png", f"{args.model} / {args.task}: head scores ({cfg.utility})")


if __name__ == "__main__":
    main()
