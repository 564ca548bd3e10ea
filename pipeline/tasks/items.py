"""What an item is: the benchmark table's schema, reading it back, and what the model sees and answers.

Every producer (the synthetic generator ``pipeline.tasks.benchmark``, the COCO importer
``pipeline.tasks.coco_import``) writes these two tables, and every consumer reads them and
derives prompts and target answers through this module only.

Map of this module:
- ``TASKS``, ``SPLITS``, ``ANNOTATION_SCHEMA`` / ``ANNOTATION_COLUMNS``, ``IMAGE_SCHEMA``: the
  fixed vocabulary and Arrow schemas of ``annotations.parquet`` (one row per item) and
  ``images.parquet`` (one row per image, encoded bytes in the ``png`` column).
- ``BenchmarkError``: a malformed table, image or item; the message names the item or file.
- ``read_annotations`` / ``ImageTable``: read the two tables back, validated.
- ``PROMPTS``: the stored prompt wording of the ocr, caption and retrieval tasks (docs/method.md
  section 1 fixes the retrieval one; a vqa item's prompt is its question).
- ``candidate_prompt`` / ``item_prompt`` / ``item_prompts``: the prompt as the model sees it (a
  retrieval item's template filled with a candidate; by default its positive candidate).
- ``reference_answer`` / ``teacher_forced_answers``: the one answer an item is scored and trained
  against (its first reference; "Yes" for retrieval, on the positive candidate).
- ``sampled_reference``: one reference drawn at random (the default model's caption training).
- ``TrainingExample`` / ``RankingExample`` / ``training_examples`` / ``training_rows``:
  supervised examples of items: one per item, plus a (negative candidate, "No") example per
  retrieval item; or, with ``retrieval_negatives``, one ranking group per retrieval item.

An *item* below is one row of the annotation table as ``DataFrame.itertuples()`` yields it (a
``pd.Series`` row works too): fields item_id, image_id, split, task, question_type, prompt,
references, candidates, positive_index.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("vqa", "ocr", "caption", "retrieval")
# "ood": held out like "test", drawn under a shift that training never saw (the synthetic
# benchmark's out-of-distribution split, docs/default.md); nothing is trained or steered on it.
SPLITS: tuple[str, ...] = ("train", "discovery", "dev", "test", "ood")

ANNOTATION_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("references", pa.list_(pa.string()), nullable=False),
        pa.field("candidates", pa.list_(pa.string()), nullable=False),
        pa.field("positive_index", pa.int32(), nullable=False),
    ]
)
ANNOTATION_COLUMNS: tuple[str, ...] = tuple(ANNOTATION_SCHEMA.names)
IMAGE_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string(), nullable=False), pa.field("png", pa.binary(), nullable=False)]
)

# docs/method.md section 1 fixes the retrieval prompt; the others are short, model-agnostic
# instructions.
CANDIDATE_SLOT = "{candidate}"
PROMPTS: dict[str, str] = {
    "ocr": "What is the word written in the box?",
    "caption": "Describe the image in one sentence.",
    "retrieval": ("Candidate: {candidate} Does the candidate correctly describe the image? Answer exactly Yes or No."),
}
# The answers of a retrieval prompt: "Yes" on the positive candidate, "No" on a negative one.
RETRIEVAL_YES = "Yes"
RETRIEVAL_NO = "No"

CaptionReference = Literal["first", "sampled"]


class BenchmarkError(PipelineError):
    """A benchmark table, image or item is malformed; the message names the item or file."""


# --- the two tables ---------------------------------------------------------------------------


def read_annotations(
    path: Path, splits: tuple[str, ...] | None = None, tasks: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """Read and validate ``annotations.parquet``; optionally filter by split and task."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"annotation table not found: {path}")
    df = pq.read_table(path).to_pandas()
    missing = [c for c in ANNOTATION_COLUMNS if c not in df.columns]
    if missing:
        raise BenchmarkError(f"{path}: missing columns {missing}; expected {list(ANNOTATION_COLUMNS)}")
    bad_task = sorted(set(df["task"]) - set(TASKS))
    if bad_task:
        log.info("%s: tasks beyond the built-in four: %s", path, bad_task)
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise BenchmarkError(f"{path}: unknown splits {bad_split}; allowed: {list(SPLITS)}")
    if df["item_id"].duplicated().any():
        dup = df.loc[df["item_id"].duplicated(), "item_id"].iloc[0]
        raise BenchmarkError(f"{path}: duplicate item_id {dup!r}")
    if splits is not None:
        df = df[df["split"].isin(splits)]
    if tasks is not None:
        df = df[df["task"].isin(tasks)]
    for rec in df.itertuples():
        if len(rec.references) == 0 or any(not str(r).strip() for r in rec.references):
            raise BenchmarkError(f"{path}: item {rec.item_id!r} has an empty reference answer")
        if rec.task == "retrieval" and not (0 <= rec.positive_index < len(rec.candidates)):
            raise BenchmarkError(
                f"{path}: retrieval item {rec.item_id!r} has positive_index {rec.positive_index} "
                f"outside its {len(rec.candidates)} candidates"
            )
    return df.reset_index(drop=True)


