"""Stage `evaluate@<model>`: cross-task suppression matrices on the test split."""

from pathlib import Path

import pandas as pd

from stages.params import ConfigError, EvaluateConfig
from pipeline.io import write_json, write_parquet
from pipeline.report.html.plots import plot_square
from pipeline.outcomes.suppression import suppression_matrices, suppression_summary, suppression_table
from stages._common import entry, load_images, load_items, load_model, load_params, parser, runtime, section, study_tasks


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: table, metrics JSON and heatmaps")
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "evaluate", EvaluateConfig)
    rt = runtime(params)
    tasks = study_tasks(params)
    masks = pd.read_parquet(args.masks)
    methods = cfg.methods or list(dict.fromkeys(masks["method"]))
    unknown = sorted(set(methods) - set(masks["method"]))
    if unknown:
        raise ConfigError(f"evaluate.methods: {unknown} not in {args.masks}; available: {sorted(set(masks['method']))}")
    masks = masks[masks["method"].isin(methods) & masks["task"].isin(tasks)]
    items = load_items(args.benchmark, (cfg.split,), tuple(tasks), cfg.max_items)
    adapter = load_model(params, args.model)
    table = suppression_table(adapter, items, load_images(args.benchmark), masks,
                              batch_size=rt.batch_size, max_new_tokens=rt.max_new_tokens, utility=cfg.utility)
    write_parquet(table, args.out / "suppression.parquet")
    matrices = suppression_matrices(table)
    baseline = table.drop_duplicates("eval_task").set_index("eval_task")["baseline"].to_dict()
    write_json(
        {
            "baseline": {t: round(v, 6) for t, v in baseline.items()},
            "relative_drop": {m: {t: {s: round(float(v), 4) for s, v in row.items()} for t, row in mat.iterrows()}
                              for m, mat in matrices.items()},
            "summary": {m: {k: round(v, 4) for k, v in suppression_summary(mat).items()} for m, mat in matrices.items()},
        },
        args.out / "suppression.json",
    )
    for method, mat in matrices.items():
        plot_square(mat, args.out / f"suppression_{method}.png",
                    f"{args.model} / {method}: relative drop (%) when the row task's mask is zeroed",
                    "relative drop (%)", cmap="RdBu_r", center=0.0, fmt="{:.1f}")


if __name__ == "__main__":
    main()
