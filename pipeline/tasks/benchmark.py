"""The synthetic multi-task image benchmark (the embedded default) and its generator.

Map of this module:
- ``COLORS``, ``SHAPES``, ``POSITIONS``, ``WORDS``, ``VQA_QUESTIONS``: what scenes and questions
  are made of.
- ``Rendering``, ``IN_DISTRIBUTION``, ``OUT_OF_DISTRIBUTION``: how a split looks and is worded
  (the "ood" split: darker background, smaller shapes, blue word, reworded prompts).
- ``Scene`` / ``sample_scene`` / ``render_scene``: procedural scenes (1-3 coloured shapes in
  left/middle/right slots plus a short word in a box), seeded and deterministic.
- ``caption_references`` / ``hard_negative`` / ``retrieval_candidates`` / ``vqa_examples``: the
  text of each task for a scene.
- ``BenchmarkSpec`` / ``build_benchmark``: writes ``annotations.parquet`` (one row per example)
  and ``images.parquet`` (one row per image, PNG bytes) into a directory, atomically.

The table itself (schemas, task prompts, reading it back) lives in ``pipeline.tasks.items``;
the COCO importer writes the same table.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.io import atomic_directory
from pipeline.tasks.items import ANNOTATION_SCHEMA, IMAGE_SCHEMA, PROMPTS, SPLITS, BenchmarkError

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 200, 25),
    "purple": (145, 60, 185),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
WORDS: tuple[str, ...] = (
    "cat",
    "dog",
    "sun",
    "map",
    "key",
    "box",
    "cup",
    "hat",
    "pen",
    "car",
    "bus",
    "egg",
    "fox",
    "ice",
    "jam",
    "kit",
    "log",
    "net",
    "owl",
    "pig",
    "rug",
    "tea",
    "van",
    "web",
    "yak",
    "zip",
    "bird",
    "fish",
    "lamp",
    "moon",
    "star",
    "tree",
    "ship",
    "rain",
    "snow",
    "wind",
    "rock",
    "leaf",
    "milk",
    "corn",
    "book",
    "door",
    "frog",
    "gold",
    "king",
    "lion",
    "nest",
    "park",
    "ring",
    "salt",
    "apple",
    "bread",
    "chair",
    "cloud",
    "grape",
    "horse",
    "lemon",
    "mouse",
    "piano",
    "river",
    "stone",
    "table",
    "tiger",
    "water",
    "zebra",
    "queen",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")

VQA_QUESTIONS: dict[str, str] = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many shapes are there?",
    "position": "Where is the {color} {shape}?",
}


@dataclass(frozen=True)
class Rendering:
    """How a split draws its scenes and words its prompts.

    background: grey level of the background (jittered by +-18 per channel); object_scale: a
    shape's radius as a share of its slot's width (plus up to 0.08); font_scale: the word's
    height as a share of the image; text_color: the word's RGB colour; questions / prompts: the
    VQA question templates and the other tasks' prompts.
    """

    background: int
    object_scale: float
    font_scale: float
    text_color: tuple[int, int, int]
    questions: dict[str, str]
    prompts: dict[str, str]


IN_DISTRIBUTION = Rendering(
    background=200,
    object_scale=0.30,
    font_scale=0.19,
    text_color=(0, 0, 0),
    questions=VQA_QUESTIONS,
    prompts=PROMPTS,
)
# The "ood" split: a darker background, smaller shapes, the word in blue, and every prompt
# reworded. Together they cost the default models part of their utility on every task, not all
# of it (a smaller font in place of the colour took tiny-idefics3's OCR to chance). Prompts use
# only words of the in-distribution vocabulary, so that a word-level tokenizer built on the
# benchmark is the same with or without this split and no word is unknown to it.
OUT_OF_DISTRIBUTION = Rendering(
    background=160,
    object_scale=0.24,
    font_scale=0.19,
    text_color=(40, 40, 160),
    questions={
        "color": "What is the color of the {shape}?",
        "shape": "What is the shape of the {color} object?",
        "count": "How many shapes are in the image?",
        "position": "Where in the image is the {color} {shape}?",
    },
    prompts={
        "ocr": "What word is written in the box?",
        "caption": "Describe the picture in one sentence.",
        "retrieval": "Candidate: {candidate} Does the candidate correctly describe the picture? Answer Yes or No.",
    },
)
RENDERINGS: dict[str, Rendering] = {"ood": OUT_OF_DISTRIBUTION}


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One image's content: objects ordered left to right, and the word in the box."""

    objects: tuple[SceneObject, ...]
    word: str


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw 1-3 objects with distinct colours in distinct slots, and one word."""
    n = int(rng.integers(1, 4))
    slots = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    colors = rng.choice(list(COLORS), size=n, replace=False).tolist()
    shapes = rng.choice(SHAPES, size=n, replace=True).tolist()
    objects = tuple(SceneObject(color=c, shape=s, position=POSITIONS[p]) for c, s, p in zip(colors, shapes, slots))
    return Scene(objects=objects, word=str(rng.choice(WORDS)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise BenchmarkError(f"unknown shape {shape!r}; allowed: {SHAPES}")


_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def render_scene(
    scene: Scene, image_size: int, rng: np.random.Generator, rendering: Rendering = IN_DISTRIBUTION
) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels.

    The upper ~65% holds the shapes in three slots, the lower part a white box with the
    word in black. ``rng`` adds small jitter (background tint, shape size and offset) so
    that no two images with the same scene are pixel-identical.
    """
    s = image_size
    bg = tuple(int(v) for v in rendering.background + rng.integers(-18, 18, size=3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    shape_h = 0.64 * s
    slot_w = s / 3
    for obj in scene.objects:
        slot = POSITIONS.index(obj.position)
        r = slot_w * (rendering.object_scale + 0.08 * rng.random())
        cx = slot_w * (slot + 0.5) + rng.uniform(-0.08, 0.08) * slot_w
        cy = shape_h * 0.5 + rng.uniform(-0.12, 0.12) * shape_h
        _draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color])
    top = int(0.68 * s)
    draw.rectangle((2, top, s - 3, s - 3), fill=(255, 255, 255), outline=(0, 0, 0))
    font = _font(max(8, int(round(s * rendering.font_scale))))
    left, t, right, b = draw.textbbox((0, 0), scene.word, font=font)
    tx = (s - (right - left)) / 2 - left + rng.uniform(-1.5, 1.5)
    ty = top + (s - 3 - top - (b - t)) / 2 - t
    draw.text((tx, ty), scene.word, fill=rendering.text_color, font=font)
    return img


