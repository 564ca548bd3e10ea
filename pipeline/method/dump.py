"""Dumping FFN activations into the activation store (docs/method.md section 3, model side).

For each discovery item of a task: the target tokens and their weights (``item_targets``),
the DVP direction's projection of every neuron's write vector (``dvp_projection``), and z at
the last prompt token (prompts: ``pipeline.tasks.items.item_prompts``) under the base condition
and with each critical head mean-substituted (``capture_block``, ``dump_activations``); and,
from one forward and backward pass of the unmodified model, the per-item arrays of the
gradient and published baselines (``item_arrays``: atp, the log-probability DVP, act(gate)
statistics over the prompt).
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
from pipeline.method.store import ActivationStore, ItemArrays, StoreIndex, StoreLayout, check_free_space
from pipeline.model.batching import for_each_batch
from pipeline.model.hooks import (
    capture_ffn,
    capture_layer_inputs,
    forward_sharing_prefix,
    lowest_layer,
    substitute_heads,
    trace_ffn,
)
from pipeline.model.scoring import answer_logprobs, mean_answer_logprob
from pipeline.tasks.items import ImageTable, item_prompts, reference_answer, teacher_forced_answers

log = logging.getLogger(__name__)


CAPTION_TARGETS = ("joined", "distinct")
# The authors' caption target: the first five references joined, its first 128 tokens.
CAPTION_REFERENCES = 5
CAPTION_MAX_TOKENS = 128


def item_targets(
    tokenizer, items: pd.DataFrame, *, caption_idf: bool = True, caption_target: str = "joined"
) -> tuple[list[list[int]], list[list[float]]]:
    """Target token ids and weights per item (docs/method.md section 3).

    vqa / ocr: the tokens of ``items.reference_answer`` (the first reference), weight 1.
    retrieval: the first token of its reference answer "Yes" (the token whose logit the margin
    reads). caption, ``caption_target``:

    - ``"joined"`` (the authors' code, used by ``hones``): the first ``CAPTION_REFERENCES``
      references joined by spaces into one text, its first ``CAPTION_MAX_TOKENS`` tokens, one
      entry per token *occurrence* (a token repeated k times weighs k x idf in the direction).
    - ``"distinct"``: the distinct tokens of ALL references, each once.

    IDF is smoothed over the task's items, idf = log((n + 1) / (df + 1)) + 1 with df the number
    of items whose target holds the token (1 everywhere without ``caption_idf``). Special tokens
    are dropped; an item left with no target token is an error naming it.
    """
    if caption_target not in CAPTION_TARGETS:
        raise PipelineError(f"caption_target must be one of {CAPTION_TARGETS}, got {caption_target!r}")
    special = set(tokenizer.all_special_ids)

    def ids_of(text: str) -> list[int]:
        return [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special]

    token_lists: list[list[int]] = []
    for rec in items.itertuples():
        if rec.task == "retrieval":
            ids = ids_of(reference_answer(rec))[:1]
        elif rec.task == "caption" and caption_target == "joined":
            ids = ids_of(" ".join(str(r) for r in list(rec.references)[:CAPTION_REFERENCES]))[:CAPTION_MAX_TOKENS]
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
        token_lists.append(ids)

    weights: list[list[float]] = []
    n = len(items)
    df = Counter(t for ids, task in zip(token_lists, items["task"]) if task == "caption" for t in set(ids))
    for ids, task in zip(token_lists, items["task"]):
        if task == "caption" and caption_idf:
            weights.append([math.log((n + 1) / (df[t] + 1)) + 1.0 for t in ids])
        else:
            weights.append([1.0] * len(ids))
    return token_lists, weights


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


def _target_logprob(
    logits: torch.Tensor,
    rows: torch.Tensor,
    last: torch.Tensor,
    target_ids: list[list[int]],
    target_weights: list[list[float]],
) -> torch.Tensor:
    """[B] sum_t w_t log p(y_t) / sum_t w_t at each row's last prompt token (nats)."""
    logp = torch.log_softmax(logits[rows, last].float(), dim=-1)
    out = []
    for b, (ids, w) in enumerate(zip(target_ids, target_weights)):
        wt = torch.tensor(w, dtype=torch.float32, device=logp.device)
        out.append((logp[b, torch.tensor(ids, device=logp.device)] * wt).sum() / wt.sum())
    return torch.stack(out)


def item_arrays(
    adapter,
    images: list,
    prompts: list[str],
    answers: list[str],
    target_ids: list[list[int]],
    target_weights: list[list[float]],
    batch_size: int,
) -> ItemArrays:
    """The per-item store arrays of n items (``ItemArrays``, all [n, layer, neuron] but
    ``prompt_tokens`` [n]) from one teacher-forced forward and backward pass per batch
    (``hooks.trace_ffn``) of the unmodified model:

    - ``atp``: d U / d scale of each neuron (z times the gradient, summed over every position),
      U = the item's mean answer log-probability (nats), the ground truth's utility
      (``pipeline.method.ablation``): the first-order estimate of its zeroing effect.
    - ``dvp_logprob``: < W_down[l][:, i], g > with g = d T / d residual at the last prompt
      token, T = sum_t w_t log p(y_t) / sum_t w_t over the item's targets: the direct path's
      linearised change of the target's log-probability, through the final norm (for a
      last-layer neuron, z * dvp_logprob is the first-order change of T when it is zeroed).
    - ``dvp``: the published projection (``dvp_projection``).
    - ``gate_sum`` / ``gate_positive`` / ``prompt_tokens``: act(gate) over the prompt tokens.
    """
    n, L, I = len(prompts), adapter.num_layers, adapter.ffn_width
    out = {name: np.zeros((n, L, I), dtype=np.float32) for name in ("dvp_logprob", "atp", "gate_sum")}
    out["gate_positive"] = np.zeros((n, L, I), dtype=np.int32)
    out["prompt_tokens"] = np.zeros(n, dtype=np.int32)

    def run(sl: slice) -> None:
        inputs = adapter.build_inputs(images[sl], prompts[sl], answers=answers[sl])
        last = inputs.last_prompt_index
        positions = torch.arange(inputs.input_ids.shape[1], device=last.device)
        prompt_mask = inputs.attention_mask.bool() & (positions.unsqueeze(0) <= last.unsqueeze(1))
        rows = torch.arange(inputs.batch_size, device=last.device)
        with torch.enable_grad(), trace_ffn(adapter, last, prompt_mask) as trace:
            logits = adapter.model(**inputs.tensors).logits
            target = _target_logprob(logits, rows, last, target_ids[sl], target_weights[sl])
            (g,) = torch.autograd.grad(target.sum(), trace.residual, retain_graph=True)
            utility = mean_answer_logprob(*answer_logprobs(logits, inputs.input_ids, inputs.answer_mask))
            scale_grads = torch.autograd.grad(utility.sum(), [trace.scales[l] for l in range(L)])
        # One layer's W_down [hidden, I] in float32 at a time (all of them would be GBs on a 7B model).
        out["dvp_logprob"][sl] = (
            torch.stack([g.float() @ adapter.ffn_down_proj(l).weight.detach().float() for l in range(L)], dim=1)
            .cpu()
            .numpy()
        )
        out["atp"][sl] = torch.stack(scale_grads, dim=1).cpu().numpy()
        out["gate_sum"][sl] = torch.stack([trace.gate_sum[l] for l in range(L)], dim=1).cpu().numpy()
        out["gate_positive"][sl] = torch.stack([trace.gate_positive[l] for l in range(L)], dim=1).cpu().numpy()
        out["prompt_tokens"][sl] = prompt_mask.sum(1).cpu().numpy()

    for_each_batch(n, batch_size, run, what="gradient attribution", progress=False)
    return ItemArrays(dvp=dvp_projection(adapter, target_ids, target_weights), **out)


@torch.no_grad()
def capture_block(
    adapter,
    images: list,
    prompts: list[str],
    row_heads: list[tuple[int, int] | None],
    batch_size: int,
    share_prefix: bool = True,
) -> np.ndarray:
    """z at the last prompt token for every (item, condition): [condition, item, layer, neuron].

    With an untouched condition among ``row_heads`` (None; the dump's base), its rows run
    first, item-major, keeping the residual stream entering each layer a head condition starts
    at (``hooks.capture_layer_inputs``; real tokens only, on the CPU). Then the head
    conditions' rows, ordered by their head's layer and item-major within it: a head at layer
    l changes nothing below l, so each batch computes only from its lowest head's layer up,
    starting from its items' base residual stream there (``hooks.forward_sharing_prefix``; the
    vision tower runs for one image), and takes z below it from the base rows. Without an
    untouched condition (or with ``share_prefix`` False), every row is a plain forward pass,
    item-major.
    """
    C, n, L = len(row_heads), len(prompts), adapter.num_layers
    z = np.zeros((C, n, L, adapter.ffn_width), dtype=np.float32)
    base = next((c for c, h in enumerate(row_heads) if h is None), None) if share_prefix else None
    first_of = [-1 if h is None else lowest_layer([h]) for h in row_heads]
    rows = [(i, c) for i in range(n) for c in range(C)]
    needed: list[int] = []
    if base is not None:
        rows.sort(key=lambda row: first_of[row[1]])  # stable: item-major within a layer
        needed = sorted({f for f in first_of if f >= 0})
    # layer -> item -> the base row's residual stream entering that layer, real tokens only [n_real, hidden]
    prefixes: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in needed}

    def run(sl: slice) -> None:
        batch = rows[sl]
        first = min(first_of[c] for _, c in batch) if base is not None else -1
        inputs = adapter.build_inputs([images[i] for i, _ in batch], [prompts[i] for i, _ in batch])
        heads = [row_heads[c] for _, c in batch]
        if first < 0:
            with substitute_heads(adapter, heads), capture_layer_inputs(adapter, needed) as entering:
                with capture_ffn(adapter, None, inputs.last_prompt_index, stop_after_last=True) as captured:
                    adapter.model(**inputs.tensors)
            real = inputs.attention_mask.bool()
            for b, (i, c) in enumerate(batch):
                if c == base:
                    for layer in needed:
                        prefixes[layer][i] = entering[layer][b][real[b]].cpu()
        else:
            # Each row starts from its item's base residual stream at ``first``, left-padded to this batch.
            S = inputs.input_ids.shape[1]
            prefix = torch.zeros(len(batch), S, adapter.hidden_size, dtype=adapter.dtype)
            for b, (i, _) in enumerate(batch):
                kept = prefixes[first][i]
                prefix[b, S - kept.shape[0] :] = kept
            with capture_ffn(adapter, range(first, L), inputs.last_prompt_index, stop_after_last=True) as captured:
                forward_sharing_prefix(
                    adapter,
                    None,
                    inputs.tensors,
                    torch.arange(len(batch)),
                    first,
                    lambda: substitute_heads(adapter, heads),
                    prefix=prefix,
                )
        stacked = torch.stack([captured[l] for l in range(max(first, 0), L)], dim=1).cpu().numpy()
        for (i, c), v in zip(batch, stacked):
            if first > 0:
                z[c, i, :first] = z[base, i, :first]
            z[c, i, max(first, 0) :] = v

    for_each_batch(len(rows), batch_size, run, what="capture z", progress=False)
    return z


