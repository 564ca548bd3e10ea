"""Import the published HONES data (the authors' unified COCO JSON) into the benchmark table.

A lab that has the paper's data runs the paper's setting by pointing ``benchmark.hones_coco``
(params) at its JSON and image folder; the result is the same two Parquet files the
synthetic benchmark writes (``annotations.parquet`` with ``ANNOTATION_SCHEMA``,
``images.parquet`` with ``IMAGE_SCHEMA``), so every later stage reads it unchanged.

Map of this module:
- ``load_items``: parse and validate the JSON into ``CocoItem`` records (one per image; several
  records of one image file add their questions to it, ``_merged``). A
  missing task block skips that task for the image (counted, logged at INFO); a present but
  malformed field, a text longer than ``MAX_TEXT_CHARS``, or a key that looks like a misspelt
  task block (``caption``, ``VQA``) raises ``BenchmarkError`` naming ``data[i]``, the file name
  and the field (``_parse_item``: ``_parse_file_name``, ``_parse_vqa``, ``_parse_ocr``,
  ``_parse_captions``).
- ``CocoSizeError``: split sizes or negatives the data cannot supply; names the arguments.
- ``assign_splits``: seeded, image-disjoint train/discovery/dev/test assignment of one file;
  ``load_split_files`` / ``first_of_each_split``: the authors' split files used as given.
- ``caption_words`` / ``rank_hard_negatives``: word-overlap (Jaccard) hard negatives for
  retrieval via an inverted index, ties broken by a seeded RNG; no caption of the positive's
  own image is ever a negative.
- ``annotation_rows``: the annotation rows of all splits (``_split_rows``, ``_image_rows``).
- ``import_hones_coco``: the whole import, written atomically (temporary sibling directory,
  renamed when complete; removed on any error).

Input format (top level ``{"data": [item, ...]}``), per item::

    {"image_info": {"file_name": "COCO_val2014_000000000042.jpg", ...},
     "vqa": {"question": "...", "answer": "...", "all_answers": ["...", ...]},   # answer: the majority
     "ocr": {"text": "...", "bbox": [x, y, w, h]},
     "captions": [{"caption": "..."}, ...]}

A vqa item's references are ``all_answers`` (every annotator's answer, for the VQA accuracy) with
the majority ``answer`` first: the first reference is the target that head scoring, the dump and
training use, and the authors' code targets the majority answer, not one annotator's.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io import atomic_directory
from pipeline.tasks.items import ANNOTATION_SCHEMA, IMAGE_SCHEMA, PROMPTS, SPLITS, TASKS, BenchmarkError

log = logging.getLogger(__name__)

MAX_CAPTION_REFERENCES = 5
# Longer than any question, answer, caption or scene text of the paper's data by far: a longer
# field is a broken record (a file pasted into a field), not a text a model should be fed.
MAX_TEXT_CHARS = 1000
_FIELDS = ("image_info", "vqa", "ocr", "captions")
_TASK_BLOCKS = ("vqa", "ocr", "captions")
# Keys that are a task block under another spelling (``caption``, ``VQA``): refused, since the
# task would silently go missing. Other unknown keys (ids, metadata) are ignored.
_TASK_SPELLINGS = {"vqa", "ocr", "caption", "captions", "retrieval"}
_IMAGE_BATCH = 256  # images per Parquet write: bounds memory for 12K full-size COCO images
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class CocoItem:
    """One image of the input and its validated task fields (``None``: task absent)."""

    index: int  # position in the JSON's ``data`` list (of the image's first record)
    file_name: str  # relative to the image root
    image_id: str  # file name stem
    # (question, reference answers) of each question about the image, in input order (several
    # records of one image each add theirs); empty: no VQA item.
    questions: tuple[tuple[str, list[str]], ...]
    ocr: str | None  # the text in the image
    captions: list[str] | None  # all captions, stripped, non-empty
    source: Path | None = None  # the JSON file of the record (errors name it with ``index``)


class CocoSizeError(BenchmarkError):
    """The data cannot supply the split sizes or negatives asked for; ``arguments`` names the
    arguments of ``import_hones_coco`` to change."""

    def __init__(self, message: str, arguments: tuple[str, ...]):
        super().__init__(message)
        self.arguments = arguments


def _err(json_path: Path, index: int, file_name: object, field: str, problem: str) -> BenchmarkError:
    return BenchmarkError(f"{json_path}: data[{index}] (file_name {file_name!r}): field {field!r} {problem}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_file_name(json_path: Path, index: int, raw: object) -> str:
    """``image_info.file_name`` of one element of ``data``: a non-empty path relative to the image root."""
    if not isinstance(raw, dict):
        raise _err(json_path, index, None, "", f"must be an object, got {type(raw).__name__}")
    info = raw.get("image_info")
    if not isinstance(info, dict):
        raise _err(json_path, index, None, "image_info", f"must be an object, got {type(info).__name__}")
    fn = info.get("file_name")
    if not isinstance(fn, str) or not fn.strip():
        raise _err(json_path, index, fn, "image_info.file_name", "must be a non-empty string")
    if Path(fn).is_absolute() or ".." in Path(fn).parts:
        raise _err(json_path, index, fn, "image_info.file_name", "must be relative to the image root")
    return fn


# ``bad(field, problem)``: the BenchmarkError naming the item being parsed, the field and the problem.
_Bad = Callable[[str, str], BenchmarkError]


def _check_length(text: str, field: str, bad: _Bad) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise bad(field, f"is {len(text):,} characters long (at most {MAX_TEXT_CHARS:,}): a broken record")
    return text


def _parse_vqa(block: object, bad: _Bad) -> tuple[str, list[str]] | None:
    """(question, reference answers) of a ``vqa`` block; None when the block is absent.

    A present block needs a question and at least one answer: the references are
    ``all_answers`` (stripped) with the majority ``answer`` moved first (prepended when no
    annotator's answer equals it), else ``[answer]``.
    """
    if block is None:
        return None
    if not isinstance(block, dict):
        raise bad("vqa", f"must be an object, got {type(block).__name__}")
    q = block.get("question")
    if not isinstance(q, str) or not q.strip():
        raise bad("vqa.question", f"must be a non-empty string, got {q!r}")
    answer = block.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise bad("vqa.answer", f"must be a string, got {type(answer).__name__}")
    all_answers = block.get("all_answers")
    if all_answers is None:
        all_answers = []
    if not isinstance(all_answers, list):
        raise bad("vqa.all_answers", f"must be a list of strings, got {type(all_answers).__name__}")
    for j, a in enumerate(all_answers):
        if not isinstance(a, str) or not a.strip():
            raise bad(f"vqa.all_answers[{j}]", f"must be a non-empty string, got {a!r}")
    _check_length(q, "vqa.question", bad)
    refs = [_check_length(a.strip(), f"vqa.all_answers[{j}]", bad) for j, a in enumerate(all_answers)]
    majority = _check_length(answer.strip(), "vqa.answer", bad) if answer is not None else ""
    if not refs and not majority:
        raise bad("vqa.answer", "is empty and vqa.all_answers is empty: no reference answer")
    if majority:
        if majority in refs:
            refs.remove(majority)  # one occurrence: the annotators' counts stay as they were
        refs.insert(0, majority)
    return q.strip(), refs


def _parse_ocr(block: object, bad: _Bad) -> str | None:
    """The stripped text of an ``ocr`` block; None when the block is absent or its text is
    missing or empty (the image has no text). A present ``bbox`` must be 4 finite numbers or empty."""
    if block is not None and not isinstance(block, dict):
        raise bad("ocr", f"must be an object, got {type(block).__name__}")
    if block is None:
        return None
    bbox = block.get("bbox")
    if bbox is not None and not (
        isinstance(bbox, list) and (len(bbox) == 0 or (len(bbox) == 4 and all(_is_number(v) for v in bbox)))
    ):
        raise bad("ocr.bbox", f"must be a list of 4 numbers (or empty), got {bbox!r}")
    text = block.get("text")
    if text is not None and not isinstance(text, str):
        raise bad("ocr.text", f"must be a string, got {type(text).__name__}")
    if text is not None and text.strip():
        return _check_length(text.strip(), "ocr.text", bad)
    return None


def _parse_captions(block: object, bad: _Bad) -> list[str] | None:
    """Every caption of a ``captions`` list, stripped and non-empty; None when the list is
    absent or empty (no caption and no retrieval row)."""
    if block is not None and not isinstance(block, list):
        raise bad("captions", f"must be a list, got {type(block).__name__}")
    if not block:
        return None
    captions = []
    for j, c in enumerate(block):
        text = c.get("caption") if isinstance(c, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise bad(f"captions[{j}].caption", f"must be a non-empty string, got {c!r}")
        captions.append(_check_length(text.strip(), f"captions[{j}].caption", bad))
    return captions


def _parse_item(json_path: Path, index: int, raw: object) -> CocoItem:
    """Validate one element of ``data`` into its item."""
    fn = _parse_file_name(json_path, index, raw)

    def bad(field: str, problem: str) -> BenchmarkError:
        return _err(json_path, index, fn, field, problem)

    for key in raw:
        if key in _FIELDS or not isinstance(key, str):
            continue
        near = difflib.get_close_matches(key.lower(), _TASK_BLOCKS, n=1, cutoff=0.8)
        if key.lower() in _TASK_SPELLINGS or near:
            guess = near[0] if near else {"caption": "captions", "retrieval": "captions"}.get(key.lower(), key.lower())
            raise bad(
                key,
                f"is not a field of the format: did you mean {guess!r}? (fields: {', '.join(_FIELDS)}; "
                "a misspelt task block would drop the task)",
            )
    vqa = _parse_vqa(raw.get("vqa"), bad)
    ocr = _parse_ocr(raw.get("ocr"), bad)
    captions = _parse_captions(raw.get("captions"), bad)
    return CocoItem(index, fn, Path(fn).stem, (vqa,) if vqa is not None else (), ocr, captions, json_path)


def _merged(json_path: Path, first: CocoItem, again: CocoItem) -> CocoItem:
    """The image of ``first`` with the question of ``again``, a later record of the same file
    (several questions about one image, as VQA and TextVQA ask them). Its OCR text and
    captions must be absent or those of the first record; a question asked twice is refused."""
    where = f"{json_path}: data[{first.index}] and data[{again.index}] (file_name {first.file_name!r})"
    for name in ("ocr", "captions"):
        mine, theirs = getattr(first, name), getattr(again, name)
        if theirs is not None and mine is not None and theirs != mine:
            raise BenchmarkError(f"{where}: the same image with different {name}; one image has one {name}")
    for question, _ in again.questions:
        if question in {q for q, _ in first.questions}:
            raise BenchmarkError(f"{where}: the question {question!r} is asked twice about the image")
    return CocoItem(
        first.index,
        first.file_name,
        first.image_id,
        first.questions + again.questions,
        first.ocr if first.ocr is not None else again.ocr,
        first.captions if first.captions is not None else again.captions,
        first.source,
    )


def load_items(json_path: Path, max_images: int | None = None) -> list[CocoItem]:
    """Parse and validate the unified JSON into one ``CocoItem`` per image, in the order of
    each image's first record; the first ``max_images`` images if given. Records of the same
    image file add their questions to it (``_merged``).

    Raises ``BenchmarkError`` for an unreadable file, a malformed item (naming ``data[i]``, its
    file name and the field) or two image files with the same image id (file name stem).
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise BenchmarkError(f"HONES COCO JSON not found: {json_path}")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{json_path}: not valid JSON: {exc}") from exc
    except RecursionError:
        raise BenchmarkError(f"{json_path}: nested too deeply to parse (not the HONES format)") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise BenchmarkError(f"{json_path}: top level must be an object with a list under 'data'")
    if not data:
        raise BenchmarkError(f"{json_path}: 'data' holds no items")
    items: list[CocoItem] = []
    position: dict[str, int] = {}  # image id -> its place in items
    for i, raw in enumerate(data):
        item = _parse_item(json_path, i, raw)
        if item.image_id in position:
            k = position[item.image_id]
            if items[k].file_name != item.file_name:
                raise BenchmarkError(
                    f"{json_path}: data[{items[k].index}] ({items[k].file_name!r}) and data[{i}] "
                    f"({item.file_name!r}) have the same image id {item.image_id!r} (file name stem); "
                    "image ids must be unique"
                )
            items[k] = _merged(json_path, items[k], item)
            continue
        if max_images is not None and len(items) == max_images:
            continue  # later records may still add questions to the images kept
        position[item.image_id] = len(items)
        items.append(item)
    lacking = {
        "vqa": sum(not it.questions for it in items),
        "ocr": sum(it.ocr is None for it in items),
        "caption": sum(it.captions is None for it in items),
    }
    lacking["retrieval"] = lacking["caption"]
    for t in TASKS:
        log.info("coco import: %d of %d images lack the %s task (no row emitted)", lacking[t], len(items), t)
    questions, asked = sum(len(it.questions) for it in items), len(items) - lacking["vqa"]
    if questions > asked:
        log.info("coco import: %d questions about %d images", questions, asked)
    return items


def load_split_files(folder: Path, max_images: int | None = None) -> tuple[list[CocoItem], np.ndarray]:
    """The authors' split files as given: ``<split>.json`` in ``folder`` for each split of
    ``SPLITS`` that has one (their data: ``discovery.json``, ``dev.json``, ``test.json``), each
    read by ``load_items``. Returns the items of every file, in split order, and the split of
    each. An image in two files is refused, naming both; a folder without any is named."""
    folder = Path(folder)
    items: list[CocoItem] = []
    splits: list[str] = []
    seen: dict[str, str] = {}
    files = [(split, folder / f"{split}.json") for split in SPLITS if (folder / f"{split}.json").is_file()]
    if not files:
        raise BenchmarkError(f"{folder}: no split file; expected any of {[f'{s}.json' for s in SPLITS]}")
    for split, path in files:
        if path.is_symlink():
            raise BenchmarkError(f"coco import: the split file {path} is a symbolic link: {_SYMLINK_WHY}")
        for it in load_items(path, max_images):
            if it.image_id in seen:
                raise BenchmarkError(
                    f"{path}: data[{it.index}] (file_name {it.file_name!r}) is also in {seen[it.image_id]}: "
                    "the splits must not share an image"
                )
            seen[it.image_id] = str(path)
            items.append(it)
            splits.append(split)
    return items, np.array(splits, dtype=object)


def first_of_each_split(splits: np.ndarray, limits: dict[str, int]) -> np.ndarray:
    """Indices of the images kept when split ``s`` keeps at most its first ``limits[s]`` (a split
    not in ``limits`` keeps all); a limit above what the file holds keeps all, and says so."""
    keep: list[int] = []
    for split in SPLITS:
        members = np.flatnonzero(splits == split)
        limit = limits.get(split, len(members))
        if limit > len(members) and len(members):
            log.info("coco import: %s keeps all %d images of its file (asked for up to %d)", split, len(members), limit)
        keep.extend(members[:limit].tolist())
    return np.array(sorted(keep), dtype=int)


def assign_splits(n_images: int, *, seed: int, n_discovery: int, n_dev: int, n_test: int) -> np.ndarray:
    """Split name per image (shape ``(n_images,)``, dtype object), image-disjoint by construction.

    A seeded permutation of the images gives the first ``n_test`` to test, the next ``n_dev``
    to dev, the next ``n_discovery`` to discovery and the rest to train.
    """
    sizes = {"test": n_test, "dev": n_dev, "discovery": n_discovery}
    names = ("n_discovery", "n_dev", "n_test")
    if any(v < 0 for v in sizes.values()):
        raise CocoSizeError(f"coco import: split sizes must be >= 0, got {sizes}", names)
    if sum(sizes.values()) > n_images:
        raise CocoSizeError(
            f"coco import: split sizes {sizes} (total {sum(sizes.values())}) exceed the {n_images} images", names
        )
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(n_images)
    out = np.full(n_images, "train", dtype=object)
    start = 0
    for name, size in sizes.items():
        out[perm[start : start + size]] = name
        start += size
    return out


def caption_words(text: str) -> tuple[str, ...]:
    """Lower-cased word tokens (``\\w+``) of a caption; punctuation dropped."""
    return tuple(_WORD.findall(text.lower()))


def rank_hard_negatives(
    positives: list[str], n_negatives: int, rng: np.random.Generator, excluded: Sequence[Sequence[str]] | None = None
) -> list[list[str]]:
    """For each caption, the ``n_negatives`` most word-overlapping OTHER captions of the list.

    ``positives``: one caption per image of a split (length N). Overlap is the Jaccard index of
    lower-cased word sets, highest first; ties (including zero overlap, the fallback to random
    captions) are broken by ``rng``. Captions with the same word sequence as the positive (the
    image's own, or a duplicate) are never negatives, and negatives are distinct texts: the
    candidate pool is the U <= N distinct captions of the split. ``excluded[i]`` (optional) are
    further texts that caption ``i`` must not get as a negative (its image's other captions:
    COCO repeats captions across images, so another image's positive can be one of them).

    Complexity: an inverted index word -> distinct captions; per query, ``np.bincount`` over the
    postings of its words gives the intersection sizes, then an O(U) partition selects the top
    ``n_negatives`` (plus ties). Total O(sum of posting lengths touched + N * U) time, vectorised
    (about a second for a 7000-image split), and O(total words + U) memory; no U x U matrix.
    Returns a list (length N) of lists of ``n_negatives`` caption strings. Raises
    ``CocoSizeError`` when fewer than ``n_negatives`` distinct other captions exist (for any
    caption, after its exclusions).
    """
    keys = [caption_words(p) for p in positives]
    uid: dict[tuple[str, ...], int] = {}
    texts: list[str] = []
    for key, text in zip(keys, positives):
        if key not in uid:
            uid[key] = len(texts)
            texts.append(text)
    n_unique = len(texts)
    if n_unique - 1 < n_negatives and positives:
        raise CocoSizeError(
            f"retrieval needs {n_negatives} negatives per image but the split has only {n_unique} "
            f"distinct captions; lower n_negatives or enlarge the split",
            ("n_negatives",),
        )
    vocab: dict[str, int] = {}
    word_ids: list[np.ndarray] = []
    for key in uid:  # dict order = first occurrence = text index
        word_ids.append(np.array(sorted({vocab.setdefault(w, len(vocab)) for w in key}), dtype=np.int64))
    sizes = np.array([len(w) for w in word_ids], dtype=np.float64)
    postings: list[list[int]] = [[] for _ in vocab]
    for u, ws in enumerate(word_ids):
        for w in ws:
            postings[w].append(u)
    postings_np = [np.array(p, dtype=np.int64) for p in postings]

    out: list[list[str]] = []
    for i, key in enumerate(keys):
        u = uid[key]
        ws = word_ids[u]
        if len(ws):
            inter = np.bincount(np.concatenate([postings_np[w] for w in ws]), minlength=n_unique).astype(np.float64)
        else:
            inter = np.zeros(n_unique)
        union = sizes[u] + sizes - inter
        jac = np.divide(inter, union, out=np.zeros(n_unique), where=union > 0)
        jac[u] = -np.inf  # the positive itself (and any caption with the same words)
        for text in excluded[i] if excluded is not None else ():
            jac[uid.get(caption_words(text), u)] = -np.inf
        if np.count_nonzero(jac > -np.inf) < n_negatives:
            raise CocoSizeError(
                f"caption {positives[i]!r} has only {np.count_nonzero(jac > -np.inf)} distinct captions left as "
                f"negatives once its image's own captions are excluded, fewer than {n_negatives}; lower "
                "n_negatives or enlarge the split",
                ("n_negatives",),
            )
        kth = np.partition(jac, n_unique - n_negatives)[n_unique - n_negatives]
        sel = np.flatnonzero(jac >= kth)  # top n_negatives plus everything tied with the last
        order = np.lexsort((rng.random(sel.size), -jac[sel]))
        out.append([texts[v] for v in sel[order[:n_negatives]]])
    return out


def _read_image(json_path: Path, image_root: Path, item: CocoItem) -> bytes:
    """The file's bytes as they are, after checking PIL decodes them fully."""
    json_path = item.source or json_path
    path = image_root / item.file_name
    if not path.is_file():
        raise _err(json_path, item.index, item.file_name, "image_info.file_name", f"image file not found: {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # PIL raises several unrelated types for corrupt data; re-raised below
        raise _err(
            json_path, item.index, item.file_name, "image_info.file_name", f"image {path} cannot be decoded: {exc}"
        ) from exc
    return data


def _annotation_row(
    it: CocoItem,
    split: str,
    task: str,
    prompt: str,
    refs: list[str],
    cands: Sequence[str] = (),
    pos: int = -1,
    number: int = 0,
) -> dict:
    """One ``ANNOTATION_SCHEMA`` row of image ``it`` (item id ``<image_id>-<task>-<number>``: the
    number-th question of a VQA image, 0 for every other task)."""
    return {
        "item_id": f"{it.image_id}-{task}-{number}",
        "image_id": it.image_id,
        "split": split,
        "task": task,
        "question_type": "",
        "prompt": prompt,
        "references": list(refs),
        "candidates": list(cands),
        "positive_index": int(pos),
    }


def _image_rows(
    it: CocoItem, split: str, negatives: list[str] | None, n_negatives: int, rng: np.random.Generator
) -> list[dict]:
    """The rows of one image, in task order vqa, ocr, caption, retrieval (each only if present).

    Retrieval: candidates are ``negatives`` with the first caption inserted at a position
    drawn from ``rng`` (uniform over the ``n_negatives + 1`` places).
    """
    rows = [
        _annotation_row(it, split, "vqa", question, refs, number=k) for k, (question, refs) in enumerate(it.questions)
    ]
    if it.ocr is not None:
        rows.append(_annotation_row(it, split, "ocr", PROMPTS["ocr"], [it.ocr]))
    if it.captions:
        rows.append(_annotation_row(it, split, "caption", PROMPTS["caption"], it.captions[:MAX_CAPTION_REFERENCES]))
        pos = int(rng.integers(n_negatives + 1))
        cands = negatives[:pos] + [it.captions[0]] + negatives[pos:]
        rows.append(_annotation_row(it, split, "retrieval", PROMPTS["retrieval"], [it.captions[0]], cands, pos))
    return rows


def _split_rows(members: list[CocoItem], split: str, n_negatives: int, rng: np.random.Generator) -> list[dict]:
    """The rows of one split's images (``members``, in input order).

    Draws from ``rng`` first for the hard negatives of the images with captions
    (``rank_hard_negatives``, none of them a caption of the positive's image), then for each retrieval row's positive position, image by image.
    """
    with_captions = [it for it in members if it.captions]
    try:
        negatives = rank_hard_negatives(
            [it.captions[0] for it in with_captions],
            n_negatives,
            rng,
            excluded=[it.captions[1:] for it in with_captions],
        )
    except CocoSizeError as exc:
        raise CocoSizeError(f"coco import, split {split!r} ({len(members)} images): {exc}", exc.arguments) from None
    neg_of = {it.image_id: negs for it, negs in zip(with_captions, negatives)}
    rows: list[dict] = []
    for it in members:
        rows.extend(_image_rows(it, split, neg_of.get(it.image_id), n_negatives, rng))
    return rows


def annotation_rows(items: list[CocoItem], splits: np.ndarray, *, seed: int, n_negatives: int) -> list[dict]:
    """Every annotation row, ordered by split (``SPLITS`` order), then input order, then task.

    ``splits``: the split name of each item (``assign_splits``). Each split draws from its own
    stream, ``SeedSequence([seed, 1, split index])``.
    """
    rows: list[dict] = []
    for split_index, split in enumerate(SPLITS):
        members = [it for it, s in zip(items, splits) if s == split]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, split_index]))
        rows.extend(_split_rows(members, split, n_negatives, rng))
    return rows


