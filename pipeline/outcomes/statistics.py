"""Uncertainty of every reported effect: paired bootstrap over test items, and verdicts.

Everything here works on per-item scores, so that a resample of test items is applied to
the baseline and to every intervention at once (the pairing that makes small differences
visible). A resample is a row of multinomial counts over the n items (``bootstrap_counts``):
a utility's replicate is then one matrix product, for means and for corpus BLEU alike.

Map of this module:
- ``bootstrap_counts``: [B, n] resample counts (seeded).
- ``utility_replicates``: a task's utility under C conditions, as a point value [C] and B
  bootstrap replicates [C, B]; per-item values [C, n] (mean utilities) or per-item BLEU
  statistics [C, n, 2 * max_n + 2] (corpus BLEU).
- ``relative_drop_replicates``: 100 * (base - masked) / |base| with the same resamples.
- ``Interval`` / ``interval``: a value with its percentile interval; ``verdict``: holds / fails /
  equivalent / undecided from an interval, a threshold and an equivalence margin.
- ``layer_preference``: Cramér's V of the task x layer table of the masks' neurons, with a
  bootstrap interval and a permutation null (does each task's mask prefer its own layers?).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.tasks.metrics import paper_bleu_from_statistics, utility_of_values

CONFIDENCE = 0.95
Verdict = Literal["holds", "fails", "equivalent", "undecided"]


def bootstrap_counts(n_items: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n_items] int counts: how often each item is drawn in each resample of size n_items."""
    if n_items < 1:
        raise PipelineError("bootstrap: no items to resample")
    if n_resamples < 1:
        raise PipelineError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_resamples)


