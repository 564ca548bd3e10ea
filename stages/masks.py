"""Stage `masks@<model>`: top-rho steering masks per method and task; faithfulness metrics; plots."""

from pathlib import Path

import numpy as np

from pipeline.io import write_json, write_parquet
from pipeline.method.masks import build_masks, faithfulness, mask_size, overlap
from pipeline.method.store import read_importance
from pipeline.report.plots import plot_layer_distribution, plot_square
from stages._common import entry, parser
from stages.params import read_params

READS = ("masks.rho",)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--attribution", type=Path, required=True, help="the model's importance array (<model>.zarr)")
    p.add_argument("--out", type=Path, required=True, help="masks Parquet of the model")
    p.add_argument("--metrics", type=Path, required=True, help="attribution metrics JSON of the model")
    p.add_argument("--plots", type=Path, required=True, help="folder for the model's PNG figures")
    args = p.parse_args()
    rho = read_params(args.params, READS, model=args.model).masks.rho
    methods, tasks, importance, _ = read_importance(args.attribution)
    n_layers, n_neurons = importance.shape[2:]
    selectable = [m for m in methods if m != "ablation" or np.isfinite(importance[methods.index(m)]).all()]
    masks = build_masks(selectable, tasks, importance[[methods.index(m) for m in selectable]], rho)
    write_parquet(masks, args.out)
    k = mask_size(n_layers, n_neurons, rho)
    faith: dict = {}
    if "ablation" in selectable:
        truth = importance[methods.index("ablation")]
        for j, task in enumerate(tasks):
            faith[task] = {m: faithfulness(importance[methods.index(m), j], truth[j], k)
                           for m in methods if m != "ablation"}
    jac = overlap(masks, "hones")
    write_json({
        "mask_size": k,
        "faithfulness": faith,
        "overlap_jaccard_hones": {a: {b: round(float(jac.loc[a, b]), 4) for b in jac.columns} for a in jac.index},
    }, args.metrics)
    plot_layer_distribution(masks, n_layers, args.plots / "layer_distribution.png",
                            f"{args.model}: layers of the top {rho:.1%} neurons")
    plot_square(jac, args.plots / "overlap.png", f"{args.model}: overlap of HONES masks", "Jaccard")


if __name__ == "__main__":
    main()
