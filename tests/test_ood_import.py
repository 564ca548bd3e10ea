"""Out-of-distribution importers: each format's happy path, and bad records refused in one line
that names the file and the record (or counted and reported with skip_bad)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.tasks.items import PROMPTS, BenchmarkError, read_annotations
from pipeline.tasks.ood_import import OodRecordError, import_ood, read_ood_records

TEXTVQA = {
    "dataset_name": "textvqa",
    "data": [
        {
            "question": "what brand is this?",
            "answers": ["nokia", "nokia", "Nokia", "nokia"],
            "image_id": "a1",
            "question_id": 1,
        },
        {
            "question": "what is written on the sign?",
            "answers": ["stop", "halt", "halt"],
            "image_id": "a1",
            "question_id": 2,
        },
        {"question": "what number is shown?", "answers": ["7"], "image_id": "b2", "question_id": 3},
    ],
}
GQA = {
    "201": {"question": "Is the cup red?", "answer": "yes", "imageId": "n1", "fullAnswer": "Yes, it is."},
    "202": {"question": "What is on the table?", "answer": "cup", "imageId": "n1"},
}
FLICKR = {
    "images": [
        {"filename": "f1.jpg", "sentences": [{"raw": f"a dog runs {k}"} for k in range(6)], "split": "test"},
        {"filename": "f2.jpg", "sentences": [{"raw": "two people talk"}], "split": "test"},
    ]
}
IMAGES = {"textvqa": ["a1.jpg", "b2.jpg"], "gqa": ["n1.jpg"], "flickr30k": ["f1.jpg", "f2.jpg"]}
DOCS = {"textvqa": TEXTVQA, "gqa": GQA, "flickr30k": FLICKR}


def _setup(tmp_path: Path, fmt: str, doc: object) -> tuple[Path, Path]:
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for name in IMAGES[fmt]:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / name)
    path = tmp_path / f"{fmt}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path, root


def test_textvqa_questions_become_ocr_and_vqa_items_with_every_answer_in_order(tmp_path) -> None:
    """The first answer is the authors' target (they keep answers[0]); repeats stay, so the
    standard VQA accuracy counts annotators."""
    path, root = _setup(tmp_path, "textvqa", TEXTVQA)
    done = import_ood("textvqa", path, root, tmp_path / "out")
    table = read_annotations(tmp_path / "out" / "annotations.parquet")
    assert len(table) == 6 and set(table["split"]) == {"ood"}
    assert table.groupby("task").size().to_dict() == {"ocr": 3, "vqa": 3}
    sign = table[table["item_id"] == "textvqa-2-vqa"].iloc[0]
    assert sign["prompt"] == "what is written on the sign?" and list(sign["references"]) == ["stop", "halt", "halt"]
    assert list(table[table["item_id"] == "textvqa-1-ocr"].iloc[0]["references"]) == [
        "nokia",
        "nokia",
        "Nokia",
        "nokia",
    ]
    # Two questions on one image: the image is stored once.
    assert sorted(pd.read_parquet(tmp_path / "out" / "images.parquet")["image_id"]) == ["a1", "b2"]
    assert done.skipped == []
    # What was imported, for the transfer stages and the report.
    assert json.loads((tmp_path / "out" / "import.json").read_text()) == {
        "format": "textvqa",
        "records_file": "textvqa.json",
        "split": "ood",
        "items": {"ocr": 3, "vqa": 3},
        "images": 2,
        "skipped": [],
    }


def test_gqa_and_flickr30k_map_to_vqa_and_captions(tmp_path) -> None:
    path, root = _setup(tmp_path, "gqa", GQA)
    import_ood("gqa", path, root, tmp_path / "gqa")
    gqa = read_annotations(tmp_path / "gqa" / "annotations.parquet")
    assert list(gqa["item_id"]) == ["gqa-201-vqa", "gqa-202-vqa"] and set(gqa["task"]) == {"vqa"}
    assert list(gqa.iloc[0]["references"]) == ["yes"]

    path, root = _setup(tmp_path, "flickr30k", FLICKR)
    import_ood("flickr30k", path, root, tmp_path / "flickr")
    cap = read_annotations(tmp_path / "flickr" / "annotations.parquet")
    assert set(cap["task"]) == {"caption"} and set(cap["prompt"]) == {PROMPTS["caption"]}
    assert len(cap.iloc[0]["references"]) == 5 and list(cap.iloc[1]["references"]) == ["two people talk"]
    # The simpler record list with a "captions" field reads the same.
    plain = [{"filename": "f1.jpg", "captions": ["a dog runs 0"]}]
    assert read_ood_records("flickr30k", _setup(tmp_path, "flickr30k", plain)[0]).records[0].references == (
        "a dog runs 0",
    )


def _broken(fmt: str, kind: str) -> tuple[object, str]:
    """A copy of the format's document with one bad record, and what the error must say."""
    doc = copy.deepcopy(DOCS[fmt])
    if fmt == "textvqa":
        rec, where = doc["data"][1], r"data\[1\]"
        fields = {
            "missing": "question",
            "empty": "answers",
            "type": "answers",
            "image": "image_id",
            "id": "question_id",
        }
    elif fmt == "gqa":
        rec, where = doc["202"], "question '202'"
        fields = {"missing": "question", "empty": "answer", "type": "answer", "image": "imageId", "id": None}
    else:
        rec, where = doc["images"][1], r"images\[1\]"
        fields = {"missing": "filename", "empty": "sentences", "type": "sentences", "image": "filename", "id": None}
    name = fields[kind]
    if kind == "missing":
        del rec[name]
        return doc, f"{where}: {name}: missing"
    if kind == "empty":
        rec[name] = [] if isinstance(rec[name], list) else ""
        return doc, f"{where}: {name}: empty"
    if kind == "type":
        rec[name] = 42
        return doc, f"{where}: {name}: expected a"
    if kind == "image":
        rec[name] = "nowhere.jpg" if fmt == "flickr30k" else "nowhere"
        return doc, f"{where}: image: image file not found"
    # duplicate id
    if fmt == "textvqa":
        rec["question_id"] = 1
        return doc, r"data\[0\] and data\[1\] have the same id"
    if fmt == "gqa":
        # Question ids are the keys: a repeated one is a repeated key, which json would drop.
        return json.dumps(doc).replace('"202"', '"201"'), "the key '201' appears twice"
    doc["images"][1]["filename"] = "f1.jpg"
    return doc, r"images\[0\] and images\[1\] have the same id"


