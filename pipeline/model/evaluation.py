"""Task utilities P_t (HONES.md section 1): batched greedy generation, retrieval scoring,
the teacher-forced log-probability surrogate, and their aggregation per task.

Map of this module:
- ``UTILITY_KINDS``: "generative" (the paper's metrics) and "teacher_forced" (mean answer
  log-probability, a cheap surrogate that is always reported beside, never instead of, it).
- ``TaskResult``: one task's utility over a set of items under one condition.
- ``generate`` / ``answer_logprob`` / ``yes_no_margin``: one batch's greedy answers, mean answer
  log-probabilities (via ``pipeline.model.scoring``) and retrieval Yes/No margins.
- ``evaluate_task``: runs a task over items, optionally under several *conditions* at once
  (e.g. one per substituted head). Each example is repeated once per condition inside the
  same batch and ``condition_hooks(conditions_of_rows)`` returns the context manager that
  applies the per-row interventions; this is what lets head localisation batch across heads.
  Prompts and teacher-forced answers come from ``pipeline.tasks.items``.
- ``aggregate_utility``: per-item scores and the corpus-level utility for a task.
- ``evaluate_model_quality``: the generative utility of each task on one split.
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
from pipeline.model.batching import for_each_batch
from pipeline.model.scoring import answer_logprobs, mean_answer_logprob
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

UTILITY_KINDS = ("generative", "teacher_forced")
METRIC_NAMES = {"vqa": "vqa_accuracy", "ocr": "anls", "caption": "bleu4", "retrieval": "ndcg@5"}

ConditionHooks = Callable[[list[int]], AbstractContextManager]


@dataclass
class TaskResult:
    """Utility of one task under one condition.

    ``per_item`` [item]: the per-example score (VQA accuracy, ANLS, sentence BLEU-4,
    NDCG@5, or mean answer log-probability in nats); ``utility`` is the task's corpus-level
    value (corpus BLEU-4 for captions, the mean otherwise).
    """

    task: str
    metric: str
    utility: float
    per_item: np.ndarray
    predictions: list[str] | None = None


def answer_token_id(tokenizer, word: str) -> int:
    """The first token id of ``word`` as the model would write it after the prompt."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PipelineError(f"the tokenizer maps {word!r} to no tokens; cannot score retrieval")
    return int(ids[0])


def aggregate_utility(task: str, predictions: Sequence[str], items: pd.DataFrame) -> tuple[float, np.ndarray]:
    """Corpus-level utility and per-item scores of generated answers for ``task``."""
    refs = [list(r) for r in items["references"]]
    if task == "vqa":
        per = np.array([metrics.vqa_accuracy(p, r) for p, r in zip(predictions, refs)])
        return float(per.mean()) if len(per) else math.nan, per
    if task == "ocr":
        per = np.array([metrics.anls(p, r) for p, r in zip(predictions, refs)])
        return float(per.mean()) if len(per) else math.nan, per
    if task == "caption":
        per = np.array([metrics.sentence_bleu(p, r) for p, r in zip(predictions, refs)])
        return float(metrics.corpus_bleu(list(predictions), refs)), per
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


@torch.no_grad()
def answer_logprob(adapter, images: list, prompts: list[str], answers: list[str]) -> np.ndarray:
    """Mean log-probability (nats per token) of each answer (+ eos) given image and prompt; [batch].

    One full forward pass (logits at every position), then ``scoring.mean_answer_logprob``.
    """
    inputs = adapter.build_inputs(images, prompts, answers=answers)
    logits = adapter.model(**inputs.tensors).logits
    return mean_answer_logprob(*answer_logprobs(logits, inputs.input_ids, inputs.answer_mask)).cpu().numpy()


