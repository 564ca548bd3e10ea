"""Stage `masks@<model>`: steering masks per method and task over the deletion-curve sizes;
faithfulness to the ablation ground truth (of the importance the masks use, from every
discovery item, and of the importance from only the ground truth's items); layer preference; plots."""

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import write_parquet
from pipeline.method.masks import build_masks, faithfulness, mask_size, overlap
from pipeline.method.store import read_importance, read_importance_on_ablation_items
from pipeline.outcomes.records import AttributionRecord, as_record, write_record
from pipeline.outcomes.statistics import layer_preference, verdict
from pipeline.report.plots import plot_layer_distribution, plot_square
from stages._common import entry, parser, report_rows
from stages.params import read_params

READS = (
    "masks.rho",
    "masks.rho_grid",
    "masks.random_draws",
    "masks.seed",
    "statistics.bootstrap_resamples",
    "statistics.seed",
)


def ablation_se(folder: Path, tasks: list[str], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """{task: [layer, neuron] standard error of the ablation effect} for the tasks that have one."""
    out = {}
    for task in tasks:
        path = folder / f"{task}.parquet"
        if not path.is_file():
            continue
        t = pd.read_parquet(path)
        if len(t) and "se" in t:
            se = np.full(shape, np.nan)
            se[t["layer"].to_numpy(), t["neuron"].to_numpy()] = t["se"].to_numpy()
            out[task] = se
    return out


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--attribution", type=Path, required=True, help="the model's importance array (<model>.zarr)")
    p.add_argument("--ablation", type=Path, required=True, help="folder of the ablation <task>.parquet (effect, se)")
    p.add_argument("--out", type=Path, required=True, help="masks Parquet of the model")
    p.add_argument("--metrics", type=Path, required=True, help="attribution metrics JSON of the model")
    p.add_argument("--plots", type=Path, required=True, help="folder for the model's PNG figures")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg, st = params.masks, params.statistics
    methods, tasks, importance, _ = read_importance(args.attribution)
    n_layers, n_neurons = importance.shape[2:]
    selectable = [m for m in methods if m != "ablation" or np.isfinite(importance[methods.index(m)]).all()]
    masks = build_masks(
        selectable,
        tasks,
        importance[[methods.index(m) for m in selectable]],
        cfg.rho_grid,
        cfg.rho,
        random_draws=cfg.random_draws,
        seed=cfg.seed,
    )
    write_parquet(masks, args.out)
    report_rows(len(masks.groupby(["method", "task", "rho", "draw"])), "masks")
    k = mask_size(n_layers, n_neurons, cfg.rho)
    faith: dict = {}
    matched: dict = {}
    if "ablation" in selectable:
        truth = importance[methods.index("ablation")]
        se = ablation_se(args.ablation, tasks, (n_layers, n_neurons))
        on_items = read_importance_on_ablation_items(args.attribution)
        for j, task in enumerate(tasks):
            faith[task] = {
                m: faithfulness(importance[methods.index(m), j], truth[j], k, se.get(task))
                for m in methods
                if m != "ablation"
            }
            if task in se:
                faith[task]["ground_truth_se"] = {
                    "median": float(np.nanmedian(se[task])),
                    "max": float(np.nanmax(se[task])),
                }
            if on_items is not None:
                matched[task] = {
                    m: faithfulness(on_items[methods.index(m), j], truth[j], k, se.get(task))
                    for m in methods
                    if m not in ("ablation", "random")
                }
    headline = masks[masks["headline"] & (masks["draw"] == 0)]
    jac = overlap(masks, "hones")
    metrics = {
        "mask_size": k,
        "faithfulness": faith,
        # The same, each method computed from only the ground truth's items (the masks use all items).
        "faithfulness_on_ablation_items": matched,
        "overlap_jaccard_hones": {a: {b: round(float(jac.loc[a, b]), 4) for b in jac.columns} for a in jac.index},
    }
    # Layer preference compares tasks: a study of one task has none (and no verdict row for it).
    if len(tasks) > 1:
        pref = layer_preference(
            headline[headline["method"] == "hones"], n_layers, np.random.default_rng(st.seed), st.bootstrap_resamples
        )
        metrics["layer_preference_hones"] = {
            "cramers_v": pref["interval"].as_dict(),
            "null_q95": round(pref["null_q95"], 4),
            "p_value": round(pref["p_value"], 4),
            "verdict": verdict(pref["interval"], pref["null_q95"]),
        }
    write_record(as_record(AttributionRecord, metrics, f"attribution metrics of {args.model}"), args.metrics)
    plot_layer_distribution(
        headline,
        n_layers,
        args.plots / "layer_distribution.png",
        f"{args.model}: layers of the top {cfg.rho:.1%} neurons",
    )
    plot_square(jac, args.plots / "overlap.png", f"{args.model}: overlap of HONES masks", "Jaccard")


if __name__ == "__main__":
    main()
