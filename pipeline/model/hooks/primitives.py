"""Interventions on a VLM's language model: context managers around torch forward pre-hooks.

Map of this module:
- ``capture_ffn``: copies the FFN neuron vector z (input of down_proj) at one position per row.
- ``substitute_heads``: per batch row, mean-substitutes attention heads at the input of o_proj
  (docs/method.md section 2), so many head conditions of one example run as one batched forward.
- ``scale_neurons``: multiplies chosen neurons of z by scales (0 = masking; a Parameter =
  learnable steering scales, differentiable).
- ``scale_neurons_per_row`` / ``ablate_neurons_per_row``: per batch row, scales (zeroes) that
  row's own neurons, so many single-neuron ablations run as one batched forward.
- ``condition_scales``: ``evaluate_task`` condition hooks for per-condition neuron scales
  (steering variants run as conditions of the same batches).
- ``trace_ffn``: differentiable probes for gradient attribution (a per-row scale of every
  neuron, an additive probe on the residual stream entering the unembedding) and per-row
  statistics of act(gate) over chosen tokens (the published MA / AP / LAPE baselines).
- ``trace_head_substitution``: a differentiable probe per (row, layer, head) that moves the
  head's output toward its mean substitution (0: untouched, 1: ``substitute_heads``), whose
  gradient is the first-order estimate of every head's substitution effect at once.
- ``capture_layer_inputs``: the residual stream entering chosen layers, every position (the
  ``prefix`` that ``forward_sharing_prefix`` can reuse).
- ``capture_residual_stream``: the residual stream entering each layer, between its attention
  and FFN, and leaving the last layer, at chosen positions (what the logit lens decodes).

(layer, head) and (layer, neuron) arguments are range-checked by ``ModelAdapter.check_heads`` /
``check_neurons`` (an ``AdapterError``, a ``PipelineError``, naming the row or condition).

All hooks are pre-hooks on modules returned by ``ModelAdapter.attn_out_proj`` /
``ModelAdapter.ffn_down_proj`` and are removed when the context exits, also when its body
raises. Hooks entered later see the inputs as modified by hooks entered earlier on the same
module (torch runs pre-hooks in registration order), e.g. a capture entered inside a
``scale_neurons`` context records the scaled z.

Row-wise interventions assume the batch rows seen by the model are the rows given here, in
order: true for ``model(...)`` and greedy/sampled ``model.generate`` with KV cache (decode steps
see [B, new_tokens, ...]), not for beam search or num_return_sequences > 1, which expand rows.

The shared-prefix engine built on these hooks (``forward_sharing_prefix``) is
``pipeline.model.hooks.prefix``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.model.adapter import AdapterError, ModelAdapter

__all__ = [
    "capture_ffn",
    "substitute_heads",
    "scale_neurons",
    "scale_neurons_per_row",
    "ablate_neurons_per_row",
    "RowSpec",
    "FfnTrace",
    "trace_ffn",
    "trace_head_substitution",
    "capture_layer_inputs",
]


# One batch row's intervention: None (untouched), one (layer, index) pair, or several pairs.
RowSpec = tuple[int, int] | Sequence[tuple[int, int]] | None


class _StopForward(Exception):
    """Raised by a capture hook to skip the rest of a forward pass; caught by its context manager."""


def _first_input(args: tuple, kwargs: dict, name: str = "input") -> torch.Tensor:
    """A hooked module's first argument, positional or passed as ``name`` (a projection's
    ``input``, a decoder layer's ``hidden_states``)."""
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    raise RuntimeError(f"hooked module was called without its {name} tensor")


def _replace_first_input(args: tuple, kwargs: dict, new: torch.Tensor, name: str = "input") -> tuple[tuple, dict]:
    if args:
        return (new,) + tuple(args[1:]), kwargs
    return args, {**kwargs, name: new}


