"""Held-out causal check (HONES.md section 5): zero a task's mask, evaluate every task.

For each method m and target task t, the neurons of mask (m, t) are zeroed at every position
and every task s is evaluated on the test split: relative drop
100 * (P_s(base) - P_s(masked)) / |P_s(base)|. All (method, target) masks of one evaluated
task run as conditions of the same batches (``hooks.ablate_neurons_per_row``), so the model
sees each test example once per batch row instead of once per pass.

- ``suppression_table``: long table (method, target_task, eval_task, baseline, masked, relative_drop).
- ``suppression_summary``: per method, mean on-target drop (diagonal) and selectivity
  (diagonal mean minus off-diagonal mean), in percentage points.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.tasks.items import ImageTable
from pipeline.model.evaluation import evaluate_task
from pipeline.model.hooks import ablate_neurons_per_row

log = logging.getLogger(__name__)

SUPPRESSION_COLUMNS = ("method", "target_task", "eval_task", "baseline", "masked", "relative_drop")


def relative_drop(base: float, masked: float) -> float:
    """100 * (base - masked) / |base| in percent; NaN when the baseline is 0."""
    return float("nan") if base == 0 else 100.0 * (base - masked) / abs(base)


def suppression_table(
    adapter,
    items: pd.DataFrame,
    images: ImageTable,
    masks: pd.DataFrame,
    *,
    batch_size: int,
    max_new_tokens: int,
    utility: str = "generative",
) -> pd.DataFrame:
    """The T x T relative-drop matrix of every method in ``masks`` (columns method, task, layer, neuron).

    ``items``: the evaluation items of every task (test split).
    """
    keys = list(dict.fromkeys(zip(masks["method"], masks["task"])))
    neuron_sets = [
        [(int(l), int(i)) for l, i in zip(g["layer"], g["neuron"])]
        for (_, _), g in ((k, masks[(masks["method"] == k[0]) & (masks["task"] == k[1])]) for k in keys)
    ]
    row_specs: list[list[tuple[int, int]] | None] = [None, *neuron_sets]
    rows = []
    for eval_task in dict.fromkeys(items["task"]):
        task_items = items[items["task"] == eval_task]
        results = evaluate_task(
            adapter, eval_task, task_items, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
            utility=utility, n_conditions=len(row_specs),
            condition_hooks=lambda conds: ablate_neurons_per_row(adapter, [row_specs[c] for c in conds]),
            progress=f"suppression {eval_task}",
        )
        base = results[0].utility
        for (method, target), res in zip(keys, results[1:]):
            rows.append((method, target, eval_task, base, res.utility, relative_drop(base, res.utility)))
        log.info("%s baseline %.4f; %d masked conditions", eval_task, base, len(keys))
    return pd.DataFrame(rows, columns=list(SUPPRESSION_COLUMNS))


def suppression_matrices(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """method -> [target_task x eval_task] relative drops (%)."""
    tasks = list(dict.fromkeys(table["eval_task"]))
    out = {}
    for method, g in table.groupby("method", sort=False):
        m = g.pivot(index="target_task", columns="eval_task", values="relative_drop")
        out[method] = m.reindex(index=[t for t in tasks if t in m.index], columns=tasks)
    return out


def suppression_summary(matrix: pd.DataFrame) -> dict[str, float]:
    """Mean on-target drop (diagonal) and selectivity (diagonal mean - off-diagonal mean)."""
    values = matrix.to_numpy(dtype=float)
    diag_mask = np.zeros_like(values, dtype=bool)
    for r, t in enumerate(matrix.index):
        if t in matrix.columns:
            diag_mask[r, list(matrix.columns).index(t)] = True
    diag = values[diag_mask]
    off = values[~diag_mask]
    on_target = float(np.nanmean(diag)) if diag.size else float("nan")
    off_target = float(np.nanmean(off)) if off.size else float("nan")
    return {"on_target_drop": on_target, "off_target_drop": off_target, "selectivity": on_target - off_target}