def _check_image_files(json_path: Path, image_root: Path, items: list[CocoItem]) -> None:
    """Every item's image file exists and is no symbolic link (a cheap check before any output;
    decoding is checked while writing)."""
    for it in items:
        path = image_root / it.file_name
        if not path.is_file():
            raise _err(
                it.source or json_path, it.index, it.file_name, "image_info.file_name", f"image file not found: {path}"
            )
        if path.is_symlink():
            raise _err(
                it.source or json_path,
                it.index,
                it.file_name,
                "image_info.file_name",
                f"image {path} is a symbolic link: {_SYMLINK_WHY}",
            )


# DVC hashes a link, not what it points to: a dependency behind a link can change unseen.
_SYMLINK_WHY = (
    "DVC does not follow links, so an edit behind it would not rerun the import; copy the data "
    "under data/inputs (and `dvc add` it)"
)


def _refuse_links(json_path: Path, image_root: Path) -> None:
    for what, path in (("JSON", json_path), ("image root", image_root)):
        if path.is_symlink():
            raise BenchmarkError(f"coco import: the {what} {path} is a symbolic link: {_SYMLINK_WHY}")


def _write_images(path: Path, json_path: Path, image_root: Path, items: list[CocoItem]) -> None:
    """``images.parquet`` (``IMAGE_SCHEMA``): each item's file bytes as they are, checked to
    decode, written ``_IMAGE_BATCH`` images at a time."""
    from tqdm import tqdm

    with pq.ParquetWriter(path, IMAGE_SCHEMA) as writer:
        for start in tqdm(range(0, len(items), _IMAGE_BATCH), desc="coco images", leave=False):
            batch = [
                {"image_id": it.image_id, "png": _read_image(json_path, image_root, it)}
                for it in items[start : start + _IMAGE_BATCH]
            ]
            writer.write_table(pa.Table.from_pylist(batch, schema=IMAGE_SCHEMA))


