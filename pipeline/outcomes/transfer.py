"""Transfer: what the in-domain masks and steering scales do on out-of-distribution items.

Nothing is learned or chosen here. The masks come from the discovery split, the learned scales
and the Grid-Search scale from the steer stage's training split; both are applied zero-shot to
held-out items of another distribution (the synthetic benchmark's ``ood`` split, or an imported
out-of-domain set), as the paper applies its in-domain scales to GQA, TextVQA and Flickr30k.

Map of this module:
- ``chosen_grid_scales``: per task, the uniform scale the steer stage's grid search picked,
  read back from its ``steering.parquet`` with the same rule (``steering.steer_task``).
- ``transfer_variants``: per task, the scale sets compared out of distribution: ``base`` (none),
  ``grid_search`` (that scale on every neuron of the task's HONES mask) and ``learned`` (the
  learned scales of ``scales.parquet``).
- ``TransferSteeringJob`` / ``run_transfer_steering_job``: one task's variants evaluated as
  conditions of the same batches, under the steering utility and the likelihood, returned as a
  ``steering.TaskSteering`` so that ``steering.steering_statistics`` gives the paired intervals.

- ``transfer_outcomes``: suppression (the headline masks as conditions of
  ``pipeline.outcomes.suppression`` on the other items) and steering, as one list of jobs, so
  each worker loads the model once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import TaskResult, evaluate_conditions
from pipeline.model.hooks import condition_scales, lowest_scaled_layer
from pipeline.model.workers import map_jobs
from pipeline.outcomes.steering import TaskSteering
from pipeline.outcomes.suppression import (
    MaskCondition,
    SuppressionJob,
    merge_suppression_scores,
    run_suppression_job,
    suppression_jobs,
)
from pipeline.tasks.items import likelihood_sequences_per_item

__all__ = [
    "TRANSFER_VARIANTS",
    "chosen_grid_scales",
    "transfer_variants",
    "TransferSteeringJob",
    "run_transfer_steering_job",
    "transfer_outcomes",
]

Neuron = tuple[int, int]
TRANSFER_VARIANTS = ("base", "grid_search", "learned")
_GRID_PREFIX = "grid@"


def chosen_grid_scales(steering: pd.DataFrame, source: str = "steering.parquet") -> dict[str, float]:
    """{task: scale} from the steer stage's long table (columns task, variant, utility): among a
    task's ``grid@<scale>`` rows (utilities on the steer stage's training split), the highest
    utility; ties go to the scale closest to 1, then the smaller, as ``steer_task`` picks it."""
    grid = steering[steering["variant"].str.startswith(_GRID_PREFIX)]
    out: dict[str, float] = {}
    for task, g in grid.groupby("task", sort=False):
        scales = [float(v[len(_GRID_PREFIX) :]) for v in g["variant"]]
        utilities = [float(u) for u in g["utility"]]
        out[str(task)] = min(zip(scales, utilities), key=lambda su: (-su[1], abs(su[0] - 1.0), su[0]))[0]
    if not out:
        raise PipelineError(f"{source}: no grid@<scale> rows; was it written by the steer stage?")
    return out


def transfer_variants(
    masks: dict[str, Sequence[Neuron]], learned: pd.DataFrame, grid_scales: dict[str, float], tasks: Sequence[str]
) -> dict[str, dict[str, dict[Neuron, float]]]:
    """{task: {variant: {(layer, neuron): scale}}} for ``TRANSFER_VARIANTS``.

    ``masks``: each task's HONES headline neurons (those the steer stage scaled);
    ``learned``: the steer stage's ``scales.parquet`` (task, layer, neuron, scale); every task
    must have its mask, learned scales and grid scale, or the error names what is missing.
    """
    out: dict[str, dict[str, dict[Neuron, float]]] = {}
    for task in tasks:
        if not masks.get(task):
            raise PipelineError(f"transfer: no HONES mask for task {task!r}")
        if task not in grid_scales:
            raise PipelineError(f"transfer: no grid-search scale for task {task!r} in the steer stage's table")
        rows = learned[learned["task"] == task]
        if rows.empty:
            raise PipelineError(f"transfer: no learned scales for task {task!r} in the steer stage's scales")
        neurons = [(int(l), int(n)) for l, n in masks[task]]
        scaled = {(int(l), int(n)): float(s) for l, n, s in zip(rows["layer"], rows["neuron"], rows["scale"])}
        if set(scaled) != set(neurons):
            raise PipelineError(
                f"transfer: the learned scales of {task!r} cover {len(scaled)} neurons, not the "
                f"{len(neurons)} of its HONES mask; were the masks and the steer stage run on the same params?"
            )
        out[task] = {
            "base": {},
            "grid_search": {nr: grid_scales[task] for nr in neurons},
            "learned": scaled,
        }
    return out


@dataclass(frozen=True)
class TransferSteeringJob:
    """One task's ``transfer_variants`` on ``items``: a job for ``pipeline.model.workers.map_jobs``.

    ``scales``: (variant, {(layer, neuron): scale}) pairs in order; ``train_split``: where the
    scales were learned (recorded in the result); ``utility``: the steering utility (the
    likelihood is computed beside it)."""

    task: str
    items: pd.DataFrame
    scales: tuple[tuple[str, dict[Neuron, float]], ...]
    train_split: str
    utility: str
    batch_size: int
    max_new_tokens: int

    def __str__(self) -> str:
        return f"transfer steering {self.task}"

    @property
    def cost(self) -> float:
        return likelihood_sequences_per_item(self.items, self.task) * len(self.items) * len(self.scales)


def run_transfer_steering_job(state: tuple, job: TransferSteeringJob) -> TaskSteering:
    """Every variant of ``job`` as a condition of the same batches; ``state`` is (adapter, images).
    Returns a ``TaskSteering`` whose ``results`` hold the steering utility and ``likelihood``
    the likelihood, per variant (no grid: nothing is chosen out of distribution)."""
    adapter, images = state
    names = [name for name, _ in job.scales]
    sets = [scales for _, scales in job.scales]
    idx = range(len(sets))
    out = evaluate_conditions(
        adapter,
        job.task,
        job.items,
        images,
        {job.utility: idx, "likelihood": idx},
        batch_size=job.batch_size,
        max_new_tokens=job.max_new_tokens,
        condition_hooks=condition_scales(adapter, sets),
        condition_layers=[lowest_scaled_layer(s) for s in sets],
        progress=f"transfer {job.task}",
    )
    split = str(job.items["split"].iloc[0])
    neurons = sorted({nr for s in sets for nr in s})
    return TaskSteering(
        job.task,
        job.train_split,
        split,
        neurons,
        dict(job.scales),
        {n: out[job.utility][c] for n, c in zip(names, idx)},
        likelihood={n: out["likelihood"][c] for n, c in zip(names, idx)},
    )


def _run_transfer_job(
    state: tuple,
    job: SuppressionJob | TransferSteeringJob,
    *,
    items: pd.DataFrame,
    conditions: Sequence[MaskCondition],
    batch_size: int,
    max_new_tokens: int,
):
    if isinstance(job, TransferSteeringJob):
        return run_transfer_steering_job(state, job)
    return run_suppression_job(
        state, job, items=items, conditions=conditions, batch_size=batch_size, max_new_tokens=max_new_tokens
    )


def transfer_outcomes(
    items: pd.DataFrame,
    conditions: Sequence[MaskCondition],
    steering_jobs: Sequence[TransferSteeringJob],
    load: Callable[[], tuple],
    *,
    batch_size: int,
    max_new_tokens: int,
    workers: int = 1,
    threads: int = 1,
) -> tuple[dict[tuple[str, str], dict[int, TaskResult]], list[TaskSteering]]:
    """Suppression of ``conditions`` on ``items`` (as ``suppression.score_suppression``) and the
    ``steering_jobs``, heaviest first over ``workers`` processes that each load their
    (adapter, images) once with ``load``: (suppression scores, one ``TaskSteering`` per
    steering job, in the order given)."""
    shards = 1 if workers == 1 else 2 * workers
    jobs: list[SuppressionJob | TransferSteeringJob] = [*suppression_jobs(items, conditions, shards), *steering_jobs]
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k].cost)
    done = map_jobs(
        partial(
            _run_transfer_job, items=items, conditions=conditions, batch_size=batch_size, max_new_tokens=max_new_tokens
        ),
        [jobs[k] for k in order],
        load,
        workers=workers,
        threads=threads,
        what="transfer",
    )
    results = [result for _, result in sorted(zip(order, done), key=lambda kr: kr[0])]
    n_suppression = len(jobs) - len(steering_jobs)
    return merge_suppression_scores(results[:n_suppression], items), results[n_suppression:]
