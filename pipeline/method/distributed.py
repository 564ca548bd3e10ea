"""Scale-out: multi-process activation dumps (torch.distributed) and distributed attribution (dask).

Map of this module:
- ``dist_context`` / ``init_process_group`` / ``barrier``: the torch.distributed plumbing of a
  multi-rank dump (rank, world size, the one start barrier).
- ``attribute_dask`` / ``importance_dask``: ``task_statistics`` / ``attribute`` with the store
  reductions done by dask.

Extraction: ``stages.dump`` launched by torchrun runs one rank per process,

    torchrun --standalone --nproc_per_node=N -m stages.dump --model M --task T ...   (same arguments)

and calls ``pipeline.method.dump.dump_activations`` with this module's ``dist_context()`` and
``barrier``: rank 0 creates (or resumes) the scratch store, every rank writes only whole write
blocks ``k % N == r`` (no two processes touch one chunk or shard: zarr's unlocked
read-modify-write of a shard would lose data), no DistributedSampler (it pads with duplicated
items), and no collective at the end (ranks are uneven, and an NCCL barrier times out after
10 minutes): rank 0 polls the done markers and finalizes. The store is bitwise the one a
single process writes, under the same params hash, so either resumes the other.

``init_process_group`` serves only that start barrier: ``gloo`` on CPU; on CUDA the group is
``nccl`` (each rank on ``cuda:LOCAL_RANK``) and the barrier runs on a gloo side group.

Attribution (``attribute_dask``): the per-task sums of ``pipeline.method.attribution``
(``block_sums``, the same function the streaming pass calls) as one dask task per item chunk
of each store, summed in a tree, all tasks in one ``dask.compute`` (the stores are read once),
on the given ``dask.distributed`` client or the current scheduler. Returns the same
``TaskStatistics`` as ``task_statistics`` (equal to ~1e-15 relative: only the summation order
differs). ``stages.attribute`` uses it with
``attribute.engine: dask``.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping

import numpy as np

from pipeline.errors import PipelineError
from pipeline.method.attribution import (
    BaselineSettings,
    MethodScores,
    StreamingContributions,
    TaskStatistics,
    block_sums,
    with_ground_truth,
)
from pipeline.method.store import ActivationStore

log = logging.getLogger(__name__)

__all__ = ["attribute_dask", "importance_dask", "dist_context", "barrier", "init_process_group"]


def dist_context() -> tuple[int, int]:
    """(rank, world_size) of this process: from torch.distributed if initialised, else the
    torchrun environment (RANK / WORLD_SIZE), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_BARRIER_GROUP = None  # a gloo side group when the default group is nccl


def barrier() -> None:
    """A barrier over all ranks (a no-op without an initialised group of several processes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier(group=_BARRIER_GROUP)


# ============================================================================ attribution (dask)
def _block_sums(path: str, sl: slice) -> dict[str, np.ndarray]:
    """``block_sums`` of items ``sl`` of the finished store at ``path`` (runs on a worker)."""
    block = ActivationStore.open(path).read_items(sl)
    return block_sums(block.z, block.arrays)


def _add(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.array(v, copy=True) for k, v in parts[0].items()}
    for p in parts[1:]:
        for k, v in p.items():
            out[k] = out[k] + v
    return out


def _dask_sums(store: ActivationStore, items_per_chunk: int | None):
    """A lazy ``block_sums`` dict of the whole store: one task per item chunk, summed in a tree."""
    import dask

    parts = [dask.delayed(_block_sums)(str(store.root), sl) for sl in store.item_slices(items_per_chunk)]
    while len(parts) > 1:
        parts = [dask.delayed(_add)(parts[i : i + 8]) for i in range(0, len(parts), 8)]
    return parts[0]


def attribute_dask(
    stores: Mapping[str, ActivationStore] | ActivationStore,
    *,
    client=None,
    items_per_chunk: int | None = None,
) -> dict[str, TaskStatistics] | TaskStatistics:
    """``pipeline.method.attribution.task_statistics`` of each store, computed by dask.

    ``stores``: {task: store} (returns {task: TaskStatistics}) or one store (returns its
    TaskStatistics). ``client``: a ``dask.distributed.Client`` to run on (default: the current
    scheduler, i.e. a client created earlier, else dask's threads). ``items_per_chunk``: items
    per dask task (default: the store's write block). One ``dask.compute`` for everything.
    """
    import dask

    single = isinstance(stores, ActivationStore)
    named = {"_": stores} if single else dict(stores)
    if not named:
        raise PipelineError("no stores to attribute")
    lazy = [_dask_sums(store, items_per_chunk) for store in named.values()]
    computed = dask.compute(*lazy, scheduler=client) if client is not None else dask.compute(*lazy)
    out = {}
    for (task, store), sums in zip(named.items(), computed):
        stats = StreamingContributions(store.layout.n_conditions, store.layout.n_layers, store.layout.n_neurons)
        stats.add_sums(sums)
        out[task] = TaskStatistics.from_sums(stats, store)
    return out["_"] if single else out


def importance_dask(
    stores: Mapping[str, ActivationStore],
    ablation: Mapping[str, np.ndarray | None],
    *,
    seed: int,
    baselines: BaselineSettings = BaselineSettings(),
    client=None,
    items_per_chunk: int | None = None,
) -> MethodScores:
    """``pipeline.method.attribution.attribute`` with the store reductions done by ``attribute_dask``."""
    statistics = attribute_dask(stores, client=client, items_per_chunk=items_per_chunk)
    return with_ground_truth(statistics, ablation, seed=seed, baselines=baselines)


def init_process_group(backend: str, device: str) -> str:
    """Initialise torch.distributed from the torchrun environment; returns this rank's device."""
    import torch
    import torch.distributed as dist

    global _BARRIER_GROUP
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto" or device.startswith("cuda"):
        # One rank per GPU (a model spread over several GPUs runs without torchrun); more ranks than GPUs share them round-robin (gloo only: NCCL refuses).
        index = local_rank % max(1, torch.cuda.device_count())
        device = f"cuda:{index}"
        torch.cuda.set_device(index)
    if world == 1 or dist.is_initialized():
        return device
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
    # Only the start barrier uses the group; the wait at the end polls the done markers.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    if backend != "gloo":
        _BARRIER_GROUP = dist.new_group(backend="gloo")
    return device
