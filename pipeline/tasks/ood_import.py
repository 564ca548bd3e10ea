"""Import the out-of-distribution benchmarks the authors' steering code reads, as the benchmark table.

The paper applies its in-domain steering scales zero-shot to three public sets, mapped to the
project's tasks as the authors map them:

- ``textvqa``: TextVQA's annotation JSON, ``{"data": [{"question", "answers", "image_id",
  "question_id", ...}]}``, images ``<image_root>/<image_id>.jpg``; every question becomes an
  ``ocr`` item and a ``vqa`` item (prompt: the question; references: every annotator's answer
  in the file's order, repeats kept). The first is what the authors' code scores both tasks
  against (it keeps ``answers[0]``), hence what the paper's metrics use; the standard variants
  count every annotator.
- ``gqa``: GQA's question JSON, ``{question_id: {"question", "answer", "imageId", ...}}``, images
  ``<image_root>/<imageId>.jpg``; ``vqa`` items (references: the answer).
- ``flickr30k``: caption records, either Karpathy's ``{"images": [{"filename", "sentences":
  [{"raw"}, ...]}]}``, a list of ``{"filename", "captions": [...]}``, or the CSV the authors'
  repository ships (``flickr_annotations_30k.csv``: columns ``raw``, a JSON list of captions,
  and ``filename``; a file ending in ``.csv``), images ``<image_root>/<filename>``; ``caption``
  items (prompt: the benchmark's caption prompt; references: the first five captions).

The authors' adapters silently skip a record that lacks a field. Here a record that cannot be
used stops the import with one line naming the file, the record and the field; with
``skip_bad=True`` it is instead counted, logged and returned, never dropped without a word.

Map of this module: ``read_ood_records`` (parse and validate one file into ``OodRecord``s),
``import_ood`` (records and their images into ``annotations.parquet`` / ``images.parquet`` of one
split and the summary ``import.json``, written atomically), ``OodRecordError``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io import atomic_directory, write_json
from pipeline.tasks.coco_import import MAX_CAPTION_REFERENCES, MAX_TEXT_CHARS
from pipeline.tasks.items import ANNOTATION_SCHEMA, IMAGE_SCHEMA, PROMPTS, BenchmarkError

__all__ = ["FORMATS", "IMPORT_SUMMARY", "OodRecord", "OodImport", "OodRecordError", "read_ood_records", "import_ood"]

log = logging.getLogger(__name__)

# What an import wrote beside its tables: format, records file, items per task, images, and the
# one-line reason of every record left out with ``skip_bad``.
IMPORT_SUMMARY = "import.json"
FORMATS: dict[str, tuple[str, ...]] = {"textvqa": ("ocr", "vqa"), "gqa": ("vqa",), "flickr30k": ("caption",)}


class OodRecordError(BenchmarkError):
    """One record of an out-of-distribution file cannot be used; the message names the file,
    the record and the field."""


@dataclass(frozen=True)
class OodRecord:
    """One item: ``record`` says where it came from (``data[3]``, ``"20240871"``)."""

    record: str
    item_id: str
    image_file: str
    task: str
    prompt: str
    references: tuple[str, ...]


@dataclass
class OodImport:
    """The usable records of a file and, with ``skip_bad``, the one-line reason of each skipped one."""

    records: list[OodRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _bad(path: Path, where: str, fieldname: str, problem: str) -> OodRecordError:
    return OodRecordError(f"{path}: {where}: {fieldname}: {problem}")


def _text(value: object, path: Path, where: str, fieldname: str) -> str:
    if not isinstance(value, str):
        raise _bad(path, where, fieldname, f"expected a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise _bad(path, where, fieldname, "empty")
    if len(text) > MAX_TEXT_CHARS:
        raise _bad(path, where, fieldname, f"{len(text)} characters, more than {MAX_TEXT_CHARS}")
    return text


def _texts(value: object, path: Path, where: str, fieldname: str) -> list[str]:
    if not isinstance(value, list):
        raise _bad(path, where, fieldname, f"expected a list, got {type(value).__name__}")
    if not value:
        raise _bad(path, where, fieldname, "empty list")
    return [_text(v, path, where, f"{fieldname}[{k}]") for k, v in enumerate(value)]


def _ident(value: object, path: Path, where: str, fieldname: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(path, where, fieldname, f"expected a string or an integer id, got {type(value).__name__}")
    return _text(str(value), path, where, fieldname)


def _record(raw: object, path: Path, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _bad(path, where, "record", f"expected an object, got {type(raw).__name__}")
    return raw


def _field(raw: dict, path: Path, where: str, name: str) -> object:
    if name not in raw:
        raise _bad(path, where, name, "missing")
    return raw[name]


def _textvqa(doc: object, path: Path) -> Iterator[tuple[str, Callable[[], list[OodRecord]]]]:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: TextVQA annotations need an object with a list under 'data'")
    for i, raw in enumerate(data):
        where = f"data[{i}]"

        def parse(raw=raw, where=where) -> list[OodRecord]:
            rec = _record(raw, path, where)
            question = _text(_field(rec, path, where, "question"), path, where, "question")
            refs = tuple(_texts(_field(rec, path, where, "answers"), path, where, "answers"))
            image = _ident(_field(rec, path, where, "image_id"), path, where, "image_id")
            qid = _ident(_field(rec, path, where, "question_id"), path, where, "question_id")
            return [
                OodRecord(where, f"textvqa-{qid}-{task}", f"{image}.jpg", task, question, refs)
                for task in FORMATS["textvqa"]
            ]

        yield where, parse


def _gqa(doc: object, path: Path) -> Iterator[tuple[str, Callable[[], list[OodRecord]]]]:
    if not isinstance(doc, dict) or not doc:
        raise BenchmarkError(f"{path}: GQA questions need a non-empty object {{question_id: record}}")
    for qid, raw in doc.items():
        where = f"question {qid!r}"

        def parse(qid=qid, raw=raw, where=where) -> list[OodRecord]:
            rec = _record(raw, path, where)
            question = _text(_field(rec, path, where, "question"), path, where, "question")
            answer = _text(_field(rec, path, where, "answer"), path, where, "answer")
            image = _ident(_field(rec, path, where, "imageId"), path, where, "imageId")
            return [OodRecord(where, f"gqa-{qid}-vqa", f"{image}.jpg", "vqa", question, (answer,))]

        yield where, parse


@dataclass(frozen=True)
class _CsvRows:
    """A CSV file's rows as dicts, each with its line number (the header is line 1)."""

    rows: list[tuple[int, dict[str, str]]]


