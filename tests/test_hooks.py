"""Interventions of pipeline.model.hooks against manual computations on tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import PROMPTS, make_images, tiny_llava, tiny_mistral3, tiny_phi, tiny_qwen2_5_vl
from torch import nn

from pipeline.model.adapter import ModelAdapter
from pipeline.model.hooks import (
    ablate_neurons_per_row,
    capture_ffn,
    scale_neurons,
    scale_neurons_per_row,
    substitute_heads,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_CACHE: dict[str, ModelAdapter] = {}


def adapter(family: str) -> ModelAdapter:
    if family not in _CACHE:
        factory = {"llava": tiny_llava, "qwen2_5_vl": tiny_qwen2_5_vl, "phi": tiny_phi, "mistral3": tiny_mistral3}
        model, processor = factory[family]()
        _CACHE[family] = ModelAdapter.from_model(model, processor)
    return _CACHE[family]


def batch(a: ModelAdapter, n: int = 3):
    """Inputs for n different examples (different lengths, so rows are padded differently)."""
    if a.processor is None:  # text-only model: random ids, left padding on the first row
        ids = torch.randint(3, a.model.config.vocab_size, (n, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        return {"input_ids": ids, "attention_mask": mask}, torch.full((n,), 8)
    inputs = a.build_inputs(make_images(n), PROMPTS[:n])
    return inputs.tensors, inputs.last_prompt_index


def single(a: ModelAdapter, r: int):
    """Row r of ``batch`` alone, unpadded."""
    if a.processor is None:
        tensors, _ = batch(a)
        keep = tensors["attention_mask"][r].bool()
        return {"input_ids": tensors["input_ids"][r : r + 1, keep]}
    return a.build_inputs(make_images(r + 1)[r : r + 1], PROMPTS[r : r + 1]).tensors


def all_hooked_modules(a: ModelAdapter) -> list[nn.Module]:
    return [m for i in range(a.num_layers) for m in (a.attn_out_proj(i), a.ffn_down_proj(i))]


def no_hooks_left(a: ModelAdapter) -> bool:
    return all(len(m._forward_pre_hooks) == 0 for m in all_hooked_modules(a))


# ------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "phi"])
def test_capture_equals_manual_z(family):
    a = adapter(family)
    tensors, positions = batch(a)
    mlp_inputs: dict[int, torch.Tensor] = {}
    handles = [
        a.mlp(i).register_forward_pre_hook(lambda m, args, i=i: mlp_inputs.__setitem__(i, args[0]))
        for i in range(a.num_layers)
    ]
    try:
        with torch.no_grad(), capture_ffn(a, None, positions) as z:
            a.model(**tensors)
    finally:
        for h in handles:
            h.remove()
    assert sorted(z) == list(range(a.num_layers))
    rows = torch.arange(len(positions))
    for i in range(a.num_layers):
        mlp, x = a.mlp(i), mlp_inputs[i]
        with torch.no_grad():
            if hasattr(mlp, "gate_proj"):
                manual = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            else:
                manual = mlp.activation_fn(mlp.fc1(x))
        assert z[i].dtype == torch.float32 and z[i].shape == (len(positions), a.ffn_width)
        torch.testing.assert_close(z[i], manual[rows, positions], atol=1e-6, rtol=0)
    assert no_hooks_left(a)


def test_capture_stop_after_last_skips_later_layers():
    a = adapter("llava")
    tensors, positions = batch(a)
    with torch.no_grad(), capture_ffn(a, [0, 1], positions) as full:
        a.model(**tensors)
    ran = []
    handle = a.layers[1].mlp.down_proj.register_forward_hook(lambda *args: ran.append(1))
    reached_end = False
    try:
        with torch.no_grad(), capture_ffn(a, [0], positions, stop_after_last=True) as early:
            a.model(**tensors)
            reached_end = True  # skipped: the forward is aborted after layer 0's capture
    finally:
        handle.remove()
    assert not reached_end and not ran
    assert list(early) == [0]
    torch.testing.assert_close(early[0], full[0], atol=0, rtol=0)
    # An int position: the same for every row (-1 = last position).
    with torch.no_grad(), capture_ffn(a, [1], -1, stop_after_last=True) as last:
        a.model(**tensors)
    seq = tensors["input_ids"].shape[1]
    assert torch.equal(positions, torch.full_like(positions, seq - 1))
    torch.testing.assert_close(last[1], full[1], atol=0, rtol=0)
    assert no_hooks_left(a)


# ------------------------------------------------------------------------------- heads
def manual_substitution(a: ModelAdapter, layer: int, head: int):
    """A pre-hook replacing head ``head``'s slice by the mean of the others with a python loop."""
    dh, n_heads = a.head_dim, a.num_heads

    def hook(module, args):
        x = args[0].clone()
        others = [args[0][..., g * dh : (g + 1) * dh] for g in range(n_heads) if g != head]
        x[..., head * dh : (head + 1) * dh] = sum(others) / len(others)
        return (x,)

    return a.attn_out_proj(layer).register_forward_pre_hook(hook)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_substitute_heads_per_row_matches_single_row_manual(family):
    a = adapter(family)
    tensors, _ = batch(a)
    row_heads = [(0, 1), None, (1, 3)]
    with torch.no_grad():
        base = a.model(**tensors).logits
        with substitute_heads(a, row_heads):
            hooked = a.model(**tensors).logits
    assert no_hooks_left(a)
    mask = tensors["attention_mask"].bool()
    for r, spec in enumerate(row_heads):
        one = single(a, r)
        handle = manual_substitution(a, *spec) if spec else None
        try:
            with torch.no_grad():
                expected = a.model(**one).logits[0]
        finally:
            if handle:
                handle.remove()
        got = hooked[r, mask[r]]
        assert (got - expected).abs().max() <= 1e-5
        if spec is None:
            assert torch.equal(hooked[r], base[r])
        else:
            assert (got - base[r, mask[r]]).abs().max() > 1e-4, "the substitution should change the output"


