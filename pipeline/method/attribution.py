"""Neuron-task attribution from the activation stores in streaming passes (docs/method.md 3-4).

Every method yields a [layer, neuron] importance matrix per task (higher = more important).

The paper's method (docs/method.md section 3, exactly as the authors' code):

- ``hones``: I = sum_h w_h * max(cbar_0 - cbar_h, 0) / sum_h w_h with w_h = max(S_t(h), 0),
  where cbar_c[l, i] = mean over items of z_c * dvp (the DVP contribution under condition c;
  c = 0 base, c = h with critical head h mean-substituted). No positive head: I = cbar_0.
- ``hones_nohead``: cbar_0, the plain DVP contribution (ablation of the head conditioning;
  also the score of Pan et al., ``opanhw/MM_Neurons``: act x (W_down^T W_U)[i, y] at the last token).

Beyond the paper (docs/method.md section 8), named apart:

- ``hones_lp`` / ``hones_lp_nohead``: the same formulas on the log-probability DVP
  (``dvp_logprob``: the direct path's gradient of the target's log-probability, through the
  final norm), so that what is shared with competing answers cancels as in the softmax.
- ``atp``: attribution patching, the mean over items of gradient x activation of the answer
  log-probability summed over every position: the first-order estimate of the ground truth.

Published baselines, on act(gate) (act(fc1) for plain MLPs) over every prompt token (image and
text) of each item:

- ``ma`` / ``ap`` (MINER, ``hkccccc/MINER`` ``utils/func.py``,
  ``save_ISM_with_token_mask_in_one_layer``): per item and layer, the mean of act(gate) over
  the tokens (``ma``) or the fraction of tokens where it is > 0 (``ap``), min-max normalised
  within the layer, then summed over items (we divide by the number of items: same ranking).
  Selection is a global top-k (MINER's "adaptive" strategy), as ``masks`` does.
- ``lape`` (Tang et al. 2024, ``RUCAIBox/Language-Specific-Neurons`` ``identify.py``): AP_t =
  tokens with act(gate) > 0 over all tokens of task t's items; entropy H of AP normalised over
  tasks (nats); a neuron is kept only if some task's AP exceeds the ``filter_quantile``
  (0.95) quantile of all AP values (layer x neuron x task); the lowest-entropy ``top_rate`` of
  all neurons are selected, and a selected neuron belongs to every task whose AP exceeds the
  ``bar_quantile`` (0.95) quantile (``lape_selection``). As a ranking (``lape_scores``): task
  t's candidates (kept, AP_t above the bar) by entropy, lowest first, so that LAPE's own set
  at any ``top_rate`` is a prefix of it; then the other neurons by their share p_t = AP_t /
  sum_s AP_s (our choice, for masks larger than the candidates).

This project's earlier last-token variants (z = the down_proj input at the last prompt token):

- ``ma_last``: mean over items of z_0; ``ap_last``: fraction of items with z_0 > 0;
  ``ape_last``: with p_t = AP_t / sum_s AP_s and H = -sum_t p_t log p_t, p_t * (log T - H),
  0 where AP_t < ``ape_min_probability``.

- ``random``: seeded uniform scores; ``masks`` selects them with the per-layer budget of
  ``hones``, which makes it the floor the paper compares against.
- ``ablation``: ground truth from ``pipeline.method.ablation`` (not computed here).

Map of this module:
- ``STORE_METHODS``: the methods computed from the stores, in the order of the importance array.
- ``block_sums`` / ``StreamingContributions``: float64 running sums of one store's blocks, so
  memory is bounded by one block (``ActivationStore.iter_blocks``) whatever the number of
  items; its ``state_dict`` round-trips for resumption and for merging partial sums computed
  elsewhere (dask, ranks).
- ``accumulate`` / ``task_statistics``: one streaming pass over a store -> ``TaskStatistics``.
- ``hones_importance`` / ``ape_scores`` / ``lape_scores`` / ``lape_selection``: the formulas above.
- ``importance_matrix`` / ``with_ground_truth`` / ``attribute``: every method for every task,
  [method, task, layer, neuron]; ``attribute_on_items``: the same from chosen items only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.errors import PipelineError
from pipeline.method.store import ActivationStore, ItemArrays

log = logging.getLogger(__name__)

STORE_METHODS = (
    "hones",
    "hones_nohead",
    "hones_lp",
    "hones_lp_nohead",
    "atp",
    "ma",
    "ap",
    "lape",
    "ma_last",
    "ap_last",
    "ape_last",
    "random",
)
# What each method is and where its formula comes from (the report's table of methods).
METHOD_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "hones": (
        "head-conditioned drop of the DVP contribution z * <W_down[:, i], u_y> (a logit)",
        "the paper (docs/method.md section 3), exactly as the authors' code",
    ),
    "hones_nohead": (
        "the DVP contribution itself, without head conditioning",
        "the paper's ablation; Pan et al. (opanhw/MM_Neurons)",
    ),
    "hones_lp": (
        "HONES on the log-probability DVP: the direct path's gradient of the target's log-probability",
        "this project (docs/method.md section 8)",
    ),
    "hones_lp_nohead": ("the log-probability DVP contribution, without head conditioning", "this project"),
    "atp": (
        "gradient x activation of the answer log-probability, summed over positions",
        "attribution patching (Kramar et al. 2024, AtP*)",
    ),
    "ma": ("mean act(gate) over prompt tokens, min-max normalised per item and layer", "MINER (hkccccc/MINER)"),
    "ap": ("share of prompt tokens with act(gate) > 0, min-max normalised per item and layer", "MINER"),
    "lape": (
        "lowest entropy over tasks of act(gate) > 0 probability, filtered, multi-task assignment",
        "LAPE (RUCAIBox/Language-Specific-Neurons, identify.py)",
    ),
    "ma_last": ("mean z (down_proj input) at the last prompt token", "this project's earlier variant"),
    "ap_last": ("share of items with z > 0 at the last prompt token", "this project's earlier variant"),
    "ape_last": ("entropy specificity of ap_last across tasks", "this project's earlier variant"),
    "random": ("uniform scores under HONES's per-layer budget", "the paper's floor"),
    "ablation": ("exact effect of zeroing the neuron at every position (ground truth)", "this project"),
}


class MethodScores(NamedTuple):
    """Every neuron's importance under each method for each task: ``scores`` [method, task,
    layer, neuron] (float32) with its coordinates ``methods`` and ``tasks``. Unpacks as
    ``methods, tasks, scores = ...``."""

    methods: list[str]
    tasks: list[str]
    scores: np.ndarray


def _layer_min_max(x: np.ndarray) -> np.ndarray:
    """x [item, layer, neuron] min-max normalised within each (item, layer); 0 where constant."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = hi - lo
    return np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)


