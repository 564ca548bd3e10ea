"""Stage `evaluate@<model>`: cross-task suppression matrices on the held-out split."""

from pathlib import Path

import pandas as pd

from pipeline.io import write_json, write_parquet
from pipeline.outcomes.suppression import suppression_matrices, suppression_summary, suppression_table
from pipeline.report.plots import plot_square
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model
from stages.params import ConfigError, read_params

READS = (
    "evaluate.split", "evaluate.max_items", "evaluate.methods", "evaluate.utility",
    "runtime.threads", "runtime.batch_sequences", "runtime.max_new_tokens",
    "tasks", "models.{model}",
)


def selected_masks(masks: pd.DataFrame, methods: list[str] | None, tasks: list[str], source: Path) -> pd.DataFrame:
    """The rows of ``methods`` (default: all) and ``tasks``; an unknown method is a ConfigError."""
    methods = methods or list(dict.fromkeys(masks["method"]))
    unknown = sorted(set(methods) - set(masks["method"]))
    if unknown:
        raise ConfigError(f"evaluate.methods: {unknown} not in {source}; available: {sorted(set(masks['method']))}")
    return masks[masks["method"].isin(methods) & masks["task"].isin(tasks)]


def suppression_metrics(table: pd.DataFrame) -> dict:
    """Baseline utilities, the relative-drop matrix (%) and its summary, per method."""
    matrices = suppression_matrices(table)
    baseline = table.drop_duplicates("eval_task").set_index("eval_task")["baseline"].to_dict()
    return {
        "baseline": {t: round(v, 6) for t, v in baseline.items()},
        "relative_drop": {m: {t: {s: round(float(v), 4) for s, v in row.items()} for t, row in mat.iterrows()}
                          for m, mat in matrices.items()},
        "summary": {m: {k: round(v, 4) for k, v in suppression_summary(mat).items()} for m, mat in matrices.items()},
    }


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: table, metrics JSON and heatmaps")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg, rt, tasks = params.evaluate, params.runtime, params.tasks
    masks = selected_masks(pd.read_parquet(args.masks), cfg.methods, tasks, args.masks)
    items = load_items(args.benchmark, (cfg.split,), tuple(tasks), cfg.max_items)
    adapter = load_model(params, args.model)
    table = suppression_table(adapter, items, load_images(args.benchmark), masks,
                              batch_size=rt.batch_sequences, max_new_tokens=rt.max_new_tokens, utility=cfg.utility)
    write_parquet(table, args.out / "suppression.parquet")
    write_json(suppression_metrics(table), args.out / "suppression.json")
    for method, mat in suppression_matrices(table).items():
        plot_square(mat, args.out / f"suppression_{method}.png",
                    f"{args.model} / {method}: relative drop (%) when the row task's mask is zeroed",
                    "relative drop (%)", cmap="RdBu_r", center=0.0, fmt="{:.1f}")


if __name__ == "__main__":
    main()
