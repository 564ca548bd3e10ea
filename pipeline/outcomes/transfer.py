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

Suppression out of distribution needs nothing new: the headline masks are conditions of
``pipeline.outcomes.suppression`` on the other items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import evaluate_conditions
from pipeline.model.hooks import condition_scales, lowest_scaled_layer
from pipeline.outcomes.steering import TaskSteering
from pipeline.tasks.items import likelihood_sequences_per_item

__all__ = [
    "TRANSFER_VARIANTS",
    "chosen_grid_scales",
    "transfer_variants",
    "TransferSteeringJob",
    "run_transfer_steering_job",
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
