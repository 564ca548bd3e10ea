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
- ``estimate_head_scores``: the first-order (gradient) estimate of every head's teacher-forced
  score, per item, from one forward and one backward pass (``hooks.trace_head_substitution``).
- ``score_heads_guided``: gradient-guided localisation (an addition to the paper, which
  substitutes every head): exact scores only for the ``candidates`` heads the estimate ranks
  highest; ``guided_candidates`` is that choice.
- ``score_heads_screened``: screened localisation (also an addition): every head scored exactly
  on the first ``screen_items`` items, then the ``candidates`` best of them on every item.
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
import torch

from pipeline.errors import PipelineError
from pipeline.model.batching import for_each_batch
from pipeline.model.evaluation import evaluate_task, result_values
from pipeline.model.hooks import lowest_layer, substitute_heads, trace_head_substitution
from pipeline.model.scoring import mean_answer_logprob, model_answer_logprobs
from pipeline.tasks.items import ImageTable, item_prompts, teacher_forced_answers
from pipeline.tasks.metrics import utility_of_values

log = logging.getLogger(__name__)

HEAD_COLUMNS = ("layer", "head", "score", "baseline", "intervened", "metric", "utility")
# What the heads stage adds to the table: the gradient estimate of each head's score (nats), and
# whether the exact score was computed (guided localisation leaves the others NaN).
ESTIMATE_COLUMNS = ("estimate", "exact")


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
        adapter,
        task,
        items,
        images,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        utility=utility,
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
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    *,
    batch_size: int,
    max_new_tokens: int = 24,
    utility: str = "generative",
    heads: list[tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Reference implementation: a full pass over ``items`` per head (L*H+1 passes)."""
    heads = heads if heads is not None else all_heads(adapter.num_layers, adapter.num_heads)
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, utility=utility, progress=False)
    base = evaluate_task(adapter, task, items, images, **kw)[0]
    intervened = []
    for head in heads:
        res = evaluate_task(
            adapter,
            task,
            items,
            images,
            **kw,
            condition_hooks=lambda conds, head=head: substitute_heads(adapter, [head] * len(conds)),
        )[0]
        intervened.append(res.utility)
    return _table(heads, base.utility, intervened, base.metric, utility)


def estimate_head_scores(
    adapter, items: pd.DataFrame, images: ImageTable, *, batch_size: int, progress: bool = True
) -> np.ndarray:
    """The first-order estimate of every head's teacher-forced score, per item: float64
    [items, layers, heads], nats.

    estimate[n, l, h] = -d U_n / d alpha[l, h] at alpha = 0 (``hooks.trace_head_substitution``),
    U_n the mean log-probability of item n's ``reference_answer`` given its prompt (the
    utility of ``score_heads(..., utility="teacher_forced")`` and of the neuron ground truth):
    linear in the substitution, so it approximates U_n(base) - U_n(head substituted), the
    per-item score, from one forward and one backward pass per batch of ``batch_size`` items,
    whatever the number of heads. Where attention saturates or effects cancel it can miss a
    head; ``score_heads_guided`` therefore scores its top candidates exactly.
    """
    items = items.reset_index(drop=True)
    prompts, answers = item_prompts(items), teacher_forced_answers(items)
    imgs = [images[i] for i in items["image_id"]]
    L = adapter.num_layers
    out = np.zeros((len(items), L, adapter.num_heads), dtype=np.float64)

    def run(sl: slice) -> None:
        inputs = adapter.build_inputs(imgs[sl], prompts[sl], answers=answers[sl])
        with torch.enable_grad(), trace_head_substitution(adapter, inputs.batch_size) as alphas:
            utility = mean_answer_logprob(*model_answer_logprobs(adapter, inputs))
            grads = torch.autograd.grad(utility.sum(), [alphas[l] for l in range(L)])
        out[sl] = -torch.stack(grads, dim=1).double().cpu().numpy()

    for_each_batch(len(items), batch_size, run, what="head score estimate", progress=progress)
    return out


def with_estimate(scores: pd.DataFrame, estimate: np.ndarray) -> pd.DataFrame:
    """``scores`` (one row per head, any order) with the ``estimate`` column: the mean over items
    of ``estimate_head_scores``' [items, layers, heads] at each row's (layer, head), and ``exact``
    (the ``score`` column was computed: not NaN)."""
    mean = estimate.mean(axis=0)
    return scores.assign(
        estimate=mean[scores["layer"].to_numpy(), scores["head"].to_numpy()], exact=scores["score"].notna().to_numpy()
    )


def guided_candidates(estimate: pd.DataFrame, candidates: int, name: str = "candidates") -> list[tuple[int, int]]:
    """The ``candidates`` heads with the highest ``estimate`` (a table with layer, head, estimate;
    ties broken by layer, then head), layer-major: the heads guided localisation scores exactly."""
    if candidates < 1:
        raise PipelineError(f"{name} must be >= 1, got {candidates}")
    if candidates > len(estimate):
        raise PipelineError(
            f"{name} = {candidates} but the model has {len(estimate)} attention heads; "
            f"set {name} to at most {len(estimate)}"
        )
    top = estimate.sort_values(["estimate", "layer", "head"], ascending=[False, True, True], kind="stable").head(
        candidates
    )
    return sorted((int(l), int(h)) for l, h in zip(top["layer"], top["head"]))


def score_heads_guided(
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    *,
    candidates: int,
    gradient_batch_items: int,
    name: str = "candidates",
    **kwargs,
) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Gradient-guided localisation: ``estimate_head_scores`` ranks every head, then
    ``score_heads_per_item`` (``kwargs``: its batching and utility) scores exactly the
    ``candidates`` with the highest estimate (``guided_candidates``). Cost: one forward and one
    backward per item plus ``candidates`` of the L*H substitutions.

    Returns ``score_heads_per_item``'s (table, values, kind) with the table holding every head:
    ``score`` / ``intervened`` NaN where not computed, ``estimate`` and ``exact`` columns
    (``with_estimate``); ``values`` rows are the base and the candidates, in the order of the
    table's exact rows. With ``candidates`` = every head it ranks as ``score_heads`` does.
    """
    estimate = estimate_head_scores(adapter, items, images, batch_size=gradient_batch_items)
    every = pd.DataFrame(all_heads(adapter.num_layers, adapter.num_heads), columns=["layer", "head"])
    chosen = guided_candidates(with_estimate(every.assign(score=np.nan), estimate), candidates, name)
    exact, values, kind = score_heads_per_item(adapter, task, items, images, heads=chosen, **kwargs)
    return with_estimate(_every_head(every, exact), estimate), values, kind


