"""Neuron-task attribution from the activation stores, in streaming passes (HONES.md sections 3-4).

Every method yields a [layer, neuron] importance matrix per task (higher = more important):

- ``hones``: I = sum_h w_h * max(cbar_0 - cbar_h, 0) / sum_h w_h with w_h = max(S_t(h), 0),
  where cbar_c[l, i] = mean over items of z_c * dvp (the DVP contribution under condition c;
  c = 0 base, c = h with critical head h mean-substituted). No positive head: I = cbar_0.
- ``hones_nohead``: cbar_0, the plain DVP contribution (ablation of the head conditioning).
- ``ma``: mean activation, mean over items of z_0.
- ``ap``: activation probability, fraction of items with z_0 > 0.
- ``ape``: activation-probability entropy across tasks (LAPE-style). With AP_t the activation
  probability of a neuron on task t and p_t = AP_t / sum_s AP_s, the entropy
  H = -sum_t p_t log p_t is low for task-specific neurons; the score for task t is
  p_t * (log T - H), and 0 where AP_t < ``ape_min_probability`` (a neuron must fire on the
  task at all to be specific to it).
- ``random``: seeded uniform scores; ``masks`` selects them with the per-layer budget of
  ``hones``, which makes it the floor the paper compares against.
- ``ablation``: ground truth from ``pipeline.method.ablation`` (not computed here).

Map of this module:
- ``STORE_METHODS``: the methods computed from the stores, in the order of the importance array.
- ``StreamingContributions``: float64 running sums, so memory is bounded by one block of the
  store (``ActivationStore.iter_blocks``) whatever the number of items; its ``state_dict``
  round-trips for resumption and for merging partial sums computed elsewhere (dask, ranks).
- ``accumulate`` / ``task_statistics``: one streaming pass over a store -> ``TaskStatistics``
  (``TaskStatistics.from_sums``: the means plus the store's head scores).
- ``hones_importance`` / ``ape_scores``: the formulas above.
- ``importance_matrix`` / ``with_ground_truth`` / ``attribute``: every method for every task,
  [method, task, layer, neuron].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.errors import PipelineError
from pipeline.method.store import ActivationStore

log = logging.getLogger(__name__)

STORE_METHODS = ("hones", "hones_nohead", "ma", "ap", "ape", "random")


class MethodScores(NamedTuple):
    """Every neuron's importance under each method for each task: ``scores`` [method, task,
    layer, neuron] (float32) with its coordinates ``methods`` and ``tasks``. Unpacks as
    ``methods, tasks, scores = ...``."""

    methods: list[str]
    tasks: list[str]
    scores: np.ndarray


class StreamingContributions:
    """Running per-condition sums over items of z * dvp, z and 1[z > 0] (base condition).

    >>> stats = StreamingContributions(n_conditions=5, n_layers=4, n_neurons=512)
    >>> for block in store.iter_blocks(): stats.add(block.z, block.dvp)
    >>> stats.mean_contribution()      # [condition, layer, neuron]
    """

    def __init__(self, n_conditions: int, n_layers: int, n_neurons: int):
        self.contribution_sum = np.zeros((n_conditions, n_layers, n_neurons), dtype=np.float64)
        self.activation_sum = np.zeros((n_layers, n_neurons), dtype=np.float64)
        self.positive_count = np.zeros((n_layers, n_neurons), dtype=np.int64)
        self.n_items = 0

    def add(self, z: np.ndarray, dvp: np.ndarray) -> None:
        """z [condition, item, layer, neuron]; dvp [item, layer, neuron]."""
        z64 = z.astype(np.float64, copy=False)
        self.contribution_sum += np.einsum("cnli,nli->cli", z64, dvp.astype(np.float64, copy=False))
        self.activation_sum += z64[0].sum(0)
        self.positive_count += (z[0] > 0).sum(0)
        self.n_items += z.shape[1]

    def merge(self, other: "StreamingContributions") -> None:
        """Add ``other``'s sums (computed over other items of the same store) to these."""
        self.contribution_sum += other.contribution_sum
        self.activation_sum += other.activation_sum
        self.positive_count += other.positive_count
        self.n_items += other.n_items

    def state_dict(self) -> dict[str, np.ndarray | int]:
        return {
            "contribution_sum": self.contribution_sum.copy(),
            "activation_sum": self.activation_sum.copy(),
            "positive_count": self.positive_count.copy(),
            "n_items": self.n_items,
        }

    def load_state_dict(self, state: dict) -> None:
        self.contribution_sum = np.array(state["contribution_sum"], dtype=np.float64)
        self.activation_sum = np.array(state["activation_sum"], dtype=np.float64)
        self.positive_count = np.array(state["positive_count"], dtype=np.int64)
        self.n_items = int(state["n_items"])

    def _check(self) -> None:
        if self.n_items == 0:
            raise PipelineError("no items were added: the store is empty")

    def mean_contribution(self) -> np.ndarray:
        """cbar [condition, layer, neuron]: mean DVP contribution (logit units)."""
        self._check()
        return self.contribution_sum / self.n_items

    def mean_activation(self) -> np.ndarray:
        """[layer, neuron]: mean z of the base condition."""
        self._check()
        return self.activation_sum / self.n_items

    def activation_probability(self) -> np.ndarray:
        """[layer, neuron]: fraction of items with z > 0 in the base condition."""
        self._check()
        return self.positive_count / self.n_items


