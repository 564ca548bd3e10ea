"""A ground truth that scales: faithfulness from the exact effect of a sample of neurons.

The exhaustive ground truth zeroes every one of the L x I neurons on every ablation item
(``pipeline.method.ablation``): 5.6 million forward rows per task for LLaVA-1.5-7B at 16 items.
A stratified sample zeroes far fewer:

- a census: the top ``k`` neurons of every method compared, whose exact effects decide
  precision@k and the captured effect of those methods;
- a "near" stratum: the neurons some method ranks in its top ``near * k`` but not its top k,
  where the ground truth's top k is most likely to hold neurons the census missed, sampled
  densely;
- a "far" stratum: every other neuron, sampled sparsely.

Each sampled neuron of a stratum stands for N_h / n_h of its stratum's neurons (1 in the census).

- ``NeuronSample`` / ``sample_neurons``: the strata as boolean [layer, neuron] masks;
  ``census_methods``: the methods a census covers; ``draw_sample``: the sample of one task the ``sampled_ground_truth`` stage zeroes (strata sized
  from the census); ``sample_table`` / ``sample_from_table``: a sample and its measured effects
  as rows and back.
- ``sampled_faithfulness``: ``pipeline.method.masks.faithfulness``'s spearman, precision_at_k and
  captured_effect estimated from the sample's effects alone, each with a percentile interval
  from a bootstrap within each random stratum (the census is fixed).
- ``sampled_ground_truth``: per task, every method's figures from a measured sample, beside the
  exhaustive figures where the model has those too (the embedded default).

The estimators use those inclusion weights: the ground truth's k-th largest effect is the
threshold tau where the weighted count of sampled effects above it reaches k; precision@k is
the share of a method's top k (all in the census) with effect >= tau; the captured effect
divides the effect over a method's top k by the weighted sum of the effects >= tau; Spearman
is the weighted Pearson correlation of the population ranks each sampled neuron is estimated to
hold under the method and under the ground truth. With every neuron sampled (all weights 1)
they equal the exhaustive figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

# The strata of a sample, as ``sample_table`` names them.
STRATA = ("census", "near", "far")


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest finite values, ties broken by position (as ``faithfulness``)."""
    flat = values.ravel().astype(np.float64)
    return np.argsort(-np.where(np.isfinite(flat), flat, -np.inf), kind="stable")[:k]


@dataclass(frozen=True)
class NeuronSample:
    """Which neurons a sampled ground truth zeroes: ``census`` [layer, neuron] (all measured,
    weight 1), and per random stratum its population and its sampled neurons (both [layer,
    neuron] masks; the sampled ones weigh population / sampled)."""

    census: np.ndarray
    strata: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def sampled(self) -> np.ndarray:
        """Every neuron to zero [layer, neuron]."""
        out = self.census.copy()
        for _, drawn in self.strata:
            out |= drawn
        return out

    def sizes(self) -> dict[str, int]:
        out = {"population": int(self.census.size), "census": int(self.census.sum())}
        for name, (population, drawn) in zip(("near", "far"), self.strata):
            out[f"{name}_population"], out[name] = int(population.sum()), int(drawn.sum())
        return out


def sample_neurons(
    scores: dict[str, np.ndarray], k: int, n_near: int, n_far: int, rng: np.random.Generator, near: int = 4
) -> NeuronSample:
    """The census (every method's top ``k``), ``n_near`` neurons drawn without replacement from
    those some method ranks in its top ``near * k`` but no method in its top k, and ``n_far``
    from the rest (all of a stratum when it has fewer). ``scores``: {method: [layer, neuron]}."""
    if not scores:
        raise PipelineError("sample_neurons needs the scores of at least one method")
    shape = next(iter(scores.values())).shape
    census, close = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for method, s in scores.items():
        if s.shape != shape:
            raise PipelineError(f"sample_neurons: {method} scores have shape {s.shape}, expected {shape}")
        census.flat[_top(s, k)] = True
        close.flat[_top(s, near * k)] = True
    strata = []
    for population, n in ((close & ~census, n_near), (~close, n_far)):
        drawn = np.zeros(shape, dtype=bool)
        members = np.flatnonzero(population)
        drawn.flat[rng.choice(members, size=min(n, members.size), replace=False)] = True
        strata.append((population, drawn))
    return NeuronSample(census, tuple(strata))


