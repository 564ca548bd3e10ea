"""Candidate texts that share their prefix, scored with that prefix computed once.

A retrieval item is one image and prompt scored against K candidate texts; its K sequences
are equal up to the first token where the candidates differ (the image's tokens and the
template before the candidate). Here that prefix runs once per group of rows (an item under
one intervention), its keys and values are kept, and only each row's suffix runs after it:
for a VLM whose image takes hundreds of tokens (LLaVA-1.5: 576; Qwen2.5-VL: ~391 for a COCO
image) against a caption of a few dozen, the rows cost a few percent of their full forward
passes; on the default models about half.

Map of this module:
- ``CANDIDATE_PREFIX_FAMILIES``: the families whose results equal the full forward's (tests).
- ``last_logits_sharing_candidates``: logits at each row's last token [B, V], rows grouped by
  what they share; None where they cannot share, and the caller runs the full forward.

The rows' interventions must act at every position alike (``substitute_heads``,
``scale_neurons_per_row``, ``condition_scales``): they run in both passes, each with its own
rows (the groups' first rows in the first, every row in the second).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager

import torch

from pipeline.model.adapter import ModelAdapter
from pipeline.model.hooks.prefix import forward_sharing_prefix

__all__ = ["CANDIDATE_PREFIX_FAMILIES", "last_logits_sharing_candidates"]

# Causal attention over the whole sequence, and positions that the suffix continues: one-
# dimensional (LLaVA, Idefics3, SmolVLM), or M-RoPE's three (Qwen2-VL, Qwen2.5-VL: given to the
# suffix explicitly, from the prefix's own). Not here: PaliGemma (its prompt attends both ways,
# so the prefix sees the candidate), Gemma 3 (token types per position, images attend both
# ways), InternVL and Mistral 3 (not checked).
CANDIDATE_PREFIX_FAMILIES = frozenset({"llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"})
_MROPE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})

# Model inputs with one entry per token that are split at the prefix; rows with any other
# per-token input are not split.
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def _image_token_id(adapter: ModelAdapter) -> int | None:
    config = adapter.model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _common_length(rows: list[torch.Tensor]) -> int:
    """Length of the longest token prefix all ``rows`` (1-D) share, at most the shortest minus one
    (every row keeps a token after the prefix, whose logits are the row's)."""
    n = min(int(r.numel()) for r in rows) - 1
    first = rows[0][:n]
    for r in rows[1:]:
        differ = (r[:n] != first).nonzero()
        if differ.numel():
            n = int(differ[0, 0])
            first = first[:n]
    return n


def _left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.numel() :] = r
        mask[b, width - r.numel() :] = 1
    return ids, mask


def _right_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : r.numel()] = r
        mask[b, : r.numel()] = 1
    return ids, mask


def _take(images: dict[str, torch.Tensor], n_seq: int, rows: list[int]) -> dict[str, torch.Tensor] | None:
    """The image inputs of sequences ``rows`` (repeats allowed) out of those of ``n_seq``
    sequences: tensors with one entry per sequence indexed; Qwen2-VL's flattened patches
    (``pixel_values`` [patches, dim] with ``image_grid_thw`` [n_seq, 3]) cut per sequence; None
    where a tensor is neither."""
    grid = images.get("image_grid_thw")
    out: dict[str, torch.Tensor] = {}
    for key, value in images.items():
        if key == "pixel_values" and grid is not None and value.dim() == 2 and grid.shape[0] == n_seq:
            counts = grid.prod(dim=-1).tolist()
            if sum(counts) != value.shape[0]:
                return None
            starts = [sum(counts[:s]) for s in range(n_seq)]
            out[key] = torch.cat([value[starts[s] : starts[s] + counts[s]] for s in rows])
        elif value.dim() >= 1 and value.shape[0] == n_seq:
            out[key] = value[torch.tensor(rows, dtype=torch.long, device=value.device)]
        else:
            return None
    return out


