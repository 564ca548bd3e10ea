"""The embedded default VLM: built from transformers configs and trained on the benchmark, on CPU.

Map of this module:
- ``DefaultModelSpec`` (defined in ``default_spec``): architecture and training schedule.
- ``build_tokenizer``: a word-level ``tokenizers`` tokenizer over the benchmark vocabulary,
  wrapped as a transformers fast tokenizer with a chat template.
- ``build_processor`` / ``build_model``: the family's processor and a randomly initialised
  model. ``llava``: a ``LlavaProcessor`` (CLIP image processor + tokenizer) and a
  ``LlavaForConditionalGeneration`` (CLIP vision tower + 2-layer projector + Llama decoder).
  ``idefics3``, the second family: an ``Idefics3Processor`` and an
  ``Idefics3ForConditionalGeneration`` (SigLIP-style vision tower, pixel-shuffle connector,
  Qwen2 decoder), different from LLaVA in vision encoder, connector and language model.
- ``warm_up_vision``: trains the vision tower alone first (``image_word_targets``).
- ``train_default_model``: trains on the benchmark's train split and ``save_pretrained``s
  model + processor into a folder that ``ModelAdapter.load`` (AutoProcessor +
  AutoModelForImageTextToText) reads like any hub model. Its steps, in order:
  ``_read_train_split`` -> ``_build_untrained`` -> ``_decode_images`` -> ``warm_up_vision`` ->
  ``_language_optimizer`` -> ``_train_language_model`` (``_refill_pool``, ``_training_step``)
  -> ``_training_summary`` -> ``_save_trained``. The examples are
  ``pipeline.tasks.items.training_examples`` (captions answered with a sampled reference), the
  loss ``pipeline.model.scoring.answer_cross_entropy``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_directory, atomic_file, resumable_scratch
from pipeline.model.default_spec import FAMILIES, DefaultModelSpec
from pipeline.model.scoring import answer_cross_entropy, answer_token_id
from pipeline.tasks.items import (
    CANDIDATE_SLOT,
    RETRIEVAL_NO,
    RETRIEVAL_YES,
    ImageTable,
    RankingExample,
    TrainingExample,
    read_annotations,
    training_examples,
)

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
# Idefics3's processor wraps the image tokens in these; they must be single tokens.
IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
# A LLaVA-1.5-like single-turn template; words are in the vocabulary, so it tokenises exactly.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} assistant : {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} </s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)
TEMPLATE_WORDS = ("user", "assistant", ":", "yes", "no")


def benchmark_vocabulary(annotations: pd.DataFrame) -> list[str]:
    """Every word that the benchmark's prompts, answers and candidates use, sorted."""
    from tokenizers.pre_tokenizers import Punctuation, Sequence, WhitespaceSplit

    pre = Sequence([WhitespaceSplit(), Punctuation()])
    words: set[str] = set(TEMPLATE_WORDS)
    texts: list[str] = []
    for rec in annotations.itertuples():
        texts.append(rec.prompt.replace(CANDIDATE_SLOT, " "))
        texts.extend(rec.references)
        texts.extend(rec.candidates)
    for t in set(texts):
        words.update(w for w, _ in pre.pre_tokenize_str(t.lower()))
    return sorted(words)


def build_tokenizer(vocabulary: list[str], extra_specials: tuple[str, ...] = ()):
    """Word-level fast tokenizer (lower-cased, punctuation split) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(extra_specials)
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in vocabulary if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        additional_special_tokens=list(extra_specials),
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, spec: DefaultModelSpec):
    """The family's own processor class over our tokenizer and a fixed-size image processor."""
    if spec.family == "idefics3":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        image_processor = Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": spec.image_size},
            max_image_size={"longest_edge": spec.image_size},
        )
        # Pixel shuffle with scale factor 2 merges 2x2 patches into one language-model token.
        seq_len = (spec.image_size // spec.patch_size) ** 2 // 4
        return Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE
        )
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=SPECIAL_TOKENS["image"],
    )


