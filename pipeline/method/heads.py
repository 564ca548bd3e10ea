"""Critical-head localisation (docs/method.md section 2).

For every attention head (l, h) of the language model, S_t(l, h) = P_t(base) - P_t(head h of
layer l mean-substituted) on the discovery split. All L*H + 1 conditions of an example run
in the same batches: each example is repeated once per condition and every row substitutes
its own head (``hooks.substitute_heads``), so the model runs ceil(items * (L*H+1) / batch)
forwards instead of L*H+1 passes over the split.

- ``score_heads``: the batched computation -> DataFrame (layer, head, score, baseline,
  intervened, metric, utility).
- ``score_heads_naive``: one head at a time, the reference the tests compare against.
- ``top_heads``: the K_h heads with the highest score.
- ``score_heads_per_item``: ``score_heads`` and the per-item utilities behind it;
  ``per_item_table`` / ``per_item_values``: those utilities as a long table and back.

How stable the top K_h are under a bootstrap over the scoring items is
``pipeline.outcomes.head_stability``.

The layer x head heatmap of the scores is ``pipeline.report.plots.plot_head_scores``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import evaluate_task, result_values
from pipeline.model.hooks import lowest_layer, substitute_heads
from pipeline.tasks.items import ImageTable

log = logging.getLogger(__name__)

HEAD_COLUMNS = ("layer", "head", "score", "baseline", "intervened", "metric", "utility")


def all_heads(n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Every (layer, head) pair, layer-major."""
    return [(l, h) for l in range(n_layers) for h in range(n_heads)]


def _table(heads, base: float, intervened: list[float], metric: str, utility: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": np.array([l for l, _ in heads], dtype=np.int32),
            "head": np.array([h for _, h in heads], dtype=np.int32),
            "score": np.array([base - v for v in intervened], dtype=np.float64),
            "baseline": np.full(len(heads), base, dtype=np.float64),
            "intervened": np.array(intervened, dtype=np.float64),
            "metric": metric,
            "utility": utility,
        }
    )


def score_heads(adapter, task: str, items: pd.DataFrame, images: ImageTable, **kwargs) -> pd.DataFrame:
    """S_t(l, h) for every head (or the given ``heads``): the table of ``score_heads_per_item``."""
    return score_heads_per_item(adapter, task, items, images, **kwargs)[0]


def score_heads_per_item(
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    *,
    batch_size: int,
    max_new_tokens: int = 24,
    utility: str = "generative",
    heads: list[tuple[int, int]] | None = None,
    share_prefix: bool = True,
) -> tuple[pd.DataFrame, np.ndarray, str]:
    """S_t(l, h) for every head (or the given ``heads``), batched across heads.

    Returns (table, values, kind). ``values``: the per-item utilities of the base (row 0) and of
    each head's substitution, [1 + heads, items] (``kind`` "mean") or per-item BLEU statistics
    [1 + heads, items, 10] (``kind`` "corpus_bleu"), what ``head_stability`` resamples. The table
    has one row per head: ``score`` = ``baseline`` - ``intervened`` in the task's metric
    units (``metric`` column; "answer_logprob" in nats for ``utility="teacher_forced"``).
    ``share_prefix``: single-forward utilities compute the vision tower and the layers below
    each batch's lowest head once per item (``evaluate_task``'s ``condition_layers``); False
    runs every row in full (benchmarks).
    """
    heads = heads if heads is not None else all_heads(adapter.num_layers, adapter.num_heads)
    row_heads: list[tuple[int, int] | None] = [None, *heads]
    results = evaluate_task(
        adapter, task, items, images, batch_size=batch_size, max_new_tokens=max_new_tokens, utility=utility,
        n_conditions=len(row_heads),
        condition_hooks=lambda conds: substitute_heads(adapter, [row_heads[c] for c in conds]),
        condition_layers=[lowest_layer([h]) for h in row_heads] if share_prefix else None,
        progress=f"heads {task} ({utility})",
    )
    base = results[0].utility
    log.info("%s %s baseline %.4f over %d items", task, results[0].metric, base, len(items))
    values, kind = result_values(results)
    return _table(heads, base, [r.utility for r in results[1:]], results[0].metric, utility), values, kind


def score_heads_naive(
    adapter, task: str, items: pd.DataFrame, images: ImageTable, *, batch_size: int, max_new_tokens: int = 24,
    utility: str = "generative", heads: list[tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Reference implementation: a full pass over ``items`` per head (L*H+1 passes)."""
    heads = heads if heads is not None else all_heads(adapter.num_layers, adapter.num_heads)
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, utility=utility, progress=False)
    base = evaluate_task(adapter, task, items, images, **kw)[0]
    intervened = []
    for head in heads:
        res = evaluate_task(
            adapter, task, items, images, **kw,
            condition_hooks=lambda conds, head=head: substitute_heads(adapter, [head] * len(conds)),
        )[0]
        intervened.append(res.utility)
    return _table(heads, base.utility, intervened, base.metric, utility)


def top_heads(scores: pd.DataFrame, k: int, name: str = "top_k") -> pd.DataFrame:
    """The ``k`` highest-scoring heads (ties broken by layer, then head), with their rank.

    ``scores`` holds every head of the model (a ``head_scores`` table), so ``k`` above its
    length is an error naming ``name`` (the caller's key) and the model's head count, never a
    silent cut to fewer heads than asked for."""
    if k < 1:
        raise PipelineError(f"{name} must be >= 1, got {k}")
    if k > len(scores):
        shape = (f" ({scores['layer'].nunique()} layers x {scores['head'].nunique()} heads)"
                 if {"layer", "head"} <= set(scores.columns) and len(scores) else "")
        raise PipelineError(f"{name} = {k} but the model has {len(scores)} attention heads{shape}; "
                            f"set {name} to at most {len(scores)}")
    top = scores.sort_values(["score", "layer", "head"], ascending=[False, True, True], kind="stable").head(k)
    return top.assign(rank=np.arange(1, len(top) + 1, dtype=np.int32)).reset_index(drop=True)



def per_item_table(values: np.ndarray, kind: str) -> pd.DataFrame:
    """``score_heads_per_item``'s ``values`` as rows (condition, item, score[, bleu_0 ..]):
    condition 0 is the base, condition c >= 1 the head in row c - 1 of the scores table; for
    ``kind`` "corpus_bleu" the BLEU statistics are the ``bleu_*`` columns and score is NaN."""
    C, n = values.shape[:2]
    out = pd.DataFrame({"condition": np.repeat(np.arange(C, dtype=np.int32), n),
                        "item": np.tile(np.arange(n, dtype=np.int32), C)})
    if kind == "corpus_bleu":
        out["score"] = np.nan
        for j in range(values.shape[2]):
            out[f"bleu_{j}"] = values[:, :, j].reshape(-1)
    else:
        out["score"] = values.reshape(-1).astype(np.float64)
    return out


def per_item_values(table: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The inverse of ``per_item_table``: (values, kind)."""
    table = table.sort_values(["condition", "item"], kind="stable")
    C, n = int(table["condition"].max()) + 1, int(table["item"].max()) + 1
    if len(table) != C * n:
        raise PipelineError(f"per-item head scores: {len(table)} rows, expected {C} conditions x {n} items")
    bleu = sorted((c for c in table.columns if c.startswith("bleu_")), key=lambda c: int(c.split("_")[1]))
    if bleu:
        return table[bleu].to_numpy(dtype=np.float64).reshape(C, n, len(bleu)), "corpus_bleu"
    return table["score"].to_numpy(dtype=np.float64).reshape(C, n), "mean"
