"""One model adapter for every supported vision-language model family.

Map of this module:
- ``AdapterError``: a model whose language-model pieces cannot be found (names the piece and class).
- ``ModelInputs``: the tensors of one batch plus where each prompt ends and where its answer lies.
- ``ModelAdapter``: finds, in any supported VLM, the language model's decoder layers, the
  attention output projection (o_proj, whose input is the concatenation of the H head outputs)
  and the FFN down projection (down_proj / fc2, whose input is the neuron vector z) of each
  layer, the unembedding and the final norm; and turns (image, prompt[, answer]) triples into
  left-padded model inputs with the processor's own chat template. ``check_layers`` /
  ``check_heads`` / ``check_neurons``: the one range check of (layer, index) arguments.

Everything is found generically (``get_decoder().layers``, ``self_attn.o_proj|out_proj|dense``,
``mlp.down_proj|fc2``, head counts from the text config); the per-family tables below only say
what is genuinely family-specific (prompt format without a chat template, token types of answers).
Layers are looked up only under the language model, never in the vision tower, whose blocks
(Qwen2.5-VL, Pixtral) have the same projection names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.timings import peak_rss_mib

__all__ = ["AdapterError", "ModelAdapter", "ModelInputs", "SUPPORTED_FAMILIES"]

log = logging.getLogger(__name__)

# Families tested with tiny models of their real transformers classes; others that follow the
# same layout (decoder.layers[i].self_attn.o_proj / .mlp.down_proj) work too.
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "internvl",
    "mistral3",
)

_ATTN_NAMES = ("self_attn", "self_attention", "attention", "attn")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_PROJ_NAMES = ("down_proj", "fc2")
_ACT_NAMES = ("act_fn", "activation_fn", "act", "activation")
# The norm in front of a layer's FFN; its input is the residual stream between attention and FFN.
# Gemma 2/3 also have a post_attention_layernorm, on the attention output, so theirs comes first.
_FFN_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
# Where the language model lives when get_decoder() does not lead to it.
_DECODER_PATHS = ("model.language_model", "language_model", "model.text_model", "text_model", "model")

# Prompt formats for processors without a chat template. PaliGemma is trained on the bare
# prefix: its processor itself adds <bos> after the image tokens and the closing newline.
_PLAIN_FORMATS: dict[str, str] = {
    "paligemma": "{image}{prompt}",
    "llava": "USER: {image}\n{prompt} ASSISTANT:",
}
_DEFAULT_PLAIN_FORMAT = "{image}\n{prompt}\n"

# Token-type value of appended answer tokens. PaliGemma is a prefix-LM: type 0 tokens attend
# bidirectionally, so answers must be type 1 (causal suffix), as its processor's `suffix` does.
# Gemma3's token_type_ids mark image tokens, so answers are 0 there (and everywhere else).
_ANSWER_TOKEN_TYPE: dict[str, int] = {"paligemma": 1}

# Per-token tensors that are padded and extended together with input_ids.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# Processor outputs that are not model inputs.
_DROP_KEYS = ("labels", "text_replacement_offsets", "num_crops", "video_metadata")


class AdapterError(PipelineError):
    """The model lacks a piece the adapter needs; the message names the piece and the model class."""


@dataclass
class ModelInputs:
    """One left-padded batch.

    tensors: everything to pass as ``model(**tensors)`` / ``model.generate(**tensors)``:
        input_ids [B, S], attention_mask [B, S], pixel_values and whatever the family needs
        (image_grid_thw, pixel_attention_mask, image_sizes, token_type_ids, mm_token_type_ids).
    last_prompt_index: LongTensor [B], position of each row's last prompt token, i.e. the
        position whose logits predict the first answer token. Equals S-1 for every row when
        there are no answers.
    answer_mask: BoolTensor [B, S] or None; True at the positions holding answer tokens (the
        answer's own tokens and the appended eos). Logits at position p-1 predict token p.
    """

    tensors: dict[str, torch.Tensor]
    last_prompt_index: torch.Tensor
    answer_mask: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """LongTensor [B, S]."""
        return self.tensors["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        """LongTensor [B, S], 0 at left padding."""
        return self.tensors["attention_mask"]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def answer_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit positions, target token ids) of all answer tokens, for teacher forcing.

        Returns two tensors of shape [B, S-1]: ``mask`` (bool, True where position p predicts
        an answer token) and ``targets`` (the token at p+1); use as
        ``logits[:, :-1][mask]`` against ``targets[mask]``.
        """
        if self.answer_mask is None:
            raise ValueError("these inputs were built without answers")
        return self.answer_mask[:, 1:], self.input_ids[:, 1:]


def _prefix(context: str) -> str:
    return f"{context}: " if context else ""


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


_VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual")


def find_vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VLM: ``model.model.<name>`` or ``model.<name>`` for the first of
    vision_tower (LLaVA, PaliGemma, Gemma 3, InternVL, Mistral 3), vision_model (Idefics3,
    SmolVLM) and visual (Qwen2-VL) that exists; None when there is none."""
    for owner in (getattr(model, "model", None), model):
        if owner is not None:
            tower = _child(owner, _VISION_TOWER_NAMES)
            if tower is not None:
                return tower
    return None


def _width_in(module: nn.Module) -> int | None:
    width = getattr(module, "in_features", None)
    if width is None and isinstance(getattr(module, "weight", None), torch.Tensor):
        width = module.weight.shape[1]
    return None if width is None else int(width)


def _answer_tensors(
    ans: list[int], ids_dtype: torch.dtype, mask_dtype: torch.dtype, answer_type: int
) -> dict[str, torch.Tensor]:
    """What one answer of ``len(ans)`` tokens appends to each per-token tensor (``_SEQUENCE_KEYS``):
    its ids, attention 1, token type ``answer_type`` and multimodal token type 0."""
    return {
        "input_ids": torch.tensor(ans, dtype=ids_dtype),
        "attention_mask": torch.ones(len(ans), dtype=mask_dtype),
        "token_type_ids": torch.full((len(ans),), answer_type, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(len(ans), dtype=torch.long),
    }


def _left_pad(rows: list[torch.Tensor], total: int, value: int, dtype: torch.dtype) -> torch.Tensor:
    """[len(rows), total] of ``dtype``: each 1-d row right-aligned, ``value`` to its left."""
    padded = torch.full((len(rows), total), value, dtype=dtype)
    for r, row in enumerate(rows):
        padded[r, total - len(row) :] = row
    return padded


@dataclass(eq=False)
class ModelAdapter:
    """Uniform access to the language-model internals of a VLM (or a plain decoder LM).

    Attributes derived at construction:
        layers: the language model's decoder layers (never the vision tower's).
        num_layers, num_heads (query heads), num_kv_heads, head_dim, ffn_width (width of
        down_proj's input z), hidden_size.
    Raises AdapterError when a piece is missing or inconsistent.
    """

    model: nn.Module = field(repr=False)
    processor: Any = field(default=None, repr=False)
    layers: list[nn.Module] = field(init=False, repr=False)
    decoder: nn.Module = field(init=False, repr=False)
    num_layers: int = field(init=False)
    num_heads: int = field(init=False)
    num_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)
    ffn_width: int = field(init=False)
    hidden_size: int = field(init=False)

    def __post_init__(self) -> None:
        cls = type(self.model).__name__
        self.decoder, layer_list = self._find_decoder()
        self.layers = list(layer_list)
        self.num_layers = len(self.layers)

        cfg = self.text_config
        expected_layers = getattr(cfg, "num_hidden_layers", None)
        if isinstance(expected_layers, int) and expected_layers != self.num_layers:
            raise AdapterError(
                f"decoder layers of {cls}: found {self.num_layers} under {type(self.decoder).__name__}, "
                f"but its text config has num_hidden_layers={expected_layers}"
            )

        attn0 = self._attention(0)
        num_heads = getattr(cfg, "num_attention_heads", None) or getattr(attn0, "num_heads", None)
        if not num_heads:
            raise AdapterError(f"number of attention heads not found in the text config of {cls}")
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.hidden_size = int(getattr(cfg, "hidden_size", 0) or self.decoder.get_input_embeddings().weight.shape[1])
        head_dim = getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None)
        self.head_dim = int(head_dim or self.hidden_size // self.num_heads)

        width = self.num_heads * self.head_dim
        ffn_widths = set()
        for i in range(self.num_layers):
            o_in = _width_in(self.attn_out_proj(i))
            if o_in != width:
                raise AdapterError(
                    f"o_proj of layer {i} in {cls} takes {o_in} features, expected num_heads*head_dim = "
                    f"{self.num_heads}*{self.head_dim} = {width}"
                )
            ffn_widths.add(_width_in(self.ffn_down_proj(i)))
        if len(ffn_widths) != 1 or None in ffn_widths:
            raise AdapterError(
                f"down_proj input widths of {cls} differ across layers ({sorted(ffn_widths, key=str)}); "
                "per-layer FFN widths are not supported"
            )
        self.ffn_width = int(ffn_widths.pop())

        tok = self.tokenizer
        if tok is not None:
            # Left padding puts every row's last prompt token at position -1 for generation.
            tok.padding_side = "left"

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls, name_or_path: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None
    ) -> "ModelAdapter":
        """Load processor + model with AutoProcessor / AutoModelForImageTextToText, in eval mode.

        dtype: a torch dtype name ("float32", "bfloat16", "float16") or "auto" (the checkpoint's);
        device: "cpu", "cuda", "cuda:1", ... or "auto": spread over every visible GPU
        (accelerate's ``device_map="auto"``, for a model larger than one GPU). Each weight is
        read straight onto its device: the host never holds a full copy of a GPU model. A
        damaged weights file is an ``AdapterError`` naming it. Logs the load time and the
        process's peak host memory after it.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from pipeline.model.weights import WeightsError, check_weight_files, load_errors

        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype, None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise AdapterError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
        started = time.perf_counter()
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
            model = AutoModelForImageTextToText.from_pretrained(
                name_or_path, dtype=torch_dtype, revision=revision, device_map=device
            )
        except load_errors() as exc:
            folder = Path(name_or_path)
            if folder.is_dir():
                try:  # name the damaged file when there is one; the loader's message rarely does
                    check_weight_files(folder)
                except WeightsError as damaged:
                    raise AdapterError(f"cannot load model {name_or_path!r}: {damaged}") from exc
            raise AdapterError(
                f"cannot load model {name_or_path!r} (revision {revision}): {' '.join(str(exc).split())}"
            ) from exc
        model.eval()
        log.info(
            "loaded %s (%s, %s) in %.1f s; peak host memory of this process so far %s",
            name_or_path,
            dtype,
            device,
            time.perf_counter() - started,
            f"{peak_rss_mib():.0f} MiB",
        )
        return cls(model=model, processor=processor)

    @classmethod
    def from_model(cls, model: nn.Module, processor: Any = None) -> "ModelAdapter":
        """Wrap an already-built model (and optionally its processor)."""
        return cls(model=model, processor=processor)

    def _find_decoder(self) -> tuple[nn.Module, nn.ModuleList]:
        candidates: list[nn.Module] = []
        get_decoder = getattr(self.model, "get_decoder", None)
        if callable(get_decoder):
            try:
                dec = get_decoder()
            except (AttributeError, NotImplementedError, TypeError):
                dec = None
            if isinstance(dec, nn.Module):
                candidates.append(dec)
        for path in _DECODER_PATHS:
            dec = _get_path(self.model, path)
            if isinstance(dec, nn.Module):
                candidates.append(dec)
        for dec in candidates:
            layers = getattr(dec, "layers", None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return dec, layers
        found = ", ".join(dict.fromkeys(type(dec).__name__ for dec in candidates)) or "none"
        raise AdapterError(
            f"decoder layers not found in {type(self.model).__name__}: expected a language model with a "
            f"`layers` ModuleList reachable via get_decoder() or one of {', '.join(_DECODER_PATHS)} "
            f"(language models found there, without `layers`: {found})"
        )

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def text_config(self) -> Any:
        """The language model's config (``config.get_text_config()``, else the config itself)."""
        cfg = self.config
        if cfg is None:
            return None
        get_text = getattr(cfg, "get_text_config", None)
        if callable(get_text):
            return get_text()
        return getattr(cfg, "text_config", None) or cfg

    @property
    def family(self) -> str:
        """The model's config.model_type, e.g. "llava", "qwen2_5_vl", "paligemma"."""
        model_type = getattr(self.config, "model_type", None)
        return str(model_type) if model_type else type(self.model).__name__.lower()

    @property
    def tokenizer(self) -> Any:
        if self.processor is None:
            return None
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the language model's weights (float inputs are cast to it)."""
        for p in self.decoder.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------ index checks
    def check_layers(self, layers: Iterable[int], context: str = "") -> list[int]:
        """``layers`` as ints, each checked to be a decoder layer in [0, num_layers).

        Raises ``AdapterError`` naming ``context`` (e.g. the caller, a row) and the bad layer.
        """
        out = [int(l) for l in layers]
        for l in out:
            if not 0 <= l < self.num_layers:
                raise AdapterError(f"{_prefix(context)}layer {l} out of range [0, {self.num_layers})")
        return out

    def check_heads(
        self, heads: Iterable[tuple[int, int]], context: str = "", *, distinct: bool = False
    ) -> list[tuple[int, int]]:
        """(layer, head) pairs as ints, each checked against num_layers x num_heads (and, with
        ``distinct``, none given twice). Raises ``AdapterError`` naming ``context`` and the pair."""
        return self._check_pairs(heads, self.num_heads, "head", context, distinct)

    def check_neurons(
        self, neurons: Iterable[tuple[int, int]], context: str = "", *, distinct: bool = False
    ) -> list[tuple[int, int]]:
        """(layer, neuron) pairs as ints, each checked against num_layers x ffn_width (and, with
        ``distinct``, none given twice). Raises ``AdapterError`` naming ``context`` and the pair."""
        return self._check_pairs(neurons, self.ffn_width, "neuron", context, distinct)

    def _check_pairs(
        self, pairs: Iterable[tuple[int, int]], n_units: int, unit: str, context: str, distinct: bool
    ) -> list[tuple[int, int]]:
        out = [(int(l), int(i)) for l, i in pairs]
        seen: set[tuple[int, int]] = set()
        for l, i in out:
            if not (0 <= l < self.num_layers and 0 <= i < n_units):
                raise AdapterError(
                    f"{_prefix(context)}{unit} ({l}, {i}) out of range: {self.num_layers} layers x {n_units} {unit}s"
                )
            if distinct:
                if (l, i) in seen:
                    raise AdapterError(f"{_prefix(context)}{unit} ({l}, {i}) given twice")
                seen.add((l, i))
        return out

    # ------------------------------------------------------------------ modules
    def _layer(self, layer: int) -> nn.Module:
        (layer,) = self.check_layers([layer])
        return self.layers[layer]

    def _attention(self, layer: int) -> nn.Module:
        attn = _child(self._layer(layer), _ATTN_NAMES)
        if attn is None:
            raise AdapterError(
                f"attention module (one of {', '.join(_ATTN_NAMES)}) not found in layer {layer} "
                f"({type(self.layers[layer]).__name__}) of {type(self.model).__name__}"
            )
        return attn

    def attn_out_proj(self, layer: int) -> nn.Module:
        """The attention output projection (o_proj / out_proj / dense) of a decoder layer.

        Its input is [.., num_heads*head_dim]: head h occupies features [h*head_dim, (h+1)*head_dim).
        """
        attn = self._attention(layer)
        proj = _child(attn, _OUT_PROJ_NAMES)
        if proj is None:
            raise AdapterError(
                f"o_proj (one of {', '.join(_OUT_PROJ_NAMES)}) not found in layer {layer} "
                f"attention ({type(attn).__name__}) of {type(self.model).__name__}"
            )
        return proj

    def mlp(self, layer: int) -> nn.Module:
        """The FFN block of a decoder layer."""
        mlp = _child(self._layer(layer), _MLP_NAMES)
        if mlp is None:
            raise AdapterError(
                f"MLP (one of {', '.join(_MLP_NAMES)}) not found in layer {layer} "
                f"({type(self.layers[layer]).__name__}) of {type(self.model).__name__}"
            )
        return mlp

    def ffn_input_norm(self, layer: int) -> nn.Module:
        """The norm in front of a decoder layer's FFN. Its input [.., hidden] is the residual
        stream after the layer's attention has been added (pre-norm blocks: x + attn(norm(x)))."""
        norm = _child(self._layer(layer), _FFN_NORM_NAMES)
        if norm is None:
            raise AdapterError(
                f"the norm before the FFN (one of {', '.join(_FFN_NORM_NAMES)}) not found in layer "
                f"{layer} ({type(self.layers[layer]).__name__}) of {type(self.model).__name__}"
            )
        return norm

    def ffn_down_proj(self, layer: int) -> nn.Module:
        """The FFN output projection (down_proj / fc2); its input is z [.., ffn_width].

        Gated MLPs: z = act(gate_proj(x)) * up_proj(x); plain MLPs: z = act(fc1(x)).
        """
        mlp = self.mlp(layer)
        proj = _child(mlp, _DOWN_PROJ_NAMES)
        if proj is None:
            raise AdapterError(
                f"down_proj (one of {', '.join(_DOWN_PROJ_NAMES)}) not found in layer {layer} "
                f"MLP ({type(mlp).__name__}) of {type(self.model).__name__}"
            )
        return proj

    def ffn_activation(self, layer: int) -> nn.Module:
        """The FFN's activation module (act_fn / activation_fn): its output is act(gate_proj(x))
        for gated MLPs, act(fc1(x)) = z for plain ones [.., ffn_width]."""
        mlp = self.mlp(layer)
        act = _child(mlp, _ACT_NAMES)
        if act is None:
            raise AdapterError(
                f"activation module (one of {', '.join(_ACT_NAMES)}) not found in layer {layer} "
                f"MLP ({type(mlp).__name__}) of {type(self.model).__name__}"
            )
        return act

    def unembedding_input(self) -> nn.Module:
        """The module whose input is the residual stream at the end of the decoder: the final norm,
        or the lm_head when there is none."""
        norm = self.final_norm()
        if norm is not None:
            return norm
        get_out = getattr(self.model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else _child(self.model, ("lm_head",))
        if out is None:
            raise AdapterError(f"neither a final norm nor an lm_head found in {type(self.model).__name__}")
        return out

    def unembedding(self) -> torch.Tensor:
        """The unembedding matrix [vocab, hidden] (lm_head weight, or the tied input embedding)."""
        weight = None
        get_out = getattr(self.model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else _child(self.model, ("lm_head",))
        if out is not None:
            weight = getattr(out, "weight", None)
        if weight is None and getattr(self.config, "tie_word_embeddings", False):
            weight = self.decoder.get_input_embeddings().weight
        if weight is None or weight.dim() != 2 or weight.shape[1] != self.hidden_size:
            raise AdapterError(
                f"lm_head (unembedding [vocab, {self.hidden_size}]) not found in {type(self.model).__name__}"
            )
        return weight

    def final_norm(self) -> nn.Module | None:
        """The norm applied to the residual stream before the unembedding, if any."""
        return _child(self.decoder, _FINAL_NORM_NAMES)

    # ------------------------------------------------------------------ inputs
    def format_prompt(self, prompt: str) -> str:
        """The text of one user turn (one image + prompt) ready for generation.

        Uses the processor's chat template when it has one, otherwise the family's plain format.
        """
        proc = self._require_processor()
        template = getattr(proc, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        image = getattr(proc, "image_token", None)
        if image is None:
            raise AdapterError(f"processor {type(proc).__name__} has neither a chat template nor an image_token")
        return _PLAIN_FORMATS.get(self.family, _DEFAULT_PLAIN_FORMAT).format(image=image, prompt=prompt)

    def _require_processor(self) -> Any:
        if self.processor is None:
            raise AdapterError(f"no processor given for {type(self.model).__name__}; build_inputs needs one")
        return self.processor

    def build_inputs(
        self, images: list[Any], prompts: list[str], answers: list[str] | None = None, *, append_eos: bool = True
    ) -> ModelInputs:
        """Left-padded model inputs for one image (PIL) + prompt per row, optionally followed by an answer.

        Without answers each row is [pad..., prompt...]. With answers it is
        [pad..., prompt..., answer..., eos]: the answer is tokenised on its own (no special
        tokens) and eos is the tokenizer's eos token (omitted with ``append_eos=False``); the
        answer_mask covers the answer tokens and eos. Tensors are on the model's device, float
        tensors in the model's dtype. Steps: ``_encode_prompts``, then (with answers)
        ``_answer_token_ids`` and ``_append_answers``, then ``_to_model``.
        """
        proc = self._require_processor()
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt")
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        if not prompts:
            raise ValueError("build_inputs needs at least one row")

        tensors = self._encode_prompts(proc, images, prompts)
        if answers is None:
            bsz, seq = tensors["input_ids"].shape
            last = torch.full((bsz,), seq - 1, dtype=torch.long)
            return self._to_model(ModelInputs(tensors, last, None))
        return self._to_model(self._append_answers(tensors, self._answer_token_ids(answers, append_eos)))

    def _encode_prompts(self, proc: Any, images: list[Any], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's left-padded output for one image + formatted prompt per row, on the CPU:
        input_ids [B, S], attention_mask [B, S] (all ones when the processor gives none) and the
        family's other model inputs; non-input outputs (``_DROP_KEYS``) are dropped."""
        tok = self.tokenizer
        texts = [self.format_prompt(p) for p in prompts]
        kwargs: dict[str, Any] = {}
        bos = getattr(tok, "bos_token", None)
        if bos and all(t.startswith(bos) for t in texts):
            # The template already wrote <bos>; as in processor.apply_chat_template, don't add another.
            kwargs["add_special_tokens"] = False
        tok.padding_side = "left"
        batch = proc(
            images=[[im] for im in images], text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs
        )
        tensors = {k: v for k, v in batch.items() if k not in _DROP_KEYS and isinstance(v, torch.Tensor)}
        if "attention_mask" not in tensors:
            tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
        if not bool(tensors["attention_mask"][:, -1].all()):
            raise AdapterError(f"processor {type(proc).__name__} did not left-pad its output")
        return tensors

    def _answer_token_ids(self, answers: list[str], append_eos: bool) -> list[list[int]]:
        """Per answer: its token ids (tokenised on its own, no special tokens), then eos if asked
        for and the tokenizer has one."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if append_eos and tok.eos_token_id is not None else []
        return [list(tok(answer, add_special_tokens=False)["input_ids"]) + eos for answer in answers]

    def _append_answers(self, tensors: dict[str, torch.Tensor], answer_ids: list[list[int]]) -> ModelInputs:
        """Append each row's answer tokens after its prompt and left-pad again.

        ``tensors``: ``_encode_prompts``' output [B, S] (changed in place); ``answer_ids``: B
        token lists. Every per-token tensor (``_SEQUENCE_KEYS``) grows to [B, T], T the longest
        prompt + answer; input_ids are padded with the pad token (else eos, else 0), the others
        with 0. Returns the inputs (still on the CPU) with ``last_prompt_index`` and ``answer_mask``.
        """
        tok = self.tokenizer
        ids, mask = tensors["input_ids"], tensors["attention_mask"]
        bsz, seq = ids.shape
        answer_type = _ANSWER_TOKEN_TYPE.get(self.family, 0)
        seq_keys = [k for k in _SEQUENCE_KEYS if k in tensors and tuple(tensors[k].shape[:2]) == (bsz, seq)]
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in seq_keys}
        for r, ans in enumerate(answer_ids):
            n = int(mask[r].sum())
            extra = _answer_tensors(ans, ids.dtype, mask.dtype, answer_type)
            for k in seq_keys:
                prompt_part = tensors[k][r, seq - n :]
                rows[k].append(torch.cat([prompt_part, extra[k].to(prompt_part.dtype)]))
        total = max(len(x) for x in rows["input_ids"])
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for k in seq_keys:
            tensors[k] = _left_pad(rows[k], total, pad_id if k == "input_ids" else 0, tensors[k].dtype)
        lens = torch.tensor([len(ans) for ans in answer_ids], dtype=torch.long)
        last = total - lens - 1
        positions = torch.arange(total).unsqueeze(0)
        return ModelInputs(tensors, last, positions > last.unsqueeze(1))

    def _to_model(self, inputs: ModelInputs) -> ModelInputs:
        device, dtype = self.device, self.dtype
        tensors = {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in inputs.tensors.items()
        }
        mask = None if inputs.answer_mask is None else inputs.answer_mask.to(device)
        return ModelInputs(tensors, inputs.last_prompt_index.to(device), mask)