def build_model(tokenizer, spec: DefaultModelSpec) -> torch.nn.Module:
    """A randomly initialised model of ``spec.family``: LLaVA (CLIP vision tower + 2-layer projector +
    Llama decoder) or Idefics3 (``_build_idefics3``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if spec.family not in FAMILIES:
        raise PipelineError(f"default model family {spec.family!r} is not supported; allowed: {FAMILIES}")
    if spec.family == "idefics3":
        return _build_idefics3(tokenizer, spec)
    n_patches = (spec.image_size // spec.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    # LLaVA's init draws every weight from N(0, 0.02), which leaves a from-scratch CLIP tower
    # unable to learn in our step budget (measured: OCR probe loss stays at log(66) for 300
    # steps); CLIP's own init learns. Pretrained LLaVAs never meet this: their tower is trained.
    model.model.vision_tower.load_state_dict(CLIPVisionModel(vision).state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _build_idefics3(tokenizer, spec: DefaultModelSpec) -> torch.nn.Module:
    """An Idefics3-style VLM: SigLIP-style tower (no class token, post-norm) + pixel-shuffle
    connector + a Qwen2 decoder (biased q/k/v, grouped-query attention): a second family that
    differs from LLaVA in vision encoder, connector and language model."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(spec.seed)
    model = Idefics3ForConditionalGeneration(config)
    # As for LLaVA: the composite model's N(0, 0.02) init stalls a from-scratch tower; SigLIP's own
    # init (same parameter names, minus SigLIP's pooling head) learns.
    siglip = SiglipVisionModel(SiglipVisionConfig(**vision)).state_dict()
    own = model.model.vision_model.state_dict()
    model.model.vision_model.load_state_dict({k: siglip[k] for k in own if k in siglip}, strict=False)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, attr, getattr(tokenizer, attr))
    return model


def vision_tower(model) -> torch.nn.Module:
    """The vision encoder module of a default model (frozen after the warm-up)."""
    from pipeline.model.adapter import find_vision_tower

    tower = find_vision_tower(model)
    if tower is None:
        raise PipelineError(f"{type(model).__name__} has no vision tower (vision_tower, vision_model or visual)")
    return tower


def image_pixels(processor, images: list) -> torch.Tensor:
    """[image, 3, H, W] pixel values from the family's image processor."""
    if type(processor).__name__.startswith("Idefics3"):
        return processor.image_processor([[im] for im in images], return_tensors="pt")["pixel_values"][:, 0]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def patch_features(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[image, patch, hidden]: the patch features the language model receives (CLIP: the last
    hidden state without the class token; SigLIP-style: the post-normed last hidden state)."""
    if hasattr(tower, "post_layernorm") and not hasattr(tower, "vision_model"):
        return tower(pixel_values=pixels).last_hidden_state
    return tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


class _CachedImageProcessor:
    """Stands in for a processor's image processor: each image (keyed by object identity: the
    trainer passes the same decoded PIL images every step) is processed once per set of call
    options, and a call returns its images' stored outputs, batched as the real one batches them
    (one row per image: no image splitting, all images one size, which ``_image_size`` checks)."""

    def __init__(self, real, owner: FrozenVisionCache):
        self._real, self._owner = real, owner
        self._done: dict[tuple, dict[int, dict]] = {}

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def __call__(self, images, **kwargs):
        from transformers import BatchFeature

        flat = [im for row in images for im in (row if isinstance(row, (list, tuple)) else [row])]
        if len(flat) != len(images):
            raise PipelineError(
                f"frozen-tower cache: {len(images)} rows hold {len(flat)} images; training "
                "passes exactly one image per row"
            )
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        done = self._done.setdefault(key, {})
        todo = list(dict.fromkeys(id(im) for im in flat if id(im) not in done))
        if todo:
            by_id = {id(im): im for im in flat}
            out = self._real([[by_id[i]] if isinstance(images[0], (list, tuple)) else by_id[i] for i in todo], **kwargs)
            for k, i in enumerate(todo):
                done[i] = {name: v[k] for name, v in out.items()}
        rows = [done[id(im)] for im in flat]
        self._owner.select(flat)
        batched = {
            name: torch.stack([r[name] for r in rows])
            if isinstance(rows[0][name], torch.Tensor)
            else [r[name] for r in rows]
            for name in rows[0]
        }
        return BatchFeature(batched)


class FrozenVisionCache:
    """The frozen vision tower's work, done once per training image.

    While the tower is frozen (the language phase) its output for an image never changes, so
    ``installed`` makes the model read stored outputs instead: the processor's image processor
    is swapped for ``_CachedImageProcessor`` (each image processed once) and the tower's
    ``forward`` for a lookup of the tower outputs computed here up front, in fixed chunks of
    ``chunk`` images (so a resumed run sees the same bits). Stored per image: the tower output
    the family's ``get_image_features`` reads (LLaVA: every token of the last hidden state,
    class token included, [tokens, hidden]; Idefics3: the last hidden state [patches, hidden]).
    The projector / connector after the tower still runs and trains.
    """

    def __init__(self, model, processor, images: dict[str, object], *, chunk: int = 256):
        self.model, self.processor = model, processor
        self.tower = vision_tower(model)
        self._row = {id(im): k for k, im in enumerate(images.values())}
        self._selected: torch.Tensor | None = None
        device = next(self.tower.parameters()).device
        ordered = list(images.values())
        parts = []
        was_training = self.tower.training
        self.tower.eval()
        with torch.no_grad():
            for s in range(0, len(ordered), chunk):
                pixels = image_pixels(processor, ordered[s : s + chunk]).to(device, next(self.tower.parameters()).dtype)
                parts.append(self._tower_output(pixels))
        self.tower.train(was_training)
        self.features = torch.cat(parts)

    def _tower_output(self, pixels: torch.Tensor) -> torch.Tensor:
        if hasattr(self.tower, "post_layernorm") and not hasattr(self.tower, "vision_model"):
            # Idefics3's get_image_features passes an all-true patch mask for unpadded images.
            side = pixels.shape[-1] // self.tower.config.patch_size
            mask = torch.ones(pixels.shape[0], side, side, dtype=torch.bool, device=pixels.device)
            return self.tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
        return self.tower(pixels, output_hidden_states=True).hidden_states[-1]

    def select(self, images: list) -> None:
        """The images of the batch being built, in row order (called by the image processor)."""
        missing = [im for im in images if id(im) not in self._row]
        if missing:
            raise PipelineError(f"frozen-tower cache: {len(missing)} image(s) of the batch were not cached")
        self._selected = torch.tensor([self._row[id(im)] for im in images])

    def _forward(self, pixel_values: torch.Tensor, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self._selected is None or len(self._selected) != pixel_values.shape[0]:
            raise PipelineError(
                "frozen-tower cache: the tower was called for images the cached image processor did not prepare"
            )
        mask = kwargs.get("patch_attention_mask")
        if mask is not None and not bool(mask.all()):
            raise PipelineError("frozen-tower cache: padded images are not supported")
        out = self.features[self._selected.to(self.features.device)]
        return BaseModelOutputWithPooling(last_hidden_state=out, hidden_states=(out,))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within: the model reads the stored tower outputs; on exit the real tower and image
        processor are back (what is saved is the real model and processor)."""
        real = self.processor.image_processor
        self.processor.image_processor = _CachedImageProcessor(real, self)
        self.tower.forward = self._forward
        try:
            yield
        finally:
            del self.tower.forward
            self.processor.image_processor = real
            self._selected = None