def test_substitute_several_heads_in_one_row_and_validation():
    a = adapter("llava")
    tensors, _ = batch(a, 2)
    with torch.no_grad(), substitute_heads(a, [[(0, 0), (0, 2), (1, 1)], None]):
        hooked = a.model(**tensors).logits[0]
    one = single(a, 0)
    # Simultaneous: both heads of layer 0 are replaced by means of the unmodified slices.
    dh = a.head_dim

    def two_heads(module, args):
        x = args[0]
        parts = [x[..., g * dh : (g + 1) * dh] for g in range(a.num_heads)]
        new = list(parts)
        for h in (0, 2):
            new[h] = (sum(parts) - parts[h]) / (a.num_heads - 1)
        return (torch.cat(new, dim=-1),)

    handles = [a.attn_out_proj(0).register_forward_pre_hook(two_heads), manual_substitution(a, 1, 1)]
    try:
        with torch.no_grad():
            expected = a.model(**one).logits[0]
    finally:
        for h in handles:
            h.remove()
    assert (hooked[tensors["attention_mask"][0].bool()] - expected).abs().max() <= 1e-5
    for bad in ([(2, 0)], [(0, 4)], [("x", 1)], [(0, 1, 2)]):
        with pytest.raises(ValueError):
            with substitute_heads(a, bad):
                pass
    with pytest.raises(ValueError, match="rows"):  # 3 specs for a 2-row batch
        with torch.no_grad(), substitute_heads(a, [None, None, (0, 1)]):
            a.model(**tensors)
    assert no_hooks_left(a)


def test_hooks_removed_after_exception():
    a = adapter("llava")
    tensors, positions = batch(a, 2)
    contexts = [
        lambda: substitute_heads(a, [(0, 1), (1, 2)]),
        lambda: capture_ffn(a, None, positions),
        lambda: scale_neurons(a, {0: (torch.tensor([1, 2]), 0.0)}),
        lambda: ablate_neurons_per_row(a, [(0, 3), None]),
    ]
    for make in contexts:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                assert not no_hooks_left(a)
                raise RuntimeError("boom")
        assert no_hooks_left(a)
        with make():
            pass
        assert no_hooks_left(a)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_substitute_heads_under_generate(family):
    a = adapter(family)
    inputs = a.build_inputs(make_images(3), PROMPTS[:3])
    row_heads = [(1, 2), (0, 0), None]
    # min_new_tokens: the tiny random models may otherwise stop at once on eos.
    kwargs = dict(
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=a.tokenizer.pad_token_id,
    )
    with torch.no_grad(), substitute_heads(a, row_heads):
        out = a.model.generate(**inputs.tensors, **kwargs)
    assert no_hooks_left(a)
    prompt_len = inputs.input_ids.shape[1]
    for r, spec in enumerate(row_heads):
        one = a.build_inputs(make_images(r + 1)[r : r + 1], PROMPTS[r : r + 1])
        handle = manual_substitution(a, *spec) if spec else None
        try:
            with torch.no_grad():
                ref = a.model.generate(**one.tensors, **kwargs)
        finally:
            if handle:
                handle.remove()
        assert out.sequences[r, prompt_len:].tolist() == ref.sequences[0, one.input_ids.shape[1] :].tolist()
        for step in range(3):
            assert (out.logits[step][r] - ref.logits[step][0]).abs().max() <= 1e-4


