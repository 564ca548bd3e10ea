"""The verdict table: one row per claim of the method (HONES.md sections 5-7), per model.

Each row holds the measured value, its interval and a verdict computed from the interval
(``pipeline.outcomes.statistics.verdict``: holds when the interval lies above the claim's
threshold, fails when it lies below, undecided when it contains it). Inputs are the JSON the
evaluate, steer and masks stages write; nothing is recomputed here.

- ``verdict_rows``: the rows of one model.
- ``sensitivity_message``: the sentence the report opens each model with.
- ``VERDICT_COLUMNS``: the table's columns; ``verdict_metrics``: the rows as
  {model: {claim: {utility: {value, ci_low, ci_high, threshold, verdict}}}} (what
  ``dvc metrics show`` flattens into columns).
"""

from __future__ import annotations

import math

VERDICT_COLUMNS = ("model", "claim", "utility", "value", "ci_low", "ci_high", "threshold", "verdict")
DECIDING_UTILITY = "likelihood"


def _row(model: str, claim: str, utility: str, iv: dict, threshold: float, verdict: str) -> dict:
    return {"model": model, "claim": claim, "utility": utility, "value": iv.get("value"),
            "ci_low": iv.get("ci_low"), "ci_high": iv.get("ci_high"), "threshold": threshold, "verdict": verdict}


def verdict_rows(model: str, suppression: dict, steering: dict, attribution: dict,
                 steer_utility: str = "generative") -> list[dict]:
    """Rows (``VERDICT_COLUMNS``) of one model from its ``suppression.json`` (evaluate stage),
    ``steering_intervals.json`` (steer stage) and attribution metrics (masks stage).

    Claims: HONES's on-target drop exceeds each baseline's; its selectivity exceeds each
    baseline's (and the same for the extra comparisons of ``suppression.EXTRA_COMPARISONS``,
    e.g. hones_lp against hones); learned steering beats Grid-Search (mean utility over tasks); task neurons prefer
    different layers (Cramér's V above its permutation null); and the evaluation's sensitivity
    (the ground truth's own top set drops its task, interval half-width at most a third of it).
    Likelihood rows decide; generative rows are reported beside them.
    """
    rows: list[dict] = []
    for utility in (DECIDING_UTILITY, "generative"):
        diffs = suppression.get(utility, {}).get("differences", {})
        for key, label in (("on_target_drop", "on-target drop"), ("selectivity", "selectivity")):
            for name, d in diffs.items():
                method, baseline = name.split("-minus-", 1)
                who = "HONES" if method == "hones" else method
                rows.append(_row(model, f"{who} {label} exceeds {baseline}'s", utility, d[key], 0.0, d[key]["verdict"]))
    for utility in dict.fromkeys((DECIDING_UTILITY, steer_utility)):
        d = steering.get(utility, {}).get("differences", {}).get("learned-minus-grid_search", {}).get("mean")
        if d:
            rows.append(_row(model, "learned steering beats Grid-Search (mean over tasks)", utility, d, 0.0,
                             d["verdict"]))
    pref = attribution.get("layer_preference_hones")
    if pref:
        rows.append(_row(model, "task neurons prefer different layers (Cramér's V of HONES masks)", "-",
                         pref["cramers_v"], pref["null_q95"], pref["verdict"]))
    sens = suppression.get(DECIDING_UTILITY, {}).get("sensitivity")
    if sens:
        iv = sens["ground_truth_on_target_drop"]
        ok = sens["half_width_within_third"]
        verdict = "holds" if ok else ("fails" if iv.get("ci_high") is not None and iv["ci_high"] < 0 else "undecided")
        rows.append(_row(model, "sensitivity: the ground truth's top set drops its task (half-width <= value/3)",
                         DECIDING_UTILITY, iv, 0.0, verdict))
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]


def verdict_metrics(rows: list[dict]) -> dict:
    """``verdict_rows`` output nested as {model: {claim: {utility: {value, ci_low, ci_high, threshold, verdict}}}}."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["model"], {}).setdefault(r["claim"], {})[r["utility"]] = {
            k: r[k] for k in ("value", "ci_low", "ci_high", "threshold", "verdict")}
    return out


def sensitivity_message(sensitivity: dict) -> str:
    """One sentence on whether the evaluation can see the ground truth's own effect."""
    iv = sensitivity["ground_truth_on_target_drop"]
    if sensitivity["half_width_within_third"]:
        return (f"The ground truth's own top set drops its task by {iv['value']:.2f}% "
                f"[{iv['ci_low']:.2f}, {iv['ci_high']:.2f}]: the evaluation can see effects of this size.")
    return (f"The ground truth's own top set drops its task by {iv['value']:.2f}% "
            f"[{iv['ci_low']:.2f}, {iv['ci_high']:.2f}]: the evaluation cannot see effects of this size: "
            "raise rho or the number of test items.")