def _csv_captions(rec: dict, path: Path, where: str) -> list[str]:
    raw = _field(rec, path, where, "raw")
    try:
        captions = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        captions = None
    if not isinstance(captions, list):
        raise _bad(path, where, "raw", f"expected a JSON list of captions, got {str(raw)[:80]!r}")
    return _texts(captions, path, where, "raw")


def _flickr30k(doc: object, path: Path) -> Iterator[tuple[str, Callable[[], list[OodRecord]]]]:
    karpathy = isinstance(doc, dict) and isinstance(doc.get("images"), list)
    if isinstance(doc, _CsvRows):
        data: list = [rec for _, rec in doc.rows]
        places = [f"line {n}" for n, _ in doc.rows]
    else:
        data = doc["images"] if karpathy else doc
        if not isinstance(data, list):
            raise BenchmarkError(
                f"{path}: Flickr30k captions need {{'images': [...]}} (Karpathy's file), a list of "
                "{'filename', 'captions'} records, or a CSV with columns raw and filename"
            )
        places = [f"images[{i}]" if karpathy else f"[{i}]" for i in range(len(data))]
    for raw, where in zip(data, places):

        def parse(raw=raw, where=where) -> list[OodRecord]:
            rec = _record(raw, path, where)
            name = _text(_field(rec, path, where, "filename"), path, where, "filename")
            if isinstance(doc, _CsvRows):
                captions = _csv_captions(rec, path, where)
            elif "sentences" in rec:
                sentences = rec["sentences"]
                if not isinstance(sentences, list):
                    raise _bad(path, where, "sentences", f"expected a list, got {type(sentences).__name__}")
                raws = []
                for k, sentence in enumerate(sentences):
                    if isinstance(sentence, dict) and "raw" not in sentence:
                        raise _bad(path, where, f"sentences[{k}].raw", "missing")
                    raws.append(sentence["raw"] if isinstance(sentence, dict) else sentence)
                captions = _texts(raws, path, where, "sentences")
            else:
                captions = _texts(_field(rec, path, where, "captions"), path, where, "captions")
            refs = tuple(captions[:MAX_CAPTION_REFERENCES])
            return [OodRecord(where, f"flickr30k-{Path(name).stem}-caption", name, "caption", PROMPTS["caption"], refs)]

        yield where, parse


_PARSERS = {"textvqa": _textvqa, "gqa": _gqa, "flickr30k": _flickr30k}


def _load_document(path: Path) -> object:
    """The parsed JSON of ``path``, or ``_CsvRows`` for a file ending in ``.csv``."""
    if not path.is_file():
        raise BenchmarkError(f"out-of-distribution file not found: {path}")
    if path.is_symlink():
        raise BenchmarkError(f"{path} is a symbolic link: DVC would not see its content change; copy the file")
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return _CsvRows([(reader.line_num, row) for row in reader])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise BenchmarkError(f"{path}: not a readable CSV: {exc}") from exc

    def unique_keys(pairs: list[tuple[str, object]]) -> dict:
        # json keeps the last of two equal keys without a word: GQA's question ids are keys.
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise BenchmarkError(f"{path}: the key {key!r} appears twice in one object (a repeated id?)")
            seen[key] = value
        return seen

    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: not valid JSON: {exc}") from exc
    except RecursionError:
        raise BenchmarkError(f"{path}: nested too deeply to parse") from None