@contextmanager
def _pre_hooks(pairs: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _is_pair(entry: Any) -> bool:
    return (
        isinstance(entry, (tuple, list))
        and len(entry) == 2
        and all(isinstance(v, numbers.Integral) or (isinstance(v, torch.Tensor) and v.dim() == 0) for v in entry)
    )


def _group_rows(adapter: ModelAdapter, row_specs: Sequence[RowSpec], unit: str) -> dict[int, tuple[list, list]]:
    """{layer: (rows, units)} from per-row specs of (layer, ``unit``) pairs ("head" or "neuron"),
    each row's pairs checked by ``ModelAdapter.check_heads`` / ``check_neurons`` (distinct)."""
    check = adapter.check_heads if unit == "head" else adapter.check_neurons
    per_layer: dict[int, tuple[list[int], list[int]]] = {}
    # Rows under one condition usually hold the same spec object: check each object once.
    checked: dict[int, list[tuple[int, int]]] = {}
    for row, entry in enumerate(row_specs):
        if entry is None:
            continue
        valid = checked.get(id(entry))
        if valid is None:
            pairs = [entry] if _is_pair(entry) else list(entry)
            for pair in pairs:
                if not _is_pair(pair):
                    raise ValueError(f"row {row}: expected (layer, {unit}) pairs, got {pair!r}")
            valid = checked[id(entry)] = check(pairs, f"row {row}", distinct=True)
        for layer, idx in valid:
            rows, units = per_layer.setdefault(layer, ([], []))
            rows.append(row)
            units.append(idx)
    return per_layer


class _DeviceCache:
    """Index tensors moved to a device once (hooks run on every decode step)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._cpu = tensors
        self._by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        got = self._by_device.get(device)
        if got is None:
            got = tuple(t.to(device) for t in self._cpu)
            self._by_device[device] = got
        return got


def _check_batch(x: torch.Tensor, expected: int, what: str) -> None:
    if x.shape[0] != expected:
        raise ValueError(
            f"{what}: the model ran a batch of {x.shape[0]} rows but {expected} row specs were given "
            "(beam search and num_return_sequences > 1 expand rows and are not supported)"
        )


# ---------------------------------------------------------------------------------------------
@contextmanager
def capture_ffn(
    adapter: ModelAdapter,
    layers: Sequence[int] | None,
    positions: torch.Tensor | int,
    *,
    stop_after_last: bool = False,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture z (the input of down_proj) at one position per row.

    Args:
        layers: decoder layers to capture (None = all).
        positions: LongTensor [B] (e.g. ``ModelInputs.last_prompt_index``) or one int for all
            rows (negative counts from the end, e.g. -1 = last position).
        stop_after_last: once the highest requested layer is captured, abort the forward pass
            (an internal exception, swallowed by this context manager) so that later layers,
            the final norm and the unembedding are not computed. The rest of the ``with``
            body after the aborted forward call is then skipped too; execution continues
            after the ``with`` statement, and the model's outputs are not available. Use it
            for dumping activations only.

    Yields:
        dict layer -> float32 Tensor [B, ffn_width], filled by the forward pass run in the
        body (one forward pass per context: a second one overwrites the first).
    """
    wanted = sorted(set(adapter.check_layers(range(adapter.num_layers) if layers is None else layers, "capture_ffn")))
    if not wanted:
        raise ValueError("capture_ffn: no layers requested")
    last_layer = wanted[-1]
    captured: dict[int, torch.Tensor] = {}
    pos_cache = _DeviceCache(torch.as_tensor(positions, dtype=torch.long).reshape(-1))

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            z = _first_input(args, kwargs)
            bsz, seq = z.shape[0], z.shape[1]
            (pos,) = pos_cache.on(z.device)
            if pos.numel() == 1:
                pos = pos.expand(bsz)
            _check_batch(z, pos.numel(), "capture_ffn")
            pos = torch.where(pos < 0, pos + seq, pos)
            rows = torch.arange(bsz, device=z.device)
            # .float() alone would alias z when it is already float32; the copy must outlive the forward.
            captured[layer] = z.detach()[rows, pos].to(torch.float32, copy=True)
            if stop_after_last and layer == last_layer:
                raise _StopForward
            return None

        return hook

    try:
        with _pre_hooks([(adapter.ffn_down_proj(l), make_hook(l)) for l in wanted]):
            yield captured
    except _StopForward:
        pass


# ---------------------------------------------------------------------------------------------
@contextmanager
def substitute_heads(adapter: ModelAdapter, row_heads: Sequence[RowSpec]) -> Iterator[None]:
    """Mean-substitute attention heads, per batch row, at the input of o_proj.

    docs/method.md section 2 defines the substitution.

    Args:
        row_heads: one entry per batch row: None (row untouched), (layer, head), or a sequence
            of (layer, head) pairs. For each pair, in that row, at every position, head h's
            slice (width head_dim) of the concatenated head outputs [.., H*head_dim] entering
            that layer's o_proj is replaced by the mean of the other H-1 heads' slices (all
            computed from the unmodified input, so several heads of one layer are substituted
            simultaneously).

    Works for full forwards ([B, S, H*dh]) and KV-cached decode steps ([B, new, H*dh]).
    """
    n_heads, head_dim = adapter.num_heads, adapter.head_dim
    if n_heads < 2:
        raise AdapterError(
            f"substitute_heads needs at least 2 heads (the mean of the others); "
            f"{type(adapter.model).__name__} has {n_heads}"
        )
    per_layer = _group_rows(adapter, row_heads, "head")
    n_rows = len(row_heads)

    def make_hook(rows: list[int], heads: list[int]) -> Callable:
        cache = _DeviceCache(torch.tensor(rows), torch.tensor(heads), torch.arange(len(rows)))

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = _first_input(args, kwargs)
            _check_batch(x, n_rows, "substitute_heads")
            r, h, k = cache.on(x.device)
            x4 = x.reshape(*x.shape[:-1], n_heads, head_dim)  # [B, S, H, dh]
            # float32: a bf16 sum over H heads minus one of them loses most of the mean's bits.
            sel = x4[r].float()  # [n, S, H, dh]
            mean_others = (sel.sum(dim=2) - sel[k, :, h]) / (n_heads - 1)  # [n, S, dh]
            new = x4.clone()
            new[r, :, h] = mean_others.to(x.dtype)
            return _replace_first_input(args, kwargs, new.reshape(x.shape))

        return hook

    hooks = [(adapter.attn_out_proj(l), make_hook(rows, heads)) for l, (rows, heads) in sorted(per_layer.items())]
    with _pre_hooks(hooks):
        yield


# ---------------------------------------------------------------------------------------------
@contextmanager
def scale_neurons(
    adapter: ModelAdapter,
    scales: Mapping[int, tuple[torch.Tensor | Sequence[int], torch.Tensor | float]],
) -> Iterator[None]:
    """Multiply chosen neurons of z (input of down_proj) by scales, at every position and row.

    Args:
        scales: layer -> (idx, scale). idx: LongTensor [k] of distinct neuron indices; scale: a
            float, a 0-dim tensor, or a tensor [k] (one per neuron). 0 zeroes the neurons
            (masking). A ``torch.nn.Parameter`` is used as is: z is never modified in place, so
            gradients reach it (steering).
    """
    width = adapter.ffn_width
    prepared: list[tuple[nn.Module, Callable]] = []
    for layer, (idx, scale) in sorted(scales.items()):
        (layer,) = adapter.check_layers([layer], "scale_neurons")
        idx_t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        adapter.check_neurons([(layer, i) for i in idx_t.tolist()], "scale_neurons", distinct=True)
        scale_t = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
        if scale_t.dim() > 1 or (scale_t.dim() == 1 and scale_t.numel() not in (1, idx_t.numel())):
            raise ValueError(f"scale_neurons: layer {layer}: {scale_t.numel()} scales for {idx_t.numel()} neurons")
        prepared.append((adapter.ffn_down_proj(layer), _scale_hook(idx_t, scale_t, width)))
    with _pre_hooks(prepared):
        yield


def _scale_hook(idx: torch.Tensor, scale: torch.Tensor, width: int) -> Callable:
    cache = _DeviceCache(idx)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        z = _first_input(args, kwargs)
        (i,) = cache.on(z.device)
        s = scale.to(z.device)
        values = s.expand(i.shape) if s.numel() == 1 else s
        # Out-of-place index_put: differentiable w.r.t. the scales, leaves z untouched.
        factor = torch.ones(width, dtype=values.dtype, device=z.device).index_put((i,), values)
        return _replace_first_input(args, kwargs, z * factor.to(z.dtype))

    return hook


@contextmanager
def scale_neurons_per_row(adapter: ModelAdapter, row_neurons: Sequence[RowSpec], scale: float = 0.0) -> Iterator[None]:
    """Scale, per batch row, that row's own neurons of z by ``scale`` at every position.

    Args:
        row_neurons: one entry per batch row: None (untouched), (layer, neuron), or a sequence
            of (layer, neuron) pairs.
        scale: the factor (0 = ablation).
    """
    per_layer = _group_rows(adapter, row_neurons, "neuron")
    n_rows = len(row_neurons)

    def make_hook(rows: list[int], neurons: list[int]) -> Callable:
        cache = _DeviceCache(torch.tensor(rows), torch.tensor(neurons))

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            z = _first_input(args, kwargs)
            _check_batch(z, n_rows, "scale_neurons_per_row")
            r, n = cache.on(z.device)
            new = z.clone()
            new[r, ..., n] = z[r, ..., n] * scale
            return _replace_first_input(args, kwargs, new)

        return hook

    hooks = [(adapter.ffn_down_proj(l), make_hook(rows, neurons)) for l, (rows, neurons) in sorted(per_layer.items())]
    with _pre_hooks(hooks):
        yield


def ablate_neurons_per_row(adapter: ModelAdapter, row_neurons: Sequence[RowSpec]):
    """Zero, per batch row, that row's own neurons of z (ground-truth ablation of many neurons
    in one batched forward). Same ``row_neurons`` format as ``scale_neurons_per_row``."""
    return scale_neurons_per_row(adapter, row_neurons, scale=0.0)


def condition_scales(
    adapter: ModelAdapter, conditions: Sequence[Mapping[tuple[int, int], float]]
) -> Callable[[list[int]], AbstractContextManager]:
    """``evaluate_task``'s ``condition_hooks`` for per-condition neuron scales.

    ``conditions[c]``: {(layer, neuron): scale} applied to the rows of condition c (an empty
    mapping = no intervention). The returned callable takes the condition of every batch row
    and returns a context manager multiplying z (input of down_proj) of each row by its
    condition's scales, at every position (full forwards and KV-cached decode steps). A scale
    of 1 leaves z bitwise unchanged, and a row's result equals ``hooks.scale_neurons`` with
    its condition's scales.
    """
    width, C = adapter.ffn_width, len(conditions)
    factors: dict[int, torch.Tensor] = {}
    for c, cond in enumerate(conditions):
        for (layer, neuron), s in zip(adapter.check_neurons(cond.keys(), f"condition {c}"), cond.values()):
            factors.setdefault(layer, torch.ones(C, width))[c, neuron] = float(s)

    def make_hook(per_row: torch.Tensor) -> Callable:
        cache = _DeviceCache(per_row)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            z = _first_input(args, kwargs)
            _check_batch(z, per_row.shape[0], "condition_scales")
            (f,) = cache.on(z.device)
            f = f.to(z.dtype).reshape(f.shape[0], *([1] * (z.dim() - 2)), f.shape[1])
            return _replace_first_input(args, kwargs, z * f)

        return hook

    def hooks(row_conditions: list[int]) -> AbstractContextManager:
        rows = torch.as_tensor(list(row_conditions), dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= C):
            raise ValueError(f"condition index out of range [0, {C})")
        # Only layers where some row's factor is not 1 (a factor of 1 is bitwise a no-op), so
        # that rows intervened on only from some layer up can share the layers below it.
        return _pre_hooks(
            [
                (adapter.ffn_down_proj(l), make_hook(f[rows]))
                for l, f in sorted(factors.items())
                if bool((f[rows] != 1).any())
            ]
        )

    return hooks


# ---------------------------------------------------------------------------------------------
@dataclass
class FfnTrace:
    """What ``trace_ffn`` records in one full forward pass of B rows (all float32 unless noted).

    scales: layer -> ones [B, ffn_width] (requires grad): z of that row is multiplied by it at
        every position, so d U / d scales[l][b, i] = sum over positions of z * dU/dz: the
        first-order estimate of U(base) - U(neuron zeroed everywhere) (attribution patching).
    residual: zeros [B, hidden] (requires grad), added to the residual stream entering the final
        norm (the lm_head when there is none) at each row's ``positions``: d U / d residual is
        the direct path's gradient there.
    gate_sum: layer -> [B, ffn_width], the sum of act(gate) over the row's ``token_mask``.
    gate_positive: layer -> [B, ffn_width] int64, tokens of ``token_mask`` with act(gate) > 0.
    """

    scales: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: torch.Tensor | None = None
    gate_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_positive: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def trace_ffn(adapter: ModelAdapter, positions: torch.Tensor, token_mask: torch.Tensor) -> Iterator[FfnTrace]:
    """Probes and act(gate) statistics for the one full forward pass run in the body.

    Args:
        positions: LongTensor [B], the position of each row where the residual probe is added
            (e.g. ``ModelInputs.last_prompt_index``).
        token_mask: BoolTensor [B, S], the tokens whose act(gate) is counted (e.g. the prompt).

    Run the forward under ``torch.enable_grad()`` and take ``torch.autograd.grad`` of a
    per-row utility's sum with respect to ``trace.scales`` / ``trace.residual`` (rows are
    independent, so each row's gradient is that of its own utility). The model's weights are
    set not to require grad inside the context (and restored after), so that autograd saves
    only what the probes' gradients need: nothing of the vision tower, no weight gradients.
    Full forwards only (no KV-cached decoding).
    """
    B = int(positions.shape[0])
    width = adapter.ffn_width
    trace = FfnTrace()
    for layer in range(adapter.num_layers):
        trace.scales[layer] = torch.ones(B, width, device=adapter.device, requires_grad=True)
    trace.residual = torch.zeros(B, adapter.hidden_size, device=adapter.device, requires_grad=True)
    cache = _DeviceCache(positions.reshape(-1).long(), token_mask.bool())

    def scale_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            z = _first_input(args, kwargs)
            _check_batch(z, B, "trace_ffn")
            s = trace.scales[layer].to(z.dtype)
            return _replace_first_input(args, kwargs, z * s.reshape(B, *([1] * (z.dim() - 2)), width))

        return hook

    def gate_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            _check_batch(output, B, "trace_ffn")
            _, mask = cache.on(output.device)
            if output.shape[:2] != mask.shape:
                raise ValueError(
                    f"trace_ffn: token mask {tuple(mask.shape)} does not match the activation "
                    f"{tuple(output.shape[:2])} of layer {layer}"
                )
            a = output.detach().float() * mask.unsqueeze(-1)
            trace.gate_sum[layer] = a.sum(1)
            trace.gate_positive[layer] = (a > 0).sum(1)
            return None

        return hook

    def residual_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = _first_input(args, kwargs)
        _check_batch(x, B, "trace_ffn")
        pos, _ = cache.on(x.device)
        onehot = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        onehot[torch.arange(B, device=x.device), pos] = 1
        return _replace_first_input(args, kwargs, x + onehot.unsqueeze(-1) * trace.residual.to(x.dtype).unsqueeze(1))

    handles = []
    try:
        with _weights_frozen(adapter):
            for layer in range(adapter.num_layers):
                handles.append(
                    adapter.ffn_down_proj(layer).register_forward_pre_hook(scale_hook(layer), with_kwargs=True)
                )
                handles.append(adapter.ffn_activation(layer).register_forward_hook(gate_hook(layer)))
            handles.append(adapter.unembedding_input().register_forward_pre_hook(residual_hook, with_kwargs=True))
            yield trace
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _weights_frozen(adapter: ModelAdapter) -> Iterator[None]:
    """The model's trainable weights set not to require grad, restored on exit: a probe's
    backward then saves nothing of the vision tower and computes no weight gradients."""
    trainable = [p for p in adapter.model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def trace_head_substitution(adapter: ModelAdapter, batch_size: int) -> Iterator[dict[int, torch.Tensor]]:
    """Differentiable probes of the mean substitution of every head, for one full forward of
    ``batch_size`` rows.

    Yields {layer: alpha}, alpha zeros float32 [batch_size, num_heads] requiring grad. In row b,
    at every position, head h's slice x_h of the input of that layer's o_proj becomes
    x_h + alpha[b, h] * (m_h - x_h), with m_h the mean of the other heads' slices as
    ``substitute_heads`` computes it (from the unmodified input). alpha = 1 is that
    substitution; 0 leaves the model untouched, so d U / d alpha[b, h] at 0 is
    sum over positions of <dU/dx_h, m_h - x_h>, the first-order estimate of
    U(head h substituted) - U(base) for row b's utility U (attribution patching of the
    substitution; docs/method.md section 2). Values written into alpha (under
    ``torch.no_grad()``) before the forward act as given: exact or partial substitutions.

    Run the forward under ``torch.enable_grad()`` and take ``torch.autograd.grad`` of the rows'
    utilities' sum with respect to the alphas (rows are independent). Weights are frozen as in
    ``trace_ffn``. Full forwards only (no KV-cached decoding).
    """
    n_heads, head_dim = adapter.num_heads, adapter.head_dim
    if n_heads < 2:
        raise AdapterError(
            f"trace_head_substitution needs at least 2 heads (the mean of the others); "
            f"{type(adapter.model).__name__} has {n_heads}"
        )
    alphas = {
        layer: torch.zeros(batch_size, n_heads, device=adapter.device, requires_grad=True)
        for layer in range(adapter.num_layers)
    }

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = _first_input(args, kwargs)
            _check_batch(x, batch_size, "trace_head_substitution")
            x4 = x.reshape(*x.shape[:-1], n_heads, head_dim)  # [B, S, H, dh]
            # At least float32, as substitute_heads: a bf16 sum over the heads loses the mean's bits.
            xf = x4.to(torch.promote_types(x4.dtype, torch.float32))
            mean_others = (xf.sum(dim=2, keepdim=True) - xf) / (n_heads - 1)  # [B, S, H, dh]
            a = alphas[layer].to(x.device, xf.dtype).reshape(batch_size, *([1] * (x.dim() - 2)), n_heads, 1)
            new = xf + a * (mean_others - xf)
            return _replace_first_input(args, kwargs, new.to(x.dtype).reshape(x.shape))

        return hook

    with _weights_frozen(adapter), _pre_hooks([(adapter.attn_out_proj(l), make_hook(l)) for l in alphas]):
        yield alphas


# ---------------------------------------------------------------------------------------------
@contextmanager
def capture_layer_inputs(adapter: ModelAdapter, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The residual stream entering each of ``layers`` [B, S, hidden], every position, for the
    one forward pass run in the body (detached, on the model's device)."""
    wanted = sorted(set(adapter.check_layers(layers, "capture_layer_inputs")))
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = _first_input(args, kwargs, "hidden_states").detach()
            return None

        return hook

    with _pre_hooks([(adapter.layers[l], make_hook(l)) for l in wanted]):
        yield captured


@dataclass
class ResidualTrace:
    """The residual stream at chosen positions of one forward pass (float32 [N, hidden] each, N
    the chosen positions in row-major order; detached).

    layer_input: layer -> the residual entering the decoder layer.
    after_attention: layer -> the residual after the layer's attention was added (the input of
        the norm in front of its FFN).
    final: the residual leaving the last layer (the input of the final norm).
    """

    layer_input: dict[int, torch.Tensor] = field(default_factory=dict)
    after_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    final: torch.Tensor | None = None


@contextmanager
def capture_residual_stream(adapter: ModelAdapter, positions: torch.Tensor) -> Iterator[ResidualTrace]:
    """The residual stream before, inside and after every decoder layer, at the positions where
    ``positions`` (BoolTensor [B, S'], S' <= S: the first S' positions of each row) is True, for
    the one forward pass run in the body. What a logit lens decodes: layer l's attention output
    is after_attention[l] - layer_input[l], its FFN output layer_input[l + 1] (``final`` after the
    last layer) - after_attention[l], whatever norms the family puts around each block."""
    trace = ResidualTrace()
    cache = _DeviceCache(positions.bool())

    def gather(x: torch.Tensor) -> torch.Tensor:
        (mask,) = cache.on(x.device)
        _check_batch(x, int(mask.shape[0]), "capture_residual_stream")
        return x.detach()[:, : mask.shape[1]][mask].to(torch.float32, copy=True)

    def make_hook(store: dict[int, torch.Tensor], layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            store[layer] = gather(_first_input(args, kwargs, "hidden_states"))
            return None

        return hook

    def final_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        trace.final = gather(_first_input(args, kwargs))
        return None

    pairs = []
    for layer in range(adapter.num_layers):
        pairs.append((adapter.layers[layer], make_hook(trace.layer_input, layer)))
        pairs.append((adapter.ffn_input_norm(layer), make_hook(trace.after_attention, layer)))
    pairs.append((adapter.unembedding_input(), final_hook))
    with _pre_hooks(pairs):
        yield trace