@dataclass(frozen=True, eq=False)
class DumpRequest:
    """What to dump: one task's ``items`` (annotation rows) with their ``images``, under the
    base condition and under each critical head of ``heads`` (columns layer, head, score)
    mean-substituted; caption targets IDF-weighted when ``caption_idf``, built as
    ``caption_target`` says (``item_targets``)."""

    items: pd.DataFrame
    images: ImageTable
    heads: pd.DataFrame
    caption_idf: bool
    caption_target: str = "joined"


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
    """How this process runs: ``batch_size`` (item, condition) rows per forward pass (and
    ``gradient_batch_size`` items per forward and backward pass of ``item_arrays``; None: the
    same); this
    process's ``rank`` of ``world_size`` (see ``pipeline.method.distributed``) and the
    ``barrier`` all ranks meet at once the scratch store exists (None: one process); rank 0
    polls every ``poll_seconds`` for the other ranks' blocks, giving up after
    ``timeout_seconds`` (None: never)."""

    batch_size: int
    gradient_batch_size: int | None = None
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


def _scratch_store(
    out: Path, layout: StoreLayout, index: StoreIndex, attrs: dict, params_hash: str, execution: DumpExecution
) -> ActivationStore:
    """The scratch store all ranks write into: rank 0 creates or resumes it (which cleans stale
    scratch dirs and torn files: before anyone writes), then every rank meets at the barrier,
    then the other ranks open it."""
    store = None
    if execution.rank == 0:
        store = ActivationStore.create_or_resume(
            out, layout, index.conditions, index.item_ids, index.target_ids, index.target_weights, attrs, params_hash
        )
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
    target_ids, target_weights = item_targets(
        adapter.tokenizer, items, caption_idf=request.caption_idf, caption_target=request.caption_target
    )
    conditions = head_conditions(request.heads)
    row_heads: list[tuple[int, int] | None] = [None] + [(l, h) for l, h, _ in conditions[1:]]
    layout = StoreLayout.plan(
        len(conditions), len(items), adapter.num_layers, adapter.ffn_width, storage.dtype, storage.target_chunk_bytes
    )
    index = StoreIndex(conditions, items["item_id"].tolist(), target_ids, target_weights)
    attrs = {
        **storage.attrs,
        "task": str(items["task"].iloc[0]),
        "caption_idf": request.caption_idf,
        "caption_target": request.caption_target,
    }
    if rank == 0:
        check_free_space(out, layout, storage.params_hash)
    store = _scratch_store(out, layout, index, attrs, storage.params_hash, execution)

    prompts = item_prompts(items)
    answers = teacher_forced_answers(items)
    pending = store.pending_blocks(rank, world_size)
    log.info("rank %d/%d: %d of %d blocks to write", rank, world_size, len(pending), layout.n_blocks)
    for k in tqdm(pending, desc=f"dump {out.name} (rank {rank})", leave=False):
        sl = layout.block(k)
        imgs = [request.images[i] for i in items["image_id"].iloc[sl]]
        z = capture_block(adapter, imgs, prompts[sl], row_heads, execution.batch_size)
        arrays = item_arrays(
            adapter,
            imgs,
            prompts[sl],
            answers[sl],
            target_ids[sl],
            target_weights[sl],
            execution.gradient_batch_size or execution.batch_size,
        )
        store.write_block(k, z, arrays)
    if rank != 0:
        return None
    store.wait_until_done(execution.poll_seconds, execution.timeout_seconds)
    return store.finalize()
