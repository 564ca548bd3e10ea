"""The verdict table: one row per claim of the method (docs/method.md sections 5-7), per model.

Each row holds the measured value, its interval and a verdict computed from the interval
(``pipeline.outcomes.statistics.verdict``: holds when the interval lies above the claim's
threshold, fails when it lies below, equivalent when it lies within the equivalence margin
around it, undecided otherwise). Inputs are the JSON the evaluate, steer and masks stages write
and, for a recipe replicated over seeds, ``suppression.replicated_differences``.

- ``verdict_rows``: the rows of one model (one trained instance; ``instances`` = 1).
- ``transfer_rows``: the rows of one model's transfer stage (masks and steering scales found in
  distribution, measured out of distribution).
- ``shared_neuron_rows``: the rows of one model's shared-neurons stage.
- ``replicated_rows``: the method comparisons of one recipe decided across its instances.
- ``verdict_summary``: how many claims of each model or recipe hold, fail, are equivalent or
  undecided (deciding utility), and each claim's verdicts side by side across them.
- ``sensitivity_message``: the sentence the report opens each model with.
- ``check_recipe_instances``: refuses a recipe whose instances were trained with different
  recipes (anything but the seed).
- ``quality_against_targets``: each default model's held-out quality against the targets it must
  reach for its verdicts to be about a model that does its tasks (``QUALITY_TARGETS``).
- ``VERDICT_COLUMNS``: the table's columns; ``verdict_metrics``: the rows as
  {model: {claim: {utility: {value, ci_low, ci_high, threshold, verdict}}}} (what
  ``dvc metrics show`` flattens into columns).
"""

from __future__ import annotations

import math

from pipeline.errors import PipelineError
from pipeline.outcomes.records import (
    AttributionRecord,
    Comparison,
    IntervalRecord,
    QualityRecord,
    Sensitivity,
    SharedNeuronsRecord,
    SteeringRecord,
    SuppressionRecord,
)
from pipeline.outcomes.statistics import verdict
from pipeline.outcomes.suppression import ReplicatedDifferences

VERDICT_COLUMNS = (
    "model",
    "instances",
    "claim",
    "utility",
    "value",
    "ci_low",
    "ci_high",
    "threshold",
    "verdict",
    "per_instance",
)
VERDICTS = ("holds", "fails", "equivalent", "undecided")
DECIDING_UTILITY = "likelihood"
_LABELS = (("on_target_drop", "on-target drop"), ("selectivity", "selectivity"))
# Generative test quality (VQA accuracy, OCR ANLS, caption BLEU-4, retrieval NDCG@5) a default model
# must reach: well above chance (retrieval NDCG@5 about 0.30 by chance), so that suppressing a task's
# neurons has an answer to break.
QUALITY_TARGETS = {"vqa": 0.85, "ocr": 0.80, "caption": 0.40, "retrieval": 0.80}


def check_recipe_instances(recipe: str, specs: dict[str, dict | None]) -> None:
    """Raise PipelineError unless the instances of ``recipe`` were trained with one recipe.

    ``specs``: {instance: the ``spec`` of its training record, or None for a model without one
    (a brought model, which is taken as given)}. The recorded specs must agree in every field but
    ``seed``; the error names the instances and the fields that differ.
    """
    recorded = {name: {k: v for k, v in spec.items() if k != "seed"} for name, spec in specs.items() if spec}
    if not recorded:
        return
    first, want = next(iter(recorded.items()))
    for name, spec in recorded.items():
        fields = sorted(k for k in want.keys() | spec.keys() if want.get(k) != spec.get(k))
        if fields:
            raise PipelineError(
                f"replicates.{recipe}: {name} was trained with another recipe than {first} "
                f"(differing: {', '.join(f'{k} {spec.get(k)!r} vs {want.get(k)!r}' for k in fields)}); "
                "a recipe's instances may differ only in the seed"
            )


def quality_against_targets(quality: dict[str, QualityRecord]) -> dict[str, dict]:
    """{model: {task: {value, target, met}}, "all_met": bool} from each model's
    ``metrics/model_quality`` record (its ``generative`` utilities); tasks without a target or a
    value are left out."""
    out: dict[str, dict] = {}
    for model, q in quality.items():
        gen = q.generative or {}
        cells = {
            t: {"value": gen[t], "target": target, "met": bool(gen[t] >= target)}
            for t, target in QUALITY_TARGETS.items()
            if t in gen and gen[t] is not None
        }
        if cells:
            out[model] = {**cells, "all_met": all(c["met"] for c in cells.values())}
    return out


def _row(
    model: str,
    claim: str,
    utility: str,
    iv: IntervalRecord,
    threshold: float,
    verdict: str,
    instances: int = 1,
    per_instance: dict | None = None,
) -> dict:
    return {
        "model": model,
        "instances": instances,
        "claim": claim,
        "utility": utility,
        "value": iv.value,
        "ci_low": iv.ci_low,
        "ci_high": iv.ci_high,
        "threshold": threshold,
        "verdict": verdict,
        "per_instance": per_instance,
    }


