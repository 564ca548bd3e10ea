"""Dumping FFN activations into the activation store (HONES.md section 3, the model-side half).

For each discovery item of a task: the target tokens and their weights (``item_targets``),
the DVP direction's projection of every neuron's write vector (``dvp``), and z at the last
prompt token under the base condition and with each critical head mean-substituted
(``dump_activations``). Everything downstream (attribution, masks) reads only the store.

Resumable: blocks already marked done in the scratch store are skipped, and each block's
computation depends only on its own items (batches never straddle blocks), so an interrupted
and resumed run writes bitwise the same arrays as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.tasks.benchmark import ImageTable
from pipeline.errors import PipelineError
from pipeline.model.hooks import capture_ffn, substitute_heads
from pipeline.method.store import ActivationStore, StoreLayout

log = logging.getLogger(__name__)


def task_prompts(items: pd.DataFrame) -> list[str]:
    """Prompts as the model sees them; retrieval items are shown their positive candidate."""
    out = []
    for rec in items.itertuples():
        if rec.task == "retrieval":
            out.append(rec.prompt.format(candidate=rec.candidates[rec.positive_index]))
        else:
            out.append(rec.prompt)
    return out


def item_targets(
    tokenizer, items: pd.DataFrame, *, caption_idf: bool = True
) -> tuple[list[list[int]], list[list[float]]]:
    """Target token ids and weights per item (HONES.md section 3).

    vqa / ocr: the tokens of the first reference answer, weight 1. caption: the distinct tokens
    of all reference captions, weighted by smoothed IDF over the items' references,
    idf = log((n + 1) / (df + 1)) + 1 (or 1 without ``caption_idf``). retrieval: "Yes".
    Special tokens are dropped; an item left with no target token is an error naming it.
    """
    special = set(tokenizer.all_special_ids)

    def ids_of(text: str) -> list[int]:
        return [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special]

    token_sets: list[list[int]] = []
    for rec in items.itertuples():
        if rec.task == "retrieval":
            ids = ids_of("Yes")[:1]
        elif rec.task == "caption":
            seen: dict[int, None] = {}
            for ref in rec.references:
                for t in ids_of(str(ref)):
                    seen.setdefault(t, None)
            ids = list(seen)
        else:
            ids = ids_of(str(rec.references[0])) if len(rec.references) else []
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
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        inputs = adapter.build_inputs([images[i] for i, _ in batch], [prompts[i] for i, _ in batch])
        with substitute_heads(adapter, [row_heads[c] for _, c in batch]):
            with capture_ffn(adapter, None, inputs.last_prompt_index, stop_after_last=True) as captured:
                adapter.model(**inputs.tensors)
        stacked = torch.stack([captured[l] for l in range(adapter.num_layers)], dim=1).cpu().numpy()
        for (i, c), v in zip(batch, stacked):
            z[c, i] = v
    return z


def dump_activations(
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
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
) -> ActivationStore | None:
    """Write (or resume) the activation store of one task's ``items`` at ``out``.

    ``heads``: the critical heads (columns layer, head, score), one condition each after the
    base condition. With ``world_size > 1`` (see ``pipeline.method.distributed``) every rank calls this
    with the same inputs: rank 0 creates or resumes the scratch store, all ranks meet at
    ``barrier``, each writes only the whole blocks dealt to it (``k % world_size == rank``), and
    rank 0 polls the done markers (no collective at the end: ranks are uneven) and finalizes.
    Returns the finished store on rank 0, None on the other ranks.
    """
    from tqdm import tqdm

    out = Path(out)
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    items = items.reset_index(drop=True)
    if items.empty:
        raise PipelineError(f"no items to dump for {out}")
    target_ids, target_weights = item_targets(adapter.tokenizer, items, caption_idf=caption_idf)
    row_heads: list[tuple[int, int] | None] = [None] + [(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])]
    conditions = [(-1, -1, float("nan"))] + [
        (int(l), int(h), float(s)) for l, h, s in zip(heads["layer"], heads["head"], heads["score"])
    ]
    layout = StoreLayout.plan(len(conditions), len(items), adapter.num_layers, adapter.ffn_width, dtype,
                              target_chunk_bytes)
    store = None
    if rank == 0:
        # Creating or resuming cleans stale scratch dirs and torn files: before anyone writes.
        store = ActivationStore.create_or_resume(
            out, layout, conditions, items["item_id"].tolist(), target_ids, target_weights,
            {**attrs, "task": str(items["task"].iloc[0]), "caption_idf": caption_idf}, params_hash,
        )
    if barrier is not None:
        barrier()
    if rank != 0:
        store = ActivationStore.open_scratch(out, params_hash, layout)
    prompts = task_prompts(items)
    pending = store.pending_blocks(rank, world_size)
    log.info("rank %d/%d: %d of %d blocks to write", rank, world_size, len(pending), layout.n_blocks)
    for k in tqdm(pending, desc=f"dump {out.name} (rank {rank})", leave=False):
        sl = layout.block(k)
        imgs = [images[i] for i in items["image_id"].iloc[sl]]
        z = capture_block(adapter, imgs, prompts[sl], row_heads, batch_size)
        dvp = dvp_projection(adapter, target_ids[sl], target_weights[sl])
        store.write_block(k, z, dvp)
    if rank != 0:
        return None
    store.wait_until_done(poll_seconds, timeout_seconds)
    return store.finalize()