class ImageTable:
    """Images by id from ``images.parquet``, decoded on demand.

    >>> images = ImageTable("data/benchmark/images.parquet")
    >>> img = images["test-000001"]          # PIL.Image in RGB
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise BenchmarkError(f"image table not found: {self.path}")
        t = pq.read_table(self.path)
        self._bytes = dict(zip(t.column("image_id").to_pylist(), t.column("png").to_pylist()))

    def __len__(self) -> int:
        return len(self._bytes)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._bytes

    def __getitem__(self, image_id: str) -> Image.Image:
        data = self._bytes.get(image_id)
        if data is None:
            raise BenchmarkError(f"image {image_id!r} is not in {self.path}")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as exc:  # PIL raises several unrelated types for corrupt data
            raise BenchmarkError(f"image {image_id!r} in {self.path} cannot be decoded: {exc}") from exc
        return img.convert("RGB")


# --- what the model sees ----------------------------------------------------------------------


def candidate_prompt(prompt: str, candidate: str) -> str:
    """A retrieval prompt template with its ``{candidate}`` slot filled."""
    return prompt.format(candidate=candidate)


def item_prompt(item: Any) -> str:
    """The prompt as the model sees it: the stored prompt; a retrieval item's template is shown
    its positive candidate."""
    if item.task == "retrieval":
        return candidate_prompt(item.prompt, item.candidates[item.positive_index])
    return item.prompt


def item_prompts(items: pd.DataFrame) -> list[str]:
    """``item_prompt`` of every row of ``items``, in order."""
    return [item_prompt(rec) for rec in items.itertuples()]


def likelihood_sequences_per_item(task_items: pd.DataFrame, task: str) -> float:
    """Mean sequences per item that the likelihood utility runs for ``task`` (its items, one
    task): retrieval every candidate, caption every reference, any other task 1. What jobs over
    tasks are weighed by, to hand out the heaviest first."""
    column = {"retrieval": "candidates", "caption": "references"}.get(task)
    return float(task_items[column].map(len).mean()) if column and len(task_items) else 1.0


# --- what the model answers -------------------------------------------------------------------


def _no_reference(item: Any) -> BenchmarkError:
    return BenchmarkError(f"item {item.item_id!r} ({item.task}) has an empty target: no reference answer")


def reference_answer(item: Any) -> str:
    """The one answer an item is scored and trained against (with ``item_prompt``).

    Retrieval: "Yes" (the prompt shows the positive candidate). Every other task: the first
    reference. Raises ``BenchmarkError`` naming the item when it has no reference.
    """
    if item.task == "retrieval":
        return RETRIEVAL_YES
    if len(item.references) == 0:
        raise _no_reference(item)
    return str(item.references[0])


def teacher_forced_answers(items: pd.DataFrame) -> list[str]:
    """``reference_answer`` of every row of ``items``: the answers whose mean log-probability is
    the teacher-forced utility."""
    return [reference_answer(rec) for rec in items.itertuples()]


def sampled_reference(item: Any, rng: np.random.Generator) -> str:
    """One of the item's references drawn uniformly with ``rng`` (one draw)."""
    if len(item.references) == 0:
        raise _no_reference(item)
    return str(rng.choice(item.references))