def census_methods(evaluated: list[str], stored: list[str]) -> list[str]:
    """The methods whose top neurons a sample's census holds: the ``evaluated`` ones
    (``evaluate.methods``) but the ground truth itself; PipelineError naming ``evaluate.methods``
    for one the importance array's ``stored`` methods lack, or for none at all."""
    methods = [m for m in evaluated if m != "ablation"]
    missing = [m for m in methods if m not in stored]
    if missing:
        raise PipelineError(f"evaluate.methods: {missing} not among the attribution's methods {stored}")
    if not methods:
        raise PipelineError("evaluate.methods: a sampled ground truth needs at least one method besides ablation")
    return methods


def draw_sample(
    scores: dict[str, np.ndarray], k: int, *, near: float, far: float, seed: int, index: int
) -> NeuronSample:
    """The sample a sampled ground truth zeroes for one task (``sample_neurons``): the census
    (every method of ``scores``' top ``k``), int(``near`` x its size) neurons of the near stratum
    and int(``far`` x its size) of the rest, drawn by a generator seeded with (``seed``, 28,
    ``index``), ``index`` the task's position."""
    if near < 0 or far < 0:
        raise PipelineError(f"draw_sample: near and far are shares of the census, >= 0; got {near}, {far}")
    n = int(sample_neurons(scores, k, 0, 0, np.random.default_rng(0)).census.sum())
    return sample_neurons(scores, k, int(near * n), int(far * n), np.random.default_rng([seed, 28, index]))


def sample_table(sample: NeuronSample, effect: np.ndarray, se: np.ndarray) -> pd.DataFrame:
    """Every neuron of the model as a row (layer, neuron, stratum, sampled, effect, se): its
    stratum (``STRATA``), whether it was zeroed, and its measured effect and standard error
    (nats; NaN where not sampled); ``sample_from_table`` reads it back."""
    shape = sample.census.shape
    if effect.shape != shape or se.shape != shape:
        raise PipelineError(f"sample_table: effects of shape {effect.shape} / {se.shape}, sample {shape}")
    stratum = np.zeros(shape, dtype=np.int8)
    for code, (population, _) in enumerate(sample.strata, start=1):
        stratum[population] = code
    sampled = sample.sampled
    layers, neurons = np.indices(shape)
    return pd.DataFrame(
        {
            "layer": layers.ravel().astype(np.int32),
            "neuron": neurons.ravel().astype(np.int32),
            "stratum": pd.Categorical.from_codes(stratum.ravel(), categories=list(STRATA)),
            "sampled": sampled.ravel(),
            "effect": np.where(sampled, effect, np.nan).ravel().astype(np.float64),
            "se": np.where(sampled, se, np.nan).ravel().astype(np.float64),
        }
    )


def sample_from_table(table: pd.DataFrame, what: str) -> tuple[NeuronSample, np.ndarray]:
    """(sample, effect [layer, neuron]) of a ``sample_table``; PipelineError naming ``what`` (the
    file, the task) when rows are missing or a sampled neuron has no finite effect."""
    table = table.sort_values(["layer", "neuron"], kind="stable")
    L, I = int(table["layer"].max()) + 1, int(table["neuron"].max()) + 1
    if len(table) != L * I:
        raise PipelineError(f"{what}: {len(table)} rows, expected one per neuron ({L} layers x {I} neurons)")
    stratum = table["stratum"].astype(str).to_numpy().reshape(L, I)
    sampled = table["sampled"].to_numpy(dtype=bool).reshape(L, I)
    effect = table["effect"].to_numpy(dtype=np.float64).reshape(L, I)
    if not np.isfinite(effect[sampled]).all():
        raise PipelineError(f"{what}: a sampled neuron has no finite effect")
    census = stratum == "census"
    if not sampled[census].all():
        raise PipelineError(f"{what}: a census neuron was not zeroed")
    strata = tuple((stratum == name, (stratum == name) & sampled) for name in STRATA[1:])
    return NeuronSample(census, strata), effect


