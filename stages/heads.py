"""Stage `heads@<model>-<task>`: S_t(l, h) for every head (``heads.localisation`` exhaustive), for
the gradient estimate's top candidates (guided) or for the best candidates of an exact screen of
the first items (screened), with every head's estimate -> scores.parquet +
heatmap.png, and the per-item utilities behind the exact scores -> per_item.parquet (what the
report's stability check resamples)."""

from pathlib import Path

from pipeline.io import write_parquet
from pipeline.method.heads import (
    estimate_head_scores,
    per_item_table,
    score_heads_guided,
    score_heads_per_item,
    score_heads_screened,
    with_estimate,
)
from pipeline.report.plots import plot_head_scores
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model
from stages.params import read_params

READS = (
    "heads.split",
    "heads.max_items",
    "heads.utility",
    "heads.localisation",
    "heads.{heads.localisation}",
    "heads.gradient_batch_items",
    "runtime.threads",
    "runtime.batch_sequences",
    "runtime.max_new_tokens",
    "models.{model}",
)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model, task=args.task)
    cfg, rt = params.heads, params.runtime
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    images = load_images(args.benchmark)
    adapter = load_model(params, args.model)
    scoring = dict(batch_size=rt.batch_sequences, max_new_tokens=rt.max_new_tokens, utility=cfg.utility)
    mode = getattr(cfg, cfg.localisation)  # the settings of the chosen localisation
    if cfg.localisation == "guided":
        scores, values, kind = score_heads_guided(
            adapter,
            args.task,
            items,
            images,
            candidates=mode.candidates,
            gradient_batch_items=cfg.gradient_batch_items,
            name="heads.guided.candidates",
            **scoring,
        )
    else:
        if cfg.localisation == "screened":
            scores, values, kind = score_heads_screened(
                adapter,
                args.task,
                items,
                images,
                screen_items=mode.items,
                candidates=mode.candidates,
                name="heads.screened.candidates",
                **scoring,
            )
        else:
            scores, values, kind = score_heads_per_item(adapter, args.task, items, images, **scoring)
        estimate = estimate_head_scores(adapter, items, images, batch_size=cfg.gradient_batch_items)
        scores = with_estimate(scores, estimate)
    args.out.mkdir(parents=True, exist_ok=True)
    write_parquet(scores, args.out / "scores.parquet")
    write_parquet(per_item_table(values, kind), args.out / "per_item.parquet")
    plot_head_scores(scores, args.out / "heatmap.png", f"{args.model} / {args.task}: head scores ({cfg.utility})")


if __name__ == "__main__":
    main()
