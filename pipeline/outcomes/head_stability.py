"""Are the critical heads a property of the model or of the items that scored them?

``head_stability``: the recall of the top K_h heads under a bootstrap over the head-scoring
items, each head's selection frequency, and whether the scores are degenerate (no head whose
substitution lowers the utility: the top K_h is then arbitrary and HONES reduces to
``hones_nohead``, ``pipeline.method.attribution.hones_importance``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.method.heads import top_heads
from pipeline.outcomes.statistics import bootstrap_counts, distribution, utility_replicates


def head_stability(scores: pd.DataFrame, values: np.ndarray, kind: str, k: int, *, n_resamples: int,
                   seed: int) -> dict:
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
    top = top_heads(scores, k, name="heads.top_k")
    index = {(int(l), int(h)): i for i, (l, h) in enumerate(zip(scores["layer"], scores["head"]))}
    chosen = np.array([index[(int(l), int(h))] for l, h in zip(top["layer"], top["head"])])
    # Row order is layer-major, so a stable sort of -score breaks ties by layer, then head.
    layer_major = np.lexsort((scores["head"].to_numpy(), scores["layer"].to_numpy()))
    counts = bootstrap_counts(values.shape[1], n_resamples, np.random.default_rng([seed, 11]))
    _, reps = utility_replicates(values, counts, kind)
    rep_scores = (reps[0][None, :] - reps[1:])[layer_major]            # [heads, B]
    picks = layer_major[np.argsort(-rep_scores, axis=0, kind="stable")[:k]]  # [k, B]
    recall = np.isin(picks, chosen).sum(axis=0) / k
    freq = np.bincount(picks.ravel(), minlength=len(scores)) / n_resamples
    label = [f"{int(l)}.{int(h)}" for l, h in zip(scores["layer"], scores["head"])]
    positive = int((scores["score"].to_numpy() > 0).sum())
    return {
        "top_k": k, "items": int(values.shape[1]), "resamples": n_resamples,
        "top_heads": [label[i] for i in chosen],
        "recall": distribution(recall),
        "selection_frequency": {label[i]: round(float(freq[i]), 4) for i in np.argsort(-freq, kind="stable")
                                if freq[i] > 0},
        "positive_heads": positive,
        "degenerate": positive == 0,
        "hones_reduces_to": "hones_nohead" if positive == 0 else None,
    }