@pytest.mark.parametrize("fmt", ["textvqa", "gqa", "flickr30k"])
@pytest.mark.parametrize("kind", ["missing", "empty", "type", "image", "id"])
def test_a_bad_record_stops_the_import_in_one_line(tmp_path, fmt, kind) -> None:
    doc, message = _broken(fmt, kind)
    path, root = _setup(tmp_path, fmt, doc)
    with pytest.raises(BenchmarkError, match=message) as caught:
        import_ood(fmt, path, root, tmp_path / "out")
    text = str(caught.value)
    assert "\n" not in text and (str(path) in text or "not found" in text)
    assert not (tmp_path / "out").exists(), "an import that failed left output behind"


@pytest.mark.parametrize("fmt", ["textvqa", "gqa", "flickr30k"])
def test_skip_bad_counts_and_reports_the_bad_records(tmp_path, fmt, caplog) -> None:
    doc, message = _broken(fmt, "missing")
    path, root = _setup(tmp_path, fmt, doc)
    done = import_ood(fmt, path, root, tmp_path / "out", skip_bad=True)
    assert len(done.skipped) == 1 and any(msg in done.skipped[0] for msg in (message.replace("\\", ""),))
    assert "skipped" in caplog.text
    table = read_annotations(tmp_path / "out" / "annotations.parquet")
    assert len(table) == len(done.records) > 0
    assert json.loads((tmp_path / "out" / "import.json").read_text())["skipped"] == done.skipped
    # A missing image is skipped the same way, with its own reason.
    doc, message = _broken(fmt, "image")
    path, root = _setup(tmp_path, fmt, doc)
    done = import_ood(fmt, path, root, tmp_path / "out2", skip_bad=True)
    assert len(done.skipped) == 1 and "image file not found" in done.skipped[0]