def import_hones_coco(
    json_path: Path,
    image_root: Path,
    out_dir: Path,
    *,
    seed: int,
    n_discovery: int,
    n_dev: int,
    n_test: int,
    n_negatives: int = 49,
    max_images: int | None = None,
) -> pd.DataFrame:
    """Import the HONES unified COCO JSON into ``out_dir`` (annotations.parquet, images.parquet).

    ``json_path`` is one file, split here (``assign_splits``: ``n_discovery``, ``n_dev`` and
    ``n_test`` images, the rest train), or a folder of the authors' split files used as given
    (``load_split_files``: ``discovery.json``, ``dev.json``, ``test.json``, and ``train.json``
    if present), of which each split keeps its first ``n_<split>`` images (all, when fewer).

    One annotation row per (image, task) present: vqa (prompt = the question, references =
    the majority ``answer`` then the other ``all_answers``), ocr (references = ``[text]``), caption (references = up to
    5 captions), retrieval (candidates = the first caption + ``n_negatives`` hard negatives from
    the same split, positive at a seeded position). ``images.parquet`` holds the original file
    bytes (JPEG/PNG as they are) in its ``png`` column. Rows are ordered by split, then input
    order, then task. Deterministic for ``seed``. The JSON and the image files' presence are
    validated before any output is written; each image is decoded with PIL while it is copied.
    Output goes to a temporary sibling directory that is renamed when complete and is removed
    on any error, so a failed import leaves neither ``out_dir`` nor its temporary sibling.
    Returns the annotations (as ``read_annotations`` would read them).
    Steps: ``load_items`` -> ``assign_splits`` -> ``annotation_rows`` -> ``_check_image_files``
    -> write both tables (``_write_images``).
    """
    json_path, image_root, out_dir = Path(json_path), Path(image_root), Path(out_dir)
    if n_negatives < 1:
        raise CocoSizeError(f"coco import: n_negatives must be >= 1, got {n_negatives}", ("n_negatives",))
    if not image_root.is_dir():
        raise BenchmarkError(f"coco import: image root is not a directory: {image_root}")
    _refuse_links(json_path, image_root)
    if json_path.is_dir():
        items, splits = load_split_files(json_path, max_images)
        keep = first_of_each_split(splits, {"discovery": n_discovery, "dev": n_dev, "test": n_test})
        items, splits = [items[k] for k in keep], splits[keep]
    else:
        items = load_items(json_path, max_images)
        splits = assign_splits(len(items), seed=seed, n_discovery=n_discovery, n_dev=n_dev, n_test=n_test)
    rows = annotation_rows(items, splits, seed=seed, n_negatives=n_negatives)
    table = pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA)
    _check_image_files(json_path, image_root, items)

    with atomic_directory(out_dir) as tmp:
        pq.write_table(table, tmp / "annotations.parquet")
        _write_images(tmp / "images.parquet", json_path, image_root, items)
    counts = pd.Series(splits).value_counts().to_dict()
    log.info(
        "coco import: %d images (%s), %d examples -> %s",
        len(items),
        ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS),
        len(rows),
        out_dir,
    )
    return table.to_pandas()
