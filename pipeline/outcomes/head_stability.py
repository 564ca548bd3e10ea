"""Are the critical heads a property of the model or of the items that scored them?

``head_stability``: the recall of the top K_h heads under a bootstrap over the head-scoring
items, each head's selection frequency, and whether the scores are degenerate (no head whose
substitution lowers the utility: the top K_h is then arbitrary and HONES reduces to
``hones_nohead``, ``pipeline.method.attribution.hones_importance``).

``guided_localisation``: how well gradient-guided localisation (``pipeline.method.heads.
score_heads_guided``) would have found the exhaustive sweep's top K_h, from an exhaustive
heads table that carries every head's gradient estimate.

``screened_localisation``: the same for screened localisation (``score_heads_screened``): every
head scored exactly on the first items only, the best candidates then on every item, computed
from the exhaustive sweep's per-item values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from pipeline.errors import PipelineError
from pipeline.method.heads import guided_candidates, top_heads
from pipeline.outcomes.statistics import bootstrap_counts, distribution, utility_replicates


def head_stability(scores: pd.DataFrame, values: np.ndarray, kind: str, k: int, *, n_resamples: int, seed: int) -> dict:
    """How much the top ``k`` heads of ``scores`` depend on which scoring items were drawn.

    ``values`` / ``kind``: the per-item utilities of ``score_heads_per_item`` (row 0 the base,
    then the heads in ``scores``' order). Each of ``n_resamples`` bootstrap resamples of the items
    re-scores every head and takes its top ``k`` (ties broken as ``top_heads`` breaks them).
    Returns JSON-ready: ``recall`` (share of the full-sample top k found in a resample's top k:
    mean and 2.5/97.5 percentiles over resamples), ``selection_frequency`` {"layer.head": share
    of resamples whose top k holds it} for every head selected at least once, ``positive_heads``
    (heads whose substitution lowers the utility), and ``degenerate`` (no such head: the top k
    is arbitrary, and HONES reduces to ``hones_nohead``).
    """
    # Guided localisation scores only its candidates; ``values`` holds those rows, in table order.
    scores = scores[scores["score"].notna()].reset_index(drop=True)
    top = top_heads(scores, k, name="heads.top_k")
    index = {(int(l), int(h)): i for i, (l, h) in enumerate(zip(scores["layer"], scores["head"]))}
    chosen = np.array([index[(int(l), int(h))] for l, h in zip(top["layer"], top["head"])])
    # Row order is layer-major, so a stable sort of -score breaks ties by layer, then head.
    layer_major = np.lexsort((scores["head"].to_numpy(), scores["layer"].to_numpy()))
    counts = bootstrap_counts(values.shape[1], n_resamples, np.random.default_rng([seed, 11]))
    _, reps = utility_replicates(values, counts, kind)
    rep_scores = (reps[0][None, :] - reps[1:])[layer_major]  # [heads, B]
    picks = layer_major[np.argsort(-rep_scores, axis=0, kind="stable")[:k]]  # [k, B]
    recall = np.isin(picks, chosen).sum(axis=0) / k
    freq = np.bincount(picks.ravel(), minlength=len(scores)) / n_resamples
    label = [f"{int(l)}.{int(h)}" for l, h in zip(scores["layer"], scores["head"])]
    positive = int((scores["score"].to_numpy() > 0).sum())
    return {
        "top_k": k,
        "items": int(values.shape[1]),
        "resamples": n_resamples,
        "top_heads": [label[i] for i in chosen],
        "recall": distribution(recall),
        "selection_frequency": {
            label[i]: round(float(freq[i]), 4) for i in np.argsort(-freq, kind="stable") if freq[i] > 0
        },
        "positive_heads": positive,
        "degenerate": positive == 0,
        "hones_reduces_to": "hones_nohead" if positive == 0 else None,
    }


def head_labels(table: pd.DataFrame) -> list[str]:
    """ "layer.head" of each row of a heads table, in row order."""
    return [f"{int(l)}.{int(h)}" for l, h in zip(table["layer"], table["head"])]


def _recalls(exhaustive: pd.DataFrame, kept: pd.DataFrame, k: int) -> tuple[float, float]:
    """(recall, recall with ties counted) of the ``exhaustive`` top ``k`` among the ``kept`` heads:
    a kept head whose exact score equals the exhaustive k-th score counts as found in the second."""
    recall = len(set(head_labels(exhaustive)) & set(head_labels(kept))) / k
    tied = float((kept["score"] >= float(exhaustive["score"].iloc[-1])).sum())
    return recall, min(1.0, tied / k)


def guided_localisation(scores: pd.DataFrame, k: int, candidates: int) -> dict:
    """Gradient-guided localisation measured against the exhaustive sweep it would replace.

    ``scores``: an exhaustive heads table (every head's exact ``score``) with the ``estimate``
    column (``pipeline.method.heads.with_estimate``). Guided localisation keeps the top ``k`` by
    exact score among the ``candidates`` heads with the highest estimate; the exact scores of
    those candidates are the ones in ``scores``. Returns JSON-ready: ``spearman`` of estimate and
    exact score over every head, ``recall`` (share of the exhaustive top ``k`` that guided
    localisation finds), ``recall_ties_counted`` (the same, counting a guided head whose exact
    score equals the exhaustive k-th score as found: which of tied heads make the exhaustive top
    ``k`` is the layer order's choice, and a degenerate task's zeros tie every head),
    ``recall_estimate_only`` (the same for the estimate's own top ``k``,
    ``candidates`` = ``k``), ``candidate_recall`` (share of the exhaustive top ``k`` among the
    candidates), the top heads of each, and ``same_heads`` (guided keeps the same set, so the
    dump, masks and everything after are unchanged).
    """
    if "estimate" not in scores.columns or scores["score"].isna().any():
        raise PipelineError(
            "guided_localisation needs an exhaustive heads table with the estimate column "
            "(heads.localisation: exhaustive)"
        )
    exhaustive = top_heads(scores, k, name="heads.top_k")
    chosen = set(guided_candidates(scores, candidates, name="heads.guided.candidates"))
    in_candidates = [(int(l), int(h)) in chosen for l, h in zip(scores["layer"], scores["head"])]
    guided = top_heads(scores[in_candidates], k, name="heads.top_k")
    estimate_only = set(guided_candidates(scores, k, name="heads.top_k"))
    truth = set(head_labels(exhaustive))
    recall, recall_ties_counted = _recalls(exhaustive, guided, k)
    return {
        "top_k": k,
        "candidates": candidates,
        "heads": len(scores),
        # Undefined (NaN) where every exact score is equal, e.g. a degenerate task's zeros.
        "spearman": (
            float(spearmanr(scores["estimate"], scores["score"]).statistic)
            if np.ptp(scores["estimate"]) > 0 and np.ptp(scores["score"]) > 0
            else float("nan")
        ),
        "recall": recall,
        "recall_ties_counted": recall_ties_counted,
        "recall_estimate_only": len(truth & {f"{l}.{h}" for l, h in estimate_only}) / k,
        "candidate_recall": len(truth & {f"{l}.{h}" for l, h in chosen}) / k,
        "exhaustive_top_heads": head_labels(exhaustive),
        "guided_top_heads": head_labels(guided),
        "same_heads": recall == 1.0,
    }


def screened_localisation(
    scores: pd.DataFrame, values: np.ndarray, kind: str, k: int, candidates: int, screens: Sequence[int]
) -> dict:
    """How well screened localisation would find the exhaustive sweep's top ``k``: every head
    scored exactly on the first n items alone (n each of ``screens``), the ``candidates`` best of
    them kept (ties broken by layer, then head), and the top ``k`` of those by their exact score
    on every item.

    ``scores``: an exhaustive heads table; ``values`` / ``kind``: its per-item utilities
    (``score_heads_per_item``: row 0 the base, then the heads in ``scores``' order). The screen's
    items are among the items that define the exhaustive top ``k``, as they would be in a run
    that screens its own head-scoring items. Returns JSON-ready {n: {"items", "candidates", "recall",
    "recall_ties_counted", "screened_top_heads"}} (``guided_localisation``'s recalls), for each
    n from 1 to below the item count (a screen of every item is the sweep itself).
    """
    if scores["score"].isna().any():
        raise PipelineError("screened_localisation needs an exhaustive heads table (heads.localisation: exhaustive)")
    n_items = values.shape[1]
    exhaustive = top_heads(scores, k, name="heads.top_k")
    out = {}
    for n in sorted(set(screens)):
        if not 1 <= n < n_items:
            continue
        first = np.zeros((1, n_items))
        first[0, :n] = 1.0
        _, reps = utility_replicates(values, first, kind)
        screened = scores.assign(score=np.asarray(reps)[0, 0] - np.asarray(reps)[1:, 0])
        chosen = set(head_labels(top_heads(screened, candidates, name="heads.screened.candidates")))
        kept = top_heads(scores[[label in chosen for label in head_labels(scores)]], k, name="heads.top_k")
        recall, recall_ties_counted = _recalls(exhaustive, kept, k)
        out[str(n)] = {
            "items": n,
            "candidates": candidates,
            "recall": recall,
            "recall_ties_counted": recall_ties_counted,
            "screened_top_heads": head_labels(kept),
        }
    return out