# ------------------------------------------------------------------------------- neurons
def test_scale_zero_equals_zeroed_down_proj_columns():
    a = adapter("llava")
    tensors, _ = batch(a)
    chosen = {0: torch.tensor([0, 5, 17]), 1: torch.tensor([3, 47])}
    with torch.no_grad(), scale_neurons(a, {l: (idx, 0.0) for l, idx in chosen.items()}):
        hooked = a.model(**tensors).logits
    assert no_hooks_left(a)
    zeroed = copy.deepcopy(a.model)
    b = ModelAdapter.from_model(zeroed)
    with torch.no_grad():
        for l, idx in chosen.items():
            b.ffn_down_proj(l).weight[:, idx] = 0.0
        expected = zeroed(**tensors).logits
    assert (hooked - expected).abs().max() <= 1e-5
    with torch.no_grad():
        assert (hooked - a.model(**tensors).logits).abs().max() > 1e-4


def test_scale_neurons_per_neuron_scales_and_validation():
    a = adapter("phi")
    tensors, positions = batch(a)
    idx, scales = torch.tensor([1, 4, 9]), torch.tensor([2.0, -0.5, 0.0])
    with torch.no_grad():
        with capture_ffn(a, [1], positions) as plain:
            a.model(**tensors)
        with scale_neurons(a, {1: (idx, scales)}), capture_ffn(a, [1], positions) as scaled:
            a.model(**tensors)
    expected = plain[1].clone()
    expected[:, idx] *= scales
    torch.testing.assert_close(scaled[1], expected)
    for bad in ({2: ([0], 0.0)}, {0: ([48], 0.0)}, {0: ([1, 1], 0.0)}, {0: ([1, 2], torch.ones(3))}):
        with pytest.raises(ValueError):
            with scale_neurons(a, bad):
                pass
    assert no_hooks_left(a)


def test_scale_neurons_with_parameter_is_differentiable():
    a = adapter("llava")
    tensors, _ = batch(a, 2)
    idx = torch.tensor([2, 7, 11])
    lam = nn.Parameter(torch.zeros(3))
    params = list(a.model.parameters())
    with torch.no_grad():
        base = a.model(**tensors).logits
    try:
        for p in params:  # frozen model, as in steering: the graph exists only through the scales
            p.requires_grad_(False)
        with scale_neurons(a, {1: (idx, 1.0 + lam)}):
            logits = a.model(**tensors).logits
        torch.testing.assert_close(logits.detach(), base, atol=1e-6, rtol=0)  # scale 1 = identity
        logits.logsumexp(-1).sum().backward()
        assert lam.grad is not None and lam.grad.abs().sum() > 0
        scale = nn.Parameter(torch.tensor(1.5))  # a Parameter used directly, one scale for all neurons
        with scale_neurons(a, {0: (idx, scale)}):
            a.model(**tensors).logits.sum().backward()
        assert scale.grad is not None and scale.grad.abs() > 0
    finally:
        for p in params:
            p.requires_grad_(True)
    assert no_hooks_left(a)


