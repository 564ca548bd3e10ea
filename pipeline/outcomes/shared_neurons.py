"""Shared neurons: the neurons two tasks' HONES masks have in common, and what zeroing them does.

The paper reports that neurons shared with VQA have the largest cross-task effect. For every
pair of tasks (a, b) whose masks of one size share neurons S:

- ``shared``: S zeroed alone;
- ``subset:<a>`` / ``subset:<b>``: as many neurons of a's (b's) mask outside S, drawn at random
  (``draws`` draws each): the same number of neurons from the same masks, which tells what
  being shared adds over being in a task's mask.

Each condition is scored on every task's held-out items (the likelihood utility), as the
evaluate stage scores masks (``pipeline.outcomes.suppression``). Per pair, the relative drop
(%) is averaged over the pair's own two tasks (``on_pair``) and over the others
(``cross_task``); a subset's figures mix its draws as random masks do (replicate b uses one
draw). Two claims are decided with the paired bootstrap over test items:

- ``vqa_pairs_minus_others``: the mean cross-task drop of the shared neurons of the pairs with
  VQA minus that of the other pairs (the paper's claim; shared sets differ in size, which this
  figure does not correct);
- ``shared_minus_subset``: the mean over pairs of the shared neurons' on-pair drop minus that of
  as many other neurons of the two masks (the size-matched comparison).

Map of this module: ``shared_sets`` (the shared neurons and the size-matched draws per pair),
``shared_conditions`` (those as ``suppression.MaskCondition``), ``shared_neuron_statistics``
(the figures and claims, a ``records.SharedNeuronsRecord``), ``no_shared_neurons`` (the record
when no two masks share a neuron).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import TaskResult
from pipeline.outcomes.records import SharedNeuronsRecord, as_record
from pipeline.outcomes.statistics import interval, mean_over, verdict
from pipeline.outcomes.suppression import MaskCondition, relative_drops

__all__ = [
    "SharedSet",
    "shared_sets",
    "shared_conditions",
    "shared_neuron_statistics",
    "no_shared_neurons",
    "SHARED_METHOD",
]

Neuron = tuple[int, int]
SHARED_METHOD = "shared"
SUBSET_PREFIX = "subset:"
PAIR_SEP = "&"
FOCUS_TASK = "vqa"
UTILITY = "likelihood"


@dataclass(frozen=True)
class SharedSet:
    """One pair's shared neurons (rank order of a's mask) and, per task of the pair, its
    size-matched draws from that task's mask outside them."""

    a: str
    b: str
    shared: tuple[Neuron, ...]
    subsets: dict[str, tuple[tuple[Neuron, ...], ...]]

    @property
    def pair(self) -> str:
        return f"{self.a}{PAIR_SEP}{self.b}"


def _mask(masks: pd.DataFrame, task: str, rho: float, method: str) -> list[Neuron]:
    sel = masks[(masks["method"] == method) & (masks["task"] == task) & (masks["rho"] == rho) & (masks["draw"] == 0)]
    return [(int(l), int(n)) for l, n in zip(sel["layer"], sel["neuron"])]


def shared_sets(
    masks: pd.DataFrame, tasks: Sequence[str], rho: float, draws: int, seed: int, method: str = "hones"
) -> list[SharedSet]:
    """The pairs of ``tasks`` (in order) whose ``method`` masks of size ``rho`` (a masks table of
    ``pipeline.method.masks``) share neurons, each with ``draws`` size-matched random subsets of
    both masks outside the shared neurons (seeded by ``seed`` and the pair)."""
    if draws < 1:
        raise PipelineError(f"shared neurons: draws must be >= 1, got {draws}")
    own = {t: _mask(masks, t, rho, method) for t in tasks}
    missing = [t for t, m in own.items() if not m]
    if missing:
        raise PipelineError(f"shared neurons: no {method} mask of size {rho:g} for task(s) {missing}")
    out = []
    for k, (a, b) in enumerate(itertools.combinations(tasks, 2)):
        in_b = set(own[b])
        shared = tuple(nr for nr in own[a] if nr in in_b)
        if not shared:
            continue
        rng = np.random.default_rng([seed, 29, k])
        subsets = {}
        for t in (a, b):
            rest = [nr for nr in own[t] if nr not in set(shared)]
            size = min(len(shared), len(rest))
            subsets[t] = tuple(
                tuple(sorted(rest[i] for i in rng.choice(len(rest), size=size, replace=False))) for _ in range(draws)
            )
        out.append(SharedSet(a, b, shared, subsets))
    return out


def shared_conditions(sets: Sequence[SharedSet], rho: float) -> list[MaskCondition]:
    """Every pair's conditions (``target_task`` names the pair "a&b"): shared, then each task's draws."""
    out = []
    for s in sets:
        out.append(MaskCondition(SHARED_METHOD, s.pair, rho, 0, False, s.shared))
        for t, draws in s.subsets.items():
            out += [MaskCondition(f"{SUBSET_PREFIX}{t}", s.pair, rho, d, False, nr) for d, nr in enumerate(draws)]
    return out