def _every_head(heads: pd.DataFrame, exact: pd.DataFrame) -> pd.DataFrame:
    """``heads`` (layer, head of every head of the model) with ``exact``'s columns where it scored
    the head (NaN elsewhere), and its baseline, metric and utility on every row."""
    table = heads[["layer", "head"]].merge(exact, on=["layer", "head"], how="left")
    table["baseline"] = exact["baseline"].iloc[0]
    table["metric"], table["utility"] = exact["metric"].iloc[0], exact["utility"].iloc[0]
    return table.astype({"layer": np.int32, "head": np.int32})


def score_heads_screened(
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    *,
    screen_items: int,
    candidates: int,
    name: str = "candidates",
    **kwargs,
) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Screened localisation: every head scored exactly (``score_heads_per_item``, ``kwargs``
    its batching and utility) on the first ``screen_items`` items, then the ``candidates`` heads
    with the highest screen score (ties broken by layer, then head) on the remaining items too,
    ranked by their exact score over every item. Cost: L*H + 1 rows per screened item and
    ``candidates`` + 1 per other item, against L*H + 1 per item exhaustive.

    Returns ``score_heads_guided``'s layout: the table holds every head (``score`` and
    ``intervened`` over every item, NaN outside the candidates; ``screen_score`` every head's
    score on the screened items; ``exact``), ``values`` the base and the candidates over every
    item [1 + candidates, items(, 10)] in the order of the table's exact rows. With
    ``screen_items`` >= the items and ``candidates`` = every head it is ``score_heads``.
    """
    if screen_items < 1:
        raise PipelineError(f"screen_items must be >= 1, got {screen_items}")
    items = items.reset_index(drop=True)
    n = min(screen_items, len(items))
    screen, screen_values, kind = score_heads_per_item(adapter, task, items.iloc[:n], images, **kwargs)
    top = top_heads(screen, candidates, name=name)
    chosen = sorted((int(l), int(h)) for l, h in zip(top["layer"], top["head"]))
    labels = list(zip(screen["layer"].astype(int), screen["head"].astype(int)))
    values = screen_values[[0, *(1 + labels.index(head) for head in chosen)]]
    if n < len(items):
        log.info(
            "%s: screened %d heads on %d items; %d candidates on the other %d",
            task,
            len(screen),
            n,
            candidates,
            len(items) - n,
        )
        _, rest, rest_kind = score_heads_per_item(adapter, task, items.iloc[n:], images, heads=chosen, **kwargs)
        if rest_kind != kind:
            raise PipelineError(f"heads {task}: the screen's utilities are {kind}, the other items' {rest_kind}")
        values = np.concatenate([values, rest], axis=1)
    utility = utility_of_values(values, kind)
    exact = _table(
        chosen, float(utility[0]), [float(u) for u in utility[1:]], screen["metric"].iloc[0], screen["utility"].iloc[0]
    )
    table = _every_head(screen, exact)
    table["screen_score"] = screen["score"].to_numpy()
    table["exact"] = table["score"].notna().to_numpy()
    return table, values, kind


def top_heads(scores: pd.DataFrame, k: int, name: str = "top_k") -> pd.DataFrame:
    """The ``k`` highest-scoring heads (ties broken by layer, then head), with their rank.

    ``scores`` holds every head of the model (a ``head_scores`` table), so ``k`` above its
    length is an error naming ``name`` (the caller's key) and the model's head count, never a
    silent cut to fewer heads than asked for; so is ``k`` above the heads with exact scores of a
    guided table (``exact`` column)."""
    if k < 1:
        raise PipelineError(f"{name} must be >= 1, got {k}")
    # A guided table scores only its candidates: the others must never fill the top k.
    scored = int(scores["exact"].sum()) if "exact" in scores.columns else len(scores)
    if len(scores) >= k > scored:
        raise PipelineError(
            f"{name} = {k} but only {scored} of the model's {len(scores)} heads have exact scores "
            f"(guided localisation's candidates); set {name} to at most {scored}"
        )
    if k > len(scores):
        shape = (
            f" ({scores['layer'].nunique()} layers x {scores['head'].nunique()} heads)"
            if {"layer", "head"} <= set(scores.columns) and len(scores)
            else ""
        )
        raise PipelineError(
            f"{name} = {k} but the model has {len(scores)} attention heads{shape}; set {name} to at most {len(scores)}"
        )
    top = scores.sort_values(["score", "layer", "head"], ascending=[False, True, True], kind="stable").head(k)
    return top.assign(rank=np.arange(1, len(top) + 1, dtype=np.int32)).reset_index(drop=True)


def per_item_table(values: np.ndarray, kind: str) -> pd.DataFrame:
    """``score_heads_per_item``'s ``values`` as rows (condition, item, score[, bleu_0 ..]):
    condition 0 is the base, condition c >= 1 the head in row c - 1 of the scores table; for
    ``kind`` "corpus_bleu" the BLEU statistics are the ``bleu_*`` columns and score is NaN."""
    C, n = values.shape[:2]
    out = pd.DataFrame(
        {"condition": np.repeat(np.arange(C, dtype=np.int32), n), "item": np.tile(np.arange(n, dtype=np.int32), C)}
    )
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