def test_files_that_are_not_of_the_format_are_refused(tmp_path) -> None:
    path, root = _setup(tmp_path, "textvqa", {"questions": []})
    with pytest.raises(BenchmarkError, match="list under 'data'"):
        import_ood("textvqa", path, root, tmp_path / "out")
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BenchmarkError, match="nested too deeply"):
        read_ood_records("textvqa", path)
    path.write_text(json.dumps([GQA["201"]]))
    with pytest.raises(BenchmarkError, match="GQA questions need a non-empty object"):
        read_ood_records("gqa", path)
    with pytest.raises(BenchmarkError, match="unknown out-of-distribution format 'vizwiz'"):
        read_ood_records("vizwiz", path)
    long = copy.deepcopy(TEXTVQA)
    long["data"][0]["question"] = "x" * 5000
    path, root = _setup(tmp_path, "textvqa", long)
    with pytest.raises(OodRecordError, match=r"data\[0\]: question: 5000 characters"):
        read_ood_records("textvqa", path)


def _flickr_csv(tmp_path: Path, rows: list[str]) -> tuple[Path, Path]:
    """The authors' flickr_annotations_30k.csv layout: raw (a JSON list of captions), sentids,
    split, filename, img_id."""
    _, root = _setup(tmp_path, "flickr30k", FLICKR)
    path = tmp_path / "flickr_annotations_30k.csv"
    path.write_text("raw,sentids,split,filename,img_id\n" + "".join(r + "\n" for r in rows))
    return path, root


def test_flickr30k_csv_as_the_authors_ship_it(tmp_path) -> None:
    captions = json.dumps([f"a dog runs {k}" for k in range(6)]).replace('"', '""')
    path, root = _flickr_csv(
        tmp_path, [f'"{captions}","[0]",test,f1.jpg,0', '"[""two people talk""]","[5]",test,f2.jpg,1']
    )
    import_ood("flickr30k", path, root, tmp_path / "out")
    table = read_annotations(tmp_path / "out" / "annotations.parquet")
    assert list(table["item_id"]) == ["flickr30k-f1-caption", "flickr30k-f2-caption"]
    assert list(table.iloc[0]["references"]) == [f"a dog runs {k}" for k in range(5)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('"not json",[0],test,f1.jpg,0', r"line 2: raw: expected a JSON list of captions"),
        ('"[]",[0],test,f1.jpg,0', r"line 2: raw"),
        ('"[""a dog""]",[0],test,,0', r"line 2: filename"),
        ('"[""a dog""]",[0],test,missing.jpg,0', r"line 2: image: image file not found"),
        ('"[""a dog""]",[0],test', r"line 2: filename"),
    ],
)
def test_a_bad_flickr30k_csv_row_names_its_line(tmp_path, row, message) -> None:
    path, root = _flickr_csv(tmp_path, [row])
    with pytest.raises(OodRecordError, match=message) as caught:
        import_ood("flickr30k", path, root, tmp_path / "out")
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_repeated_flickr30k_csv_image_is_refused(tmp_path) -> None:
    path, root = _flickr_csv(tmp_path, ['"[""a""]",[0],test,f1.jpg,0', '"[""b""]",[1],test,f1.jpg,0'])
    with pytest.raises(OodRecordError, match=r"line 2 and line 3 have the same id"):
        read_ood_records("flickr30k", path)
