"""The shared-prefix engine: rows that repeat a few distinct sequences, intervened on only from
some layer up.

Map of this module:
- ``forward_sharing_prefix``: one forward of rows that repeat a few distinct sequences, the
  vision tower and the layers below the lowest intervened one (``lowest_layer``,
  ``lowest_scaled_layer``) computed once per distinct sequence (``prefix_input``).

The rows' interventions are the row-wise hooks of ``pipeline.model.hooks.primitives``, entered for
the second pass only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from pipeline.model.adapter import ModelAdapter, find_vision_tower
from pipeline.model.hooks.primitives import (
    RowSpec,
    _first_input,
    _is_pair,
    _pre_hooks,
    _replace_first_input,
    _StopForward,
)

__all__ = [
    "forward_sharing_prefix",
    "lowest_layer",
    "lowest_scaled_layer",
    "prefix_input",
]


def _repeat_first(value: Any, n: int) -> Any:
    """``value`` with every tensor of batch 1 repeated to batch n (tuples, lists and ModelOutputs
    rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.repeat(n, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == 1 else value
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        for key in list(value.keys()):
            value[key] = _repeat_first(value[key], n)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_first(v, n) for v in value)
    return value


# Families whose vision tower maps pixel_values [images (or tiles), ...] to outputs with the same
# leading dimension, one entry per image: CLIP (LLaVA), SigLIP (PaliGemma, Gemma 3, Idefics3,
# SmolVLM), InternViT. Qwen2-VL's flattened patches and Pixtral's (Mistral 3) images concatenated
# into one sequence are not; their towers, and any family not listed, run in full.
_PER_IMAGE_TOWER_FAMILIES = frozenset({"llava", "idefics3", "smolvlm", "paligemma", "gemma3", "internvl"})


def _one_image_tower(forward: Callable) -> Callable:
    """The tower's forward, computed for the first image only and repeated to every image.

    Only used where the tower's output is overwritten anyway (``forward_sharing_prefix``'s second
    pass replaces the decoder's input): the images' shape must be right, their values need not.
    Only for ``_PER_IMAGE_TOWER_FAMILIES``.
    """

    def stub(*args: Any, **kwargs: Any) -> Any:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() < 4 or pixels.shape[0] < 2:
            return forward(*args, **kwargs)
        n = pixels.shape[0]

        def first(v: Any) -> Any:
            return v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

        return _repeat_first(forward(*[first(a) for a in args], **{k: first(v) for k, v in kwargs.items()}), n)

    return stub


@contextmanager
def _replaced_forwards(replacements: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Modules' ``forward`` replaced inside the context; an instance-level forward that was
    there before (e.g. ``FrozenVisionCache``'s) is put back."""
    saved = [(module, vars(module).get("forward")) for module, _ in replacements]
    try:
        for module, forward in replacements:
            module.forward = forward
        yield
    finally:
        for module, before in saved:
            if before is not None:
                module.forward = before
            elif "forward" in vars(module):
                del module.forward


def lowest_layer(row_specs: Sequence[RowSpec]) -> int | None:
    """The lowest layer any of the (layer, index) specs touches (None: no row intervenes)."""
    layers = []
    for entry in row_specs:
        if entry is None:
            continue
        pairs = [entry] if _is_pair(entry) else list(entry)
        layers.extend(int(l) for l, _ in pairs)
    return min(layers) if layers else None


def lowest_scaled_layer(scales: Mapping[tuple[int, int], float]) -> int | None:
    """The lowest layer whose neurons ``scales`` ({(layer, neuron): scale}) changes (a scale of
    1 changes nothing); None when it changes none."""
    layers = [int(l) for (l, _), v in scales.items() if float(v) != 1.0]
    return min(layers) if layers else None


def prefix_input(adapter: ModelAdapter, tensors: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The residual stream entering decoder layer ``layer`` [B, S, hidden] for the inputs
    ``tensors`` (a forward pass stopped there: the vision tower and layers below only)."""
    (layer,) = adapter.check_layers([layer], "prefix_input")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_first_input(args, kwargs, "hidden_states").detach())
        raise _StopForward

    try:
        with _pre_hooks([(adapter.layers[layer], hook)]):
            adapter.model(**tensors)
    except _StopForward:
        pass
    if not captured:
        raise RuntimeError(f"the forward pass never reached decoder layer {layer}")
    return captured[0]


def forward_sharing_prefix(
    adapter: ModelAdapter,
    unique: Mapping[str, torch.Tensor] | None,
    rows: Mapping[str, torch.Tensor],
    row_source: torch.Tensor,
    first_layer: int,
    interventions: Callable[[], AbstractContextManager] | None = None,
    *,
    prefix: torch.Tensor | None = None,
    **forward_kwargs: Any,
) -> Any:
    """One forward pass over B rows that repeat U distinct sequences, computing once per distinct
    sequence what all its rows share: the vision tower and every decoder layer below
    ``first_layer``, the lowest layer any row's intervention touches.

    Args:
        unique: model inputs of the U distinct sequences (``ModelInputs.tensors``).
        rows: model inputs of the B rows (row b is a copy of sequence ``row_source[b]``, padded
            to the same length as ``unique``).
        row_source: LongTensor [B], the distinct sequence of each row.
        first_layer: no intervention acts below this decoder layer (``lowest_layer``); a hook
            that ``interventions`` puts on a layer below it is a ``ValueError`` (it would not run).
        interventions: returns the context manager of the rows' interventions (row-wise hooks
            for the B rows), entered for the second pass only.
        prefix: the residual stream entering ``first_layer`` for the U sequences [U, S, hidden]
            when the caller has it already (``capture_layer_inputs`` during their own pass):
            then ``unique`` is not needed and the first pass is skipped.
        forward_kwargs: passed to the model's second pass (e.g. ``logits_to_keep``).

    Returns the model's output for the B rows, equal to a plain forward of ``rows`` under the
    interventions up to float rounding (tests: every supported family, GQA, left padding).

    First pass: the U sequences up to the input of ``first_layer`` (``prefix_input``). Second
    pass: the B rows, with the layers below ``first_layer`` passing their input through, the
    vision tower computed for one image and repeated (its output only feeds skipped layers,
    see ``_one_image_tower``; in full for Qwen2-VL, Mistral 3 and unlisted families) and the
    input of ``first_layer`` replaced by the first pass's,
    row by row. The embedding, masks and position ids are still computed for B rows by the
    model's own code, so every family's conventions (M-RoPE, token types, per-layer masks)
    hold. No generation, no gradients; a KV cache (``use_cache=True``) is whole only with
    ``first_layer`` 0 (the layers below it pass their input through), as ``hooks.candidates``
    uses it.
    """
    ctx = interventions if interventions is not None else contextlib.nullcontext
    (first_layer,) = adapter.check_layers([first_layer], "forward_sharing_prefix")
    row_source = torch.as_tensor(row_source, dtype=torch.long).reshape(-1)
    pixels = rows.get("pixel_values")
    tower = find_vision_tower(adapter.model) if adapter.family in _PER_IMAGE_TOWER_FAMILIES else None
    can_share_tower = tower is not None and (pixels is None or pixels.dim() >= 4)
    if prefix is None:
        if unique is None:
            raise ValueError("forward_sharing_prefix: give the distinct sequences' inputs or their prefix")
        n_unique = int(unique["input_ids"].shape[0])
        if row_source.numel() <= n_unique or (first_layer == 0 and not can_share_tower):
            with ctx():
                return adapter.model(**rows, **forward_kwargs)
        with torch.no_grad():
            prefix = prefix_input(adapter, unique, first_layer)
    src = row_source.to(prefix.device)

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = _first_input(args, kwargs, "hidden_states")
        if x.shape[0] != src.numel() or x.shape[1:] != prefix.shape[1:]:
            raise ValueError(
                f"forward_sharing_prefix: layer {first_layer} sees {tuple(x.shape)} but the distinct "
                f"sequences gave {tuple(prefix.shape)} for {src.numel()} rows (rows must be copies of "
                "the distinct sequences, padded alike)"
            )
        return _replace_first_input(args, kwargs, prefix[src].to(device=x.device, dtype=x.dtype), "hidden_states")

    def pass_through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    replaced = [(adapter.layers[l], pass_through) for l in range(first_layer)]
    if can_share_tower:
        replaced.append((tower, _one_image_tower(tower.forward)))
    skipped = [adapter.layers[l] for l in range(first_layer)]
    before = _hook_count(skipped)
    with torch.no_grad(), _replaced_forwards(replaced), _pre_hooks([(adapter.layers[first_layer], inject)]), ctx():
        if _hook_count(skipped) != before:
            raise ValueError(
                f"forward_sharing_prefix: an intervention hooks a layer below first_layer={first_layer}, "
                "which this pass skips; pass the lowest intervened layer (lowest_layer)"
            )
        return adapter.model(**rows, **forward_kwargs)


def _hook_count(modules: Sequence[nn.Module]) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for top in modules for m in top.modules())