@dataclass(frozen=True)
class ImageTargets:
    """What the vision warm-up predicts of each image (keys: image ids), from its non-retrieval
    rows' reference answers: ``words``, the token ids they use (colours, shapes, positions,
    counts, the written word); ``pairs``, the adjacent token pairs ("red square", "square on"):
    a pair binds an attribute to its object, which a bag of words cannot; ``ocr``, the first
    token of the OCR answer (-1 without an OCR row)."""

    words: dict[str, list[int]]
    pairs: dict[str, list[tuple[int, int]]]
    ocr: dict[str, int]


def image_word_targets(annotations: pd.DataFrame, tokenizer) -> ImageTargets:
    """The warm-up's ``ImageTargets`` of every image of ``annotations`` that has a non-retrieval row."""
    special = set(tokenizer.all_special_ids)
    words: dict[str, set[int]] = {}
    pairs: dict[str, set[tuple[int, int]]] = {}
    ocr: dict[str, int] = {}
    for rec in annotations.itertuples():
        if rec.task == "retrieval":
            continue
        ids = words.setdefault(rec.image_id, set())
        bound = pairs.setdefault(rec.image_id, set())
        for ref in rec.references:
            toks = [t for t in tokenizer(str(ref), add_special_tokens=False)["input_ids"] if t not in special]
            ids.update(toks)
            bound.update(zip(toks, toks[1:]))
            if rec.task == "ocr" and toks:
                ocr[rec.image_id] = toks[0]
    return ImageTargets(
        {k: sorted(v) for k, v in words.items()},
        {k: sorted(v) for k, v in pairs.items()},
        {k: ocr.get(k, -1) for k in words},
    )


CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoints:
    """Where and how often training saves everything a bitwise resume needs.

    ``directory``: the scratch directory (inside the output, ``pipeline.io.resumable_scratch``);
    one file, ``checkpoint.pt``, replaced atomically at each save. ``every``: optimiser steps
    between saves, counted separately in each phase ("warmup" and "language"); 0 never saves.
    ``on_save(phase, step)`` runs after each save (progress reporting; the tests kill there).
    """

    directory: Path
    every: int
    on_save: Callable[[str, int], None] | None = None

    def due(self, done: int, total: int) -> bool:
        """True after ``done`` of ``total`` steps when a save is due (never after the last step:
        the finished model is saved instead)."""
        return self.every > 0 and done % self.every == 0 and done < total

    def save(self, state: dict) -> None:
        """Write ``state`` (with "phase" and "step") with torch's and CUDA's RNG states added."""
        state = {
            **state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.directory / CHECKPOINT_FILE) as tmp:
            torch.save(state, tmp)
        log.info("checkpoint: %s step %d", state["phase"], state["step"])
        if self.on_save is not None:
            self.on_save(state["phase"], state["step"])

    def load(self) -> dict | None:
        """The last saved state, or None when there is none (a file that cannot be read, as a
        kill inside ``torch.save`` cannot leave one, is reported and ignored)."""
        path = self.directory / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, in our own scratch
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            log.warning("ignoring unreadable checkpoint %s (%s); training starts afresh", path, exc)
            return None
        log.info("resuming training from %s: %s step %d", path, state["phase"], state["step"])
        return state


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's ``.grad`` that is set. Part of the training state: the frozen tower keeps
    its last warm-up gradient, and ``clip_grad_norm_`` over all parameters counts it."""
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _restore_model(model: torch.nn.Module, state: dict) -> None:
    """Weights and gradients of ``model`` as saved in a checkpoint ``state``."""
    model.load_state_dict(state["model"])
    for name, param in model.named_parameters():
        grad = state["gradients"].get(name)
        param.grad = None if grad is None else grad.to(param.device)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _multi_label(ids: list[str], targets: dict[str, list], classes: dict) -> torch.Tensor:
    """[image, class] 0/1 matrix of each image's targets, less the classes present in over half
    the images ("a", "the", "."): they tell no image apart and would dominate the loss."""
    labels = torch.zeros(len(ids), len(classes))
    for k, iid in enumerate(ids):
        labels[k, [classes[t] for t in targets.get(iid, ())]] = 1.0
    labels[:, labels.mean(0) > 0.5] = 0.0
    return labels


def _pooled_softmax_loss(patch_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the images' classes under a softmax over the patch logits [B, P, C]
    pooled by a smoothed max, the target spread evenly over each image's classes."""
    # Multiple-instance pooling (max over patches, smoothed): each class must be predictable from
    # some patch, which keeps the features local, as the language model reads them. A softmax
    # averaged over the image's classes: with ~15 positives among ~130 words, per-label BCE was
    # satisfied by the frequent words and left colours and shapes unlearned.
    pooled = torch.logsumexp(patch_logits, dim=1) - math.log(patch_logits.shape[1])
    target = labels / labels.sum(1, keepdim=True).clamp(min=1)
    return -(target * torch.log_softmax(pooled, dim=-1)).sum(1).mean()