# --- text for each task -------------------------------------------------------------------


def _object_phrase(o: SceneObject) -> str:
    article = "an" if o.color[0] in "aeiou" else "a"
    return f"{article} {o.color} {o.shape}"


def _where(o: SceneObject) -> str:
    return "in the middle" if o.position == "middle" else f"on the {o.position}"


def caption_references(scene: Scene) -> list[str]:
    """Five reference captions with varied wording; the first is the canonical one."""
    objs = scene.objects
    n = len(objs)
    at = " and ".join(f"{_object_phrase(o)} {_where(o)}" for o in objs)
    plain = " and ".join(_object_phrase(o) for o in objs)
    shapes_word = "shape" if n == 1 else "shapes"
    return [
        f"{at} .",
        f"there is {at} .",
        f"an image of {plain} .",
        f"{NUMBER_WORDS[n]} {shapes_word} : {at} .",
        f"a picture with {at} above a word in a box .",
    ]


def canonical_caption(scene: Scene) -> str:
    return caption_references(scene)[0]


def hard_negative(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that differs from ``scene`` in exactly one attribute (colour, shape, slot, count)."""
    objs = list(scene.objects)
    kinds = ["color", "shape", "position", "count"]
    kind = str(rng.choice(kinds))
    i = int(rng.integers(len(objs)))
    if kind == "color":
        used = {o.color for o in objs}
        new = str(rng.choice([c for c in COLORS if c not in used]))
        objs[i] = SceneObject(new, objs[i].shape, objs[i].position)
    elif kind == "shape":
        new = str(rng.choice([s for s in SHAPES if s != objs[i].shape]))
        objs[i] = SceneObject(objs[i].color, new, objs[i].position)
    elif kind == "position":
        free = [p for p in POSITIONS if p not in {o.position for o in objs}]
        if free:
            objs[i] = SceneObject(objs[i].color, objs[i].shape, str(rng.choice(free)))
        else:  # all slots used: swap two objects' attributes instead
            j = (i + 1) % len(objs)
            objs[i], objs[j] = (
                SceneObject(objs[j].color, objs[j].shape, objs[i].position),
                SceneObject(objs[i].color, objs[i].shape, objs[j].position),
            )
    else:
        if len(objs) > 1 and (len(objs) == 3 or rng.random() < 0.5):
            objs.pop(i)
        else:
            free = [p for p in POSITIONS if p not in {o.position for o in objs}]
            used = {o.color for o in objs}
            objs.append(
                SceneObject(
                    str(rng.choice([c for c in COLORS if c not in used])),
                    str(rng.choice(SHAPES)),
                    str(rng.choice(free)),
                )
            )
    objs.sort(key=lambda o: POSITIONS.index(o.position))
    return Scene(objects=tuple(objs), word=scene.word)


def retrieval_candidates(
    scene: Scene, rng: np.random.Generator, n_negatives: int, n_hard: int
) -> tuple[list[str], int]:
    """1 positive + ``n_negatives`` distinct negative captions; returns (candidates, positive index)."""
    positive = canonical_caption(scene)
    negatives: list[str] = []
    seen = {positive}
    tries = 0
    while len(negatives) < n_negatives:
        tries += 1
        if tries > 1000:
            raise BenchmarkError(f"could not draw {n_negatives} distinct negatives for scene {scene}")
        other = hard_negative(scene, rng) if len(negatives) < n_hard else sample_scene(rng)
        cap = canonical_caption(other)
        if cap not in seen:
            seen.add(cap)
            negatives.append(cap)
    pos = int(rng.integers(n_negatives + 1))
    candidates = negatives[:pos] + [positive] + negatives[pos:]
    return candidates, pos


def vqa_examples(scene: Scene, questions: dict[str, str] = VQA_QUESTIONS) -> list[tuple[str, str, str]]:
    """All well-posed (question type, question, answer) triples for ``scene``, worded by
    ``questions`` (templates per question type)."""
    out: list[tuple[str, str, str]] = [("count", questions["count"], str(len(scene.objects)))]
    shape_counts: dict[str, int] = {}
    for o in scene.objects:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
    for o in scene.objects:
        if shape_counts[o.shape] == 1:
            out.append(("color", questions["color"].format(shape=o.shape), o.color))
        out.append(("shape", questions["shape"].format(color=o.color), o.shape))
        out.append(("position", questions["position"].format(color=o.color, shape=o.shape), o.position))
    return out


# --- building the table ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkSpec:
    """Sizes (in images) per split and rendering options of the synthetic benchmark."""

    seed: int
    image_size: int
    n_images: dict[str, int]
    vqa_per_image: dict[str, int]
    retrieval_negatives: int
    retrieval_hard_negatives: int


def build_benchmark(spec: BenchmarkSpec, out_dir: Path) -> pd.DataFrame:
    """Render the benchmark into ``out_dir`` (annotations.parquet, images.parquet).

    Each split draws from its own seeded stream, so images are disjoint across splits and a
    split's content does not change when another split's size does. Returns the annotations.
    Written with ``pipeline.io.atomic_directory``, so a crash leaves no partial output.
    """
    out_dir = Path(out_dir)
    rows: list[dict] = []
    images: list[dict] = []
    from tqdm import tqdm

    for split_index, split in enumerate(SPLITS):
        n = spec.n_images.get(split, 0)
        split_rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split_index]))
        n_vqa = spec.vqa_per_image.get(split, 1)
        rendering = RENDERINGS.get(split, IN_DISTRIBUTION)
        for k in tqdm(range(n), desc=f"benchmark {split}", leave=False):
            image_id = f"{split}-{k:06d}"
            scene = sample_scene(split_rng)
            img = render_scene(scene, spec.image_size, split_rng, rendering)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images.append({"image_id": image_id, "png": buf.getvalue()})

            def row(task: str, qtype: str, prompt: str, refs: list[str], cands=(), pos=-1, j=0) -> dict:
                return {
                    "item_id": f"{image_id}-{task}-{j}",
                    "image_id": image_id,
                    "split": split,
                    "task": task,
                    "question_type": qtype,
                    "prompt": prompt,
                    "references": list(refs),
                    "candidates": list(cands),
                    "positive_index": int(pos),
                }

            qs = vqa_examples(scene, rendering.questions)
            # Balance question types: pick types round-robin from the image index, then a question.
            for j in range(min(n_vqa, len(qs))):
                types = sorted({q[0] for q in qs})
                qtype = types[(k + j) % len(types)]
                pool = [q for q in qs if q[0] == qtype]
                q = pool[int(split_rng.integers(len(pool)))]
                qs.remove(q)
                rows.append(row("vqa", q[0], q[1], [q[2]], j=j))
            rows.append(row("ocr", "", rendering.prompts["ocr"], [scene.word]))
            rows.append(row("caption", "", rendering.prompts["caption"], caption_references(scene)))
            cands, pos = retrieval_candidates(scene, split_rng, spec.retrieval_negatives, spec.retrieval_hard_negatives)
            rows.append(row("retrieval", "", rendering.prompts["retrieval"], [cands[pos]], cands, pos))
    table = pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA)
    with atomic_directory(out_dir) as tmp:
        pq.write_table(table, tmp / "annotations.parquet")
        pq.write_table(pa.Table.from_pylist(images, schema=IMAGE_SCHEMA), tmp / "images.parquet", row_group_size=512)
    log.info("benchmark: %d images, %d examples -> %s", len(images), len(rows), out_dir)
    return table.to_pandas()
