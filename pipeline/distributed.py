"""Scale-out: multi-process activation dumps (torch.distributed) and distributed attribution (dask).

Extraction (``dump_distributed``), one process per GPU (or per CPU core group), launched by

    torchrun --standalone --nproc_per_node=N -m pipeline.distributed dump \\
        --model M --task T --benchmark data/benchmark --heads data/heads/M/T/scores.parquet \\
        --out data/activations/M/T.zarr --critical-heads data/activations/M/T.heads.parquet

(the arguments of ``stages.dump``; the store is bitwise the one ``stages.dump`` writes, with the
same params hash, so a single-process and an N-process run resume each other's scratch store).

- Rank 0 creates (or resumes) the scratch store: metadata, item ids, targets, conditions.
  Every rank waits for it at one start barrier; the other ranks only open the scratch store
  and never clean or remove anything in it.
- Rank r writes the whole write blocks (chunks or shards) ``k % N == r`` that are not yet
  marked done (``ActivationStore.pending_blocks(rank, world_size)``): no two processes ever
  touch the same block, so zarr's unlocked read-modify-write of a shard cannot lose data.
  No DistributedSampler (it pads with duplicated items).
- No collective at the end (ranks are uneven, and an NCCL barrier times out after 10 minutes):
  rank 0 polls the done markers and finalizes (renames the scratch store) once every block
  has one. A rank that dies makes torchrun stop the others; rerunning resumes.

The process group serves only the start barrier: ``gloo`` on CPU; with ``--device cuda`` the
group is ``nccl`` (each rank on ``cuda:LOCAL_RANK``) and the barrier runs on a gloo side group.

Attribution (``attribute_dask``): the per-task sums of ``pipeline.attribution`` (sum over items of
z * dvp per condition, of z and of 1[z > 0] in the base condition) as ``dask.array`` reductions
over ``from_zarr`` views of ``z`` and ``dvp`` in float64, all tasks and all statistics in one
``dask.compute`` (the stores are read once), on whatever scheduler is current or the given
``dask.distributed`` client. Returns the same ``TaskStatistics`` as ``task_statistics``
(equal to ~1e-15 relative: only the summation order differs).

    python -m pipeline.distributed attribute --model M --activations data/activations/M \\
        --ablation data/ablation/M --out data/attribution/M.zarr [--scheduler tcp://host:8786 | --workers 4]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.attribution import StreamingContributions, TaskStatistics, importance_matrix
from pipeline.benchmark import ImageTable
from pipeline.errors import PipelineError
from pipeline.store import ActivationStore, StoreError, StoreLayout, scratch_path

log = logging.getLogger(__name__)

__all__ = ["dump_distributed", "attribute_dask", "importance_dask", "dist_context", "main"]


# ============================================================================ extraction (torch.distributed)
def dist_context() -> tuple[int, int]:
    """(rank, world_size) of this process: from torch.distributed if initialised, else the
    torchrun environment (RANK / WORLD_SIZE), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_BARRIER_GROUP = None  # a gloo side group when the default group is nccl


def _default_barrier() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier(group=_BARRIER_GROUP)


@dataclass(frozen=True)
class _DumpPlan:
    layout: StoreLayout
    conditions: list[tuple[int, int, float]]
    row_heads: list[tuple[int, int] | None]
    target_ids: list[list[int]]
    target_weights: list[list[float]]
    prompts: list[str]
    store_attrs: dict


def _plan_dump(adapter, items: pd.DataFrame, heads: pd.DataFrame, *, dtype: str, caption_idf: bool, attrs: dict,
               target_chunk_bytes: int) -> _DumpPlan:
    # Exactly what pipeline.dump.dump_activations computes before writing (tests compare the stores bitwise).
    from pipeline.dump import item_targets, task_prompts

    target_ids, target_weights = item_targets(adapter.tokenizer, items, caption_idf=caption_idf)
    row_heads = [None] + [(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])]
    conditions = [(-1, -1, float("nan"))] + [
        (int(l), int(h), float(s)) for l, h, s in zip(heads["layer"], heads["head"], heads["score"])
    ]
    layout = StoreLayout.plan(len(conditions), len(items), adapter.num_layers, adapter.ffn_width, dtype,
                              target_chunk_bytes)
    store_attrs = {**attrs, "task": str(items["task"].iloc[0]), "caption_idf": caption_idf}
    return _DumpPlan(layout, conditions, row_heads, target_ids, target_weights, task_prompts(items), store_attrs)


