"""Stage `evaluate@<model>`: cross-task suppression on the held-out split, with intervals and deletion curves."""

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io import write_parquet
from pipeline.outcomes.records import IntervalRecord, SuppressionRecord, UtilitySuppression, write_record
from pipeline.outcomes.suppression import (
    conditions_table,
    mask_conditions,
    score_suppression,
    scores_table,
    suppression_statistics,
)
from pipeline.report.plots import plot_deletion_curves, plot_square
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.params import ConfigError, read_params

READS = (
    "evaluate.split",
    "evaluate.max_items",
    "evaluate.methods",
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


def selected_masks(
    masks: pd.DataFrame, methods: list[str] | None, tasks: list[str], source: Path, key: str = "evaluate.methods"
) -> pd.DataFrame:
    """The rows of ``methods`` (default: all) and ``tasks``; an unknown method is a ConfigError
    naming the params ``key`` it came from."""
    methods = methods or list(dict.fromkeys(masks["method"]))
    unknown = sorted(set(methods) - set(masks["method"]))
    if unknown:
        raise ConfigError(f"{key}: {unknown} not in {source}; available: {sorted(set(masks['method']))}")
    return masks[masks["method"].isin(methods) & masks["task"].isin(tasks)]


def _matrix(cells: Mapping[str, Mapping[str, IntervalRecord]]) -> pd.DataFrame:
    """{target: {eval: interval}} -> [target x eval] values."""
    return pd.DataFrame({t: {s: iv.value for s, iv in row.items()} for t, row in cells.items()}).T


def _utility(record: SuppressionRecord, utility: str) -> UtilitySuppression:
    figures = record.of(utility)
    if figures is None:
        raise PipelineError(f"suppression statistics: the {utility} utility was not evaluated")
    return figures


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: per-item scores, statistics JSON, figures")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg, rt, st, tasks = params.evaluate, params.runtime, params.statistics, params.tasks
    masks = selected_masks(pd.read_parquet(args.masks), cfg.methods, tasks, args.masks)
    conditions = mask_conditions(masks)
    items = load_items(args.benchmark, (cfg.split,), tuple(tasks), cfg.max_items)
    workers, threads = worker_plan(params, args.model)
    scores = score_suppression(
        items,
        conditions,
        partial(load_model_and_images, params, args.model, args.benchmark),
        batch_size=rt.batch_sequences,
        max_new_tokens=rt.max_new_tokens,
        workers=workers,
        threads=threads,
    )
    record = suppression_statistics(
        scores,
        conditions,
        n_resamples=st.bootstrap_resamples,
        seed=st.seed,
        confidence=st.confidence,
        equivalence_margin=st.equivalence_margin,
    )
    write_parquet(scores_table(scores, items), args.out / "scores.parquet")
    write_parquet(conditions_table(conditions), args.out / "conditions.parquet")
    write_record(record, args.out / "suppression.json")
    for utility in ("generative", "likelihood"):
        for method, cells in _utility(record, utility).relative_drop.items():
            plot_square(
                _matrix(cells),
                args.out / f"suppression_{utility}_{method}.png",
                f"{args.model} / {method}: relative drop (%) of {utility} when the row task's mask is zeroed",
                "relative drop (%)",
                cmap="RdBu_r",
                center=0.0,
                fmt="{:.1f}",
            )
    plot_deletion_curves(
        _utility(record, "likelihood").curve or {},
        args.out / "deletion_curves.png",
        f"{args.model}: deletion curves (likelihood, {st.confidence:.0%} intervals)",
    )


if __name__ == "__main__":
    main()
