"""How small a sampled ground truth can be: interval coverage at other ``ablation.sample`` shares.

For every studied model whose attribution holds the exhaustive ground truth (the embedded
default), the sample ``sampled_ground_truth`` would draw at each (near, far) pair is taken from
the exhaustive effects (the measured sample's effects equal them to float rounding:
``metrics/sampled_ground_truth.json``, ``effect_max_abs_difference``), and every method's figures
are estimated from it as the report does. Printed per pair: the share of neurons zeroed, and how
many exhaustive values lie inside their sampled 95% interval. No model runs.

    python benchmarks/bench_sample_shares.py [--shares 1.0,0.5 0.5,0.25 0.25,0.125]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import REPO, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data")
    p.add_argument("--metrics", type=Path, default=REPO / "metrics")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--shares", nargs="+", default=["1.0,0.5", "0.5,0.25", "0.25,0.125"], help="near,far pairs")
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args(argv)

    import numpy as np
    import yaml

    from pipeline.method.store import read_importance
    from pipeline.outcomes.sampled_faithfulness import census_methods, draw_sample, sampled_ground_truth

    params = yaml.safe_load(args.params.read_text())
    seed = params["ablation"]["sample"]["seed"]
    arrays = {}
    for m in params["studied_models"]:
        path = args.data / "attribution" / f"{m}.zarr"
        if not path.exists():
            print(f"skipped: {path} not found; run `dvc repro` (or `dvc pull`) first.")
            return 0
        stored, tasks, importance, _ = read_importance(path)
        if "ablation" not in stored or not np.isfinite(importance[stored.index("ablation")]).all():
            continue  # no exhaustive ground truth to take the sample's effects from
        k = json.loads((args.metrics / "attribution" / f"{m}.json").read_text())["mask_size"]
        arrays[m] = (stored, tasks, importance, k, census_methods(params["evaluate"]["methods"], stored))
    rows = []
    for pair in args.shares:
        near, far = (float(x) for x in pair.split(","))
        within = figures = 0
        zeroed = []
        for m, (stored, tasks, importance, k, methods) in arrays.items():
            scores, measured, exhaustive = {}, {}, {}
            for index, task in enumerate(params["tasks"]):
                j = tasks.index(task)
                scores[task] = {x: importance[stored.index(x), j] for x in methods}
                truth = importance[stored.index("ablation"), j].astype(np.float64)
                sample = draw_sample(scores[task], k, near=near, far=far, seed=seed, index=index)
                measured[task] = (sample, np.where(sample.sampled, truth, np.nan))
                exhaustive[task] = truth
                zeroed.append(float(sample.sampled.mean()))
            out = sampled_ground_truth(
                scores,
                measured,
                k,
                exhaustive=exhaustive,
                n_resamples=args.resamples,
                seed=params["statistics"]["seed"],
            )
            within, figures = within + out["within"], figures + out["figures"]
        rows.append(
            (near, far, f"{min(zeroed):.1%} - {max(zeroed):.1%}", f"{within} of {figures}", within / max(figures, 1))
        )
    print(f"{len(arrays)} models with an exhaustive ground truth; 95% intervals, {args.resamples} resamples")
    print(table(("near", "far", "neurons zeroed", "exhaustive inside the interval", "share"), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
