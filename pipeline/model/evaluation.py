"""Task utilities P_t (docs/method.md section 1): batched greedy generation, retrieval scoring,
the teacher-forced log-probability surrogate, and their aggregation per task.

Map of this module:
- ``UTILITY_KINDS``: "generative" (the paper's metrics), "teacher_forced" (mean log-probability
  of the first reference, the heads' cheap surrogate) and "likelihood" (the continuous utility
  that held-out effects are decided on, always reported beside, never instead of, the generative
  metric): per item in [0, 1], the mean over ALL references of their per-token probability
  exp(mean answer log-probability); for retrieval, the softmax over the candidates' Yes-minus-No
  margins at the positive. Both are monotone in the teacher-forced log-probability and in the
  positive's margin against the negatives, with 0 meaning "task lost", which a relative drop needs
  (a log-probability's 0 is a perfect answer: OCR's -0.0008 nats made a 1% mask a 382% drop).
- ``TaskResult``: one task's utility over a set of items under one condition.
- ``generate`` / ``answer_logprob`` / ``yes_no_margin``: one batch's greedy answers, mean answer
  log-probabilities (via ``pipeline.model.scoring``) and retrieval Yes/No margins.
- ``evaluate_conditions``: ``evaluate_task`` for several utilities at once, each on its own
  subset of the conditions; retrieval's candidate margins are computed once for all of them.
- ``evaluate_task``: runs a task over items, optionally under several *conditions* at once
  (e.g. one per substituted head). Each example is repeated once per condition inside the
  same batch and ``condition_hooks(conditions_of_rows)`` returns the context manager that
  applies the per-row interventions; this is what lets head localisation batch across heads.
  Prompts and teacher-forced answers come from ``pipeline.tasks.items``.
  ``condition_layers`` (the lowest decoder layer each condition intervenes on) lets the
  single-forward utilities compute the vision tower and the layers below each batch's lowest
  intervened layer once per distinct sequence (``RowSharing``, ``hooks.forward_sharing_prefix``);
  generation always runs every row in full. Retrieval's candidates of one item under one
  condition run after one pass over the prefix they share where the family allows it
  (``hooks.candidates``), in place of that layer sharing.
- ``aggregate_utility``: per-item scores and the corpus-level utility for a task (the paper's
  metric), and ``generative_scores`` with it the captions' BLEU statistics;
  ``standard_utility``: this project's standard variant of it.
(The model-quality stage's measure is ``pipeline.model.quality``.)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.model.adapter import ModelInputs
from pipeline.model.batching import for_each_batch, largest_fitting_batch
from pipeline.model.hooks import forward_sharing_prefix
from pipeline.model.hooks.candidates import CANDIDATE_PREFIX_FAMILIES, last_logits_sharing_candidates
from pipeline.model.scoring import answer_logprobs, answer_token_id, mean_answer_logprob
from pipeline.tasks import metrics
from pipeline.tasks.items import (
    RETRIEVAL_NO,
    RETRIEVAL_YES,
    ImageTable,
    candidate_prompt,
    item_prompts,
    teacher_forced_answers,
)

log = logging.getLogger(__name__)

UTILITY_KINDS = ("generative", "teacher_forced", "likelihood")
METRIC_NAMES = {"vqa": "vqa_accuracy", "ocr": "anls", "caption": "bleu4", "retrieval": "ndcg@5"}
LIKELIHOOD_NAMES = {"retrieval": "positive_probability"}  # every other task: "reference_probability"

ConditionHooks = Callable[[list[int]], AbstractContextManager]


@dataclass
class TaskResult:
    """Utility of one task under one condition.

    ``per_item`` [item]: the per-example score (VQA accuracy, ANLS, sentence BLEU-4,
    NDCG@5, mean answer log-probability in nats, or the likelihood in [0, 1]); ``utility`` is
    the task's corpus-level value (corpus BLEU-4 for captions, the mean otherwise).
    ``statistics`` [item, 10]: for generated captions, ``metrics.paper_bleu_statistics`` (what a
    bootstrap of corpus BLEU resamples).
    """

    task: str
    metric: str
    utility: float
    per_item: np.ndarray
    predictions: list[str] | None = None
    statistics: np.ndarray | None = None


def result_values(results: list) -> tuple[np.ndarray, str]:
    """Per-item values of one task's ``TaskResult``s (one per condition, same items) for
    ``utility_replicates``: ([C, n, S] BLEU statistics, "corpus_bleu") for generated captions,
    else ([C, n] scores, "mean")."""
    if all(r.statistics is not None for r in results):
        return np.stack([r.statistics for r in results]), "corpus_bleu"
    return np.stack([np.asarray(r.per_item, dtype=np.float64) for r in results]), "mean"


def aggregate_utility(task: str, predictions: Sequence[str], items: pd.DataFrame) -> tuple[float, np.ndarray]:
    """The paper's utility of generated answers for ``task``, as the authors' evaluation
    computes it (``metrics.clean_generation``, then ``paper_vqa_accuracy`` against the first
    reference, ``paper_anls`` or ``paper_corpus_bleu``): (corpus-level utility, per-item scores). Captions' per-item score
    is the smoothed sentence BLEU of the cleaned caption (the corpus value is not its mean)."""
    utility, per, _ = generative_scores(task, predictions, items)
    return utility, per


def generative_scores(
    task: str, predictions: Sequence[str], items: pd.DataFrame
) -> tuple[float, np.ndarray, np.ndarray | None]:
    """``aggregate_utility``'s (utility, per-item scores), and for captions the per-item
    statistics [item, 10] of the paper's corpus BLEU (``metrics.paper_bleu_statistics``, what a
    bootstrap resamples; None for other tasks), each answer cleaned once."""
    refs = [list(r) for r in items["references"]]
    cleaned = [metrics.clean_generation(p) for p in predictions]
    if task == "vqa":
        # Against the first reference alone, the majority answer: the authors' reader looks for
        # a list of answers under keys their COCO records do not use, so it scores the majority
        # answer with the substring rule, never the three-annotator rule.
        per = np.array([metrics.paper_vqa_accuracy(p, r[:1]) for p, r in zip(cleaned, refs)])
        return (float(per.mean()) if len(per) else math.nan), per, None
    if task == "ocr":
        per = np.array([metrics.paper_anls(p, r) for p, r in zip(cleaned, refs)])
        return (float(per.mean()) if len(per) else math.nan), per, None
    if task == "caption":
        per = np.array([metrics.sentence_bleu(p, r) for p, r in zip(cleaned, refs)])
        stats = metrics.paper_bleu_statistics(cleaned, refs)
        # paper_corpus_bleu's own arithmetic, on the statistics computed once.
        return float(metrics.paper_bleu_from_statistics(stats.sum(axis=0))), per, stats
    raise PipelineError(f"task {task!r} has no generative metric; known: vqa, ocr, caption (retrieval is ranked)")


def standard_utility(task: str, predictions: Sequence[str], items: pd.DataFrame) -> float:
    """This project's standard variant of the generative metric (not the paper's): VQA
    accuracy with the VQA normalisation and whole-word containment (``metrics.vqa_accuracy``),
    ANLS against the best reference (``metrics.anls``), unsmoothed corpus BLEU-4 on word and
    punctuation tokens (``metrics.corpus_bleu``); raw generations, nothing cleaned."""
    refs = [list(r) for r in items["references"]]
    if task == "vqa":
        return float(np.mean([metrics.vqa_accuracy(p, r) for p, r in zip(predictions, refs)]))
    if task == "ocr":
        return float(np.mean([metrics.anls(p, r) for p, r in zip(predictions, refs)]))
    if task == "caption":
        return float(metrics.corpus_bleu(list(predictions), refs))
    raise PipelineError(f"task {task!r} has no generative metric; known: vqa, ocr, caption (retrieval is ranked)")


def _hooks(condition_hooks: ConditionHooks | None, conds: np.ndarray) -> AbstractContextManager:
    return condition_hooks(conds.tolist()) if condition_hooks is not None else contextlib.nullcontext()


@torch.no_grad()
def generate(adapter, images: list, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding for one batch; returns the decoded new text per row (special tokens dropped)."""
    inputs = adapter.build_inputs(images, prompts)
    out = adapter.model.generate(
        **inputs.tensors,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=adapter.processor.tokenizer.pad_token_id,
    )
    new = out[:, inputs.tensors["input_ids"].shape[1] :]
    return [t.strip() for t in adapter.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@dataclass(frozen=True)
class RowSharing:
    """How the rows of one batch share their prefix (``hooks.forward_sharing_prefix``):
    ``sources`` [B], the distinct sequence each row copies (any hashable keys), and
    ``first_layer``, the lowest decoder layer any row's intervention touches."""

    sources: Sequence
    first_layer: int


def _logits(
    adapter,
    images: list,
    prompts: list[str],
    answers: list[str] | None,
    hooks: Callable[[], AbstractContextManager],
    sharing: RowSharing | None,
):
    """(logits [B, S, V], inputs) of one batch under ``hooks``, its shared prefix computed once
    per distinct sequence when ``sharing`` is given."""
    if sharing is None:
        inputs = adapter.build_inputs(images, prompts, answers=answers)
        with hooks():
            return adapter.model(**inputs.tensors).logits, inputs
    index: dict = {}
    reps: list[int] = []  # the first row of each distinct sequence
    for b, key in enumerate(sharing.sources):
        if key not in index:
            index[key] = len(reps)
            reps.append(b)
    source = torch.tensor([index[key] for key in sharing.sources])
    unique = adapter.build_inputs(
        [images[b] for b in reps],
        [prompts[b] for b in reps],
        answers=None if answers is None else [answers[b] for b in reps],
    )
    inputs = _repeated_rows(adapter, unique, source)
    if inputs is None:
        inputs = adapter.build_inputs(images, prompts, answers=answers)
    out = forward_sharing_prefix(adapter, unique.tensors, inputs.tensors, source, sharing.first_layer, hooks)
    return out.logits, inputs


# Families whose processors give every tensor one entry per row (one image per row: pixel_values
# [rows, ...]), so a batch of repeated rows is the distinct rows' tensors indexed. Qwen2-VL's
# flattened patches and InternVL's tiles ([tiles, ...]) are not indexed by row.
_ROW_INDEXED_FAMILIES = frozenset({"llava", "idefics3", "smolvlm", "paligemma", "gemma3"})


def _repeated_rows(adapter, unique: ModelInputs, source: torch.Tensor) -> ModelInputs | None:
    """``unique``'s rows repeated as ``source`` [B] says, without running the processor again
    (its image work costs a third of a tiny model's forward), or None where the family's tensors
    are not indexed by row."""
    if adapter.family not in _ROW_INDEXED_FAMILIES:
        return None
    n = unique.batch_size
    if any(t.dim() == 0 or t.shape[0] != n for t in unique.tensors.values()):
        return None
    return ModelInputs(
        {k: t[source] for k, t in unique.tensors.items()},
        unique.last_prompt_index[source],
        None if unique.answer_mask is None else unique.answer_mask[source],
    )


@torch.no_grad()
def answer_logprob(
    adapter,
    images: list,
    prompts: list[str],
    answers: list[str],
    hooks: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    sharing: RowSharing | None = None,
) -> np.ndarray:
    """Mean log-probability (nats per token) of each answer (+ eos) given image and prompt; [batch].

    One full forward pass (logits at every position) under ``hooks``, then
    ``scoring.mean_answer_logprob``; ``sharing``: see ``RowSharing``.
    """
    logits, inputs = _logits(adapter, images, prompts, answers, hooks, sharing)
    return mean_answer_logprob(*answer_logprobs(logits, inputs.input_ids, inputs.answer_mask)).cpu().numpy()


@torch.no_grad()
def yes_no_margin(
    adapter,
    images: list,
    prompts: list[str],
    hooks: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    sharing: RowSharing | None = None,
) -> np.ndarray:
    """logit("Yes") - logit("No") at the last prompt token; [batch]."""
    logits, inputs = _logits(adapter, images, prompts, None, hooks, sharing)
    rows = torch.arange(logits.shape[0])
    return _yes_no(adapter, logits[rows, inputs.last_prompt_index])


def _yes_no(adapter, last: torch.Tensor) -> np.ndarray:
    """logit("Yes") - logit("No") from each row's logits at its last prompt token [B, V]; [B]."""
    tok = adapter.processor.tokenizer
    yes, no = answer_token_id(tok, RETRIEVAL_YES), answer_token_id(tok, RETRIEVAL_NO)
    last = last.float()
    return (last[:, yes] - last[:, no]).cpu().numpy()


def evaluate_task(
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    *,
    batch_size: int,
    max_new_tokens: int = 24,
    utility: str = "generative",
    n_conditions: int = 1,
    condition_hooks: ConditionHooks | None = None,
    condition_layers: Sequence[int | None] | None = None,
    progress: str | None = None,
) -> list[TaskResult]:
    """Evaluate ``task`` on ``items`` under ``n_conditions`` conditions; one result per condition.

    Rows are (item, condition) pairs, item-major, ``batch_size`` rows per forward pass (for
    retrieval a row is one (item, candidate, condition) triple; for the likelihood one (item,
    reference, condition) triple). ``condition_hooks`` receives the condition index of every
    row of a batch and returns a context manager that applies the interventions (``None``: no
    interventions). With ``utility="teacher_forced"`` the score is the mean log-probability of
    ``pipeline.tasks.items.reference_answer`` given ``item_prompt`` (the first reference;
    retrieval: "Yes" on the positive pair); ``"likelihood"``: see the module docstring.

    ``condition_layers``: per condition, the lowest decoder layer its hooks touch (None: it
    intervenes nowhere). Given, the single-forward utilities (teacher-forced, likelihood and
    retrieval's margins) order rows by that layer, then item-major, and compute the vision
    tower and the layers below each batch's lowest layer once per distinct sequence
    (``hooks.forward_sharing_prefix``); results equal the plain rows' to float rounding.
    Generation never shares (its KV cache covers every layer).
    """
    out = evaluate_conditions(
        adapter,
        task,
        items,
        images,
        {utility: range(n_conditions)},
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        condition_hooks=condition_hooks,
        condition_layers=condition_layers,
        progress=progress,
    )
    return [out[utility][c] for c in range(n_conditions)]


def evaluate_conditions(
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    conditions: dict[str, Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int | None = 24,
    condition_hooks: ConditionHooks | None = None,
    condition_layers: Sequence[int | None] | None = None,
    progress: str | None = None,
) -> dict[str, dict[int, TaskResult]]:
    """{utility: {condition: TaskResult}} for each utility of ``conditions`` ({utility: condition
    indices}), every utility on the same ``items``. ``condition_hooks`` receives the condition
    indices as given here, ``condition_layers`` (see ``evaluate_task``) is indexed by them.
    Retrieval's generative and likelihood utilities share one pass over the union of their
    conditions (both are functions of the candidates' margins). ``max_new_tokens`` may be None
    when nothing is generated (no generative utility, or retrieval, which ranks)."""
    unknown = sorted(set(conditions) - set(UTILITY_KINDS))
    if unknown:
        raise PipelineError(f"utility {unknown[0]!r} is not one of {UTILITY_KINDS}")
    if "generative" in conditions and task != "retrieval" and (max_new_tokens is None or max_new_tokens < 1):
        raise PipelineError(f"{task}: generating answers needs max_new_tokens >= 1, got {max_new_tokens}")
    items = items.reset_index(drop=True)
    if len(items) == 0:
        raise PipelineError(f"no items to evaluate for task {task!r}")
    conds = {u: [int(c) for c in cs] for u, cs in conditions.items()}
    layers = _sharing_layers(adapter, condition_layers, conds, condition_hooks)
    out: dict[str, dict[int, TaskResult]] = {}
    if task == "retrieval":
        by_margin = [u for u in ("generative", "likelihood") if u in conds]
        if by_margin:
            union = sorted(set().union(*(conds[u] for u in by_margin)))
            margins = _retrieval_margins(adapter, items, images, batch_size, union, condition_hooks, layers, progress)
            for u in by_margin:
                out[u] = {c: _retrieval_result(items, margins[c], u) for c in conds[u]}
    for u, cs in conds.items():
        if u not in out:
            out[u] = _evaluate_rows(
                adapter,
                task,
                items,
                images,
                u,
                cs,
                batch_size,
                max_new_tokens,
                condition_hooks,
                layers if u != "generative" else None,
                progress,
            )
    return out


def _evaluate_rows(
    adapter,
    task: str,
    items: pd.DataFrame,
    images: ImageTable,
    utility: str,
    conds: list[int],
    batch_size: int,
    max_new_tokens: int | None,
    condition_hooks: ConditionHooks | None,
    layers: dict[int, int] | None,
    progress: str | None,
) -> dict[int, TaskResult]:
    """Generative, teacher-forced or likelihood results of a non-margin utility, per condition."""
    n, C = len(items), len(conds)
    prompts = item_prompts(items)
    image_ids = items["image_id"].tolist()
    if utility == "likelihood":
        # One row per (item, reference): the item's score is the mean over its references.
        refs = [[str(r) for r in rs] for rs in items["references"]]
        for i, rs in enumerate(refs):
            if not rs:
                raise PipelineError(f"item {items.at[i, 'item_id']!r} ({task}) has no reference to score")
        seq_item = np.concatenate([np.full(len(rs), i) for i, rs in enumerate(refs)])
        seq_answer = [r for rs in refs for r in rs]
    else:
        seq_item = np.arange(n)
        seq_answer = teacher_forced_answers(items) if utility == "teacher_forced" else []
    S = len(seq_item)
    preds: list[list[str]] = [[""] * n for _ in range(C)]
    scores = np.zeros((C, S))
    # Item-major (sequence, condition) rows: the rows of one image stay together.
    row_seqs, row_conds = np.repeat(np.arange(S), C), np.tile(np.arange(C), S)
    cond_ids = np.asarray(conds)
    if layers is not None:
        order = _layer_major(row_conds, cond_ids, layers)
        row_seqs, row_conds = row_seqs[order], row_conds[order]

    def run(sl: slice) -> None:
        sq, cd = row_seqs[sl], row_conds[sl]
        it = seq_item[sq]
        imgs = [images[image_ids[i]] for i in it]
        ps = [prompts[i] for i in it]
        if utility == "generative":
            with _hooks(condition_hooks, cond_ids[cd]):
                for i, c, text in zip(it, cd, generate(adapter, imgs, ps, max_new_tokens)):
                    preds[c][i] = text
        else:
            scores[cd, sq] = answer_logprob(
                adapter,
                imgs,
                ps,
                [seq_answer[q] for q in sq],
                lambda: _hooks(condition_hooks, cond_ids[cd]),
                _batch_sharing(sq.tolist(), cond_ids[cd], layers),
            )

    what = progress or f"{task} ({utility})"
    for_each_batch(S * C, batch_size, run, what=what, progress=progress is not False)
    results: dict[int, TaskResult] = {}
    for k, c in enumerate(conds):
        if utility == "generative":
            u, per, stats = generative_scores(task, preds[k], items)
            results[c] = TaskResult(task, METRIC_NAMES.get(task, task), u, per, preds[k], stats)
        elif utility == "likelihood":
            per = np.bincount(seq_item, weights=np.exp(scores[k]), minlength=n) / np.bincount(seq_item, minlength=n)
            results[c] = TaskResult(task, LIKELIHOOD_NAMES.get(task, "reference_probability"), float(per.mean()), per)
        else:
            results[c] = TaskResult(task, "answer_logprob", float(scores[k].mean()), scores[k])
    return results


def _retrieval_margins(
    adapter,
    items: pd.DataFrame,
    images: ImageTable,
    batch_size: int,
    conds: list[int],
    condition_hooks: ConditionHooks | None,
    layers: dict[int, int] | None,
    progress: str | None,
) -> dict[int, list[np.ndarray]]:
    """{condition: [item] -> Yes-minus-No margin of each candidate} for retrieval ``items``.

    Where the family allows it (``hooks.candidates``), an item's candidates under one condition
    run after one pass over the prefix they share (the image and the template before the
    candidate); otherwise every (item, candidate, condition) row runs in full, sharing the
    vision tower and the layers below each batch's lowest intervened layer (``layers``).
    """
    share_candidates = adapter.family in CANDIDATE_PREFIX_FAMILIES
    n_candidates = [len(items.at[i, "candidates"]) for i in range(len(items))]
    rows_per_call = batch_size
    if share_candidates:
        # Rows: (item, candidate, condition), an item's candidates under one condition together,
        # and calls of whole groups: as many as fit in a batch, or one group whose suffixes then
        # run in passes of at most a batch after its one prefix.
        rows = [(i, k, c) for i in range(len(items)) for c in conds for k in range(n_candidates[i])]
        widest = max(n_candidates)
        rows_per_call = (batch_size // widest) * widest if widest <= batch_size else widest
    else:
        # Item-major so that an image's rows share a batch.
        rows = [(i, k, c) for i in range(len(items)) for k in range(n_candidates[i]) for c in conds]
        if layers is not None:
            rows = [rows[r] for r in _layer_major(np.array([c for _, _, c in rows]), None, layers)]
    margins: dict[tuple[int, int, int], float] = {}
    image_ids = items["image_id"].tolist()
    prompts_of = [
        [candidate_prompt(prompt, candidate) for candidate in candidates]
        for prompt, candidates in zip(items["prompt"], items["candidates"])
    ]

    def run(sl: slice) -> None:
        batch = rows[sl]
        decoded = {i: images[image_ids[i]] for i in dict.fromkeys(i for i, _, _ in batch)}  # once per batch
        imgs = [decoded[i] for i, _, _ in batch]
        prompts = [prompts_of[i][k] for i, k, _ in batch]
        row_conds = np.array([c for _, _, c in batch])
        last = None
        if share_candidates:
            last = last_logits_sharing_candidates(
                adapter,
                imgs,
                prompts,
                [i for i, _, _ in batch],
                [(i, c) for i, _, c in batch],
                lambda rs: _hooks(condition_hooks, row_conds[rs]),
                suffix_rows=largest_fitting_batch(batch_size),
            )
        if last is not None:
            m = _yes_no(adapter, last)
        else:
            m = yes_no_margin(
                adapter,
                imgs,
                prompts,
                lambda: _hooks(condition_hooks, row_conds),
                _batch_sharing([(i, k) for i, k, _ in batch], row_conds, layers),
            )
        for key, v in zip(batch, m):
            margins[key] = float(v)

    for_each_batch(len(rows), rows_per_call, run, what=progress or "retrieval", progress=progress is not False)
    return {
        c: [np.array([margins[(i, k, c)] for k in range(len(items.at[i, "candidates"]))]) for i in range(len(items))]
        for c in conds
    }


def _sharing_layers(
    adapter,
    condition_layers: Sequence[int | None] | None,
    conds: dict[str, list[int]],
    condition_hooks: ConditionHooks | None,
) -> dict[int, int] | None:
    """{condition: first decoder layer its rows must compute} (an untouched condition: the last
    layer), or None when ``condition_layers`` is not given (no sharing)."""
    if condition_layers is None:
        return None
    if condition_hooks is None:
        raise PipelineError("condition_layers were given without condition_hooks")
    top = adapter.num_layers - 1
    out = {}
    for c in sorted(set().union(*conds.values())):
        if not 0 <= c < len(condition_layers):
            raise PipelineError(f"condition {c} has no entry in condition_layers ({len(condition_layers)} given)")
        layer = condition_layers[c]
        out[c] = top if layer is None else adapter.check_layers([layer], f"condition_layers[{c}]")[0]
    return out


def _layer_major(row_conds: np.ndarray, cond_ids: np.ndarray | None, layers: dict[int, int]) -> np.ndarray:
    """A stable order of rows by their condition's first layer (rows of conditions that start
    at the same layer fill the same batches; within a layer the old order, item-major, stays)."""
    ids = row_conds if cond_ids is None else cond_ids[row_conds]
    return np.argsort(np.array([layers[int(c)] for c in ids]), kind="stable")


def _batch_sharing(sources: list, row_conds: np.ndarray, layers: dict[int, int] | None) -> RowSharing | None:
    if layers is None:
        return None
    return RowSharing(sources, min(layers[int(c)] for c in row_conds))


def _retrieval_result(items: pd.DataFrame, margins: list[np.ndarray], utility: str) -> TaskResult:
    """NDCG@5 (generative) or the positive's softmax probability (likelihood) from candidate margins."""
    pos = [int(p) for p in items["positive_index"]]
    if utility == "generative":
        per = np.array([metrics.ndcg_at_k(m.tolist(), p, k=5) for m, p in zip(margins, pos)])
        return TaskResult("retrieval", METRIC_NAMES["retrieval"], float(per.mean()), per)
    per = np.array([float(np.exp(m[p] - m.max()) / np.exp(m - m.max()).sum()) for m, p in zip(margins, pos)])
    return TaskResult("retrieval", LIKELIHOOD_NAMES["retrieval"], float(per.mean()), per)