def accumulate(store: ActivationStore, items_per_block: int | None = None) -> StreamingContributions:
    """One streaming pass over a store."""
    from tqdm import tqdm

    lay = store.layout
    stats = StreamingContributions(lay.n_conditions, lay.n_layers, lay.n_neurons)
    n_blocks = -(-lay.n_items // (items_per_block or lay.block_items))
    for block in tqdm(store.iter_blocks(items_per_block), total=n_blocks, desc="attribute", leave=False):
        stats.add(block.z, block.dvp)
    return stats


def hones_importance(mean_contribution: np.ndarray, head_scores: np.ndarray) -> np.ndarray:
    """[layer, neuron] HONES importance from cbar [condition, layer, neuron] (condition 0 = base)
    and the critical heads' scores S_t [condition - 1]."""
    base, heads = mean_contribution[0], mean_contribution[1:]
    w = np.maximum(np.asarray(head_scores, dtype=np.float64), 0.0)
    if heads.shape[0] != w.shape[0]:
        raise PipelineError(f"{heads.shape[0]} head conditions but {w.shape[0]} head scores")
    if w.sum() <= 0:
        log.warning("no critical head has a positive score: falling back to the plain DVP contribution")
        return base.copy()
    drops = np.maximum(base[None] - heads, 0.0)
    return np.einsum("h,hli->li", w, drops) / w.sum()


def ape_scores(activation_probability: np.ndarray, min_probability: float) -> np.ndarray:
    """[task, layer, neuron] APE scores from AP [task, layer, neuron] (see module docstring)."""
    ap = np.asarray(activation_probability, dtype=np.float64)
    T = ap.shape[0]
    total = ap.sum(0, keepdims=True)
    p = np.divide(ap, total, out=np.full_like(ap, 1.0 / T), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(0, keepdims=True)
    score = p * (np.log(T) - ent)
    return np.where(ap >= min_probability, score, 0.0)


@dataclass(frozen=True)
class TaskStatistics:
    """What ``attribute`` needs from one task's store."""

    mean_contribution: np.ndarray  # [condition, layer, neuron]
    mean_activation: np.ndarray  # [layer, neuron]
    activation_probability: np.ndarray  # [layer, neuron]
    head_scores: np.ndarray  # [condition - 1]
    n_items: int

    @classmethod
    def from_sums(cls, stats: StreamingContributions, store: ActivationStore) -> "TaskStatistics":
        """The means of ``stats`` (summed over ``store``'s items) with the store's head scores."""
        return cls(
            stats.mean_contribution(), stats.mean_activation(), stats.activation_probability(),
            store.head_scores(), stats.n_items,
        )


def task_statistics(store: ActivationStore, items_per_block: int | None = None) -> TaskStatistics:
    """``TaskStatistics`` of one store, in one streaming pass (``accumulate``)."""
    return TaskStatistics.from_sums(accumulate(store, items_per_block), store)


def importance_matrix(
    statistics: dict[str, TaskStatistics], *, seed: int, ape_min_probability: float
) -> MethodScores:
    """(methods, tasks, scores [method, task, layer, neuron]) for ``STORE_METHODS``."""
    tasks = list(statistics)
    if not tasks:
        raise PipelineError("no task statistics to attribute")
    shapes = {t: s.mean_activation.shape for t, s in statistics.items()}
    if len(set(shapes.values())) != 1:
        raise PipelineError(f"tasks' stores have different [layer, neuron] shapes: {shapes}")
    L, I = next(iter(shapes.values()))
    out = np.zeros((len(STORE_METHODS), len(tasks), L, I), dtype=np.float32)
    ape = ape_scores(np.stack([statistics[t].activation_probability for t in tasks]), ape_min_probability)
    rng = np.random.default_rng(seed)
    for j, t in enumerate(tasks):
        s = statistics[t]
        by_method = {
            "hones": hones_importance(s.mean_contribution, s.head_scores),
            "hones_nohead": s.mean_contribution[0],
            "ma": s.mean_activation,
            "ap": s.activation_probability,
            "ape": ape[j],
            "random": rng.random((L, I)),
        }
        for m, method in enumerate(STORE_METHODS):
            out[m, j] = by_method[method]
    return MethodScores(list(STORE_METHODS), tasks, out)


def with_ground_truth(
    statistics: dict[str, TaskStatistics], ablation: dict[str, np.ndarray | None], *, seed: int,
    ape_min_probability: float,
) -> MethodScores:
    """``importance_matrix`` plus the ``ablation`` slice (NaN for tasks without ground truth)."""
    methods, tasks, scores = importance_matrix(statistics, seed=seed, ape_min_probability=ape_min_probability)
    truth = np.full((1, *scores.shape[1:]), np.nan, dtype=np.float32)
    for j, task in enumerate(tasks):
        if ablation.get(task) is not None:
            truth[0, j] = ablation[task]
    return MethodScores([*methods, "ablation"], tasks, np.concatenate([scores, truth]))


def attribute(
    stores: dict[str, ActivationStore],
    ablation: dict[str, np.ndarray | None],
    *,
    seed: int,
    ape_min_probability: float,
    items_per_block: int | None = None,
) -> MethodScores:
    """All methods for all tasks: (methods, tasks, importance [method, task, layer, neuron]).

    One streaming pass per task store. ``ablation[task]`` is the ground-truth effect
    [layer, neuron] or None (then the ``ablation`` slice is NaN).
    """
    statistics = {}
    for task, store in stores.items():
        statistics[task] = task_statistics(store, items_per_block)
        log.info("%s: %d items, %d head conditions", task, statistics[task].n_items,
                 len(statistics[task].head_scores))
    return with_ground_truth(statistics, ablation, seed=seed, ape_min_probability=ape_min_probability)