def block_sums(z: np.ndarray, arrays: ItemArrays) -> dict[str, np.ndarray]:
    """The sums over one block's items that every method needs (float64; counts int64):
    z [condition, item, layer, neuron]; ``arrays`` the same items' ``ItemArrays``."""
    z64 = z.astype(np.float64, copy=False)
    tokens = np.maximum(np.asarray(arrays.prompt_tokens, dtype=np.float64), 1.0)[:, None, None]
    gate_sum = np.asarray(arrays.gate_sum, dtype=np.float64)
    gate_positive = np.asarray(arrays.gate_positive, dtype=np.int64)
    return {
        "contribution_sum": np.einsum("cnli,nli->cli", z64, arrays.dvp.astype(np.float64, copy=False)),
        "logprob_contribution_sum": np.einsum("cnli,nli->cli", z64, arrays.dvp_logprob.astype(np.float64, copy=False)),
        "activation_sum": z64[0].sum(0),
        "positive_count": (z[0] > 0).sum(0).astype(np.int64),
        "atp_sum": np.asarray(arrays.atp, dtype=np.float64).sum(0),
        "gate_positive_count": gate_positive.sum(0),
        "prompt_token_count": np.asarray(arrays.prompt_tokens, dtype=np.int64).sum(keepdims=True),
        "gate_mean_normalised_sum": _layer_min_max(gate_sum / tokens).sum(0),
        "gate_probability_normalised_sum": _layer_min_max(gate_positive / tokens).sum(0),
        "n_items": np.array([z.shape[1]], dtype=np.int64),
    }


