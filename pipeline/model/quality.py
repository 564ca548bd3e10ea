"""A model's quality on held-out items: each task's generative and likelihood utility, the
standard variants of the generative metrics, and the generative metric per question type.

Apart from ``pipeline.model.evaluation`` so that a change here reruns only the model-quality
stage, not every stage that evaluates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import aggregate_utility, evaluate_conditions, standard_utility
from pipeline.tasks.items import ImageTable

log = logging.getLogger(__name__)


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
    utilities: Sequence[str] = ("generative", "likelihood"),
) -> dict[str, dict[str, float]]:
    """{utility: {task: value}} on ``split`` (the first ``max_items`` items per task).

    With the ``generative`` utility, ``generative_standard`` holds this project's standard
    variant of the metric (``standard_utility``) on the same generations, for every task that
    generates (retrieval ranks: its NDCG@5 has one definition), and
    ``generative_by_question_type`` {task: {question type: value}} the paper's metric on the same
    generations per ``question_type``, for every generating task whose items have more than one
    (the synthetic benchmark's VQA: colour, count, position, shape): where a task's utility falls short."""
    out: dict[str, dict] = {u: {} for u in utilities}
    if "generative" in utilities:
        out["generative_standard"] = {}
        out["generative_by_question_type"] = {}
    for task in tasks:
        items = annotations[(annotations["split"] == split) & (annotations["task"] == task)]
        if max_items is not None:
            items = items.head(max_items)
        if items.empty:
            raise PipelineError(f"no {task!r} items in split {split!r} of the benchmark")
        res = evaluate_conditions(
            adapter,
            task,
            items,
            images,
            {u: [0] for u in utilities},
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=f"quality {task}",
        )
        for u in utilities:
            out[u][task] = round(res[u][0].utility, 6)
            log.info("%s %s on %s (%d items): %.4f", res[u][0].metric, task, split, len(items), res[u][0].utility)
        predictions = res["generative"][0].predictions if "generative" in utilities else None
        if predictions is not None:
            out["generative_standard"][task] = round(standard_utility(task, predictions, items), 6)
            by_type = utility_by_question_type(task, predictions, items)
            if by_type:
                out["generative_by_question_type"][task] = by_type
    return out


def utility_by_question_type(task: str, predictions: Sequence[str], items: pd.DataFrame) -> dict[str, float]:
    """{question type: the paper's utility (``aggregate_utility``) of the items of that type},
    rounded to 6 decimals, in the order types first occur; empty when the items have one type
    (or none: a benchmark without the column)."""
    if "question_type" not in items.columns:
        return {}
    types = items["question_type"].astype(str).to_numpy()
    kinds = list(dict.fromkeys(types))
    if len(kinds) < 2:
        return {}
    preds = np.asarray(predictions, dtype=object)
    return {k: round(aggregate_utility(task, list(preds[types == k]), items[types == k])[0], 6) for k in kinds}
