"""Dumping FFN activations into the activation store (HONES.md section 3, the model-side half).

For each discovery item of a task: the target tokens and their weights (``item_targets``),
the DVP direction's projection of every neuron's write vector (``dvp_projection``), and z at
the last prompt token (prompts: ``pipeline.tasks.items.item_prompts``) under the base condition
and with each critical head mean-substituted (``capture_block``, ``dump_activations``).
Everything downstream (attribution, masks) reads only the store. ``dump_activations`` takes
three small records: ``DumpRequest`` (what: items, images, heads, target weighting),
``DumpStorage`` (how it is stored) and ``DumpExecution`` (how this process runs: batch size,
rank, barrier).

Resumable: blocks already marked done in the scratch store are skipped, and each block's
computation depends only on its own items (batches never straddle blocks), so an interrupted
and resumed run writes bitwise the same arrays as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.tasks.items import ImageTable, item_prompts, reference_answer
from pipeline.model.batching import for_each_batch
from pipeline.model.hooks import capture_ffn, substitute_heads
from pipeline.method.store import ActivationStore, StoreIndex, StoreLayout, check_free_space

log = logging.getLogger(__name__)


def item_targets(
    tokenizer, items: pd.DataFrame, *, caption_idf: bool = True
) -> tuple[list[list[int]], list[list[float]]]:
    """Target token ids and weights per item (HONES.md section 3).

    vqa / ocr: the tokens of ``items.reference_answer`` (the first reference), weight 1. caption:
    the distinct tokens of ALL reference captions, weighted by smoothed IDF over the items'
    references, idf = log((n + 1) / (df + 1)) + 1 (or 1 without ``caption_idf``). retrieval: the
    first token of its reference answer "Yes" (the token whose logit the margin reads).
    Special tokens are dropped; an item left with no target token is an error naming it.
    """
    special = set(tokenizer.all_special_ids)

    def ids_of(text: str) -> list[int]:
        return [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special]

    token_sets: list[list[int]] = []
    for rec in items.itertuples():
        if rec.task == "retrieval":
            ids = ids_of(reference_answer(rec))[:1]
        elif rec.task == "caption":
            seen: dict[int, None] = {}
            for ref in rec.references:
                for t in ids_of(str(ref)):
                    seen.setdefault(t, None)
            ids = list(seen)
        else:
            ids = ids_of(reference_answer(rec))
        if not ids:
            raise PipelineError(f"item {rec.item_id!r} ({rec.task}) has an empty target after tokenisation")
        token_sets.append(ids)

    weights: list[list[float]] = []
    n = len(items)
    df = Counter(t for ids, task in zip(token_sets, items["task"]) if task == "caption" for t in set(ids))
    for ids, task in zip(token_sets, items["task"]):
        if task == "caption" and caption_idf:
            weights.append([math.log((n + 1) / (df[t] + 1)) + 1.0 for t in ids])
        else:
            weights.append([1.0] * len(ids))
    return token_sets, weights


@torch.no_grad()
def dvp_projection(adapter, target_ids: list[list[int]], target_weights: list[list[float]]) -> np.ndarray:
    """[item, layer, neuron] float32: < W_down[l][:, i], u_y > with u_y the normalised weighted
    sum of the target tokens' unembedding rows."""
    U = adapter.unembedding().float()  # [vocab, hidden]
    u = torch.stack(
        [
            (U[torch.tensor(ids)] * torch.tensor(w, dtype=torch.float32, device=U.device).unsqueeze(1)).sum(0)
            for ids, w in zip(target_ids, target_weights)
        ]
    )
    u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = torch.stack([u @ adapter.ffn_down_proj(l).weight.float() for l in range(adapter.num_layers)], dim=1)
    return out.cpu().numpy().astype(np.float32)


@torch.no_grad()
def capture_block(
    adapter,
    images: list,
    prompts: list[str],
    row_heads: list[tuple[int, int] | None],
    batch_size: int,
) -> np.ndarray:
    """z at the last prompt token for every (item, condition): [condition, item, layer, neuron].

    Rows are item-major; a batch holds whole items' conditions where ``batch_size`` allows.
    """
    C, n = len(row_heads), len(prompts)
    z = np.zeros((C, n, adapter.num_layers, adapter.ffn_width), dtype=np.float32)
    rows = [(i, c) for i in range(n) for c in range(C)]

    def run(sl: slice) -> None:
        batch = rows[sl]
        inputs = adapter.build_inputs([images[i] for i, _ in batch], [prompts[i] for i, _ in batch])
        with substitute_heads(adapter, [row_heads[c] for _, c in batch]):
            with capture_ffn(adapter, None, inputs.last_prompt_index, stop_after_last=True) as captured:
                adapter.model(**inputs.tensors)
        stacked = torch.stack([captured[l] for l in range(adapter.num_layers)], dim=1).cpu().numpy()
        for (i, c), v in zip(batch, stacked):
            z[c, i] = v

    for_each_batch(len(rows), batch_size, run, what="capture z", progress=False)
    return z