def read_ood_records(fmt: str, json_path: Path, *, skip_bad: bool = False) -> OodImport:
    """Parse ``json_path`` in format ``fmt`` (one of ``FORMATS``) into records.

    A record that cannot be used raises ``OodRecordError`` naming the file, the record and the
    field, or with ``skip_bad`` is left out and its reason kept in ``skipped`` (and logged). Two
    records with the same id are always an error. A file that is not of the format raises
    ``BenchmarkError``.
    """
    if fmt not in _PARSERS:
        raise BenchmarkError(f"unknown out-of-distribution format {fmt!r}; known: {sorted(_PARSERS)}")
    path = Path(json_path)
    out = OodImport()
    first: dict[str, str] = {}
    for where, parse in _PARSERS[fmt](_load_document(path), path):
        try:
            records = parse()
        except OodRecordError as exc:
            if not skip_bad:
                raise
            out.skipped.append(str(exc))
            log.warning("skipped: %s", exc)
            continue
        for r in records:
            if r.item_id in first:
                raise OodRecordError(f"{path}: {first[r.item_id]} and {where} have the same id ({r.item_id})")
            first[r.item_id] = where
        out.records.extend(records)
    if not out.records:
        raise BenchmarkError(f"{path}: no usable record" + (f" ({len(out.skipped)} skipped)" if out.skipped else ""))
    return out


def _image_bytes(image_root: Path, name: str, path: Path, where: str) -> bytes:
    file = image_root / name
    if file.is_symlink():
        raise _bad(path, where, "image", f"{file} is a symbolic link: copy the image")
    if not file.is_file():
        raise _bad(path, where, "image", f"image file not found: {file}")
    data = file.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # PIL raises several unrelated types for corrupt data; re-raised, naming the record
        raise _bad(path, where, "image", f"{file} cannot be decoded: {exc}") from exc
    return data


def import_ood(
    fmt: str,
    json_path: Path,
    image_root: Path,
    out_dir: Path,
    *,
    split: str = "ood",
    skip_bad: bool = False,
    max_records: int | None = None,
) -> OodImport:
    """Import one out-of-distribution file and its images into ``out_dir`` (``annotations.parquet``
    with every row in ``split``, ``images.parquet`` with each image's bytes as they are, checked to
    decode, and ``IMPORT_SUMMARY``), written atomically: an error leaves no ``out_dir``.

    ``max_records``: the first records only. ``skip_bad``: as ``read_ood_records``, also for a
    record whose image is missing or broken. Several items may share an image (TextVQA and GQA
    ask several questions about one); each image is stored once, its id the file name's stem.
    Returns the records written and the reasons of those skipped.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not image_root.is_dir():
        raise BenchmarkError(f"image root is not a directory: {image_root}")
    if image_root.is_symlink():
        raise BenchmarkError(f"the image root {image_root} is a symbolic link: DVC would not track the images")
    parsed = read_ood_records(fmt, json_path, skip_bad=skip_bad)
    records = parsed.records[:max_records] if max_records is not None else parsed.records
    images: dict[str, bytes] = {}
    kept: list[OodRecord] = []
    for r in records:
        image_id = Path(r.image_file).stem
        if image_id not in images:
            try:
                images[image_id] = _image_bytes(image_root, r.image_file, json_path, r.record)
            except OodRecordError as exc:
                if not skip_bad:
                    raise
                parsed.skipped.append(str(exc))
                log.warning("skipped: %s", exc)
                images[image_id] = b""
        if images[image_id]:
            kept.append(r)
    if not kept:
        raise BenchmarkError(f"{json_path}: no record with a usable image")
    rows = [
        {
            "item_id": r.item_id,
            "image_id": Path(r.image_file).stem,
            "split": split,
            "task": r.task,
            "question_type": "",
            "prompt": r.prompt,
            "references": list(r.references),
            "candidates": [],
            "positive_index": -1,
        }
        for r in kept
    ]
    image_rows = [{"image_id": k, "png": v} for k, v in images.items() if v]
    counts = {t: int(n) for t, n in pd.Series([r.task for r in kept]).value_counts().sort_index().items()}
    summary = {
        "format": fmt,
        "records_file": json_path.name,
        "split": split,
        "items": counts,
        "images": len(image_rows),
        "skipped": list(parsed.skipped),
    }
    with atomic_directory(Path(out_dir)) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA), tmp / "annotations.parquet")
        pq.write_table(pa.Table.from_pylist(image_rows, schema=IMAGE_SCHEMA), tmp / "images.parquet")
        write_json(summary, tmp / IMPORT_SUMMARY)
    log.info(
        "%s import: %d items (%s) on %d images, %d records skipped -> %s",
        fmt,
        len(kept),
        ", ".join(f"{t} {n}" for t, n in counts.items()),
        len(image_rows),
        len(parsed.skipped),
        out_dir,
    )
    return OodImport(kept, parsed.skipped)
