"""ModelAdapter on tiny random models of every supported family (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ANSWERS, FACTORIES, PROMPTS, WITH_PROCESSOR, built, make_images, tiny_llava, tiny_phi
from tiny_models import cached_adapter as adapter_for
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model.adapter import AdapterError, ModelAdapter, ModelInputs

# PaliGemma's processor builds its (unused) labels with a numpy call that numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VLM_FAMILIES = list(FACTORIES)
# Expected (query heads, kv heads, head_dim, ffn width, hidden) of the tiny configs.
EXPECTED_SHAPES = {
    "llava": (4, 2, 8, 48, 32),
    "qwen2_vl": (4, 2, 16, 96, 64),
    "qwen2_5_vl": (4, 2, 16, 96, 64),
    "idefics3": (4, 2, 8, 48, 32),
    "smolvlm": (4, 2, 8, 48, 32),
    "paligemma": (4, 1, 8, 48, 32),
    "gemma3": (4, 2, 8, 48, 32),
    "internvl": (4, 2, 8, 48, 32),
    "mistral3": (4, 2, 8, 48, 32),
}


def _vision_module_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("vision_tower", "visual", "vision_model"):
            ids.update(id(m) for m in module.modules())
    return ids


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_layers_are_the_language_model_layers(family):
    model, _ = built(family)
    adapter = adapter_for(family)
    text_cfg = model.config.get_text_config()
    assert adapter.family == family
    assert adapter.num_layers == len(adapter.layers) == text_cfg.num_hidden_layers
    vision = _vision_module_ids(model)
    assert vision, "the tiny model should have a vision tower"
    names = {id(m): n for n, m in model.named_modules()}
    for i, layer in enumerate(adapter.layers):
        assert not any(id(m) in vision for m in layer.modules())
        for module in (adapter.attn_out_proj(i), adapter.ffn_down_proj(i)):
            assert id(module) not in vision
            assert ("language_model" in names[id(module)]) or ("text_model" in names[id(module)])


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_head_counts_and_widths(family):
    model, _ = built(family)
    adapter = adapter_for(family)
    heads, kv_heads, head_dim, ffn, hidden = EXPECTED_SHAPES[family]
    text_cfg = model.config.get_text_config()
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (heads, kv_heads, head_dim)
    assert adapter.num_heads == text_cfg.num_attention_heads
    assert (adapter.ffn_width, adapter.hidden_size) == (ffn, hidden)
    for i in range(adapter.num_layers):
        o_proj, down = adapter.attn_out_proj(i), adapter.ffn_down_proj(i)
        assert o_proj is adapter.layers[i].self_attn.o_proj
        assert down is adapter.layers[i].mlp.down_proj
        assert o_proj.in_features == adapter.num_heads * adapter.head_dim
        assert down.in_features == adapter.ffn_width == text_cfg.intermediate_size


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_unembedding_and_final_norm_reproduce_logits(family):
    model, _ = built(family)
    adapter = adapter_for(family)
    vocab = model.get_input_embeddings().weight.shape[0]
    w = adapter.unembedding()
    assert tuple(w.shape) == (vocab, adapter.hidden_size)
    ids = torch.randint(5, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = {}
    handle = adapter.layers[-1].register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        handle.remove()
    with torch.no_grad():
        recomputed = adapter.final_norm()(seen["h"]) @ w.T
    torch.testing.assert_close(recomputed, logits, atol=1e-4, rtol=1e-4)


def test_plain_mlp_text_model():
    model, _ = tiny_phi()
    adapter = ModelAdapter.from_model(model)
    assert adapter.family == "phi"
    assert adapter.attn_out_proj(0) is model.model.layers[0].self_attn.dense
    assert adapter.ffn_down_proj(1) is model.model.layers[1].mlp.fc2
    assert (adapter.num_heads, adapter.head_dim, adapter.ffn_width) == (4, 8, 48)
    assert adapter.final_norm() is model.model.final_layernorm


# ------------------------------------------------------------------------------- build_inputs
def _shortest(prompts: list[str]) -> int:
    return min(range(len(prompts)), key=lambda i: len(prompts[i].split()))


@pytest.mark.parametrize("family", WITH_PROCESSOR)
def test_build_inputs_last_prompt_index_and_answer_mask(family):
    model, processor = built(family)
    adapter = adapter_for(family)
    tok = processor.tokenizer
    n = 3
    images, prompts, answers = make_images(n), PROMPTS[:n], ANSWERS[:n]

    plain = adapter.build_inputs(images, prompts)
    assert isinstance(plain, ModelInputs) and plain.answer_mask is None
    seq = plain.input_ids.shape[1]
    assert plain.last_prompt_index.tolist() == [seq - 1] * n
    assert bool(plain.attention_mask[:, -1].all()), "left padding"

    full = adapter.build_inputs(images, prompts, answers)
    with torch.no_grad():
        logits_plain = model(**plain.tensors).logits
        logits_full = model(**full.tensors).logits
    assert torch.isfinite(logits_full).all()

    # The shortest row is padded in the batch; alone it is not.
    r = _shortest(prompts)
    single = adapter.build_inputs(images[r : r + 1], prompts[r : r + 1])
    assert bool(single.attention_mask.all())
    with torch.no_grad():
        logits_single = model(**single.tensors).logits[0, -1]
    assert plain.attention_mask[r].sum() < seq
    torch.testing.assert_close(logits_plain[r, -1], logits_single, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_full[r, full.last_prompt_index[r]], logits_single, atol=1e-4, rtol=0)
    for row in range(n):  # appending answers does not change what the prompt predicts
        torch.testing.assert_close(
            logits_full[row, full.last_prompt_index[row]], logits_plain[row, -1], atol=1e-4, rtol=0
        )

    # answer_mask marks exactly the answer tokens + eos, right after the last prompt token.
    for row in range(n):
        expected = tok(answers[row], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        positions = full.answer_mask[row].nonzero().flatten().tolist()
        assert positions == list(range(int(full.last_prompt_index[row]) + 1, full.input_ids.shape[1]))
        assert full.input_ids[row, positions].tolist() == expected
        prompt_len = int(plain.attention_mask[row].sum())
        start = int(full.last_prompt_index[row]) + 1 - prompt_len
        assert (
            full.input_ids[row, start : start + prompt_len].tolist()
            == plain.input_ids[row, seq - prompt_len :].tolist()
        )
        assert int(full.attention_mask[row].sum()) == prompt_len + len(expected)
    mask, targets = full.answer_targets()
    assert int(mask.sum()) == int(full.answer_mask.sum())


def test_build_inputs_family_specific_tensors():
    images, prompts, answers = make_images(2), PROMPTS[:2], ANSWERS[:2]
    qwen = adapter_for("qwen2_5_vl").build_inputs(images, prompts, answers)
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(qwen.tensors)
    image_id = built("qwen2_5_vl")[1].image_token_id
    torch.testing.assert_close(qwen.tensors["mm_token_type_ids"], (qwen.input_ids == image_id).long())

    pali = adapter_for("paligemma").build_inputs(images, prompts, answers)
    assert "labels" not in pali.tensors
    # Prefix-LM: answers are the causal suffix (type 1), prompt tokens the bidirectional prefix.
    assert torch.equal(pali.tensors["token_type_ids"].bool(), pali.answer_mask)

    idefics = adapter_for("idefics3").build_inputs(images, prompts)
    assert "pixel_attention_mask" in idefics.tensors


def test_prompt_formats():
    llava = adapter_for("llava")
    assert llava.format_prompt("what is written ?") == "USER: <image>\nwhat is written ? ASSISTANT:"
    pali = adapter_for("paligemma")  # no chat template
    assert pali.format_prompt("what is written ?") == "<image>what is written ?"


def test_build_inputs_rejects_mismatched_lengths():
    adapter = adapter_for("llava")
    with pytest.raises(ValueError, match="one image per prompt"):
        adapter.build_inputs(make_images(1), PROMPTS[:2])
    with pytest.raises(ValueError, match="answers"):
        adapter.build_inputs(make_images(2), PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(AdapterError, match="processor"):
        ModelAdapter.from_model(built("llava")[0]).build_inputs(make_images(1), PROMPTS[:1])


def test_load_from_saved_folder(tmp_path):
    model, processor = tiny_llava(seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapter = ModelAdapter.load(str(tmp_path), dtype="float32", device="cpu")
    assert adapter.family == "llava" and not adapter.model.training
    assert adapter.tokenizer.padding_side == "left"
    inputs = adapter.build_inputs(make_images(2), PROMPTS[:2])
    reference = ModelAdapter.from_model(model, processor).build_inputs(make_images(2), PROMPTS[:2])
    assert torch.equal(inputs.input_ids, reference.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(**inputs.tensors).logits, model(**reference.tensors).logits)
    with pytest.raises(AdapterError, match="dtype"):
        ModelAdapter.load(str(tmp_path), dtype="float33")


# ------------------------------------------------------------------------------- unsupported
def test_plain_module_is_rejected():
    with pytest.raises(AdapterError, match=r"decoder layers.*Sequential"):
        ModelAdapter.from_model(nn.Sequential(nn.Linear(4, 4)))


def test_bert_is_rejected():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(AdapterError, match=r"decoder layers.*BertForMaskedLM") as info:
        ModelAdapter.from_model(bert)
    assert isinstance(info.value, (ValueError, PipelineError))


def test_missing_pieces_are_named():
    model, _ = tiny_llava()
    attn = model.model.language_model.layers[1].self_attn
    attn.renamed = attn.o_proj
    del attn.o_proj
    with pytest.raises(AdapterError, match=r"o_proj.*layer 1.*LlavaForConditionalGeneration"):
        ModelAdapter.from_model(model)

    model, _ = tiny_llava()
    mlp = model.model.language_model.layers[0].mlp
    mlp.renamed = mlp.down_proj
    del mlp.down_proj
    with pytest.raises(AdapterError, match=r"down_proj.*layer 0"):
        ModelAdapter.from_model(model)

    model, _ = tiny_llava()
    model.lm_head = nn.Identity()
    with pytest.raises(AdapterError, match=r"lm_head.*LlavaForConditionalGeneration"):
        ModelAdapter.from_model(model).unembedding()


@pytest.mark.parametrize("family", VLM_FAMILIES + ["phi"])
def test_trace_ffn_on_every_family(family):
    """The activation module is found in every family, its statistics equal act(gate_proj(x))
    (act(fc1(x)) = z for plain MLPs) recomputed from the MLP input, and the probes get gradients."""
    from pipeline.model.hooks import trace_ffn

    model, _ = tiny_phi() if family == "phi" else built(family)
    adapter = ModelAdapter.from_model(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(5, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    last = torch.tensor([6, 6])
    seen = {}
    handles = [
        adapter.mlp(l).register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0].detach()))
        for l in range(adapter.num_layers)
    ]
    try:
        with torch.enable_grad(), trace_ffn(adapter, last, mask) as trace:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, 3].sum()
            grads = torch.autograd.grad(logp, [trace.scales[l] for l in range(adapter.num_layers)] + [trace.residual])
    finally:
        for h in handles:
            h.remove()
    for l in range(adapter.num_layers):
        mlp = adapter.mlp(l)
        x = seen[l]
        pre = mlp.gate_proj(x) if hasattr(mlp, "gate_proj") else mlp.fc1(x)
        gate = adapter.ffn_activation(l)(pre).float() * mask[..., None]
        torch.testing.assert_close(trace.gate_sum[l], gate.sum(1), rtol=1e-4, atol=1e-4)
        assert torch.equal(trace.gate_positive[l], (gate > 0).sum(1))
    assert all(g.abs().sum() > 0 for g in grads)