def _open_scratch(out: Path, params_hash: str, layout: StoreLayout) -> ActivationStore:
    """The scratch store rank 0 created, opened without cleaning anything (others may be writing)."""
    import zarr

    scratch = scratch_path(out, params_hash)
    if not (scratch / "zarr.json").is_file():
        raise StoreError(f"rank 0 did not create the scratch store {scratch} (did it fail? see its log)")
    group = zarr.open_group(str(scratch), mode="r+")
    if group.attrs.get("params_hash") != params_hash or StoreLayout(**group.attrs["layout"]) != layout:
        raise StoreError(f"scratch store {scratch} has another params hash or layout than this rank computed; "
                         "do all ranks run the same code and params?")
    return ActivationStore(scratch, out, group)


def wait_for_blocks(store: ActivationStore, *, poll_seconds: float = 2.0, timeout_seconds: float | None = None) -> None:
    """Block until every write block of ``store`` has its done marker (polling the scratch dir)."""
    n = store.layout.n_blocks
    start = last_log = time.monotonic()
    while True:
        done = store.done_blocks()
        if len(done) >= n:
            return
        now = time.monotonic()
        if timeout_seconds is not None and now - start > timeout_seconds:
            missing = sorted(set(range(n)) - done)
            raise StoreError(f"{store.root}: blocks {missing[:10]} (of {len(missing)} missing) still not done after "
                             f"{timeout_seconds:.0f} s; rerun to resume")
        if now - last_log > 60:
            log.info("rank 0 waiting for %d of %d blocks", n - len(done), n)
            last_log = now
        time.sleep(poll_seconds)


