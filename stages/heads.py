"""Stage `heads@<model>-<task>`: S_t(l, h) for every head -> scores.parquet + heatmap.png."""

from pathlib import Path


from stages.params import HeadsConfig
from pipeline.method.heads import plot_head_scores, score_heads
from pipeline.io import write_parquet
from stages._common import entry, load_images, load_items, load_model, load_params, parser, runtime, section


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
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    images = load_images(args.benchmark)
    adapter = load_model(params, args.model)
    scores = score_heads(adapter, args.task, items, images, batch_size=rt.batch_size,
                         max_new_tokens=rt.max_new_tokens, utility=cfg.utility)
    args.out.mkdir(parents=True, exist_ok=True)
    write_parquet(scores, args.out / "scores.parquet")
    plot_head_scores(scores, args.out / "heatmap.png", f"{args.model} / {args.task}: head scores ({cfg.utility})")


if __name__ == "__main__":
    main()