def test_per_row_ablation_equals_separate_single_neuron_runs():
    a = adapter("llava")
    one = single(a, 1)
    row_neurons = [(0, 3), (1, 40), None, (1, 3), [(0, 7), (1, 7)]]
    n = len(row_neurons)
    tensors = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in one.items()}
    with torch.no_grad(), ablate_neurons_per_row(a, row_neurons):
        hooked = a.model(**tensors).logits
    assert no_hooks_left(a)
    for r, spec in enumerate(row_neurons):
        pairs = [] if spec is None else ([spec] if isinstance(spec, tuple) else spec)
        scales = {}
        for l, i in pairs:
            scales.setdefault(l, []).append(i)
        with torch.no_grad(), scale_neurons(a, {l: (torch.tensor(ix), 0.0) for l, ix in scales.items()}):
            expected = a.model(**one).logits[0]
        assert (hooked[r] - expected).abs().max() <= 1e-5
    # Rows differ from each other only through their own neuron.
    assert (hooked[0] - hooked[2]).abs().max() > 0
    # A non-zero per-row scale.
    with torch.no_grad(), scale_neurons_per_row(a, [(0, 3)] + [None] * (n - 1), scale=3.0):
        tripled = a.model(**tensors).logits[0]
    with torch.no_grad(), scale_neurons(a, {0: (torch.tensor([3]), 3.0)}):
        expected = a.model(**one).logits[0]
    assert (tripled - expected).abs().max() <= 1e-5


def test_text_only_rows_of_mistral3():
    """Mistral3 on text rows: hooks act on its language model, not its Pixtral tower (whose
    blocks have the same projection names)."""
    a = adapter("mistral3")
    vocab = a.model.config.get_text_config().vocab_size
    # Past the tokenizer's specials, so that no id is the image token.
    ids = torch.randint(len(a.tokenizer.all_special_ids) + 1, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = a.model(input_ids=ids).logits
        with substitute_heads(a, [None, (1, 0)]), capture_ffn(a, [0, 1], -1) as z:
            hooked = a.model(input_ids=ids).logits
    assert torch.equal(hooked[0], base[0]) and not torch.equal(hooked[1], base[1])
    assert z[1].shape == (2, a.ffn_width)
    assert no_hooks_left(a)


def test_ablation_effects_carry_their_standard_error(annotations, images, tiny_adapter):
    """effect and se of ``neuron_ablation_effects`` equal the mean and the standard error of
    the per-item effects computed one item at a time."""
    from pipeline.method.ablation import neuron_ablation_effects

    items = annotations[(annotations["split"] == "discovery") & (annotations["task"] == "vqa")].head(3)
    effect, se = neuron_ablation_effects(tiny_adapter, items, images, batch_size=16, layers=[1])
    per_item = np.stack(
        [
            neuron_ablation_effects(tiny_adapter, items.iloc[[k]], images, batch_size=16, layers=[1])[0][1]
            for k in range(3)
        ]
    )
    np.testing.assert_allclose(effect[1], per_item.mean(0), atol=1e-6)
    np.testing.assert_allclose(se[1], per_item.std(0, ddof=1) / np.sqrt(3), atol=1e-6)
    assert np.isnan(effect[0]).all() and np.isnan(se[0]).all()
    single = neuron_ablation_effects(tiny_adapter, items.head(1), images, batch_size=16, layers=[1])[1]
    assert np.isnan(single[1]).all()  # one item: no standard error


def test_ablating_a_sample_of_neurons_equals_the_exhaustive_sweep_there(annotations, images, tiny_adapter):
    """A sampled ground truth is the exhaustive one at the sampled neurons (NaN elsewhere), and
    the sample of every neuron is the exhaustive sweep."""
    from pipeline.errors import PipelineError
    from pipeline.method.ablation import neuron_ablation_effects

    a = tiny_adapter
    items = annotations[(annotations["split"] == "discovery") & (annotations["task"] == "caption")].head(2)
    effect, se = neuron_ablation_effects(a, items, images, batch_size=16)
    sample = [(1, 5), (0, 3), (1, 0), (0, a.ffn_width - 1)]  # any order; batches mix layers
    got, got_se = neuron_ablation_effects(a, items, images, batch_size=3, neurons=sample)
    picked = np.zeros(effect.shape, dtype=bool)
    picked[tuple(np.array(sample).T)] = True
    np.testing.assert_allclose(got[picked], effect[picked], atol=1e-6)
    np.testing.assert_allclose(got_se[picked], se[picked], atol=1e-6)
    assert np.isnan(got[~picked]).all()
    every = [(l, i) for l in range(a.num_layers) for i in range(a.ffn_width)]
    np.testing.assert_allclose(
        neuron_ablation_effects(a, items, images, batch_size=16, neurons=every[::-1])[0], effect, atol=1e-6
    )
    with pytest.raises(PipelineError, match=r"neuron_ablation_effects: neuron \(0, 3\) given twice"):
        neuron_ablation_effects(a, items, images, batch_size=3, neurons=[(0, 3), (0, 3)])
