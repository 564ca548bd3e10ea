"""Back-of-the-envelope cost of running the pipeline on a model, before downloading it.

    python -m pipeline.tools.estimate --model-config llava-1.5-7b --items 7000 --top-k 4 --dtype bfloat16
    python -m pipeline.tools.estimate --model-config data/models/tiny-llava          # a folder's config.json
    python -m pipeline.tools.estimate --model-config '{"text_config": {...}, ...}'    # inline JSON

From a transformers config (``config.json`` of a local folder, a JSON file or string, or one of
``PRESETS``: ``llava-1.5-7b``, ``qwen2.5-vl-7b``) it prints:

- parameters (language model, vision tower, projector) and weight memory per dtype;
- memory of one batch: KV cache, the largest per-layer transients, all-position logits;
- disk of one task's activation store (``z``: conditions x items x layers x ffn_width x bytes,
  plus the per-item arrays ``dvp``, ``dvp_logprob``, ``atp``, ``gate_sum``, ``gate_positive``
  of 4 bytes each) and the number of chunk / shard files ``StoreLayout.plan`` chooses;
- memory of one batch of the dump's gradient pass (atp and the log-probability DVP: one
  forward and backward per item with its answer): the activations autograd saves for the
  backward, per token and layer (6 x hidden + 3.5 x ffn_width) x dtype bytes + 2 float32 norm
  inputs, plus the float32 log-softmax over the vocabulary at every position (calibrated on
  the default models with ``benchmarks/bench_dump.py``, which measures the saved bytes: the
  formula is 10% above them);
- forward passes (rows; ``ceil(rows / batch)`` model calls) and FLOPs of each model stage:
  heads ``items * (L*H + 1)``, dump ``items * (K + 1)``, the dump's gradient pass ``items``
  rows of forward + backward (~3x a forward of the language model: the backward computes
  gradients of activations, not of weights, ~2x), ablation ``items * L * I``; and the FLOPs of
  heads, dump and ablation with the shared prefix (``shared_prefix_flops``: rows computed only
  from their intervention's layer up, the vision tower once per distinct item).

Parameter counts are exact for Llama/Qwen2-style decoders, CLIP vision towers with the LLaVA
projector, and the Qwen2-VL / Qwen2.5-VL vision towers (checked in the tests against the
instantiated transformers models); other vision towers are approximated from their layer
sizes and flagged. FLOPs are 2 x (non-embedding parameters) per token + attention + lm_head;
activation memory assumes SDPA/flash attention (no S x S scores) unless ``--eager-attention``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.method.store import ITEM_ARRAYS, StoreLayout, human_bytes

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

# From the public config.json files (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct).
PRESETS: dict[str, dict] = {
    "llava-1.5-7b": {
        "model_type": "llava",
        "image_seq_length": 576,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32064, "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "num_hidden_layers": 24, "hidden_size": 1024,
            "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        },
    },
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text", "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "hidden_size": 3584, "intermediate_size": 18944, "vocab_size": 152064,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "in_channels": 3,
        },
    },
}
# Qwen2-VL / Qwen2.5-VL read images at their own resolution: tokens = H*W / (14*2)^2. The default
# here is a 448 x 448 image (256 tokens); pass --image-tokens for your images (COCO ~640x480: ~391).
DYNAMIC_RESOLUTION_TOKENS = 256

_QKV_BIAS_TYPES = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen2_vl_text", "qwen2_5_vl_text")
_NON_GATED_TYPES = ("gpt2", "opt", "phi", "gpt_neox", "falcon", "starcoder2")


class EstimateError(PipelineError):
    """A config or workload the estimate cannot use; the message names it."""


# ------------------------------------------------------------------------------ architecture
@dataclass(frozen=True)
class TextArch:
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    ffn: int
    vocab: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool
    gated_mlp: bool

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn
        return attn + mlp + 2 * h  # two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden  # + final norm


@dataclass(frozen=True)
class VisionArch:
    kind: str  # clip | qwen2_5_vl | qwen2_vl | approx
    layers: int
    hidden: int
    ffn: int
    patch: int
    positions: int  # vision sequence length per image (patches, + CLS for CLIP)
    params: int
    projector_params: int


@dataclass(frozen=True)
class ModelArch:
    name: str
    text: TextArch
    vision: VisionArch | None
    image_tokens: int  # tokens one image occupies in the language model's sequence
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        v = self.vision
        return self.text.params() + (v.params + v.projector_params if v else 0)


def _clip_vision(vc: dict, text_hidden: int) -> tuple[VisionArch, int]:
    d, inter, layers = vc["hidden_size"], vc["intermediate_size"], vc["num_hidden_layers"]
    p, size, ch = vc.get("patch_size", 14), vc.get("image_size", 224), vc.get("num_channels", 3)
    n_patches = (size // p) ** 2
    embed = ch * p * p * d + d + (n_patches + 1) * d  # patch conv (no bias), class token, positions
    layer = 4 * (d * d + d) + (d * inter + inter) + (inter * d + d) + 4 * d  # attn, fc1, fc2, 2 LayerNorms
    params = embed + 2 * d + layers * layer + 2 * d  # pre- and post-LayerNorm
    projector = (d * text_hidden + text_hidden) + (text_hidden * text_hidden + text_hidden)  # LLaVA 2-layer MLP
    return VisionArch("clip", layers, d, inter, p, n_patches + 1, params, projector), n_patches


def _qwen_vision(vc: dict, version: str, text_hidden: int) -> VisionArch:
    layers, p = vc["depth"], vc.get("patch_size", 14)
    tp, ch, m = vc.get("temporal_patch_size", 2), vc.get("in_channels", vc.get("in_chans", 3)), vc.get(
        "spatial_merge_size", 2)
    if version == "qwen2_5_vl":
        d, inter, out = vc["hidden_size"], vc["intermediate_size"], vc.get("out_hidden_size", text_hidden)
        # two RMSNorms, qkv, proj, SwiGLU (gate, up, down), all linears with biases
        layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * inter + inter) + (inter * d + d)
        ln_q = d
    else:  # qwen2_vl: LayerNorms, fc1/fc2 MLP of width mlp_ratio * embed_dim
        d, out = vc["embed_dim"], vc.get("hidden_size", text_hidden)
        inter = int(d * vc.get("mlp_ratio", 4))
        layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inter + inter) + (inter * d + d)
        ln_q = 2 * d
    merged = d * m * m
    merger = ln_q + (merged * merged + merged) + (merged * out + out)
    params = ch * tp * p * p * d + layers * layer + merger
    return VisionArch(version, layers, d, inter, p, 0, params, 0)


def _approx_vision(vc: dict) -> VisionArch:
    d = vc.get("hidden_size") or vc.get("embed_dim")
    layers = vc.get("num_hidden_layers") or vc.get("depth")
    if not (d and layers):
        raise EstimateError("vision_config has no hidden_size/num_hidden_layers: cannot estimate the vision tower")
    inter = vc.get("intermediate_size") or 4 * d
    p = vc.get("patch_size", 14)
    positions = (vc.get("image_size", 224) // p) ** 2
    layer = 4 * (d * d + d) + 2 * d * inter + inter + d + 4 * d
    return VisionArch("approx", layers, d, inter, p, positions, layers * layer, 0)


def architecture(config: dict, name: str = "model", image_tokens: int | None = None) -> ModelArch:
    """The sizes the estimate needs, from a transformers config dict (composite VLM or text LM)."""
    tc = config.get("text_config") or {}
    if "hidden_size" not in tc:  # older flat configs (Qwen2-VL) keep the text keys at the top level
        tc = {**config, **tc}
    try:
        layers, heads, hidden = tc["num_hidden_layers"], tc["num_attention_heads"], tc["hidden_size"]
        ffn, vocab = tc["intermediate_size"], tc["vocab_size"]
    except KeyError as exc:
        raise EstimateError(f"the text config lacks {exc.args[0]!r}; is this a transformers config.json?") from None
    ttype = tc.get("model_type", config.get("model_type", ""))
    tied = tc.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    text = TextArch(
        layers=layers, heads=heads, kv_heads=tc.get("num_key_value_heads") or heads, hidden=hidden, ffn=ffn,
        vocab=vocab, head_dim=tc.get("head_dim") or hidden // heads, tied_embeddings=bool(tied),
        qkv_bias=bool(tc.get("attention_bias", ttype in _QKV_BIAS_TYPES)), gated_mlp=ttype not in _NON_GATED_TYPES,
    )
    notes: list[str] = []
    vc = config.get("vision_config")
    vision, tokens = None, 0
    mtype = config.get("model_type", "")
    if vc:
        vtype = vc.get("model_type", "")
        if vtype.startswith("clip") or (mtype == "llava" and "hidden_size" in vc and "depth" not in vc):
            vision, n_patches = _clip_vision(vc, hidden)
            strategy = config.get("vision_feature_select_strategy", "default")
            tokens = config.get("image_seq_length") or (n_patches if strategy == "default" else n_patches + 1)
        elif mtype in ("qwen2_5_vl", "qwen2_vl") or vtype.startswith(("qwen2_5_vl", "qwen2_vl")):
            version = "qwen2_5_vl" if (mtype == "qwen2_5_vl" or vtype.startswith("qwen2_5_vl")) else "qwen2_vl"
            vision = _qwen_vision(vc, version, hidden)
            tokens = DYNAMIC_RESOLUTION_TOKENS
            m = vc.get("spatial_merge_size", 2)
            vision = VisionArch(**{**asdict(vision), "positions": tokens * m * m})
            notes.append(f"dynamic resolution: {tokens} image tokens assumed (a 448x448 image); "
                         "set --image-tokens for yours")
        else:
            vision = _approx_vision(vc)
            tokens = config.get("image_seq_length") or config.get("mm_tokens_per_image") or vision.positions
            notes.append(f"vision tower {vtype or mtype!r}: parameters approximated from its layer sizes "
                         "(embeddings and projector not counted)")
    if image_tokens is not None:
        tokens = image_tokens
        if vision is not None and vision.kind in ("qwen2_5_vl", "qwen2_vl"):
            m = vc.get("spatial_merge_size", 2)
            vision = VisionArch(**{**asdict(vision), "positions": tokens * m * m})
    return ModelArch(name, text, vision, int(tokens), tuple(notes))


def load_config(spec: str) -> tuple[str, dict]:
    """(name, config dict) from a preset name, a folder with config.json, a JSON file or a JSON string."""
    if spec in PRESETS:
        return spec, json.loads(json.dumps(PRESETS[spec]))
    if spec.lstrip().startswith("{"):
        return "inline", json.loads(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise EstimateError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}), a folder with config.json, "
                            "a JSON file nor a JSON string")
    return (path.parent.name if path.name == "config.json" else path.stem), json.loads(path.read_text())


# ------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class Workload:
    items: int = 7000  # discovery items per task (the paper's COCO import: 7000)
    top_k: int = 4  # critical heads -> top_k + 1 conditions
    tasks: int = 4
    dtype: str = "bfloat16"  # model weights and activations
    store_dtype: str = "float32"  # dump.dtype
    batch_size: int = 16
    gradient_batch_size: int = 4  # dump.gradient_batch_items
    prompt_tokens: int = 48  # text tokens of a prompt with its chat template, without the image
    answer_tokens: int = 8
    heads_items: int | None = None  # heads.max_items (default: items)
    ablation_items: int = 16  # ablation.max_items
    max_new_tokens: int = 24  # generative head scoring decodes up to this many tokens
    target_chunk_mib: float = 1.0
    max_files: int = 2000
    eager_attention: bool = False
    effective_tflops: float = 400.0  # sustained model FLOP/s per GPU (assumed: ~40% of an H100's bf16 peak)


def estimate(arch: ModelArch, w: Workload) -> dict:
    """Every number the table prints, as a dict (bytes, counts, FLOPs)."""
    t, v = arch.text, arch.vision
    if w.dtype not in DTYPE_BYTES or w.store_dtype not in ("float16", "float32"):
        raise EstimateError(f"unknown dtype {w.dtype!r} / store dtype {w.store_dtype!r}")
    b = DTYPE_BYTES[w.dtype]
    B, L, I = w.batch_size, t.layers, t.ffn
    S = arch.image_tokens + w.prompt_tokens + w.answer_tokens
    vision_params = (v.params + v.projector_params) if v else 0
    out: dict = {"name": arch.name, "notes": list(arch.notes), "seq_len": S, "image_tokens": arch.image_tokens}
    out["params"] = {"text": t.params(), "vision": v.params if v else 0, "projector": v.projector_params if v else 0,
                     "total": arch.params}
    out["weights_bytes"] = {d: arch.params * n for d, n in DTYPE_BYTES.items()}

    kv = 2 * L * t.kv_heads * t.head_dim * S * B * b
    hidden_states = 4 * B * S * t.hidden * b  # residual stream, normed input, attention output, MLP output
    mlp = (3 if t.gated_mlp else 2) * B * S * I * b  # gate, up and their product
    scores = 2 * B * t.heads * S * S * b if w.eager_attention else 0
    logits = B * S * t.vocab * b
    vision_act = (B * v.positions * (4 * v.hidden + 2 * v.ffn) * b) if v else 0
    out["batch_bytes"] = {"kv_cache": kv, "layer_transients": hidden_states + mlp + scores, "logits": logits,
                          "vision_transients": vision_act}
    out["batch_bytes"]["total"] = sum(out["batch_bytes"].values())

    Bg = w.gradient_batch_size
    saved = Bg * S * L * ((12 * t.hidden + 7 * I) * b // 2 + 2 * t.hidden * 4)
    log_softmax = Bg * S * t.vocab * (b + 4)
    out["gradient_batch_bytes"] = {"saved_activations": saved, "logits_and_log_softmax": log_softmax,
                                   "total": saved + log_softmax}

    C = w.top_k + 1
    layout = StoreLayout.plan(C, w.items, L, I, w.store_dtype, int(w.target_chunk_mib * 2**20), w.max_files)
    z_bytes = C * w.items * L * I * DTYPE_BYTES[w.store_dtype]
    per_item = {name: w.items * (L * I if dims else 1) * 4 for name, (dims, _, _) in ITEM_ARRAYS.items()}
    item_bytes = sum(per_item.values())
    n_blocks = layout.n_blocks
    out["store"] = {
        "conditions": C, "chunk_items": layout.chunk_items, "block_items": layout.block_items,
        "sharded": layout.sharded, "blocks": n_blocks, "z_files": C * n_blocks,
        "item_array_files": len(ITEM_ARRAYS) * n_blocks,
        "chunk_bytes": layout.chunk_items * L * I * DTYPE_BYTES[w.store_dtype],
        "z_bytes": z_bytes, "item_array_bytes": per_item, "dvp_bytes": per_item["dvp"],
        "task_bytes": z_bytes + item_bytes, "all_tasks_bytes": w.tasks * (z_bytes + item_bytes),
    }
    assert layout.nbytes() == z_bytes + item_bytes

    # FLOPs of one row (one sequence) forward: matmuls 2 x params per token, attention 4*L*S^2*H*d, lm_head.
    text_matmul = t.layers * (t.layer_params() - 2 * t.hidden)
    flops_text = 2 * text_matmul * S + 4 * L * S * S * t.heads * t.head_dim + 2 * t.vocab * t.hidden * S
    flops_vision = 2 * vision_params * v.positions if v else 0
    row_flops = flops_text + flops_vision
    heads_items = w.heads_items if w.heads_items is not None else w.items
    rows = {
        "heads": heads_items * (L * t.heads + 1),
        "dump": w.items * (w.top_k + 1),
        "dump_gradients": w.items,
        "ablation": w.ablation_items * L * I,
    }
    # Forward + backward of activations: ~3x the language model's forward, 1x the vision tower's.
    per_row = {name: row_flops for name in rows} | {"dump_gradients": 3 * flops_text + flops_vision}
    batch = {name: B for name in rows} | {"dump_gradients": w.gradient_batch_size}
    out["row_flops"] = row_flops
    shared = shared_prefix_flops(arch, w, flops_vision, (flops_text - 2 * t.vocab * t.hidden * S) / L,
                                 2 * t.vocab * t.hidden * S)
    out["stages"] = {
        name: {"rows": n, "batches": math.ceil(n / batch[name]), "flops": n * per_row[name],
               "all_tasks_flops": w.tasks * n * per_row[name],
               "gpu_hours": n * per_row[name] / (w.effective_tflops * 1e12) / 3600}
        for name, n in rows.items()
    }
    for name, flops in shared.items():
        out["stages"][name]["shared_prefix_flops"] = flops
        out["stages"][name]["shared_prefix_saving"] = out["stages"][name]["flops"] / flops
    out["workload"] = asdict(w)
    return out


def shared_prefix_flops(arch: ModelArch, w: Workload, f_vision: float, f_layer: float, f_head: float) -> dict[str, float]:
    """FLOPs per task of the single-forward stages with the shared prefix
    (``hooks.forward_sharing_prefix``): a row that intervenes from layer l up computes layers
    l..L-1 and the lm_head; each batch's distinct items compute the vision tower and the layers
    below l once (one more image stands in for the batch's tower). Rows run layer by layer,
    item-major, ``batch_size`` per call, so a batch of a layer holds max(1, B / rows per item
    and layer) items.

    - heads: H rows per layer and item (teacher-forced or retrieval-margin utilities; greedy
      generation does not share), plus the base row (all layers shared but the last);
    - dump: the base row in full, keeping the residual stream entering the head rows' layers;
      then K head rows from there; where the critical heads sit is known only after the heads
      stage, so they are assumed spread evenly over the layers;
    - ablation: I rows per layer and item, one item per batch.
    """
    t = arch.text
    L, H, I, B, K = t.layers, t.heads, t.ffn, w.batch_size, w.top_k
    heads_items = w.heads_items if w.heads_items is not None else w.items

    def layer_groups(items: int, per_item: float) -> float:
        """FLOPs of ``per_item`` rows per item at every layer l, for ``items`` items."""
        total = 0.0
        for l in range(L):
            rows = items * per_item
            prefix_rows = max(items, math.ceil(rows / B)) if per_item >= 1 else rows
            calls = math.ceil(rows / B)
            total += rows * ((L - l) * f_layer + f_head) + prefix_rows * (f_vision + l * f_layer) + calls * f_vision
        return total

    full_row = f_vision + L * f_layer + f_head
    # The dump's head rows start from the residual stream its base rows left at their layer.
    dump_heads = w.items * K * sum((L - l) * f_layer + f_head for l in range(L)) / L
    return {
        "heads": layer_groups(heads_items, H) + heads_items * full_row,  # + the base rows, each a full pass
        "dump": w.items * full_row + dump_heads + math.ceil(w.items * K / B) * f_vision,
        "ablation": layer_groups(w.ablation_items, I),
    }


# ------------------------------------------------------------------------------ printing


def human_count(n: float) -> str:
    for unit, s in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= s:
            return f"{n / s:.2f}{unit}"
    return f"{n:.0f}"


def format_table(est: dict, arch: ModelArch) -> str:
    w, t = est["workload"], arch.text
    rows: list[tuple[str, str]] = []

    def sec(title):
        rows.append((title, None))  # a section title: its own line

    sec("model")
    rows += [
        ("language model", f"{t.layers} layers, {t.heads} heads ({t.kv_heads} kv), hidden {t.hidden}, "
                           f"FFN {t.ffn}, vocab {t.vocab}"),
        ("vision tower", f"{arch.vision.kind}: {arch.vision.layers} layers, hidden {arch.vision.hidden}"
         if arch.vision else "none"),
        ("parameters", f"{est['params']['total']:,} (text {est['params']['text']:,}, vision "
                       f"{est['params']['vision']:,}, projector {est['params']['projector']:,})"),
    ]
    for d in ("float32", "bfloat16", "int8"):
        label = "bfloat16 / float16" if d == "bfloat16" else d
        rows.append((f"weights {label}", human_bytes(est["weights_bytes"][d])))
    bb = est["batch_bytes"]
    sec(f"one batch: {w['batch_size']} rows x {est['seq_len']} tokens ({est['image_tokens']} image), {w['dtype']}")
    rows += [
        ("KV cache", human_bytes(bb["kv_cache"])),
        ("largest layer transients" + (" (eager attention)" if w["eager_attention"] else ""),
         human_bytes(bb["layer_transients"])),
        ("logits, all positions", human_bytes(bb["logits"])),
        ("vision tower transients", human_bytes(bb["vision_transients"])),
        ("weights + batch", human_bytes(est["weights_bytes"][w["dtype"]] + bb["total"])),
    ]
    gb = est["gradient_batch_bytes"]
    sec(f"one batch of the dump's gradient pass: {w['gradient_batch_size']} items x {est['seq_len']} tokens, "
        f"{w['dtype']} (forward + backward)")
    rows += [
        ("activations saved for the backward", human_bytes(gb["saved_activations"])),
        ("logits + float32 log-softmax", human_bytes(gb["logits_and_log_softmax"])),
        ("weights + gradient batch", human_bytes(est["weights_bytes"][w["dtype"]] + gb["total"])),
    ]
    st = est["store"]
    sec(f"activation store per task: {w['items']:,} items x {st['conditions']} conditions "
        f"(top_k {w['top_k']}), z in {w['store_dtype']}")
    rows += [
        ("z", human_bytes(st["z_bytes"])),
        ("per-item arrays (dvp, dvp_logprob, atp, gate statistics)",
         human_bytes(sum(st["item_array_bytes"].values()))),
        ("one task / all tasks", f"{human_bytes(st['task_bytes'])} / {human_bytes(st['all_tasks_bytes'])} "
                                 f"({w['tasks']} tasks)"),
        ("chunks", f"{st['chunk_items']} item(s) = {human_bytes(st['chunk_bytes'])} per chunk"),
        ("write blocks", f"{st['blocks']:,} {'shards' if st['sharded'] else 'chunks'} of {st['block_items']} items"),
        ("files per task", f"{st['z_files'] + st['item_array_files']:,} (z {st['z_files']:,}, "
                           f"per-item arrays {st['item_array_files']:,})"),
    ]
    sec(f"forward passes per task (rows; model calls at batch {w['batch_size']}); "
        f"{human_count(est['row_flops'])}FLOP per row; GPU-h at {w['effective_tflops']:g} TFLOP/s")
    formulas = {"heads": "items x (L*H + 1)", "dump": "items x (K + 1)",
                "dump_gradients": "items, forward + backward", "ablation": "items x L x I"}
    heads_items = w["heads_items"] if w["heads_items"] is not None else w["items"]
    n_items = {"heads": heads_items, "dump": w["items"], "dump_gradients": w["items"], "ablation": w["ablation_items"]}
    for name, s in est["stages"].items():
        rows.append((f"{name}: {formulas[name]}, items={n_items[name]:,}",
                     f"{s['rows']:,} rows, {s['batches']:,} calls, {human_count(s['flops'])}FLOP, "
                     f"{s['gpu_hours']:,.1f} GPU-h"
                     + (f" (+ up to {w['max_new_tokens']} decode steps per row, generative utility)"
                        if name == "heads" else "")))
        if "shared_prefix_flops" in s:
            rows.append((f"  {name} with the shared prefix",
                         f"{human_count(s['shared_prefix_flops'])}FLOP, {s['shared_prefix_saving']:.2f}x fewer"
                         + (" (single-forward utilities)" if name == "heads" else "")
                         + (" (heads assumed spread evenly over the layers)" if name == "dump" else "")))
    width = max(len(k) for k, v in rows if v is not None)
    lines = [f"{arch.name}: estimate"]
    for k, v in rows:
        lines += [f"\n== {k}"] if v is None else [f"  {k:<{width}} | {v}"]
    lines += [f"note: {n}" for n in est["notes"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Workload()
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", required=True,
                   help=f"a preset ({', '.join(PRESETS)}), a model folder, a config.json path or a JSON string")
    p.add_argument("--items", type=int, default=d.items, help="discovery items per task (dump)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=int, default=None, help=f"critical heads K (heads.top_k; default {d.top_k})")
    g.add_argument("--conditions", type=int, default=None, help="conditions of the store, K + 1 (alternative to "
                                                                "--top-k)")
    p.add_argument("--tasks", type=int, default=d.tasks)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=d.dtype, help="model dtype")
    p.add_argument("--store-dtype", choices=("float16", "float32"), default=d.store_dtype, help="dump.dtype")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--gradient-batch-size", type=int, default=d.gradient_batch_size,
                   help="dump.gradient_batch_items: items per forward + backward of the gradient pass")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens)
    p.add_argument("--image-tokens", type=int, default=None, help="override the image's token count")
    p.add_argument("--heads-items", type=int, default=None, help="heads.max_items (default: --items)")
    p.add_argument("--ablation-items", type=int, default=d.ablation_items)
    p.add_argument("--target-chunk-mib", type=float, default=d.target_chunk_mib)
    p.add_argument("--eager-attention", action="store_true", help="count S x S attention scores")
    p.add_argument("--effective-tflops", type=float, default=d.effective_tflops,
                   help="sustained TFLOP/s per GPU for the GPU-hour column (an assumption; measure yours)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    return p


def _report_errors_on_stderr() -> None:
    """The command's errors go to the stderr of the moment as "error: ..." lines (pytest's
    capture included); the library itself only logs."""
    for handler in [h for h in log.handlers if getattr(h, "_hones_cli", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("error: %(message)s"))
    handler._hones_cli = True
    log.addHandler(handler)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """The command: the estimate as a table (or JSON) on stdout, exit 0; a bad model config as
    one "error: ..." line on stderr, exit 2."""
    _report_errors_on_stderr()
    args = build_parser().parse_args(argv)
    try:
        name, config = load_config(args.model_config)
        arch = architecture(config, name, args.image_tokens)
        top_k = args.top_k if args.top_k is not None else (args.conditions - 1 if args.conditions else Workload.top_k)
        if top_k < 0 or args.items < 1:
            raise EstimateError("--items must be >= 1 and --conditions >= 1")
        w = Workload(items=args.items, top_k=top_k, tasks=args.tasks, dtype=args.dtype, store_dtype=args.store_dtype,
                     batch_size=args.batch_size, gradient_batch_size=args.gradient_batch_size,
                     prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens,
                     heads_items=args.heads_items, ablation_items=args.ablation_items,
                     target_chunk_mib=args.target_chunk_mib, eager_attention=args.eager_attention,
                     effective_tflops=args.effective_tflops)
        est = estimate(arch, w)
    except (EstimateError, json.JSONDecodeError) as exc:
        log.error("%s", exc)
        return 2
    sys.stdout.write((json.dumps(est, indent=1) if args.json else format_table(est, arch)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
