"""The default models' vision tower: locating it and its patch features, the warm-up that trains
it alone before the language phase (``warm_up_vision``, predicting each image's
``ImageTargets``), and ``FrozenVisionCache``, its outputs computed once per training image
while it is frozen."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.model.default.checkpoints import Checkpoints, _gradients, _restore_rng


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