def sampled_negative(item: Any, rng: np.random.Generator) -> str:
    """A retrieval item's candidate other than the positive one, drawn uniformly with ``rng``."""
    cands = list(item.candidates)
    pos = int(item.positive_index)
    negatives = [k for k in range(len(cands)) if k != pos]
    if not negatives:
        raise BenchmarkError(f"retrieval item {item.item_id!r} has no negative candidate to train on")
    return cands[negatives[int(rng.integers(len(negatives)))]]


def sampled_negatives(item: Any, rng: np.random.Generator, k: int) -> list[str]:
    """``k`` of a retrieval item's candidates other than the positive one, drawn without
    replacement with ``rng`` (one draw); fewer when the item has fewer negatives."""
    cands = list(item.candidates)
    pos = int(item.positive_index)
    negatives = [cands[j] for j in range(len(cands)) if j != pos]
    if not negatives:
        raise BenchmarkError(f"retrieval item {item.item_id!r} has no negative candidate to train on")
    picked = rng.choice(len(negatives), size=min(k, len(negatives)), replace=False)
    return [negatives[int(j)] for j in picked]


class TrainingExample(NamedTuple):
    """One supervised (image, prompt, answer) example of an item."""

    task: str
    image_id: str
    prompt: str
    answer: str


class RankingExample(NamedTuple):
    """One retrieval item as a ranking group: its candidates' prompts on one image, the positive
    first (answered "Yes"), then the sampled negatives (answered "No")."""

    task: str
    image_id: str
    prompts: tuple[str, ...]

    @property
    def answers(self) -> tuple[str, ...]:
        return (RETRIEVAL_YES,) + (RETRIEVAL_NO,) * (len(self.prompts) - 1)


def training_examples(
    items: pd.DataFrame,
    rng: np.random.Generator,
    *,
    caption_reference: CaptionReference = "first",
    retrieval_negatives: int = 0,
) -> list[TrainingExample | RankingExample]:
    """The training examples of ``items``, in row order.

    Every task: (``item_prompt``, ``reference_answer``). A retrieval item adds a second example:
    a negative candidate (``sampled_negative``) answered "No"; with ``retrieval_negatives`` k > 0
    it is instead one ``RankingExample`` of its positive and k negatives (``sampled_negatives``).
    ``caption_reference="sampled"`` answers a caption with one of its references drawn at random
    (``sampled_reference``) instead of the first; the default model trains so, steering trains
    on the first. ``rng`` is drawn from once per retrieval item (and per caption when sampled),
    in row order.
    """
    if caption_reference not in ("first", "sampled"):
        raise PipelineError(f"caption_reference must be 'first' or 'sampled', got {caption_reference!r}")
    if retrieval_negatives < 0:
        raise PipelineError(f"retrieval_negatives must be >= 0, got {retrieval_negatives}")
    out: list[TrainingExample | RankingExample] = []
    for rec in items.itertuples():
        if rec.task == "caption" and caption_reference == "sampled":
            out.append(TrainingExample(rec.task, rec.image_id, rec.prompt, sampled_reference(rec, rng)))
        elif rec.task == "retrieval" and retrieval_negatives > 0:
            negatives = sampled_negatives(rec, rng, retrieval_negatives)
            prompts = (item_prompt(rec),) + tuple(candidate_prompt(rec.prompt, n) for n in negatives)
            out.append(RankingExample(rec.task, rec.image_id, prompts))
        elif rec.task == "retrieval":
            negative = sampled_negative(rec, rng)
            out.append(TrainingExample(rec.task, rec.image_id, item_prompt(rec), reference_answer(rec)))
            out.append(TrainingExample(rec.task, rec.image_id, candidate_prompt(rec.prompt, negative), RETRIEVAL_NO))
        else:
            out.append(TrainingExample(rec.task, rec.image_id, item_prompt(rec), reference_answer(rec)))
    return out


def training_rows(items: pd.DataFrame, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(image_ids, prompts, answers) of ``training_examples(items, default_rng(seed))``: the
    first reference of every item, and per retrieval item its positive candidate answered "Yes"
    and one negative candidate (drawn with ``seed``) answered "No"."""
    examples = training_examples(items, np.random.default_rng(seed))
    return [e.image_id for e in examples], [e.prompt for e in examples], [e.answer for e in examples]