@torch.no_grad()
def yes_no_margin(adapter, images: list, prompts: list[str]) -> np.ndarray:
    """logit("Yes") - logit("No") at the last prompt token; [batch]."""
    tok = adapter.processor.tokenizer
    yes, no = answer_token_id(tok, RETRIEVAL_YES), answer_token_id(tok, RETRIEVAL_NO)
    inputs = adapter.build_inputs(images, prompts)
    logits = adapter.model(**inputs.tensors).logits
    rows = torch.arange(logits.shape[0])
    last = logits[rows, inputs.last_prompt_index].float()
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
    progress: str | None = None,
) -> list[TaskResult]:
    """Evaluate ``task`` on ``items`` under ``n_conditions`` conditions; one result per condition.

    Rows are (item, condition) pairs, item-major, ``batch_size`` rows per forward pass (for
    retrieval a row is one (item, candidate, condition) triple). ``condition_hooks`` receives the
    condition index of every row of a batch and returns a context manager that applies the
    interventions (``None``: no interventions). With ``utility="teacher_forced"`` the score is
    the mean log-probability of ``pipeline.tasks.items.reference_answer`` given ``item_prompt``
    (the first reference; retrieval: "Yes" on the positive pair).
    """
    if utility not in UTILITY_KINDS:
        raise PipelineError(f"utility {utility!r} is not one of {UTILITY_KINDS}")
    items = items.reset_index(drop=True)
    n = len(items)
    if n == 0:
        raise PipelineError(f"no items to evaluate for task {task!r}")
    C = n_conditions

    if task == "retrieval" and utility == "generative":
        return _evaluate_retrieval(adapter, items, images, batch_size, C, condition_hooks, progress)

    prompts = item_prompts(items)
    image_ids = items["image_id"].tolist()
    answers = teacher_forced_answers(items) if utility == "teacher_forced" else []
    preds: list[list[str]] = [[""] * n for _ in range(C)]
    scores = np.zeros((C, n))
    # Item-major (item, condition) rows: the rows of one image stay together.
    row_items, row_conds = np.repeat(np.arange(n), C), np.tile(np.arange(C), n)

    def run(sl: slice) -> None:
        it, cd = row_items[sl], row_conds[sl]
        imgs = [images[image_ids[i]] for i in it]
        ps = [prompts[i] for i in it]
        with _hooks(condition_hooks, cd):
            if utility == "generative":
                out = generate(adapter, imgs, ps, max_new_tokens)
                for i, c, text in zip(it, cd, out):
                    preds[c][i] = text
            else:
                scores[cd, it] = answer_logprob(adapter, imgs, ps, [answers[i] for i in it])

    for_each_batch(n * C, batch_size, run, what=progress or f"{task} ({utility})", progress=progress is not False)
    results = []
    for c in range(C):
        if utility == "generative":
            u, per = aggregate_utility(task, preds[c], items)
            results.append(TaskResult(task, METRIC_NAMES.get(task, task), u, per, preds[c]))
        else:
            results.append(TaskResult(task, "answer_logprob", float(scores[c].mean()), scores[c]))
    return results


def _evaluate_retrieval(
    adapter, items: pd.DataFrame, images: ImageTable, batch_size: int, C: int,
    condition_hooks: ConditionHooks | None, progress: str | None,
) -> list[TaskResult]:
    """Generative retrieval: NDCG@5 of the Yes/No margins of every candidate; one result per condition."""
    # Rows: (item, candidate, condition), item-major so that an image's rows share a batch.
    rows = [
        (i, k, c)
        for i in range(len(items))
        for k in range(len(items.at[i, "candidates"]))
        for c in range(C)
    ]
    margins: dict[tuple[int, int, int], float] = {}

    def run(sl: slice) -> None:
        batch = rows[sl]
        imgs = [images[items.at[i, "image_id"]] for i, _, _ in batch]
        prompts = [candidate_prompt(items.at[i, "prompt"], items.at[i, "candidates"][k]) for i, k, _ in batch]
        with _hooks(condition_hooks, np.array([c for _, _, c in batch])):
            m = yes_no_margin(adapter, imgs, prompts)
        for key, v in zip(batch, m):
            margins[key] = float(v)

    for_each_batch(len(rows), batch_size, run, what=progress or "retrieval", progress=progress is not False)
    results = []
    for c in range(C):
        per = np.array(
            [
                metrics.ndcg_at_k(
                    [margins[(i, k, c)] for k in range(len(items.at[i, "candidates"]))],
                    int(items.at[i, "positive_index"]),
                    k=5,
                )
                for i in range(len(items))
            ]
        )
        results.append(TaskResult("retrieval", METRIC_NAMES["retrieval"], float(per.mean()), per))
    return results


def evaluate_model_quality(
    adapter,
    annotations: pd.DataFrame,
    images: ImageTable,
    *,
    tasks: Sequence[str],
    split: str,
    batch_size: int,
    max_new_tokens: int,
    max_items: int | None = None,
) -> dict[str, float]:
    """Generative utility of each task on ``split`` (the first ``max_items`` items per task)."""
    out: dict[str, float] = {}
    for task in tasks:
        items = annotations[(annotations["split"] == split) & (annotations["task"] == task)]
        if max_items is not None:
            items = items.head(max_items)
        if items.empty:
            raise PipelineError(f"no {task!r} items in split {split!r} of the benchmark")
        res = evaluate_task(adapter, task, items, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            progress=f"quality {task}")[0]
        out[task] = round(res.utility, 6)
        log.info("%s %s on %s (%d items): %.4f", res.metric, task, split, len(items), res.utility)
    return out