@dataclass(frozen=True, eq=False)
class DumpRequest:
    """What to dump: one task's ``items`` (annotation rows) with their ``images``, under the
    base condition and under each critical head of ``heads`` (columns layer, head, score)
    mean-substituted; caption targets IDF-weighted when ``caption_idf`` (``item_targets``)."""

    items: pd.DataFrame
    images: ImageTable
    heads: pd.DataFrame
    caption_idf: bool


@dataclass(frozen=True)
class DumpStorage:
    """How the store is written: z in ``dtype`` ("float16" or "float32"), chunks of about
    ``target_chunk_bytes`` of z (``StoreLayout.plan``), the scratch store named by
    ``params_hash`` (resumed only under the same hash) and ``attrs`` (provenance) in its attributes."""

    dtype: str
    params_hash: str
    attrs: dict
    target_chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class DumpExecution:
    """How this process runs: ``batch_size`` (item, condition) rows per forward pass; this
    process's ``rank`` of ``world_size`` (see ``pipeline.method.distributed``) and the
    ``barrier`` all ranks meet at once the scratch store exists (None: one process); rank 0
    polls every ``poll_seconds`` for the other ranks' blocks, giving up after
    ``timeout_seconds`` (None: never)."""

    batch_size: int
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None
    poll_seconds: float = 2.0
    timeout_seconds: float | None = None


def head_conditions(heads: pd.DataFrame) -> list[tuple[int, int, float]]:
    """(layer, head, head score) per condition: the base condition (-1, -1, nan), then one per
    row of ``heads`` (columns layer, head, score), in order."""
    return [(-1, -1, float("nan"))] + [
        (int(l), int(h), float(s)) for l, h, s in zip(heads["layer"], heads["head"], heads["score"])
    ]


def _scratch_store(out: Path, layout: StoreLayout, index: StoreIndex, attrs: dict, params_hash: str,
                   execution: DumpExecution) -> ActivationStore:
    """The scratch store all ranks write into: rank 0 creates or resumes it (which cleans stale
    scratch dirs and torn files: before anyone writes), then every rank meets at the barrier,
    then the other ranks open it."""
    store = None
    if execution.rank == 0:
        store = ActivationStore.create_or_resume(out, layout, index.conditions, index.item_ids, index.target_ids,
                                                 index.target_weights, attrs, params_hash)
    if execution.barrier is not None:
        execution.barrier()
    if execution.rank != 0:
        store = ActivationStore.open_scratch(out, params_hash, layout)
    return store


def dump_activations(
    adapter,
    request: DumpRequest,
    out: Path,
    storage: DumpStorage,
    execution: DumpExecution,
) -> ActivationStore | None:
    """Write (or resume) the activation store of one task's ``request.items`` at ``out``.

    One condition per critical head of ``request.heads`` after the base condition. With
    ``execution.world_size > 1`` (see ``pipeline.method.distributed``) every rank calls this
    with the same request and storage: rank 0 creates or resumes the scratch store, all ranks
    meet at ``execution.barrier``, each writes only the whole blocks dealt to it
    (``k % world_size == rank``), and rank 0 polls the done markers (no collective at the end:
    ranks are uneven) and finalizes. Returns the finished store on rank 0, None on the other ranks.
    """
    from tqdm import tqdm

    out = Path(out)
    rank, world_size = execution.rank, execution.world_size
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    items = request.items.reset_index(drop=True)
    if items.empty:
        raise PipelineError(f"no items to dump for {out}")
    target_ids, target_weights = item_targets(adapter.tokenizer, items, caption_idf=request.caption_idf)
    conditions = head_conditions(request.heads)
    row_heads: list[tuple[int, int] | None] = [None] + [(l, h) for l, h, _ in conditions[1:]]
    layout = StoreLayout.plan(len(conditions), len(items), adapter.num_layers, adapter.ffn_width, storage.dtype,
                              storage.target_chunk_bytes)
    index = StoreIndex(conditions, items["item_id"].tolist(), target_ids, target_weights)
    attrs = {**storage.attrs, "task": str(items["task"].iloc[0]), "caption_idf": request.caption_idf}
    if rank == 0:
        check_free_space(out, layout, storage.params_hash)
    store = _scratch_store(out, layout, index, attrs, storage.params_hash, execution)

    prompts = item_prompts(items)
    pending = store.pending_blocks(rank, world_size)
    log.info("rank %d/%d: %d of %d blocks to write", rank, world_size, len(pending), layout.n_blocks)
    for k in tqdm(pending, desc=f"dump {out.name} (rank {rank})", leave=False):
        sl = layout.block(k)
        imgs = [request.images[i] for i in items["image_id"].iloc[sl]]
        z = capture_block(adapter, imgs, prompts[sl], row_heads, execution.batch_size)
        dvp = dvp_projection(adapter, target_ids[sl], target_weights[sl])
        store.write_block(k, z, dvp)
    if rank != 0:
        return None
    store.wait_until_done(execution.poll_seconds, execution.timeout_seconds)
    return store.finalize()