def _comparison_claim(comparison: Comparison, label: str) -> str:
    who = "HONES" if comparison.method == "hones" else comparison.method
    return f"{who} {label} exceeds {comparison.baseline}'s"


def _finite(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]


def verdict_rows(
    model: str,
    suppression: SuppressionRecord,
    steering: SteeringRecord,
    attribution: AttributionRecord,
    steer_utility: str = "generative",
) -> list[dict]:
    """Rows (``VERDICT_COLUMNS``) of one model from the records of its ``suppression.json``
    (evaluate stage), ``steering_intervals.json`` (steer stage) and attribution metrics (masks stage).

    Claims: HONES's on-target drop exceeds each baseline's; its selectivity exceeds each
    baseline's (and the same for the extra comparisons of ``suppression.EXTRA_COMPARISONS``,
    e.g. hones_lp against hones); learned steering beats Grid-Search (mean utility over tasks); task neurons prefer
    different layers (Cramér's V above its permutation null); and the evaluation's sensitivity
    (the ground truth's own top set drops its task, interval half-width at most a third of it).
    Likelihood rows decide; generative rows are reported beside them.
    """
    rows: list[dict] = []
    for utility in (DECIDING_UTILITY, "generative"):
        us = suppression.of(utility)
        diffs = (us.differences if us is not None else None) or {}
        for key, label in _LABELS:
            for comparison, d in diffs.items():
                iv = getattr(d, key)
                rows.append(_row(model, _comparison_claim(comparison, label), utility, iv, 0.0, iv.verdict))
    for utility in dict.fromkeys((DECIDING_UTILITY, steer_utility)):
        st = steering.of(utility)
        d = st.mean_difference("learned", "grid_search") if st is not None else None
        if d is not None:
            rows.append(_row(model, "learned steering beats Grid-Search (mean over tasks)", utility, d, 0.0, d.verdict))
    pref = attribution.layer_preference_hones
    if pref is not None:
        rows.append(
            _row(
                model,
                "task neurons prefer different layers (Cramér's V of HONES masks)",
                "-",
                pref.cramers_v,
                pref.null_q95,
                pref.verdict,
            )
        )
    sens = suppression.likelihood.sensitivity
    if sens is not None:
        iv = sens.ground_truth_on_target_drop
        ok = sens.half_width_within_third
        verdict = "holds" if ok else ("fails" if iv.ci_high is not None and iv.ci_high < 0 else "undecided")
        rows.append(
            _row(
                model,
                "sensitivity: the ground truth's top set drops its task (half-width <= value/3)",
                DECIDING_UTILITY,
                iv,
                0.0,
                verdict,
            )
        )
    return _finite(rows)


_TRANSFER_STEERING = {
    Comparison("learned", "base"): "learned steering scales improve utility over base (mean over tasks)",
    Comparison("learned", "grid_search"): "learned steering scales beat Grid-Search (mean over tasks)",
}


def transfer_rows(
    model: str,
    suppression: SuppressionRecord | None,
    steering: SteeringRecord | None,
    steer_utility: str,
    margin: float,
    ood_set: str | None = None,
) -> list[dict]:
    """Rows (``VERDICT_COLUMNS``) of one model's transfer stage: the records of its
    ``suppression.json`` and ``steering_intervals.json`` on out-of-distribution items (None when
    it measured nothing): the benchmark's ood split, or the set you brought named ``ood_set``
    (a transfer_ood stage; its name is in each claim).

    Claims: HONES's in-domain masks still drop their task out of distribution (on-target drop
    above 0, ``margin`` percentage points of equivalence), and more than random masks do; the
    in-domain learned scales improve the mean utility over base and over Grid-Search (both
    chosen in distribution). Likelihood rows decide; generative rows are reported beside them.
    """
    where = "out of distribution" if ood_set is None else f"out of distribution ({ood_set})"
    rows: list[dict] = []
    for utility in (DECIDING_UTILITY, "generative"):
        u = suppression.of(utility) if suppression is not None else None
        if u is None:
            continue
        if "hones" in u.summary:
            drop = u.summary["hones"].on_target_drop
            claim = f"{where}: HONES masks drop their task (on-target drop)"
            rows.append(_row(model, claim, utility, drop, 0.0, verdict(drop.to_interval(), 0.0, margin)))
        diff = u.difference("hones", "random")
        if diff is not None:
            claim = f"{where}: HONES on-target drop exceeds random's"
            rows.append(_row(model, claim, utility, diff.on_target_drop, 0.0, diff.on_target_drop.verdict))
    for utility in dict.fromkeys((DECIDING_UTILITY, steer_utility)):
        st = steering.of(utility) if steering is not None else None
        if st is None:
            continue
        for comparison, claim in _TRANSFER_STEERING.items():
            d = st.mean_difference(*comparison)
            if d is not None:
                rows.append(_row(model, f"{where}: {claim}", utility, d, 0.0, d.verdict))
    return _finite(rows)


_SHARED_CLAIMS = {
    "vqa_pairs_minus_others": "neurons shared with VQA have the largest cross-task effect "
    "(pairs with VQA minus the others)",
    "shared_minus_subset": "shared neurons drop their pair's tasks more than as many other neurons of the masks",
}