def utility_replicates(values: np.ndarray, counts: np.ndarray, kind: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """A utility under C conditions: (point [C], replicates [C, B]).

    ``kind="mean"``: ``values`` [C, n] per-item scores; the utility is their mean.
    ``kind="corpus_bleu"``: ``values`` [C, n, S] per-item BLEU statistics
    (``metrics.paper_bleu_statistics``); the utility is the paper's corpus BLEU of the summed
    statistics.
    ``counts`` [B, n] from ``bootstrap_counts``.
    """
    n = values.shape[1]
    if counts.shape[1] != n:
        raise PipelineError(f"bootstrap: counts cover {counts.shape[1]} items, values {n}")
    if kind not in ("mean", "corpus_bleu"):
        raise PipelineError(f"bootstrap: unknown utility kind {kind!r}; known: mean, corpus_bleu")
    w, v = counts.astype(np.float64), values.astype(np.float64)
    point = utility_of_values(v, kind)
    if kind == "mean":
        return point, v @ w.T / n
    return point, paper_bleu_from_statistics(np.einsum("bn,cns->cbs", w, v))


def relative_drop(base: np.ndarray | float, masked: np.ndarray | float) -> np.ndarray:
    """100 * (base - masked) / |base| in percent, elementwise; NaN where the base is 0."""
    base, masked = np.asarray(base, dtype=np.float64), np.asarray(masked, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base == 0, np.nan, 100.0 * (base - masked) / np.abs(base))


def relative_drop_replicates(point: np.ndarray, reps: np.ndarray, base_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Relative drop (%) of every condition against condition ``base_index``: (point [C], replicates [C, B])."""
    return relative_drop(point[base_index], point), relative_drop(reps[base_index][None, :], reps)


@dataclass(frozen=True)
class Interval:
    """A value with its ``CONFIDENCE`` percentile bootstrap interval (same unit as the value)."""

    value: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0

    def excludes(self, threshold: float = 0.0) -> bool:
        return self.ci_low > threshold or self.ci_high < threshold

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {k: (round(v, digits) if math.isfinite(v) else None) for k, v in asdict(self).items()}


def interval(value: float, replicates: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Percentile interval of ``replicates`` [B] around ``value`` (NaN replicates are dropped)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0 or not math.isfinite(value):
        return Interval(float(value), math.nan, math.nan)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(r, [tail, 100.0 - tail])
    return Interval(float(value), float(lo), float(hi))


def verdict(iv: Interval, threshold: float = 0.0, margin: float = 0.0) -> Verdict:
    """ "holds" when the whole interval lies above ``threshold``, "fails" when it lies below;
    otherwise "equivalent" when the whole interval lies within ``threshold`` +- ``margin`` (a
    difference too small to matter, shown to be so), else "undecided" (or when undefined)."""
    if not (math.isfinite(iv.ci_low) and math.isfinite(iv.ci_high)):
        return "undecided"
    if iv.ci_low > threshold:
        return "holds"
    if iv.ci_high < threshold:
        return "fails"
    if margin > 0 and threshold - margin <= iv.ci_low and iv.ci_high <= threshold + margin:
        return "equivalent"
    return "undecided"


def distribution(values: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean and the central ``confidence`` percentiles of a set of values (e.g. one per random mask)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "p2.5": math.nan, "p97.5": math.nan, "n": 0}
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(v, [tail, 100.0 - tail])
    return {"mean": float(v.mean()), "p2.5": float(lo), "p97.5": float(hi), "n": int(v.size)}


def cramers_v(table: np.ndarray) -> float:
    """Cramér's V of a contingency table [rows, columns] of counts (0: independent, 1: fully dependent)."""
    t = np.asarray(table, dtype=np.float64)
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    n = t.sum()
    if n == 0 or min(t.shape) < 2:
        return 0.0
    expected = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / n
    chi2 = float(((t - expected) ** 2 / expected).sum())
    return math.sqrt(chi2 / (n * (min(t.shape) - 1)))


def layer_preference(masks: pd.DataFrame, n_layers: int, rng: np.random.Generator, n_resamples: int = 1000) -> dict:
    """Do the tasks' masks prefer different layers? ``masks``: rows (task, layer) of one method.

    Value: Cramér's V of the task x layer count table. Interval: bootstrap over each task's
    neurons. Null: the same statistic with the task labels permuted over the pooled neurons
    (``null_q95`` its 95th percentile; ``p_value`` the permutation p-value). The claim holds
    when the interval lies above ``null_q95``.
    """
    tasks = list(dict.fromkeys(masks["task"]))
    layers = [masks.loc[masks["task"] == t, "layer"].to_numpy(dtype=np.int64) for t in tasks]
    if len(tasks) < 2 or any(len(x) == 0 for x in layers):
        raise PipelineError("layer_preference needs at least two tasks with neurons")

    def table(groups: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.bincount(g, minlength=n_layers) for g in groups])

    value = cramers_v(table(layers))
    boot = np.array(
        [cramers_v(table([g[rng.integers(0, len(g), len(g))] for g in layers])) for _ in range(n_resamples)]
    )
    pooled, sizes = np.concatenate(layers), np.cumsum([len(g) for g in layers])[:-1]
    null = np.array([cramers_v(table(np.split(rng.permutation(pooled), sizes))) for _ in range(n_resamples)])
    return {
        "interval": interval(value, boot),
        "null_q95": float(np.percentile(null, 95)),
        "p_value": float((1 + (null >= value).sum()) / (1 + n_resamples)),
    }


def task_seed(seed: int, task: str) -> np.random.Generator:
    """The resampling stream of one task: the same items are drawn for every condition and
    method of that task (the pairing), whatever else is evaluated."""
    return np.random.default_rng([seed, *task.encode()])


def mean_over(reps: list[np.ndarray]) -> np.ndarray:
    """Elementwise mean of equally shaped replicate arrays, ignoring NaN."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(reps), axis=0)


def log_rho_auc(rhos: list[float], values: np.ndarray) -> np.ndarray:
    """Area under a curve over log10(rho) divided by the log10 range: the mean height of the
    curve over a log-spaced mask-size grid, in the unit of ``values`` [len(rhos), ...]."""
    x = np.log10(np.asarray(rhos, dtype=np.float64))
    if len(x) < 2:
        return np.asarray(values[0], dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    area = ((v[1:] + v[:-1]) / 2.0 * np.diff(x).reshape(-1, *([1] * (v.ndim - 1)))).sum(axis=0)
    return area / (x[-1] - x[0])