def dump_distributed(
    adapter,
    items: pd.DataFrame,
    images: ImageTable,
    heads: pd.DataFrame,
    out: Path,
    *,
    batch_size: int,
    dtype: str,
    caption_idf: bool,
    attrs: dict,
    params_hash: str,
    target_chunk_bytes: int = 1 << 20,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
) -> ActivationStore | None:
    """This rank's share of ``pipeline.dump.dump_activations`` (same arguments, same store).

    Every rank calls it with the same inputs. ``rank``/``world_size`` default to
    ``dist_context()``; ``barrier`` to a torch.distributed barrier (a no-op for one process).
    Rank 0 returns the finished store; other ranks return None once their blocks are written.
    """
    from tqdm import tqdm

    from pipeline.dump import capture_block, dvp_projection

    out = Path(out)
    if rank is None or world_size is None:
        rank, world_size = dist_context()
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    barrier = barrier or _default_barrier
    items = items.reset_index(drop=True)
    if items.empty:
        raise PipelineError(f"no items to dump for {out}")
    plan = _plan_dump(adapter, items, heads, dtype=dtype, caption_idf=caption_idf, attrs=attrs,
                      target_chunk_bytes=target_chunk_bytes)
    layout = plan.layout
    store = None
    if rank == 0:
        # Creates, or resumes (removing stale scratch dirs and torn *.partial files) before anyone writes.
        store = ActivationStore.create_or_resume(
            out, layout, plan.conditions, items["item_id"].tolist(), plan.target_ids, plan.target_weights,
            plan.store_attrs, params_hash,
        )
    barrier()
    if rank != 0:
        store = _open_scratch(out, params_hash, layout)
    pending = store.pending_blocks(rank, world_size)
    log.info("rank %d/%d: %d of %d blocks to write", rank, world_size, len(pending), layout.n_blocks)
    for k in tqdm(pending, desc=f"dump {out.name} (rank {rank})", leave=False, disable=None):
        sl = layout.block(k)
        imgs = [images[i] for i in items["image_id"].iloc[sl]]
        z = capture_block(adapter, imgs, plan.prompts[sl], plan.row_heads, batch_size)
        dvp = dvp_projection(adapter, plan.target_ids[sl], plan.target_weights[sl])
        store.write_block(k, z, dvp)
    if rank != 0:
        return None
    wait_for_blocks(store, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
    return store.finalize()


# ============================================================================ attribution (dask)
def _dask_sums(store: ActivationStore, items_per_chunk: int | None):
    """Lazy (contribution_sum [C, L, I], activation_sum [L, I], positive_count [L, I]) of one store."""
    import dask.array as da

    lay = store.layout
    step = items_per_chunk or lay.block_items
    z = da.from_zarr(str(store.root), component="z", chunks=(lay.n_conditions, step, lay.n_layers, lay.n_neurons))
    dvp = da.from_zarr(str(store.root), component="dvp", chunks=(step, lay.n_layers, lay.n_neurons))
    z64 = z.astype(np.float64)
    contribution = da.einsum("cnli,nli->cli", z64, dvp.astype(np.float64), dtype=np.float64)
    activation = z64[0].sum(axis=0)
    positive = (z[0] > 0).sum(axis=0, dtype=np.int64)
    return contribution, activation, positive


def attribute_dask(
    stores: Mapping[str, ActivationStore] | ActivationStore,
    *,
    client=None,
    items_per_chunk: int | None = None,
) -> dict[str, TaskStatistics] | TaskStatistics:
    """``pipeline.attribution.task_statistics`` of each store, computed by dask.

    ``stores``: {task: store} (returns {task: TaskStatistics}) or one store (returns its
    TaskStatistics). ``client``: a ``dask.distributed.Client`` to run on (default: the current
    scheduler, i.e. a client created earlier, else dask's threads). ``items_per_chunk``: items
    per dask chunk (default: the store's write block). One ``dask.compute`` for everything.
    """
    import dask

    single = isinstance(stores, ActivationStore)
    named = {"_": stores} if single else dict(stores)
    if not named:
        raise ValueError("no stores to attribute")
    lazy = {task: _dask_sums(store, items_per_chunk) for task, store in named.items()}
    flat = [x for sums in lazy.values() for x in sums]
    computed = dask.compute(*flat, scheduler=client) if client is not None else dask.compute(*flat)
    out = {}
    for j, (task, store) in enumerate(named.items()):
        contribution, activation, positive = computed[3 * j: 3 * j + 3]
        stats = StreamingContributions(store.layout.n_conditions, store.layout.n_layers, store.layout.n_neurons)
        stats.load_state_dict({"contribution_sum": contribution, "activation_sum": activation,
                               "positive_count": positive, "n_items": store.layout.n_items})
        head_scores = np.array([s for _, _, s in store.conditions()[1:]], dtype=np.float64)
        out[task] = TaskStatistics(stats.mean_contribution(), stats.mean_activation(),
                                   stats.activation_probability(), head_scores, stats.n_items)
    return out["_"] if single else out


def importance_dask(
    stores: Mapping[str, ActivationStore],
    ablation: Mapping[str, np.ndarray | None],
    *,
    seed: int,
    ape_min_probability: float,
    client=None,
    items_per_chunk: int | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """``pipeline.attribution.attribute`` with the store reductions done by ``attribute_dask``."""
    statistics = attribute_dask(stores, client=client, items_per_chunk=items_per_chunk)
    methods, tasks, scores = importance_matrix(statistics, seed=seed, ape_min_probability=ape_min_probability)
    truth = np.full((1, *scores.shape[1:]), np.nan, dtype=np.float32)
    for j, task in enumerate(tasks):
        if ablation.get(task) is not None:
            truth[0, j] = ablation[task]
    return [*methods, "ablation"], tasks, np.concatenate([scores, truth])


# ============================================================================ command line
def _init_process_group(backend: str, device: str) -> str:
    """Initialise torch.distributed from the torchrun environment; returns this rank's device."""
    import torch
    import torch.distributed as dist

    global _BARRIER_GROUP
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        # One rank per GPU; more ranks than GPUs share them round-robin (gloo only: NCCL refuses).
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


def _dump_stage_inputs(args) -> dict:
    """What ``stages.dump`` computes from params.yaml (items, heads, params hash, attrs), so that
    this entry point writes the stage's store bitwise, under the same params hash."""
    from pipeline.config import DumpConfig, HeadsConfig, params_hash
    from pipeline.heads import top_heads
    from pipeline.provenance import provenance
    from stages._common import load_items, load_params, model_location, runtime, section

    params = load_params(args.params)
    cfg = section(params, "dump", DumpConfig)
    heads_cfg = section(params, "heads", HeadsConfig)
    rt = runtime(params)
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    heads = top_heads(pd.read_parquet(args.heads), heads_cfg.top_k)
    path, revision, dtype, device = model_location(params, args.model)
    prov = provenance(path, None, revision)
    phash = params_hash(cfg, {"top_k": heads_cfg.top_k, "heads": heads[["layer", "head", "score"]].to_dict("list"),
                              "items": items["item_id"].tolist(), "model": prov})
    prov["params_hash"] = phash
    return dict(
        items=items, heads=heads, params_hash=phash, model_path=path, revision=revision, model_dtype=dtype,
        device=device, runtime=rt, store_dtype=cfg.dtype, caption_idf=cfg.caption_idf,
        target_chunk_bytes=int(cfg.target_chunk_mib * 2**20),
        attrs={**prov, "model_name": args.model, "params": cfg.model_dump()},
    )


def _cli_dump(args) -> None:
    import torch

    from pipeline.adapter import ModelAdapter
    from pipeline.io import write_parquet

    inputs = _dump_stage_inputs(args)
    rt = inputs["runtime"]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, rt.threads // local_world))  # the runtime's threads, shared by the local ranks
    device = _init_process_group(args.backend, inputs["device"])
    rank, world = dist_context()
    adapter = ModelAdapter.load(inputs["model_path"], dtype=inputs["model_dtype"], device=device,
                                revision=inputs["revision"])
    images = ImageTable(args.benchmark / "images.parquet")
    store = dump_distributed(
        adapter, inputs["items"], images, inputs["heads"], args.out, batch_size=rt.batch_size,
        dtype=inputs["store_dtype"], caption_idf=inputs["caption_idf"], attrs=inputs["attrs"],
        params_hash=inputs["params_hash"], target_chunk_bytes=inputs["target_chunk_bytes"],
        rank=rank, world_size=world, poll_seconds=args.poll_seconds,
    )
    if store is not None:
        write_parquet(inputs["heads"], args.critical_heads)
        log.info("rank 0 finalized %s (%d blocks, %d ranks)", store.root, store.layout.n_blocks, world)


def _cli_attribute(args) -> None:
    from pipeline.config import AttributeConfig, params_hash
    from pipeline.provenance import provenance
    from pipeline.store import write_importance
    from stages._common import load_params, section, study_tasks
    from stages.attribute import ablation_matrix

    params = load_params(args.params)
    cfg = section(params, "attribute", AttributeConfig)
    task_names = study_tasks(params)
    stores = {t: ActivationStore.open(args.activations / f"{t}.zarr") for t in task_names}
    lay = next(iter(stores.values())).layout
    truth = {t: ablation_matrix(args.ablation / f"{t}.parquet", (lay.n_layers, lay.n_neurons)) for t in task_names}

    from dask.distributed import Client, LocalCluster

    cluster = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        log.info("dask client: %s", client)
        methods, tasks, importance = importance_dask(
            stores, truth, seed=cfg.seed, ape_min_probability=cfg.ape_min_probability, client=client,
            items_per_chunk=cfg.items_per_block,
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    first = next(iter(stores.values())).attrs
    prov = provenance(None, params_hash(cfg, {t: s.attrs.get("params_hash") for t, s in stores.items()}))
    prov.update({k: first.get(k) for k in ("model", "model_name", "model_revision", "model_weights_sha256")})
    write_importance(args.out, methods, tasks, importance, {**prov, "params": cfg.model_dump()})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.distributed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="one rank of a multi-process dump (launch with torchrun)")
    d.add_argument("--params", type=Path, default=Path("params.yaml"))
    d.add_argument("--model", required=True)
    d.add_argument("--task", required=True)
    d.add_argument("--benchmark", type=Path, required=True)
    d.add_argument("--heads", type=Path, required=True, help="scores.parquet of the heads stage")
    d.add_argument("--out", type=Path, required=True, help="the store, <dir>/<task>.zarr")
    d.add_argument("--critical-heads", type=Path, required=True, help="Parquet of the K_h heads used")
    d.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend (auto: nccl on cuda, else gloo)")
    d.add_argument("--poll-seconds", type=float, default=2.0, help="rank 0's poll interval on the done markers")
    a = sub.add_parser("attribute", help="the attribute stage with the store reductions on dask")
    a.add_argument("--params", type=Path, default=Path("params.yaml"))
    a.add_argument("--model", required=True)
    a.add_argument("--activations", type=Path, required=True, help="folder of <task>.zarr stores")
    a.add_argument("--ablation", type=Path, required=True, help="folder of <task>.parquet ground truth")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--scheduler", default=None, help="address of a running dask scheduler (tcp://host:8786)")
    a.add_argument("--workers", type=int, default=2, help="LocalCluster workers when no --scheduler is given")
    a.add_argument("--threads-per-worker", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        (_cli_dump if args.command == "dump" else _cli_attribute)(args)
    except PipelineError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