def shared_neuron_rows(model: str, shared: SharedNeuronsRecord) -> list[dict]:
    """Rows (``VERDICT_COLUMNS``) of one model's shared-neurons stage (the record of its
    ``shared.json``; no rows when no pair of masks shares a neuron): its two claims, in relative
    drop (%)."""
    decided = [(getattr(shared.claims, key), claim) for key, claim in _SHARED_CLAIMS.items()]
    return _finite([_row(model, claim, shared.utility, d, 0.0, d.verdict) for d, claim in decided if d is not None])


def replicated_rows(recipe: str, replicated: ReplicatedDifferences) -> list[dict]:
    """Rows (``VERDICT_COLUMNS``) of one recipe from ``suppression.replicated_differences``: each
    method comparison decided across its instances (``instances`` of them; ``per_instance``
    holds each instance's own value)."""
    rows = []
    n = len(replicated.instances)
    for utility in (DECIDING_UTILITY, "generative"):
        for key, label in _LABELS:
            for comparison, figures in replicated.of(utility).items():
                f = figures[key]
                rows.append(
                    _row(
                        recipe,
                        _comparison_claim(comparison, label),
                        utility,
                        IntervalRecord.model_construct(value=f.value, ci_low=f.ci_low, ci_high=f.ci_high),
                        0.0,
                        f.verdict,
                        instances=n,
                        per_instance=f.per_instance,
                    )
                )
    return _finite(rows)


def verdict_metrics(rows: list[dict]) -> dict:
    """Rows nested as {model: {claim: {utility: {value, ci_low, ci_high, threshold, verdict, instances}}}}
    (and ``per_instance`` where the row has it)."""
    out: dict = {}
    for r in rows:
        cell = {k: r[k] for k in ("value", "ci_low", "ci_high", "threshold", "verdict", "instances")}
        if r.get("per_instance"):
            cell["per_instance"] = r["per_instance"]
        out.setdefault(r["model"], {}).setdefault(r["claim"], {})[r["utility"]] = cell
    return out


def combined_verdict(verdicts: list[str]) -> str:
    """One claim's verdict over several models or recipes: the shared verdict when all agree,
    "mixed" when some hold and others fail, else "undecided"."""
    if verdicts and len(set(verdicts)) == 1:
        return verdicts[0]
    return "mixed" if {"holds", "fails"} <= set(verdicts) else "undecided"


def verdict_summary(rows: list[dict], across: list[str], recipes: dict[str, list[str]] | None = None) -> dict:
    """{"counts": {model or recipe: {verdict: n}}, "across": {claim: {"verdicts": {model: verdict},
    "verdict": combined}}} over the deciding utility's rows; ``across`` names the models (or recipes) whose
    verdicts are set side by side (claims that all of them have).

    ``recipes`` ({recipe: instances}): a claim a recipe has no row of (one decided per instance:
    steering, layer preference, sensitivity) takes the ``combined_verdict`` of its instances' rows,
    so it holds for the recipe only when it holds on every seed; "decided_by" says which claims
    were decided that way ("every instance") and which by the bootstrap across instances.
    """
    by_model: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["utility"] in (DECIDING_UTILITY, "-"):
            by_model.setdefault(r["model"], {})[r["claim"]] = r["verdict"]
    decided_by: dict[str, dict[str, str]] = {}
    for recipe, instances in (recipes or {}).items():
        own = by_model.setdefault(recipe, {})
        decided_by[recipe] = {c: "bootstrap across instances" for c in own}
        claims = set.intersection(*(set(by_model.get(m, {})) for m in instances)) if instances else set()
        for claim in sorted(claims - set(own)):
            own[claim] = combined_verdict([by_model[m][claim] for m in instances])
            decided_by[recipe][claim] = "every instance"
    counts = {
        m: {
            v: sum(1 for got in claims.values() if got == v)
            for v in (*VERDICTS, *(["mixed"] if "mixed" in claims.values() else []))
        }
        for m, claims in by_model.items()
    }
    by_claim: dict[str, dict[str, str]] = {}
    for model in across:
        for claim, v in by_model.get(model, {}).items():
            by_claim.setdefault(claim, {})[model] = v
    out = {
        "counts": counts,
        "across": {
            c: {"verdicts": v, "verdict": combined_verdict(list(v.values()))}
            for c, v in by_claim.items()
            if set(v) == set(across)
        },
    }
    if decided_by:
        out["decided_by"] = decided_by
    return out


def sensitivity_message(sensitivity: Sensitivity) -> str:
    """One sentence on whether the evaluation can see the ground truth's own effect."""
    iv = sensitivity.ground_truth_on_target_drop
    if sensitivity.half_width_within_third:
        return (
            f"The ground truth's own top set drops its task by {iv.value:.2f}% "
            f"[{iv.ci_low:.2f}, {iv.ci_high:.2f}]: the evaluation can see effects of this size."
        )
    return (
        f"The ground truth's own top set drops its task by {iv.value:.2f}% "
        f"[{iv.ci_low:.2f}, {iv.ci_high:.2f}]: the evaluation cannot see effects of this size: "
        "raise rho or the number of test items."
    )
