"""pipeline.tools.estimate: the presets against hand-computed numbers, and the parameter count of
instantiated transformers models (LLaVA, Qwen2-VL, Qwen2.5-VL, the embedded default)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from pipeline.tools.estimate import PRESETS, Workload, architecture, estimate, load_config, main

torch.set_num_threads(1)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_llava_1_5_7b_by_hand():
    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    h, I, V, L = 4096, 11008, 32064, 32
    text = L * (4 * h * h + 3 * h * I + 2 * h) + 2 * V * h + h  # MHA without biases, SwiGLU, 2 RMSNorms; untied
    assert text == 6_738_939_904
    d, di, n = 1024, 4096, 576  # CLIP ViT-L/14 at 336 px: 24^2 patches + CLS
    clip = 3 * 14 * 14 * d + d + (n + 1) * d + 2 * d + 24 * (4 * (d * d + d) + d * di + di + di * d + d + 4 * d) + 2 * d
    assert clip == 303_507_456
    projector = d * h + h + h * h + h
    assert arch.params == text + clip + projector == 7_063_427_072  # llava-hf/llava-1.5-7b-hf: "7.06B params"
    assert arch.image_tokens == 576

    w = Workload(
        items=7000,
        top_k=4,
        dtype="bfloat16",
        store_dtype="float32",
        batch_size=16,
        prompt_tokens=48,
        answer_tokens=8,
        ablation_items=16,
    )
    est = estimate(arch, w)
    assert est["weights_bytes"]["bfloat16"] == 2 * 7_063_427_072
    S = 576 + 48 + 8
    assert est["batch_bytes"]["kv_cache"] == 2 * 32 * 32 * 128 * S * 16 * 2 == 5_301_600_256
    st = est["store"]
    item = 32 * 11008 * 4  # 1,409,024 bytes > 1 MiB: one item per chunk
    assert (st["chunk_items"], st["chunk_bytes"]) == (1, item)
    # 5 x 7000 chunks > 2000 files: shards of ceil(7000 / (2000 // 5)) = 18 chunks, ceil(7000 / 18) = 389 of them.
    assert (st["sharded"], st["block_items"], st["blocks"]) == (True, 18, 389)
    assert (st["z_files"], st["item_array_files"]) == (5 * 389, 6 * 389)
    assert st["z_bytes"] == 5 * 7000 * item == 49_315_840_000
    # dvp, dvp_logprob, atp, gate_sum, gate_positive [item, layer, neuron] x 4 bytes, prompt_tokens [item] int32.
    assert st["dvp_bytes"] == 7000 * item == 9_863_168_000
    assert sum(st["item_array_bytes"].values()) == 5 * 9_863_168_000 + 7000 * 4
    assert st["all_tasks_bytes"] == 4 * (49_315_840_000 + 5 * 9_863_168_000 + 28_000)
    stages = est["stages"]
    assert stages["heads"]["rows"] == 7000 * (32 * 32 + 1) == 7_175_000
    assert stages["dump"]["rows"] == 7000 * 5 and stages["dump"]["batches"] == 2188
    assert stages["ablation"]["rows"] == 16 * 32 * 11008 == 5_636_096
    # The gradient pass: one row per item, batches of 4; saved activations per token and layer
    # (6 hidden + 3.5 ffn) bf16 + 2 float32 norm inputs; the logits and their float32 log-softmax.
    assert stages["dump_gradients"]["rows"] == 7000 and stages["dump_gradients"]["batches"] == 1750
    gb = est["gradient_batch_bytes"]
    assert gb["saved_activations"] == 4 * S * 32 * ((6 * 4096 + 3.5 * 11008) * 2 + 2 * 4096 * 4)
    assert gb["logits_and_log_softmax"] == 4 * S * 32064 * (2 + 4)


def test_qwen2_5_vl_7b_by_hand():
    arch = architecture(PRESETS["qwen2.5-vl-7b"], "qwen2.5-vl-7b")
    h, I, V, L, kv = 3584, 18944, 152064, 28, 4 * 128
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q, k, v with biases (Qwen2), o without
    text = L * (attn + 3 * h * I + 2 * h) + 2 * V * h + h
    assert text == 7_615_616_512
    d, di, m = 1280, 3420, 4 * 1280  # vision width, SwiGLU width, 2x2 merged width
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (d * di + di) + (di * d + d)
    vision = 3 * 2 * 14 * 14 * d + 32 * block + d + (m * m + m) + (m * h + h)
    assert vision == 676_550_144
    assert arch.params == text + vision == 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct: "8.29B params"
    est = estimate(arch, Workload(items=100, top_k=2, batch_size=8, prompt_tokens=40, answer_tokens=4))
    S = 256 + 40 + 4
    assert est["batch_bytes"]["kv_cache"] == 2 * 28 * 4 * 128 * S * 8 * 2
    assert est["stages"]["heads"]["rows"] == 100 * (28 * 28 + 1)
    assert est["store"]["z_bytes"] == 3 * 100 * 28 * 18944 * 4


def _tiny_text(**kw):
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=100,
        **kw,
    )


def test_parameter_count_equals_instantiated_models():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}
    configs = [
        LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            text_config=LlamaConfig(**_tiny_text(tie_word_embeddings=False)),
        ),
        Qwen2_5_VLConfig(
            text_config=_tiny_text(**rope),
            vision_config=dict(
                depth=2,
                hidden_size=16,
                intermediate_size=24,
                num_heads=2,
                out_hidden_size=32,
                fullatt_block_indexes=[1],
            ),
        ),
        Qwen2VLConfig(
            text_config=_tiny_text(**rope),
            vision_config=dict(depth=2, embed_dim=16, mlp_ratio=2, num_heads=2, hidden_size=32),
        ),
    ]
    classes = [LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls, config in zip(classes, configs):
            assert architecture(config.to_dict()).params == _count(cls(config)), cls.__name__


def test_embedded_default_model_from_its_folder(tmp_path, tiny_adapter):
    tiny_adapter.model.config.save_pretrained(tmp_path / "m")
    name, config = load_config(str(tmp_path / "m"))
    arch = architecture(config, name)
    assert name == "m" and arch.params == _count(tiny_adapter.model)
    assert (arch.text.layers, arch.text.ffn) == (tiny_adapter.num_layers, tiny_adapter.ffn_width)
    assert arch.image_tokens == (32 // 8) ** 2


def test_cli(capsys):
    assert main(["--model-config", "qwen2.5-vl-7b", "--items", "10", "--conditions", "3", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["store"]["conditions"] == 3 and est["stages"]["dump"]["rows"] == 30
    assert main(["--model-config", "llava-1.5-7b"]) == 0
    table = capsys.readouterr().out
    assert "7,063,427,072" in table and "389 shards of 18 items" in table
    inline = json.dumps({"text_config": _tiny_text()})
    assert main(["--model-config", inline, "--items", "3"]) == 0
    assert "vision tower" in capsys.readouterr().out
    assert main(["--model-config", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ['{"text_config": {"hidden_size": 8}}'])
def test_incomplete_config_is_an_error(bad, capsys):
    assert main(["--model-config", bad]) == 2
    assert "lacks 'num_hidden_layers'" in capsys.readouterr().err


def test_shared_prefix_flops_by_hand():
    """2 layers, 2 heads, 2 neurons, batch 4, one item: a vision tower of 10, a layer of 1, no lm_head."""
    from types import SimpleNamespace

    from pipeline.tools.estimate import Workload, shared_prefix_flops

    arch = SimpleNamespace(text=SimpleNamespace(layers=2, heads=2, ffn=2))
    w = Workload(items=1, top_k=2, batch_size=4, heads_items=1, ablation_items=1)
    got = shared_prefix_flops(arch, w, f_vision=10.0, f_layer=1.0, f_head=0.0)
    # Per layer l: 2 rows x (2 - l) layers + one prefix (10 + l) + one stand-in image (10) per call.
    groups = (2 * 2 + 10 + 10) + (2 * 1 + 11 + 10)
    assert got["heads"] == groups + 12  # + the base row, a full pass
    assert got["ablation"] == groups
    # The dump: the base row in full (12), 2 head rows from their layer (mean 1.5 layers), one call's image.
    assert got["dump"] == 12 + 2 * 1.5 + 10


def test_estimate_prints_the_shared_prefix_saving_for_llava_7b(capsys):
    assert main(["--model-config", "llava-1.5-7b", "--items", "7000", "--top-k", "30"]) == 0
    out = capsys.readouterr().out
    for stage in ("heads", "dump", "ablation"):
        line = next(l for l in out.splitlines() if l.strip().startswith(f"{stage} with the shared prefix"))
        saving = float(line.split("FLOP, ")[1].split("x fewer")[0])
        assert 1.5 < saving < 2.5, line  # about half the layers skipped on average, the tower once


def test_guided_localisation_prices_candidates_and_one_gradient_pass_per_item(capsys):
    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    base = dict(items=5000, top_k=30, dtype="bfloat16", store_dtype="float16")
    exhaustive = estimate(arch, Workload(**base))["stages"]
    guided = estimate(arch, Workload(**base, localisation="guided"))["stages"]
    assert exhaustive["heads"]["rows"] == 5000 * (32 * 32 + 1) and "heads_gradients" not in exhaustive
    assert guided["heads"]["rows"] == 5000 * (4 * 30 + 1)  # default M = 4 x top_k
    assert guided["heads_gradients"]["rows"] == 5000
    assert guided["heads_gradients"]["flops"] == guided["dump_gradients"]["flops"]  # the same forward + backward
    assert (
        estimate(arch, Workload(**base, localisation="guided", guided_candidates=1024))["stages"]["heads"]["rows"]
        == exhaustive["heads"]["rows"]
    )
    with pytest.raises(ValueError, match=r"--candidates 10 must lie in \[top_k = 30, 1024 heads\]"):
        estimate(arch, Workload(**base, localisation="guided", guided_candidates=10))
    assert main(["--model-config", "llava-1.5-7b", "--top-k", "30", "--localisation", "guided"]) == 0
    assert "heads: items x (M + 1), M guided candidates" in capsys.readouterr().out


def test_screened_localisation_prices_the_screen_and_the_candidates(capsys):
    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    base = dict(items=5000, top_k=30, dtype="bfloat16", store_dtype="float16")
    exhaustive = estimate(arch, Workload(**base))["stages"]
    screened = estimate(arch, Workload(**base, localisation="screened", screen_items=100))["stages"]
    # Every head (and the base) on the 100 screened items, the base and M = 4 x top_k on the rest.
    assert screened["heads"]["rows"] == 100 * (1024 + 1) + 4900 * (120 + 1)
    assert screened["heads_gradients"]["rows"] == 5000
    assert screened["heads"]["shared_prefix_flops"] < screened["heads"]["flops"]
    # A screen of every item is the exhaustive sweep, whatever the candidates.
    everything = estimate(arch, Workload(**base, localisation="screened", screen_items=5000))["stages"]
    assert everything["heads"]["rows"] == exhaustive["heads"]["rows"]
    assert everything["heads"]["flops"] == exhaustive["heads"]["flops"]
    with pytest.raises(ValueError, match="--screen-items must be >= 1, got 0"):
        estimate(arch, Workload(**base, localisation="screened", screen_items=0))
    with pytest.raises(ValueError, match="unknown localisation 'sampled'; use exhaustive, guided or screened"):
        estimate(arch, Workload(**base, localisation="sampled"))
    argv = ["--model-config", "llava-1.5-7b", "--top-k", "30", "--localisation", "screened", "--screen-items", "100"]
    assert main([*argv, "--candidates", "120"]) == 0
    assert "heads: 100 screened items x (L*H + 1) + the others x (M + 1), M candidates" in capsys.readouterr().out


def test_float16_store_halves_the_per_item_float_arrays():
    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    st = {d: estimate(arch, Workload(items=7000, store_dtype=d))["store"] for d in ("float32", "float16")}
    for name in ("dvp", "dvp_logprob", "atp", "gate_sum"):
        assert st["float16"]["item_array_bytes"][name] * 2 == st["float32"]["item_array_bytes"][name]
    assert st["float16"]["item_array_bytes"]["gate_positive"] == st["float32"]["item_array_bytes"]["gate_positive"]


def test_a_sampled_ground_truth_prices_its_neurons():
    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    every = estimate(arch, Workload(ablation_items=16))["stages"]["ablation"]
    sampled = estimate(arch, Workload(ablation_items=16, ablation_neurons=32 * 11008 // 4))["stages"]["ablation"]
    assert every["rows"] == 4 * sampled["rows"] == 16 * 32 * 11008
    assert sampled["shared_prefix_flops"] * 4 == pytest.approx(every["shared_prefix_flops"], rel=1e-3)
    with pytest.raises(ValueError, match=r"--ablation-neurons 0 must lie in \[1, 352256 neurons\]"):
        estimate(arch, Workload(ablation_neurons=0))


def test_retrieval_prices_every_candidate_and_the_shared_prefix_by_hand():
    """3 (item, condition) groups of 5 candidates in batches of 4: one prefix pass per group, then
    its candidates in passes of at most 4 (2 per group)."""
    from pipeline.tools.estimate import retrieval_flops
    from pipeline.tools.estimate.cost import _text_flops

    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    w = Workload(batch_size=4, retrieval_candidates=5, prompt_tokens=40, candidate_tokens=10)
    got = retrieval_flops(arch, w, groups=3, f_vision=7.0)
    assert (got["rows"], got["prefix_passes"], got["suffix_passes"]) == (15, 3, 6)
    S, P = 576 + 40, 576 + 30
    assert got["full_flops"] == 15 * (_text_flops(arch, S, S, S) + 7.0)
    assert got["shared_flops"] == 3 * (_text_flops(arch, P, P, 1) + 7.0) + 15 * _text_flops(arch, 10, P + 10, 10)
    # Batches of 12 rows hold 2 groups of 5: 2 suffix passes for 3 groups.
    assert (
        retrieval_flops(arch, Workload(**{**w.__dict__, "batch_size": 12}), groups=3, f_vision=7.0)["suffix_passes"]
        == 2
    )
    # One row of the language model: 2 x (non-embedding parameters) per token, attention, lm_head.
    t = arch.text
    matmul = 2 * t.layers * (t.layer_params() - 2 * t.hidden)
    assert _text_flops(arch, 1, 1, 1) == matmul + 4 * t.layers * t.heads * t.head_dim + 2 * t.vocab * t.hidden
    with pytest.raises(ValueError, match=r"--candidate-tokens 40 must lie in \[1, prompt tokens = 40\)"):
        retrieval_flops(arch, Workload(prompt_tokens=40, candidate_tokens=40), groups=1, f_vision=0.0)


def test_the_retrieval_task_dominates_a_7b_study_unless_its_candidates_share_their_prefix(capsys):
    arch = architecture(PRESETS["llava-1.5-7b"], "llava-1.5-7b")
    base = dict(items=5000, top_k=30, dtype="bfloat16", store_dtype="float16")
    est = estimate(arch, Workload(**base))
    heads = est["stages"]["heads"]
    assert heads["retrieval"]["rows"] == 50 * heads["rows"]
    assert "retrieval" not in est["stages"]["dump"]  # the dump runs the positive's row alone
    assert 15 < heads["retrieval"]["saving"] < 20  # a 576-token image shared by 50 candidates of 24 tokens
    # All tasks: three of one row per item and condition, retrieval's 50 candidates.
    st, t = est["stages"], est["all_tasks"]
    one_row = sum(s.get("shared_prefix_flops", s["flops"]) for s in st.values())
    assert t["flops"] == pytest.approx(
        sum((3 if "retrieval" in s else 4) * s.get("shared_prefix_flops", s["flops"]) for s in st.values())
        + sum(s["retrieval"]["shared_flops"] for s in st.values() if "retrieval" in s)
    )
    no_retrieval = estimate(arch, Workload(**base, retrieval_candidates=0))
    assert "retrieval" not in no_retrieval["stages"]["heads"]
    assert no_retrieval["all_tasks"]["flops"] == pytest.approx(4 * one_row)
    assert t["full_gpu_hours"] > 5 * t["gpu_hours"] > 5 * no_retrieval["all_tasks"]["gpu_hours"]
    assert main(["--model-config", "llava-1.5-7b", "--items", "5000", "--top-k", "30"]) == 0
    out = capsys.readouterr().out
    assert "heads, retrieval: 50 candidates per item and condition" in out
    assert "all 4 tasks, one of them retrieval (50 candidates): the stages above" in out
