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

- ``NeuronSample`` / ``sample_neurons``: the strata as boolean [layer, neuron] masks.
- ``sampled_faithfulness``: ``pipeline.method.masks.faithfulness``'s spearman, precision_at_k and
  captured_effect estimated from the sample's effects alone, each with a percentile interval
  from a bootstrap within each random stratum (the census is fixed).
- ``check_against_exhaustive``: both side by side on a model that has the exhaustive one.

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

from pipeline.errors import PipelineError


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


def check_against_exhaustive(
    methods: list[str], tasks: list[str], importance: np.ndarray, k: int, *, n_resamples: int, seed: int
) -> dict:
    """The sampled ground truth checked against the exhaustive one it would replace.

    ``importance`` [method, task, layer, neuron] holds every method's scores and, as method
    "ablation", the exhaustive ground truth (``pipeline.method.store.read_importance``). Per
    task, the census is every other method's top ``k``; the near stratum gets as many neurons as
    the census, the far one half as many; each method's three figures are estimated from those
    neurons' exact effects alone (``sampled_faithfulness``) beside the exhaustive value
    (``pipeline.method.masks.faithfulness``). Returns JSON-ready {task: {method: {figure:
    {value, ci_low, ci_high, exhaustive, within}}, "sample": sizes}} and "within" / "figures":
    how many exhaustive values lie in their sampled interval.
    """
    from pipeline.method.masks import faithfulness

    if "ablation" not in methods:
        raise PipelineError("check_against_exhaustive needs the exhaustive ground truth (method 'ablation')")
    truth_index = methods.index("ablation")
    out: dict = {}
    within = figures = 0
    for j, task in enumerate(tasks):
        truth = importance[truth_index, j]
        if not np.isfinite(truth).all():
            continue  # no exhaustive ground truth for this task
        scores = {m: importance[i, j] for i, m in enumerate(methods) if m != "ablation"}
        census = sample_neurons(scores, k, 0, 0, np.random.default_rng(0)).census
        n = int(census.sum())
        sample = sample_neurons(scores, k, n, n // 2, np.random.default_rng([seed, 28, j]))
        sampled = sampled_faithfulness(
            scores, np.where(sample.sampled, truth, np.nan), sample, k, n_resamples=n_resamples, seed=seed
        )
        out[task] = {"sample": sampled.pop("sample")}
        for method, est in sampled.items():
            exact = faithfulness(scores[method], truth, k)
            out[task][method] = {}
            for f in FIGURES:
                e = est[f]
                inside = bool(e["ci_low"] <= exact[f] <= e["ci_high"])
                out[task][method][f] = {**e, "exhaustive": exact[f], "within": inside}
                within += inside
                figures += 1
    return {"by_task": out, "within": within, "figures": figures}
