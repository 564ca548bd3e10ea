"""A model's architecture as the estimate needs it: the sizes read from a transformers config
(``architecture``, ``load_config``, the ``TextArch`` / ``VisionArch`` / ``ModelArch`` dataclasses,
the per-family vision-tower helpers), the ``PRESETS`` configs and ``EstimateError``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

# From the public config.json files (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct).
PRESETS: dict[str, dict] = {
    "llava-1.5-7b": {
        "model_type": "llava",
        "image_seq_length": 576,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama",
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "vocab_size": 32064,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "num_hidden_layers": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
        },
    },
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
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
    tp, ch, m = (
        vc.get("temporal_patch_size", 2),
        vc.get("in_channels", vc.get("in_chans", 3)),
        vc.get("spatial_merge_size", 2),
    )
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
        layers=layers,
        heads=heads,
        kv_heads=tc.get("num_key_value_heads") or heads,
        hidden=hidden,
        ffn=ffn,
        vocab=vocab,
        head_dim=tc.get("head_dim") or hidden // heads,
        tied_embeddings=bool(tied),
        qkv_bias=bool(tc.get("attention_bias", ttype in _QKV_BIAS_TYPES)),
        gated_mlp=ttype not in _NON_GATED_TYPES,
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
            notes.append(
                f"dynamic resolution: {tokens} image tokens assumed (a 448x448 image); set --image-tokens for yours"
            )
        else:
            vision = _approx_vision(vc)
            tokens = config.get("image_seq_length") or config.get("mm_tokens_per_image") or vision.positions
            notes.append(
                f"vision tower {vtype or mtype!r}: parameters approximated from its layer sizes "
                "(embeddings and projector not counted)"
            )
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
        raise EstimateError(
            f"{spec!r} is neither a preset ({', '.join(PRESETS)}), a folder with config.json, "
            "a JSON file nor a JSON string"
        )
    return (path.parent.name if path.name == "config.json" else path.stem), json.loads(path.read_text())
