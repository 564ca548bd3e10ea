"""Steering masks from importance matrices, and how faithful each method's ranking is.

- ``mask_topk``: the global top ``rho`` fraction of all L*I neurons of a [layer, neuron] matrix.
- ``mask_layer_budget``: the top neurons within each layer under a per-layer budget (the
  ``random`` baseline takes the per-layer budget of ``hones``).
- ``build_masks``: the masks table (method, task, rank, layer, neuron, score) for all methods.
- ``faithfulness``: Spearman correlation with the ablation ground truth and precision@k of
  the top set against the ablation top set; ``overlap``: Jaccard of top sets across tasks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from pipeline.errors import PipelineError

MASK_COLUMNS = ("method", "task", "rank", "layer", "neuron", "score")


def mask_size(n_layers: int, n_neurons: int, rho: float) -> int:
    """Number of neurons in a top-``rho`` mask (at least 1)."""
    if not 0 < rho <= 1:
        raise PipelineError(f"masks: rho must be in (0, 1], got {rho}")
    # round() first: rho * n is computed in binary floating point, e.g. 0.07 * 100 = 7.000000000000001,
    # whose plain ceil would select one neuron too many.
    return max(1, math.ceil(round(rho * n_layers * n_neurons, 6)))


def _ranked(layers: np.ndarray, neurons: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    order = np.lexsort((neurons, layers, -scores))  # by score desc; ties by (layer, neuron)
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1, dtype=np.int32),
            "layer": layers[order].astype(np.int32),
            "neuron": neurons[order].astype(np.int32),
            "score": scores[order].astype(np.float64),
        }
    )


def mask_topk(scores: np.ndarray, rho: float) -> pd.DataFrame:
    """Top ``rho`` of all neurons of ``scores`` [layer, neuron]: columns rank, layer, neuron, score."""
    L, I = scores.shape
    k = mask_size(L, I, rho)
    flat = np.nan_to_num(scores.astype(np.float64).ravel(), nan=-np.inf)
    layers, neurons = np.divmod(np.arange(L * I), I)
    ranked = _ranked(layers, neurons, flat)
    return ranked.head(k).reset_index(drop=True)


def mask_layer_budget(scores: np.ndarray, budget: dict[int, int]) -> pd.DataFrame:
    """Within each layer l, its ``budget[l]`` highest-scoring neurons; ranked globally after."""
    parts = []
    for layer, n in budget.items():
        if n <= 0:
            continue
        row = np.nan_to_num(scores[layer].astype(np.float64), nan=-np.inf)
        top = np.lexsort((np.arange(row.size), -row))[:n]
        parts.append((np.full(n, layer), top, row[top]))
    if not parts:
        return _ranked(np.array([], int), np.array([], int), np.array([], float))
    layers, neurons, vals = (np.concatenate(p) for p in zip(*parts))
    return _ranked(layers, neurons, vals)


def build_masks(methods: list[str], tasks: list[str], scores: np.ndarray, rho: float,
                budget_from: str = "hones") -> pd.DataFrame:
    """Masks table for every method and task of ``scores`` [method, task, layer, neuron].

    ``random`` takes the per-layer budget of ``budget_from`` for the same task.
    """
    frames = []
    for j, task in enumerate(tasks):
        ref = mask_topk(scores[methods.index(budget_from), j], rho)
        budget = ref["layer"].value_counts().to_dict()
        for m, method in enumerate(methods):
            mask = mask_layer_budget(scores[m, j], budget) if method == "random" else mask_topk(scores[m, j], rho)
            frames.append(mask.assign(method=method, task=task))
    out = pd.concat(frames, ignore_index=True)
    return out[list(MASK_COLUMNS)]


def faithfulness(scores: np.ndarray, ground_truth: np.ndarray, k: int) -> dict[str, float]:
    """Spearman rho of ``scores`` vs ``ground_truth`` (both [layer, neuron]) and precision@k of
    the top-k sets."""
    a, b = scores.ravel().astype(np.float64), ground_truth.ravel().astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    rho = float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else math.nan
    top_a = set(np.argsort(-np.where(ok, a, -np.inf), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.where(ok, b, -np.inf), kind="stable")[:k].tolist())
    return {"spearman": rho, "precision_at_k": len(top_a & top_b) / k, "k": k}


def overlap(masks: pd.DataFrame, method: str = "hones") -> pd.DataFrame:
    """Jaccard overlap [task x task] of one method's selected neuron sets."""
    sel = masks[masks["method"] == method]
    tasks = list(dict.fromkeys(sel["task"]))
    sets = {t: set(zip(g["layer"], g["neuron"])) for t, g in sel.groupby("task")}
    mat = pd.DataFrame(index=tasks, columns=tasks, dtype=float)
    for a in tasks:
        for b in tasks:
            union = sets[a] | sets[b]
            mat.loc[a, b] = len(sets[a] & sets[b]) / len(union) if union else math.nan
    return mat
