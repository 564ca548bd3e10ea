"""Steering masks from importance matrices, and how faithful each method's ranking is.

- ``mask_topk``: the global top ``rho`` fraction of all L*I neurons of a [layer, neuron] matrix.
- ``mask_layer_budget``: the top neurons within each layer under a per-layer budget (the
  ``random`` baseline takes the per-layer budget of ``hones``).
- ``build_masks``: the masks table (method, task, rho, draw, headline, rank, layer, neuron,
  score) for all methods at every mask size of a grid (the deletion curve), with several
  ``random`` draws at the headline size; ``headline_mask`` selects one method's headline mask.
- ``faithfulness``: agreement with the ablation ground truth: Spearman over all neurons and
  over the neurons whose effect is distinguishable from zero, precision@k, and the fraction of
  the ground-truth top-k total effect that the method's top-k captures; ``overlap``: Jaccard of
  top sets across tasks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from pipeline.errors import PipelineError

MASK_COLUMNS = ("method", "task", "rho", "draw", "headline", "rank", "layer", "neuron", "score")


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


def build_masks(
    methods: list[str],
    tasks: list[str],
    scores: np.ndarray,
    rhos: list[float],
    headline_rho: float,
    *,
    random_draws: int = 1,
    seed: int = 0,
    budget_from: str = "hones",
) -> pd.DataFrame:
    """Masks table for every method and task of ``scores`` [method, task, layer, neuron] at
    every mask size in ``rhos`` (fractions of all neurons; ``headline_rho`` must be one of them).

    ``random`` takes the per-layer budget of ``budget_from`` for the same task and size. Its
    draw 0 ranks the stored random scores; at the headline size ``random_draws`` draws are
    made, draw d >= 1 ranking uniform scores seeded by (``seed``, d, task index).
    ``draw`` is 0 for every other method; ``headline`` marks the rows at ``headline_rho``.
    """
    rhos = sorted({float(r) for r in rhos} | {float(headline_rho)})
    if random_draws < 1:
        raise PipelineError(f"masks: random_draws must be >= 1, got {random_draws}")
    L, I = scores.shape[2:]
    frames = []
    for rho in rhos:
        headline = rho == float(headline_rho)
        for j, task in enumerate(tasks):
            ref = mask_topk(scores[methods.index(budget_from), j], rho)
            budget = ref["layer"].value_counts().to_dict()
            for m, method in enumerate(methods):
                if method != "random":
                    frames.append(
                        mask_topk(scores[m, j], rho).assign(
                            method=method, task=task, rho=rho, draw=0, headline=headline
                        )
                    )
                    continue
                for d in range(random_draws if headline else 1):
                    draw_scores = scores[m, j] if d == 0 else np.random.default_rng([seed, d, j]).random((L, I))
                    frames.append(
                        mask_layer_budget(draw_scores, budget).assign(
                            method=method, task=task, rho=rho, draw=d, headline=headline
                        )
                    )
    out = pd.concat(frames, ignore_index=True)
    return out[list(MASK_COLUMNS)].astype({"draw": np.int32, "rho": np.float64, "headline": bool})


def headline_mask(masks: pd.DataFrame, method: str, task: str) -> list[tuple[int, int]]:
    """(layer, neuron) of ``method``'s headline mask (draw 0) for ``task``, in rank order; [] if absent."""
    sel = masks[(masks["method"] == method) & (masks["task"] == task) & masks["headline"] & (masks["draw"] == 0)]
    return [(int(l), int(n)) for l, n in zip(sel["layer"], sel["neuron"])]


def faithfulness(
    scores: np.ndarray, ground_truth: np.ndarray, k: int, ground_truth_se: np.ndarray | None = None, z: float = 1.96
) -> dict[str, float]:
    """Agreement of ``scores`` with ``ground_truth`` (both [layer, neuron]).

    - ``spearman``: over all neurons;
    - ``spearman_significant`` / ``n_significant``: over the neurons whose ground-truth effect
      lies more than ``z`` standard errors (``ground_truth_se``) from zero (NaN without SEs or
      with fewer than 3 such neurons);
    - ``precision_at_k``: shared fraction of the two top-k sets;
    - ``captured_effect``: the ground-truth effect summed over the method's top k, divided by
      its sum over the ground truth's own top k (1.0: as good as the ground truth).
    """
    a, b = scores.ravel().astype(np.float64), ground_truth.ravel().astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    rho = float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else math.nan
    top_a = np.argsort(-np.where(ok, a, -np.inf), kind="stable")[:k]
    top_b = np.argsort(-np.where(ok, b, -np.inf), kind="stable")[:k]
    best = float(np.nansum(b[top_b]))
    out = {
        "spearman": rho,
        "precision_at_k": len(set(top_a.tolist()) & set(top_b.tolist())) / k,
        "k": k,
        "captured_effect": float(np.nansum(b[top_a])) / best if best > 0 else math.nan,
    }
    if ground_truth_se is not None:
        se = ground_truth_se.ravel().astype(np.float64)
        sig = ok & np.isfinite(se) & (np.abs(b) > z * se)
        out["n_significant"] = int(sig.sum())
        out["spearman_significant"] = float(spearmanr(a[sig], b[sig]).statistic) if sig.sum() > 2 else math.nan
    return out


def overlap(masks: pd.DataFrame, method: str = "hones") -> pd.DataFrame:
    """Jaccard overlap [task x task] of one method's selected neuron sets."""
    sel = masks[(masks["method"] == method) & masks["headline"] & (masks["draw"] == 0)]
    tasks = list(dict.fromkeys(sel["task"]))
    sets = {t: set(zip(g["layer"], g["neuron"])) for t, g in sel.groupby("task")}
    mat = pd.DataFrame(index=tasks, columns=tasks, dtype=float)
    for a in tasks:
        for b in tasks:
            union = sets[a] | sets[b]
            mat.loc[a, b] = len(sets[a] & sets[b]) / len(union) if union else math.nan
    return mat