def _weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each value's estimated rank (1 = smallest) in the population the weighted sample stands
    for: the weight of smaller values plus the mid-point of its own tie group's weight."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    # Ties share the mid-rank of their group.
    start = np.searchsorted(v, v, side="left")
    end = np.searchsorted(v, v, side="right")
    cum = np.concatenate([[0.0], np.cumsum(w)])
    ranks_sorted = cum[start] + (cum[end] - cum[start] + 1.0) / 2.0
    out = np.empty_like(ranks_sorted)
    out[order] = ranks_sorted
    return out


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    # np.average(a, weights=w) is (a * w).sum() / w.sum(); written out, w.sum() is summed once
    # (the same bits: the bootstrap calls this tens of thousands of times).
    total = w.sum()

    def average(a: np.ndarray) -> float:
        return np.multiply(a, w).sum() / total

    mx, my = average(x), average(y)
    cov = average((x - mx) * (y - my))
    var = average((x - mx) ** 2) * average((y - my) ** 2)
    return float(cov / math.sqrt(var)) if var > 0 else math.nan


def _estimates(
    scores: dict[str, np.ndarray], effect: np.ndarray, weights: np.ndarray, k: int, tops: dict[str, np.ndarray]
) -> dict[str, dict]:
    """The three figures per method from sampled flat ``effect`` and ``weights`` (0 = not sampled);
    ``tops``: each method's ``_top(scores, k)``, fixed across bootstrap resamples."""
    sampled = weights > 0
    e, w = effect[sampled], weights[sampled]
    order = np.argsort(-e, kind="stable")
    reached = np.cumsum(w[order]) >= k - 1e-9
    tau = float(e[order][np.argmax(reached)]) if reached.any() else float(e.min())
    above = e >= tau
    best = float(np.sum(w[above] * e[above]))
    truth_ranks = _weighted_ranks(e, w)
    out = {}
    for method, s in scores.items():
        top = tops[method]
        if not sampled[top].all():
            raise PipelineError(f"sampled_faithfulness: {method}'s top {k} is not in the census")
        hits = effect[top] >= tau
        out[method] = {
            "spearman": _weighted_pearson(_weighted_ranks(s.ravel()[sampled].astype(np.float64), w), truth_ranks, w),
            "precision_at_k": float(hits.mean()),
            "captured_effect": float(effect[top].sum()) / best if best > 0 else math.nan,
        }
    return out