def _mixed(per: list[tuple[float, np.ndarray]], pick: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean of the draws' points; replicate b from draw pick[b]."""
    if len(per) == 1:
        return per[0]
    return float(np.mean([p for p, _ in per])), np.stack([r for _, r in per])[pick, np.arange(pick.size)]


def _iv(pair: tuple[float, np.ndarray], confidence: float, margin: float | None = None) -> dict:
    iv = interval(pair[0], pair[1], confidence)
    return {**iv.as_dict(), **({"verdict": verdict(iv, 0.0, margin)} if margin is not None else {})}


def shared_neuron_statistics(
    scores: dict[tuple[str, str], dict[int, TaskResult]],
    conditions: Sequence[MaskCondition],
    sets: Sequence[SharedSet],
    *,
    mask_size: float,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
    equivalence_margin: float = 0.0,
) -> SharedNeuronsRecord:
    """The per-pair figures and the two claims of the module docstring, as the record a
    ``shared.json`` holds.

    ``scores``: {(utility, eval_task): {condition: TaskResult}} (condition 0 the base, k the
    ``conditions[k - 1]``) with the likelihood of every condition on every task; ``mask_size``:
    the masks' size (fraction of all FFN neurons) the sets were taken at. The record's document:
    {"mask_size", "utility", "confidence", "resamples", "pairs": {pair: {"shared_neurons",
    "on_pair" / "cross_task": {condition kind: interval}, "shared_minus_subset": {on_pair,
    cross_task}}}, "claims": {...}}; claims with a verdict.
    """
    tasks = list(dict.fromkeys(t for (u, t) in scores if u == UTILITY))
    if not tasks:
        raise PipelineError("shared neuron statistics: no likelihood scores")
    drops = relative_drops({t: scores[(UTILITY, t)] for t in tasks}, n_resamples, seed)
    index = {(c.method, c.target_task, c.draw): k for k, c in enumerate(conditions, start=1)}
    pick = np.random.default_rng([seed, 31]).integers

    def drop_over(condition: int, over: list[str]) -> tuple[float, np.ndarray]:
        cells = [drops.cells[(condition, t)] for t in over]
        return float(np.mean([p for p, _ in cells])), mean_over([r for _, r in cells])

    out: dict = {
        "mask_size": mask_size,
        "utility": UTILITY,
        "confidence": confidence,
        "resamples": n_resamples,
        "pairs": {},
    }
    per_pair: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    for s in sets:
        own, others = [s.a, s.b], [t for t in tasks if t not in (s.a, s.b)]
        kinds = {SHARED_METHOD: [index[(SHARED_METHOD, s.pair, 0)]]}
        for t, draws in s.subsets.items():
            kinds[f"{SUBSET_PREFIX}{t}"] = [index[(f"{SUBSET_PREFIX}{t}", s.pair, d)] for d in range(len(draws))]
        figures: dict[str, dict[str, tuple[float, np.ndarray]]] = {"on_pair": {}, "cross_task": {}}
        for kind, conds in kinds.items():
            chosen = pick(len(conds), size=n_resamples)
            figures["on_pair"][kind] = _mixed([drop_over(c, own) for c in conds], chosen)
            if others:
                figures["cross_task"][kind] = _mixed([drop_over(c, others) for c in conds], chosen)
        subset_kinds = [k for k in kinds if k != SHARED_METHOD]
        matched = {}
        for fig, by_kind in figures.items():
            if not by_kind:
                continue
            sp, sr = by_kind[SHARED_METHOD]
            rp = float(np.mean([by_kind[k][0] for k in subset_kinds]))
            rr = mean_over([by_kind[k][1] for k in subset_kinds])
            matched[fig] = (sp - rp, sr - rr)
        per_pair[s.pair] = {
            "cross_task": figures["cross_task"].get(SHARED_METHOD),
            "shared_minus_subset": matched.get("on_pair"),
        }
        out["pairs"][s.pair] = {
            "shared_neurons": len(s.shared),
            **{fig: {k: _iv(v, confidence) for k, v in by_kind.items()} for fig, by_kind in figures.items() if by_kind},
            "shared_minus_subset": {fig: _iv(v, confidence) for fig, v in matched.items()},
        }
    claims: dict = {}
    with_focus = [p for p, s in zip(per_pair, sets) if FOCUS_TASK in (s.a, s.b) and per_pair[p]["cross_task"]]
    without = [p for p, s in zip(per_pair, sets) if FOCUS_TASK not in (s.a, s.b) and per_pair[p]["cross_task"]]
    if with_focus and without:
        fp, fr = _pair_mean([per_pair[p]["cross_task"] for p in with_focus])
        op, orr = _pair_mean([per_pair[p]["cross_task"] for p in without])
        claims["vqa_pairs_minus_others"] = {
            **_iv((fp - op, fr - orr), confidence, equivalence_margin),
            "pairs_with_vqa": with_focus,
            "other_pairs": without,
        }
    matched_pairs = [p for p in per_pair if per_pair[p]["shared_minus_subset"] is not None]
    if matched_pairs:
        claims["shared_minus_subset"] = {
            **_iv(
                _pair_mean([per_pair[p]["shared_minus_subset"] for p in matched_pairs]), confidence, equivalence_margin
            ),
            "pairs": matched_pairs,
        }
    out["claims"] = claims
    return as_record(SharedNeuronsRecord, out, "shared neuron statistics")


def no_shared_neurons(mask_size: float) -> SharedNeuronsRecord:
    """The record of a study whose masks share no neuron at ``mask_size``: no pairs, no claims."""
    return as_record(
        SharedNeuronsRecord,
        {"mask_size": mask_size, "utility": UTILITY, "pairs": {}, "claims": {}},
        "shared neuron statistics",
    )


def _pair_mean(figures: list[tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    points = [p for p, _ in figures]
    return (float(np.mean(points)) if points else math.nan), mean_over([r for _, r in figures])
