"""Stage `masks`: top-rho steering masks per model, method and task; faithfulness metrics; plots."""

from pathlib import Path

import numpy as np

from stages.params import MasksConfig
from pipeline.io import write_json, write_parquet
from pipeline.method.masks import build_masks, faithfulness, mask_size, overlap
from pipeline.report.html.plots import plot_layer_distribution, plot_square
from pipeline.method.store import read_importance
from stages._common import entry, load_params, parser, section, studied_models


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--attribution", type=Path, required=True, help="folder of <model>.zarr arrays")
    p.add_argument("--out", type=Path, required=True, help="folder for <model>.parquet masks")
    p.add_argument("--metrics", type=Path, required=True, help="attribution metrics JSON")
    p.add_argument("--plots", type=Path, required=True, help="folder for PNG figures")
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "masks", MasksConfig)
    report = {}
    for model in studied_models(params):
        methods, tasks, importance, _ = read_importance(args.attribution / f"{model}.zarr")
        L, I = importance.shape[2:]
        selectable = [m for m in methods if m != "ablation" or np.isfinite(importance[methods.index(m)]).all()]
        sel = importance[[methods.index(m) for m in selectable]]
        masks = build_masks(selectable, tasks, sel, cfg.rho)
        write_parquet(masks, args.out / f"{model}.parquet")
        k = mask_size(L, I, cfg.rho)
        faith: dict = {}
        if "ablation" in selectable:
            truth = importance[methods.index("ablation")]
            for j, task in enumerate(tasks):
                faith[task] = {m: faithfulness(importance[methods.index(m), j], truth[j], k)
                               for m in methods if m != "ablation"}
        jac = overlap(masks, "hones")
        report[model] = {
            "mask_size": k,
            "faithfulness": faith,
            "overlap_jaccard_hones": {a: {b: round(float(jac.loc[a, b]), 4) for b in jac.columns} for a in jac.index},
        }
        plot_layer_distribution(masks, L, args.plots / f"{model}_layer_distribution.png",
                                f"{model}: layers of the top {cfg.rho:.1%} neurons")
        plot_square(jac, args.plots / f"{model}_overlap.png", f"{model}: overlap of HONES masks", "Jaccard")
    write_json(report, args.metrics)


if __name__ == "__main__":
    main()