def warm_up_vision(
    model,
    processor,
    decoded: dict,
    targets: ImageTargets,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    checkpoints: Checkpoints | None = None,
    resume: dict | None = None,
) -> list[float]:
    """Train the vision tower alone to predict what describes each image (``ImageTargets``).

    Three losses on the patch features (the ones the language model is fed), through
    throw-away linear heads: the image's words and its adjacent word pairs, each a softmax over
    patch logits pooled by a smoothed max (``_pooled_softmax_loss``), and a softmax over the
    vocabulary for the written word from the mean patch (one word among many labels is too weak
    a signal to learn reading). This replaces the contrastive pre-training a real CLIP tower has
    had: without it the from-scratch tower needs thousands of VLM steps before the language model
    can read anything from it. The pairs are what teach shape: a linear probe of each object's
    shape from a 6-layer tower's features after 1,500 steps read 69% of the test objects right
    with words alone, 99% with pairs (``benchmarks/bench_vision_probe.py``; colour: 99% either
    way). Returns the loss curve.
    """
    from tqdm import tqdm

    tower = vision_tower(model)
    vocab = len(processor.tokenizer)
    ids = sorted(targets.words)
    pair_classes = {p: k for k, p in enumerate(sorted({p for ps in targets.pairs.values() for p in ps}))}
    # Pixels once for all images: the image processor costs more than the tower's step.
    pixels = torch.cat(
        [image_pixels(processor, [decoded[i] for i in ids[s : s + 512]]) for s in range(0, len(ids), 512)]
    )
    labels = _multi_label(ids, targets.words, {t: t for t in range(vocab)})
    pair_labels = _multi_label(ids, targets.pairs, pair_classes)
    words = torch.tensor([targets.ocr[i] for i in ids])
    device = next(tower.parameters()).device
    pixels, labels, pair_labels, words = pixels.to(device), labels.to(device), pair_labels.to(device), words.to(device)
    hidden = tower.config.hidden_size
    heads = torch.nn.ModuleDict(
        {
            "words": torch.nn.Linear(hidden, vocab),
            "pairs": torch.nn.Linear(hidden, len(pair_classes)),
            "written": torch.nn.Linear(hidden, vocab),
        }
    ).to(device)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = 0
    if resume is not None:  # the model's weights and gradients were restored by the caller
        heads.load_state_dict(resume["heads"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        losses, start = list(resume["losses"]), resume["step"]
        _restore_rng(resume)
    tower.train()
    for step in tqdm(range(start, steps), desc="vision warm-up", leave=False, initial=start, total=steps):
        pick = torch.randint(0, len(ids), (batch_size,), generator=gen).to(device)
        patches = patch_features(tower, pixels[pick])
        loss = _pooled_softmax_loss(heads["words"](patches), labels[pick]) + _pooled_softmax_loss(
            heads["pairs"](patches), pair_labels[pick]
        )
        if bool((words[pick] >= 0).any()):
            loss = loss + torch.nn.functional.cross_entropy(
                heads["written"](patches.mean(1)), words[pick], ignore_index=-1
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if checkpoints is not None and checkpoints.due(step + 1, steps):
            checkpoints.save(
                {
                    "phase": "warmup",
                    "step": step + 1,
                    "model": model.state_dict(),
                    "gradients": _gradients(model),
                    "heads": heads.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "losses": losses,
                }
            )
    return losses


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    lm = sum(p.numel() for p in model.get_decoder().parameters()) if hasattr(model, "get_decoder") else 0
    return {"total": int(total), "language_model": int(lm)}


@dataclass(frozen=True)
class TrainSplit:
    """The benchmark as training reads it: ``annotations`` of every split (the vocabulary covers
    them all), the ``train`` rows trained on, and the ``images`` table (image_id -> PIL image)."""

    annotations: pd.DataFrame
    train: pd.DataFrame
    images: ImageTable


@dataclass
class TrainingCurves:
    """What the VLM training loop measured, in step order: ``losses`` (mean answer
    cross-entropy of each step's batch, nats), ``task_losses`` (task -> every training row's
    answer cross-entropy, nats) and ``task_steps`` (task -> the step of each of those rows)."""

    losses: list[float] = field(default_factory=list)
    task_losses: dict[str, list[float]] = field(default_factory=dict)
    task_steps: dict[str, list[int]] = field(default_factory=dict)


def _read_train_split(benchmark_dir: Path) -> TrainSplit:
    """The benchmark at ``benchmark_dir``; ``PipelineError`` when it has no train rows."""
    benchmark_dir = Path(benchmark_dir)
    annotations = read_annotations(benchmark_dir / "annotations.parquet")
    train = annotations[annotations["split"] == "train"]
    if train.empty:
        raise PipelineError(f"{benchmark_dir}/annotations.parquet has no 'train' rows to train on")
    return TrainSplit(annotations, train, ImageTable(benchmark_dir / "images.parquet"))


def _build_untrained(spec: DefaultModelSpec, annotations: pd.DataFrame, device: str):
    """(model on ``device``, processor) before training: the family's word-level tokenizer over
    the benchmark vocabulary, its processor, and a model initialised by ``build_model`` (which
    seeds torch with ``spec.seed`` itself). ``processor.tokenizer`` is that tokenizer."""
    tokenizer = build_tokenizer(
        benchmark_vocabulary(annotations), IDEFICS3_SPECIALS if spec.family == "idefics3" else ()
    )
    processor = build_processor(tokenizer, spec)
    return build_model(tokenizer, spec).to(device), processor


def _decode_images(images: ImageTable, image_ids: pd.Series) -> dict:
    """image_id -> decoded PIL image for each distinct id of ``image_ids``, in sorted order.

    Each training image is decoded once; PNG decoding would otherwise cost as much as a step.
    """
    from tqdm import tqdm

    return {iid: images[iid] for iid in tqdm(sorted(image_ids.unique()), desc="decode images", leave=False)}


def _learning_rate(spec: DefaultModelSpec, step: int) -> float:
    """Learning rate of VLM step ``step`` (0-based): linear warm-up to ``spec.lr`` over
    ``spec.warmup_steps`` steps, then cosine decay to 5% of ``spec.lr`` at ``spec.steps``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _language_optimizer(model: torch.nn.Module, spec: DefaultModelSpec) -> torch.optim.AdamW:
    """Freeze the vision tower; AdamW over every parameter still trainable (projector + LM)."""
    # As in LLaVA, the language model learns to read a frozen vision tower; letting the VLM loss
    # reach the tower collapsed its features to an image-independent vector (measured: patch
    # features differing by 1% between images after 1,500 steps) and nothing was learned.
    vision_tower(model).requires_grad_(False)
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        betas=(0.9, 0.98),
    )


# Examples per length-sorting window: 16 batches. Large enough that a window's batches are
# nearly uniform in length, small enough that each batch still mixes examples from all over
# the pass (a window is a random sample of it).
BUCKET_BATCHES = 16


Example = TrainingExample | RankingExample


def _example_words(example: Example) -> int:
    """Words of prompt + answer (a ranking group: of its longest row): the sorting key standing
    in for the token count."""
    if isinstance(example, RankingExample):
        return max(len(p.split()) for p in example.prompts) + 1
    return len(example.prompt.split()) + len(example.answer.split())


def _length_bucketed(examples: list, batch_size: int, rng: np.random.Generator) -> list:
    """``examples`` reordered so that each run of ``batch_size`` holds examples of similar length.

    Within consecutive windows of ``BUCKET_BATCHES`` batches (the examples are already in random
    order), examples are sorted by length, cut into batches, and the batches shuffled. A batch
    is padded to its longest row, so mixed lengths wasted ~40% of every step on padding (rows of
    28 tokens padded to 59, measured on the default benchmark). Draws one permutation per window."""
    window = batch_size * BUCKET_BATCHES
    out: list = []
    for start in range(0, len(examples), window):
        chunk = sorted(examples[start : start + window], key=_example_words)
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for k in rng.permutation(len(batches)):
            out.extend(batches[k])
    return out


def _refill_pool(pool: list[Example], train: pd.DataFrame, spec: DefaultModelSpec, rng: np.random.Generator) -> None:
    """When ``pool`` holds fewer than ``spec.batch_size`` examples, add one pass over the train
    split (``training_examples``) resampled with replacement in proportion to
    ``spec.task_weights`` (default weight 1), and reorder the leftover and the pass into
    batches of similar length (``_length_bucketed``). Draws from ``rng``: the pass's draws, the
    resampling, then the bucketing's permutations."""
    if len(pool) < spec.batch_size:
        fresh = training_examples(train, rng, caption_reference="sampled", retrieval_negatives=spec.retrieval_negatives)
        p = np.array([spec.task_weights.get(e.task, 1.0) for e in fresh], dtype=float)
        take = rng.choice(len(fresh), size=len(fresh), replace=True, p=p / p.sum())
        merged = pool + [fresh[i] for i in take]
        pool[:] = _length_bucketed(merged, spec.batch_size, rng)


def _batch_rows(batch: list[Example]) -> tuple[list[str], list[str], list[str], list[int]]:
    """(image ids, prompts, answers, example index) of every row of ``batch``: one row per
    ``TrainingExample``, one per candidate of a ``RankingExample``."""
    images, prompts, answers, owner = [], [], [], []
    for k, e in enumerate(batch):
        rows = zip(e.prompts, e.answers) if isinstance(e, RankingExample) else [(e.prompt, e.answer)]
        for prompt, answer in rows:
            images.append(e.image_id)
            prompts.append(prompt)
            answers.append(answer)
            owner.append(k)
    return images, prompts, answers, owner


def ranking_loss(margins: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy (nats) of a ranking group whose positive is row 0: ``margins`` [K]
    are the candidates' Yes-minus-No logit margins, the score evaluation ranks them by."""
    return -torch.log_softmax(margins, dim=0)[0]


def _training_step(
    adapter, optimizer: torch.optim.Optimizer, batch: list[Example], decoded: dict, lr: float
) -> tuple[float, list[float]]:
    """One optimiser step at learning rate ``lr`` on ``batch`` (examples; images from
    ``decoded``), gradients clipped to norm 1.

    An example's loss is its answer cross-entropy; a ranking group's is the mean answer
    cross-entropy of its rows plus ``ranking_loss`` of their margins. The step minimises the
    mean over examples. Returns (that mean, each example's loss), in nats, measured before the step.
    """
    model = adapter.model
    image_ids, prompts, answers, owner = _batch_rows(batch)
    inputs = adapter.build_inputs([decoded[i] for i in image_ids], prompts, answers)
    for g in optimizer.param_groups:
        g["lr"] = lr
    logits = model(**inputs.tensors).logits
    row_loss = answer_cross_entropy(logits, inputs.tensors["input_ids"], inputs.answer_mask, per_row=True)
    if len(owner) == len(batch):
        example_loss = row_loss  # no ranking group: rows are the examples (bitwise the pointwise step)
    else:
        tok = adapter.processor.tokenizer
        yes, no = answer_token_id(tok, RETRIEVAL_YES), answer_token_id(tok, RETRIEVAL_NO)
        first = logits[torch.arange(len(owner)), inputs.last_prompt_index].float()
        margins = first[:, yes] - first[:, no]
        owner_t = torch.tensor(owner)
        losses = []
        for k, e in enumerate(batch):
            rows = (owner_t == k).nonzero().squeeze(1)
            loss_k = row_loss[rows].mean()
            if isinstance(e, RankingExample):
                loss_k = loss_k + ranking_loss(margins[rows])
            losses.append(loss_k)
        example_loss = torch.stack(losses)
    loss = example_loss.mean()
    values = example_loss.detach().tolist()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item(), values


def _train_language_model(
    adapter,
    optimizer: torch.optim.Optimizer,
    spec: DefaultModelSpec,
    train: pd.DataFrame,
    decoded: dict,
    rng: np.random.Generator,
    *,
    name: str,
    checkpoints: Checkpoints | None = None,
    resume: dict | None = None,
    warmup_losses: list[float] | None = None,
) -> TrainingCurves:
    """``spec.steps`` steps of ``spec.batch_size`` rows drawn in order from a pool that
    ``_refill_pool`` tops up from ``rng``; the vision tower stays in eval mode (frozen).

    With ``checkpoints``, the state is saved every ``checkpoints.every`` steps (with
    ``warmup_losses``, for the summary); ``resume`` (a "language" checkpoint; the model's weights
    and gradients already restored by the caller) continues from its step, bitwise as if never stopped."""
    from tqdm import tqdm

    pool: list[Example] = []
    curves = TrainingCurves()
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["numpy_rng"]
        pool, start = list(resume["pool"]), resume["step"]
        curves = TrainingCurves(
            list(resume["losses"]),
            {t: list(v) for t, v in resume["task_losses"].items()},
            {t: list(v) for t, v in resume["task_steps"].items()},
        )
        _restore_rng(resume)
    adapter.model.train()
    vision_tower(adapter.model).eval()
    bar = tqdm(range(start, spec.steps), desc=f"train {name}", initial=start, total=spec.steps)
    for step in bar:
        _refill_pool(pool, train, spec, rng)
        batch = pool[: spec.batch_size]
        del pool[: spec.batch_size]
        loss, row_losses = _training_step(adapter, optimizer, batch, decoded, _learning_rate(spec, step))
        for task_name, v in zip((b.task for b in batch), row_losses):
            curves.task_losses.setdefault(task_name, []).append(v)
            curves.task_steps.setdefault(task_name, []).append(step)
        curves.losses.append(loss)
        if step % 20 == 0:
            bar.set_postfix({t: f"{np.mean(v[-100:]):.3f}" for t, v in sorted(curves.task_losses.items())})
        if checkpoints is not None and checkpoints.due(step + 1, spec.steps):
            checkpoints.save(
                {
                    "phase": "language",
                    "step": step + 1,
                    "model": adapter.model.state_dict(),
                    "gradients": _gradients(adapter.model),
                    "optimizer": optimizer.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "pool": pool,
                    "losses": curves.losses,
                    "task_losses": curves.task_losses,
                    "task_steps": curves.task_steps,
                    "warmup_losses": warmup_losses,
                }
            )
    return curves


def _every_50(values: list[float]) -> list[float]:
    """Means of consecutive windows of 50 values (the last window may be shorter)."""
    return [float(np.mean(values[i : i + 50])) for i in range(0, len(values), 50)]


def _windowed_by_step(steps: list[int], values: list[float], total: int, window: int = 50) -> list[float | None]:
    """Mean of ``values`` per window of ``window`` steps (by their ``steps``), None where a window has none."""
    sums, counts = np.zeros(-(-total // window)), np.zeros(-(-total // window))
    np.add.at(sums, np.asarray(steps, dtype=int) // window, values)
    np.add.at(counts, np.asarray(steps, dtype=int) // window, 1)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


def _training_summary(
    name: str, spec: DefaultModelSpec, model: torch.nn.Module, curves: TrainingCurves, warmup_losses: list[float]
) -> dict:
    """The ``training.json`` record: sizes, final loss (mean of the last 50 steps), loss curves in
    windows of 50 steps, final loss per task (last 200 rows), the spec. No wall-clock time: the
    record is part of a DVC output, and the same training must give the same bytes."""
    text = model.config.text_config
    return {
        "name": name,
        "family": spec.family,
        "parameters": count_parameters(model),
        "language_model": {
            "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "kv_heads": text.num_key_value_heads,
            "hidden": text.hidden_size,
            "ffn_width": text.intermediate_size,
            "vocab": text.vocab_size,
        },
        "steps": spec.steps,
        "final_loss": float(np.mean(curves.losses[-50:])),
        "loss_curve": _every_50(curves.losses),
        "vision_warmup_loss": _every_50(warmup_losses),
        "final_task_loss": {t: float(np.mean(v[-200:])) for t, v in sorted(curves.task_losses.items())},
        # Per task: the mean loss of its rows in each window of 50 steps (windows without one: null).
        "task_loss_curve": {
            t: _windowed_by_step(curves.task_steps[t], v, spec.steps) for t, v in sorted(curves.task_losses.items())
        },
        "spec": asdict(spec),
    }


def _save_trained(model: torch.nn.Module, processor, summary: dict, out_dir: Path) -> None:
    """``save_pretrained`` model and processor plus ``training.json`` into ``out_dir``, written
    under a temporary sibling name and renamed (``pipeline.io.atomic_directory``)."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2))


def _image_size(data: TrainSplit) -> int:
    """Side of the square train images (pixels); the processor and the vision tower are built for it."""
    first = data.train["image_id"].iloc[0]
    width, height = data.images[first].size
    if width != height:
        raise PipelineError(
            f"{data.images.path}: image {first!r} is {width}x{height}; the default model is built for square images"
        )
    return width


def train_default_model(
    spec: DefaultModelSpec,
    benchmark_dir: Path,
    out_dir: Path,
    *,
    name: str,
    device: str = "cpu",
    resume_key: str | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[str, int], None] | None = None,
) -> dict:
    """Train the default model ``name`` on the benchmark's train split and save it to ``out_dir``.

    Returns a summary (parameters, sizes, final loss, loss curves) that is also written to
    ``out_dir/training.json``. The folder is written under a temporary name and renamed.
    Steps: read the benchmark, build the untrained model for its image size, decode the train
    images, warm up the vision tower (``warm_up_vision``), freeze it, train the projector and
    language model, save. The seeds are set first and every random draw follows in that order,
    so a spec trains bitwise the same model on the same machine and thread count (the caller
    sets torch's threads).

    Resumable: with ``resume_key`` (what identifies this training: spec, data, code, threads),
    the state is saved every ``checkpoint_every`` steps into ``out_dir/.partial-<resume_key>/``
    and a run killed after a save resumes from it, to bitwise the weights of an uninterrupted
    run; anything else in ``out_dir`` is removed at the start (``pipeline.io.resumable_scratch``),
    and the scratch goes with the finished model's rename. ``on_checkpoint(phase, step)`` runs
    after each save.
    """
    from pipeline.model.adapter import ModelAdapter

    checkpoints = None
    if resume_key is not None:
        checkpoints = Checkpoints(resumable_scratch(out_dir, resume_key), checkpoint_every, on_checkpoint)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    data = _read_train_split(benchmark_dir)
    spec = replace(spec, image_size=_image_size(data))
    model, processor = _build_untrained(spec, data.annotations, device)
    adapter = ModelAdapter.from_model(model, processor)
    log.info("default model %s: %s parameters", name, f"{count_parameters(model)['total']:,}")
    decoded = _decode_images(data.images, data.train["image_id"])
    resume = checkpoints.load() if checkpoints is not None else None
    if resume is not None:
        _restore_model(model, resume)

    t0 = time.perf_counter()
    if resume is None or resume["phase"] == "warmup":
        warmup_losses = warm_up_vision(
            model,
            processor,
            decoded,
            image_word_targets(data.train, processor.tokenizer),
            steps=spec.vision_warmup_steps,
            batch_size=spec.batch_size * 2,
            lr=spec.lr,
            seed=spec.seed,
            checkpoints=checkpoints,
            resume=resume,
        )
        resume = None
    else:
        warmup_losses = list(resume["warmup_losses"])
    optimizer = _language_optimizer(model, spec)
    t_cache = time.perf_counter()
    cache = FrozenVisionCache(model, processor, decoded)
    log.info("frozen vision tower: outputs of %d images cached in %.1f s", len(decoded), time.perf_counter() - t_cache)
    with cache.installed():
        curves = _train_language_model(
            adapter,
            optimizer,
            spec,
            data.train,
            decoded,
            rng,
            name=name,
            checkpoints=checkpoints,
            resume=resume,
            warmup_losses=warmup_losses,
        )
    model.eval()
    model.to("cpu")

    summary = _training_summary(name, spec, model, curves, warmup_losses)
    _save_trained(model, processor, summary, out_dir)
    log.info("trained %s in %.0f s, final loss %.4f", name, time.perf_counter() - t0, summary["final_loss"])
    return summary