class StreamingContributions:
    """Running sums over items (``block_sums``): per condition of z * dvp and z * dvp_logprob;
    of z and 1[z > 0] at the last prompt token and of atp (base condition); of act(gate)
    statistics over prompt tokens.

    >>> stats = StreamingContributions(n_conditions=5, n_layers=4, n_neurons=512)
    >>> for block in store.iter_blocks(): stats.add(block.z, block.arrays)
    >>> stats.mean_contribution()      # [condition, layer, neuron]
    """

    _INTEGER = ("positive_count", "gate_positive_count", "prompt_token_count", "n_items")

    def __init__(self, n_conditions: int, n_layers: int, n_neurons: int):
        C, L, I = n_conditions, n_layers, n_neurons
        shapes = {
            "contribution_sum": (C, L, I),
            "logprob_contribution_sum": (C, L, I),
            "activation_sum": (L, I),
            "positive_count": (L, I),
            "atp_sum": (L, I),
            "gate_positive_count": (L, I),
            "prompt_token_count": (1,),
            "gate_mean_normalised_sum": (L, I),
            "gate_probability_normalised_sum": (L, I),
            "n_items": (1,),
        }
        self.sums = {k: np.zeros(v, dtype=np.int64 if k in self._INTEGER else np.float64) for k, v in shapes.items()}

    @property
    def n_items(self) -> int:
        return int(self.sums["n_items"][0])

    def add(self, z: np.ndarray, arrays: ItemArrays) -> None:
        """z [condition, item, layer, neuron]; ``arrays`` the same items' per-item arrays."""
        self.add_sums(block_sums(z, arrays))

    def add_sums(self, sums: dict[str, np.ndarray]) -> None:
        """Add ``block_sums`` output (or another instance's ``state_dict``)."""
        for k, v in self.sums.items():
            v += np.asarray(sums[k], dtype=v.dtype).reshape(v.shape)

    def merge(self, other: "StreamingContributions") -> None:
        """Add ``other``'s sums (computed over other items of the same store) to these."""
        self.add_sums(other.sums)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.sums.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.sums) - set(state))
        if missing:
            raise PipelineError(f"attribution state lacks {missing}: it was saved by an older version; recompute it")
        self.sums = {k: np.array(state[k], dtype=v.dtype).reshape(v.shape) for k, v in self.sums.items()}

    def _check_items(self) -> None:
        if self.n_items == 0:
            raise PipelineError("no items were added: the store is empty")

    def _mean(self, key: str) -> np.ndarray:
        self._check_items()
        return self.sums[key] / self.n_items

    def mean_contribution(self) -> np.ndarray:
        """cbar [condition, layer, neuron]: mean DVP contribution (logit units)."""
        return self._mean("contribution_sum")

    def mean_logprob_contribution(self) -> np.ndarray:
        """[condition, layer, neuron]: mean z * dvp_logprob (nats, first order)."""
        return self._mean("logprob_contribution_sum")

    def mean_activation(self) -> np.ndarray:
        """[layer, neuron]: mean z of the base condition at the last prompt token."""
        return self._mean("activation_sum")

    def activation_probability(self) -> np.ndarray:
        """[layer, neuron]: fraction of items with z > 0 at the last prompt token (base condition)."""
        return self._mean("positive_count")

    def mean_atp(self) -> np.ndarray:
        """[layer, neuron]: mean over items of gradient x activation (nats)."""
        return self._mean("atp_sum")

    def gate_probability(self) -> np.ndarray:
        """[layer, neuron]: prompt tokens with act(gate) > 0 over all prompt tokens (LAPE's AP)."""
        self._check_items()
        return self.sums["gate_positive_count"] / max(1, int(self.sums["prompt_token_count"][0]))

    def gate_mean_normalised(self) -> np.ndarray:
        """[layer, neuron]: mean over items of the per-item, per-layer min-max normalised mean act(gate) (MINER's MA)."""
        return self._mean("gate_mean_normalised_sum")

    def gate_probability_normalised(self) -> np.ndarray:
        """[layer, neuron]: the same for the fraction of tokens with act(gate) > 0 (MINER's AP)."""
        return self._mean("gate_probability_normalised_sum")