def _first_index(keys: Sequence[Hashable]) -> tuple[list[int], torch.Tensor]:
    """(the first row of each distinct key, in order of appearance; each row's key index [B])."""
    index: dict[Hashable, int] = {}
    firsts: list[int] = []
    of_row = []
    for b, key in enumerate(keys):
        if key not in index:
            index[key] = len(firsts)
            firsts.append(b)
        of_row.append(index[key])
    return firsts, torch.tensor(of_row, dtype=torch.long)


@torch.no_grad()
def last_logits_sharing_candidates(
    adapter: ModelAdapter,
    images: list,
    prompts: list[str],
    items: Sequence[Hashable],
    groups: Sequence[Hashable],
    interventions: Callable[[list[int]], AbstractContextManager],
    *,
    suffix_rows: int | None = None,
) -> torch.Tensor | None:
    """Logits [B, V] at the last prompt token of each row (image and prompt, no answer), the
    prefix that rows of one group share computed once.

    Args:
        images, prompts: one per row, as ``ModelAdapter.build_inputs`` takes them.
        items: per row, what fixes its image and the prompt around the candidate (rows of one
            item share the image and the prefix); equal prompts of one item are encoded once.
        groups: per row, the rows that share a prefix pass: one item under one intervention
            (each group's rows belong to one item).
        interventions: the context manager of given rows' interventions (their indices in
            this batch); entered for the prefix pass with each group's first row, and for each
            suffix pass with its rows.
        suffix_rows: at most this many rows per suffix pass (None: all in one); each pass
            copies the prefix's cache for its rows, so a group of more candidates than a batch
            holds still runs its prefix once.

    Within an item the prefix is the tokens every row's prompt shares, up to the first that
    differs (at most all but the last); it must hold every image token. The prefix pass runs
    once per group (the vision tower once per item, ``forward_sharing_prefix``) and keeps its
    keys and values; the suffix passes run each row's remaining tokens after its group's cache.
    The logits equal the full forward's to float rounding (tests: each family of
    ``CANDIDATE_PREFIX_FAMILIES``, with head substitutions and neuron scales).

    Returns None, and computes nothing, where the rows cannot share: a family outside
    ``CANDIDATE_PREFIX_FAMILIES``, inputs with other per-token tensors, or an item whose common
    prefix stops before its last image token.
    """
    n = len(prompts)
    if adapter.family not in CANDIDATE_PREFIX_FAMILIES or not (len(images) == len(items) == len(groups) == n):
        return None
    image_token = _image_token_id(adapter)
    if image_token is None:
        return None
    # Distinct sequences: each (item, prompt) encoded once.
    seq_first, seq_of_row = _first_index([(items[b], prompts[b]) for b in range(n)])
    encoded = adapter.build_inputs([images[b] for b in seq_first], [prompts[b] for b in seq_first])
    tensors = encoded.tensors
    n_seq, width = tensors["input_ids"].shape
    extra = {k: v for k, v in tensors.items() if k not in _TOKEN_KEYS}
    if any(v.dim() >= 2 and tuple(v.shape[:2]) == (n_seq, width) for v in extra.values()):
        return None
    if _take(extra, n_seq, [0]) is None:
        return None
    ids, mask = tensors["input_ids"], tensors["attention_mask"].bool()
    tokens = [ids[s][mask[s]] for s in range(n_seq)]
    token_types = tensors.get("mm_token_type_ids")
    types = None if token_types is None else [token_types[s][mask[s]] for s in range(n_seq)]

    # Per item: the prefix its sequences share.
    item_first, item_of_seq = _first_index([items[b] for b in seq_first])
    prefix_len: list[int] = []
    for i in range(len(item_first)):
        rows = [tokens[s] for s in range(n_seq) if int(item_of_seq[s]) == i]
        p = _common_length(rows)
        if p < 1 or any(int((r[p:] == image_token).sum()) for r in rows):
            return None
        if types is not None and any(int(types[s][p:].ne(0).sum()) for s in range(n_seq) if int(item_of_seq[s]) == i):
            return None
        prefix_len.append(p)
    item_seq = [int((item_of_seq == i).nonzero()[0, 0]) for i in range(len(item_first))]

    device = ids.device
    pad = adapter.tokenizer.pad_token_id
    pad = int(pad) if pad is not None else 0
    group_first, group_of_row = _first_index(list(groups))
    item_of_group = [int(item_of_seq[seq_of_row[b]]) for b in group_first]
    if any(int(item_of_seq[seq_of_row[b]]) != item_of_group[int(group_of_row[b])] for b in range(n)):
        raise ValueError("last_logits_sharing_candidates: a group holds rows of several items")

    # Prefix pass: one row per group, the vision tower and embeddings once per item.
    n_items = len(item_first)
    unique_ids, unique_mask = _left_pad([tokens[item_seq[i]][: prefix_len[i]] for i in range(n_items)], pad)
    unique = {"input_ids": unique_ids.to(device), "attention_mask": unique_mask.to(device)}
    if types is not None:
        unique["mm_token_type_ids"] = _left_pad([types[item_seq[i]][: prefix_len[i]] for i in range(n_items)], 0)[0].to(
            device
        )
    images_of_items = _take(extra, n_seq, item_seq)
    unique_images = _take(images_of_items, n_items, item_of_group) if images_of_items is not None else None
    if images_of_items is None or unique_images is None:
        return None
    source = torch.tensor(item_of_group, dtype=torch.long)
    prefix_rows = {k: v[source.to(v.device)] for k, v in unique.items()}
    prefix_rows.update(unique_images)
    unique.update(images_of_items)
    out = forward_sharing_prefix(
        adapter,
        unique,
        prefix_rows,
        source,
        0,
        lambda: interventions(group_first),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    group_of_row = group_of_row.to(device)
    if adapter.family in _MROPE_FAMILIES:
        # Text after the image continues from the prefix's largest position, in all three parts.
        rope, _ = adapter.model.model.get_rope_index(
            prefix_rows["input_ids"],
            prefix_rows["mm_token_type_ids"],
            image_grid_thw=prefix_rows.get("image_grid_thw"),
            attention_mask=prefix_rows["attention_mask"],
        )
        group_last_position = rope.masked_fill(~prefix_rows["attention_mask"].bool().unsqueeze(0), -1).amax(dim=(0, 2))
    else:
        group_last_position = None

    # Suffix passes: every row's tokens after its item's prefix, right-padded after its group's
    # cache, at most ``suffix_rows`` rows a pass.
    size = n if suffix_rows is None else max(1, suffix_rows)
    chunks = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    logits_out: torch.Tensor | None = None
    for chunk in chunks:
        rows_cache = copy.deepcopy(cache) if len(chunks) > 1 else cache
        rows_cache.reorder_cache(group_of_row[chunk])
        suffix_ids, suffix_mask = _right_pad(
            [tokens[int(seq_of_row[b])][prefix_len[item_of_group[int(group_of_row[b])]] :] for b in chunk], pad
        )
        suffix_mask = suffix_mask.to(device)
        attention = torch.cat([prefix_rows["attention_mask"][group_of_row[chunk]], suffix_mask], dim=1)
        positions = {}
        if group_last_position is not None:
            steps = torch.arange(1, suffix_ids.shape[1] + 1, device=device)
            positions["position_ids"] = (
                (group_last_position[group_of_row[chunk]].unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)
            )
        with interventions(chunk):
            logits = adapter.model(
                input_ids=suffix_ids.to(device), attention_mask=attention, cache=rows_cache, use_cache=True, **positions
            ).logits
        last = logits[torch.arange(len(chunk), device=device), suffix_mask.sum(dim=1) - 1]
        if logits_out is None:
            logits_out = last.new_empty((n, last.shape[-1]))
        logits_out[chunk] = last
    return logits_out