def sampled_faithfulness(
    scores: dict[str, np.ndarray],
    effect: np.ndarray,
    sample: NeuronSample,
    k: int,
    *,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """Faithfulness of each method of ``scores`` ({method: [layer, neuron]}) estimated from the
    exact ``effect`` [layer, neuron] (nats; read only at ``sample.sampled``).

    Returns {method: {figure: {"value", "ci_low", "ci_high"}}} for spearman, precision_at_k and
    captured_effect, and "sample": the strata's sizes. Intervals: percentiles of
    ``n_resamples`` bootstrap resamples within each random stratum (drawn with replacement,
    weights unchanged); they carry the sampling error, not the ground truth's own item noise.
    """
    sampled = sample.sampled
    if sampled.shape != effect.shape:
        raise PipelineError(f"sampled_faithfulness: sample of shape {sampled.shape}, effect {effect.shape}")
    flat = effect.ravel().astype(np.float64)
    if not np.isfinite(flat[sampled.ravel()]).all():
        raise PipelineError("sampled_faithfulness: a sampled neuron has no finite effect (was it ablated?)")
    base = sample.census.ravel().astype(np.float64)
    drawn = [(np.flatnonzero(d), p.sum() / max(1, d.sum())) for p, d in sample.strata]
    weights = base.copy()
    for idx, w in drawn:
        weights[idx] = w
    tops = {m: _top(s, k) for m, s in scores.items()}
    point = _estimates(scores, flat, weights, k, tops)
    rng = np.random.default_rng([seed, 27])
    reps: dict[str, dict[str, list[float]]] = {m: {f: [] for f in point[m]} for m in point}
    for _ in range(n_resamples):
        w = base.copy()
        for idx, weight in drawn:
            if idx.size:
                np.add.at(w, rng.choice(idx, size=idx.size, replace=True), weight)
        for m, figures in _estimates(scores, flat, w, k, tops).items():
            for f, v in figures.items():
                reps[m][f].append(v)
    tail = 100.0 * (1.0 - confidence) / 2.0
    out: dict[str, dict] = {}
    for m, figures in point.items():
        out[m] = {}
        for f, v in figures.items():
            r = np.array(reps[m][f], dtype=np.float64)
            r = r[np.isfinite(r)]
            lo, hi = np.percentile(r, [tail, 100.0 - tail]) if r.size else (math.nan, math.nan)
            out[m][f] = {"value": v, "ci_low": float(lo), "ci_high": float(hi)}
    out["sample"] = {**sample.sizes(), "k": k}
    return out


FIGURES = ("spearman", "precision_at_k", "captured_effect")
_ROUNDING = 1e-6


def sampled_ground_truth(
    scores: dict[str, dict[str, np.ndarray]],
    measured: dict[str, tuple[NeuronSample, np.ndarray]],
    k: int,
    *,
    exhaustive: dict[str, np.ndarray] | None = None,
    n_resamples: int,
    seed: int,
) -> dict:
    """Every method's faithfulness from a measured sampled ground truth, per task.

    ``measured``: {task: (sample, effect [layer, neuron])}, what the ``sampled_ground_truth``
    stage zeroed and measured (``sample_from_table``); ``scores``: {task: {method: [layer,
    neuron]}}, the methods whose top ``k`` the census holds. Each method's figures come from
    ``sampled_faithfulness``. Where ``exhaustive`` holds the task's exhaustive ground truth
    [layer, neuron] (every neuron finite: the embedded default), each figure also has its
    exhaustive value and whether it lies in the sampled interval (to within 1e-6 relative: float
    rounding), and the task the largest
    difference between a sampled neuron's two measured effects (the same zeroing run by two
    stages: float rounding alone). Returns JSON-ready {"by_task": {task: {method: {figure:
    {value, ci_low, ci_high[, exhaustive, within]}}, "sample": sizes[,
    "effect_max_abs_difference"]}}, "within", "figures"} (counted over exhaustive comparisons).
    """
    from pipeline.method.masks import faithfulness

    out: dict = {}
    within = figures = 0
    for task, (sample, effect) in measured.items():
        estimates = sampled_faithfulness(scores[task], effect, sample, k, n_resamples=n_resamples, seed=seed)
        entry: dict = {"sample": estimates.pop("sample")}
        truth = (exhaustive or {}).get(task)
        if truth is not None and not np.isfinite(truth).all():
            truth = None  # no exhaustive ground truth for this task
        if truth is not None:
            entry["effect_max_abs_difference"] = float(np.abs(effect - truth)[sample.sampled].max())
        for method, figures_of in estimates.items():
            exact = faithfulness(scores[task][method], truth, k) if truth is not None else None
            entry[method] = {}
            for f in FIGURES:
                e = figures_of[f]
                if exact is not None:
                    # A census-only figure has a zero-width interval, and the two stages' effects
                    # of one zeroing differ in the last bits: within up to float rounding.
                    tol = _ROUNDING * max(1.0, abs(exact[f]))
                    inside = bool(e["ci_low"] - tol <= exact[f] <= e["ci_high"] + tol)
                    e = {**e, "exhaustive": exact[f], "within": inside}
                    within += inside
                    figures += 1
                entry[method][f] = e
        out[task] = entry
    return {"by_task": out, "within": within, "figures": figures}