def accumulate(
    store: ActivationStore, items_per_block: int | None = None, items: np.ndarray | None = None
) -> StreamingContributions:
    """One streaming pass over a store; ``items``: positions of the items to include (default all)."""
    from tqdm import tqdm

    lay = store.layout
    stats = StreamingContributions(lay.n_conditions, lay.n_layers, lay.n_neurons)
    keep = np.ones(lay.n_items, dtype=bool) if items is None else np.isin(np.arange(lay.n_items), items)
    # Blocks holding none of the chosen items are never read.
    slices = [sl for sl in store.item_slices(items_per_block) if keep[sl].any()]
    for sl in tqdm(slices, desc="attribute", leave=False):
        block = store.read_items(sl)
        if keep[sl].all():
            stats.add(block.z, block.arrays)
        else:
            sel = np.flatnonzero(keep[sl])
            stats.add(block.z[:, sel], block.arrays.take(sel))
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
    """[task, layer, neuron] ``ape_last`` scores from AP [task, layer, neuron] (see module docstring)."""
    ap = np.asarray(activation_probability, dtype=np.float64)
    T = ap.shape[0]
    total = ap.sum(0, keepdims=True)
    p = np.divide(ap, total, out=np.full_like(ap, 1.0 / T), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(0, keepdims=True)
    score = p * (np.log(T) - ent)
    return np.where(ap >= min_probability, score, 0.0)


def _kth_smallest(values: np.ndarray, quantile: float) -> float:
    """torch.kthvalue(flat, round(n * quantile)): the k-th smallest value, k 1-based (as identify.py)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    k = min(max(1, round(flat.size * quantile)), flat.size)
    return float(np.partition(flat, k - 1)[k - 1])


def lape_entropy(gate_probability: np.ndarray) -> np.ndarray:
    """[layer, neuron] entropy (nats) over tasks of AP [task, layer, neuron] normalised over tasks
    (a neuron that never fires has entropy 0, as identify.py's NaN -> 0)."""
    ap = np.asarray(gate_probability, dtype=np.float64)
    total = ap.sum(0, keepdims=True)
    p = np.divide(ap, total, out=np.zeros_like(ap), where=total > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(0)


def _lape_kept(ap: np.ndarray, filter_quantile: float) -> np.ndarray:
    """bool [layer, neuron]: LAPE's filter, some task's AP above the ``filter_quantile`` value of all AP."""
    return (ap > _kth_smallest(ap, filter_quantile)).any(axis=0)


def lape_candidates(
    gate_probability: np.ndarray, filter_quantile: float = 0.95, bar_quantile: float = 0.95
) -> np.ndarray:
    """bool [task, layer, neuron]: the neuron passes LAPE's filter (some task's AP exceeds the
    ``filter_quantile`` value of all AP) and task t's AP exceeds the ``bar_quantile`` value."""
    ap = np.asarray(gate_probability, dtype=np.float64)
    return _lape_kept(ap, filter_quantile)[None] & (ap > _kth_smallest(ap, bar_quantile))


def lape_selection(
    gate_probability: np.ndarray, top_rate: float = 0.01, filter_quantile: float = 0.95, bar_quantile: float = 0.95
) -> np.ndarray:
    """bool [task, layer, neuron]: LAPE's own neuron sets (``identify.py``): the ``top_rate``
    lowest-entropy neurons among those passing the filter (ties: lowest flat index first), each
    assigned to every task whose AP exceeds the bar."""
    ap = np.asarray(gate_probability, dtype=np.float64)
    entropy = lape_entropy(ap)
    flat = np.where(_lape_kept(ap, filter_quantile), entropy, np.inf).ravel()
    n_top = round(flat.size * top_rate)
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argsort(flat, kind="stable")[:n_top]] = True
    chosen &= np.isfinite(flat)
    return chosen.reshape(entropy.shape)[None] & (ap > _kth_smallest(ap, bar_quantile))


def lape_scores(gate_probability: np.ndarray, filter_quantile: float = 0.95, bar_quantile: float = 0.95) -> np.ndarray:
    """[task, layer, neuron] ``lape`` ranking scores: 2 + (1 - H / log T) for task t's LAPE
    candidates (``lape_candidates``; lowest entropy first, so ``lape_selection`` is a prefix of
    the ranking), p_t = AP_t / sum_s AP_s in [0, 1] for the other neurons."""
    ap = np.asarray(gate_probability, dtype=np.float64)
    T = ap.shape[0]
    if T < 2:
        raise PipelineError(f"lape needs at least 2 tasks to compare (got {T})")
    total = ap.sum(0, keepdims=True)
    share = np.divide(ap, total, out=np.zeros_like(ap), where=total > 0)
    specific = 2.0 + (1.0 - lape_entropy(ap) / np.log(T))[None]
    return np.where(lape_candidates(ap, filter_quantile, bar_quantile), specific, share)


@dataclass(frozen=True)
class TaskStatistics:
    """What ``attribute`` needs from one task's store (all [layer, neuron] unless noted; see
    ``StreamingContributions`` for each mean)."""

    mean_contribution: np.ndarray  # [condition, layer, neuron]
    mean_logprob_contribution: np.ndarray  # [condition, layer, neuron]
    mean_activation: np.ndarray
    activation_probability: np.ndarray
    mean_atp: np.ndarray
    gate_probability: np.ndarray
    gate_mean_normalised: np.ndarray
    gate_probability_normalised: np.ndarray
    head_scores: np.ndarray  # [condition - 1]
    n_items: int

    @classmethod
    def from_sums(cls, stats: StreamingContributions, store: ActivationStore) -> "TaskStatistics":
        """The means of ``stats`` (summed over ``store``'s items) with the store's head scores."""
        return cls(
            stats.mean_contribution(),
            stats.mean_logprob_contribution(),
            stats.mean_activation(),
            stats.activation_probability(),
            stats.mean_atp(),
            stats.gate_probability(),
            stats.gate_mean_normalised(),
            stats.gate_probability_normalised(),
            store.head_scores(),
            stats.n_items,
        )


def task_statistics(
    store: ActivationStore, items_per_block: int | None = None, items: np.ndarray | None = None
) -> TaskStatistics:
    """``TaskStatistics`` of one store (or of its ``items`` positions), in one streaming pass (``accumulate``)."""
    return TaskStatistics.from_sums(accumulate(store, items_per_block, items), store)


@dataclass(frozen=True)
class BaselineSettings:
    """Parameters of the baselines: ``ape_min_probability`` (``ape_last``), LAPE's
    ``lape_filter_quantile`` and ``lape_bar_quantile`` (identify.py's filter_rate and
    activation_bar_ratio)."""

    ape_min_probability: float = 0.05
    lape_filter_quantile: float = 0.95
    lape_bar_quantile: float = 0.95


def importance_matrix(
    statistics: dict[str, TaskStatistics], *, seed: int, baselines: BaselineSettings = BaselineSettings()
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
    ape = ape_scores(np.stack([statistics[t].activation_probability for t in tasks]), baselines.ape_min_probability)
    lape = (
        lape_scores(
            np.stack([statistics[t].gate_probability for t in tasks]),
            baselines.lape_filter_quantile,
            baselines.lape_bar_quantile,
        )
        if len(tasks) > 1
        else np.full((1, L, I), np.nan)
    )
    rng = np.random.default_rng(seed)
    for j, t in enumerate(tasks):
        s = statistics[t]
        by_method = {
            "hones": hones_importance(s.mean_contribution, s.head_scores),
            "hones_nohead": s.mean_contribution[0],
            "hones_lp": hones_importance(s.mean_logprob_contribution, s.head_scores),
            "hones_lp_nohead": s.mean_logprob_contribution[0],
            "atp": s.mean_atp,
            "ma": s.gate_mean_normalised,
            "ap": s.gate_probability_normalised,
            "lape": lape[j],
            "ma_last": s.mean_activation,
            "ap_last": s.activation_probability,
            "ape_last": ape[j],
            "random": rng.random((L, I)),
        }
        for m, method in enumerate(STORE_METHODS):
            out[m, j] = by_method[method]
    return MethodScores(list(STORE_METHODS), tasks, out)


def with_ground_truth(
    statistics: dict[str, TaskStatistics],
    ablation: dict[str, np.ndarray | None],
    *,
    seed: int,
    baselines: BaselineSettings = BaselineSettings(),
) -> MethodScores:
    """``importance_matrix`` plus the ``ablation`` slice (NaN for tasks without ground truth)."""
    methods, tasks, scores = importance_matrix(statistics, seed=seed, baselines=baselines)
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
    baselines: BaselineSettings = BaselineSettings(),
    items_per_block: int | None = None,
) -> MethodScores:
    """All methods for all tasks: (methods, tasks, importance [method, task, layer, neuron]).

    One streaming pass per task store. ``ablation[task]`` is the ground-truth effect
    [layer, neuron] or None (then the ``ablation`` slice is NaN).
    """
    statistics = {}
    for task, store in stores.items():
        statistics[task] = task_statistics(store, items_per_block)
        log.info("%s: %d items, %d head conditions", task, statistics[task].n_items, len(statistics[task].head_scores))
    return with_ground_truth(statistics, ablation, seed=seed, baselines=baselines)


def attribute_on_items(
    stores: dict[str, ActivationStore],
    item_ids: dict[str, list[str]],
    *,
    seed: int,
    baselines: BaselineSettings = BaselineSettings(),
) -> MethodScores:
    """``importance_matrix`` from only the items ``item_ids[task]`` of each task's store (e.g.
    the items the ablation ground truth was measured on, so that a method's faithfulness is
    not diluted by the difference between item samples). A missing id is an error naming it."""
    statistics = {}
    for task, store in stores.items():
        where = {iid: k for k, iid in enumerate(store.item_ids)}
        missing = [iid for iid in item_ids[task] if iid not in where]
        if missing:
            raise PipelineError(
                f"{task}: items {missing[:5]} ({len(missing)} in all) are not in the store {store.root}"
            )
        statistics[task] = task_statistics(store, items=np.array(sorted(where[i] for i in item_ids[task])))
    return importance_matrix(statistics, seed=seed, baselines=baselines)
