"""Import of the HONES unified COCO JSON (pipeline.tasks.coco_import) on a tiny fake dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.tasks.coco_import import MAX_TEXT_CHARS, caption_words, import_hones_coco, rank_hard_negatives
from pipeline.tasks.items import ANNOTATION_SCHEMA, PROMPTS, BenchmarkError, ImageTable, read_annotations
from stages.params import CocoImportConfig, ConfigError, validate_section

# Image 0's caption overlaps most with 2, then 1, then 3 (Jaccard 4/7 > 4/8 > 2/10), none with the rest.
CAPTIONS = [
    "a red bus on a city street",
    "a red bus on a country road",
    "a blue bus on a street",
    "two cats sleeping on a sofa",
    "green trees in spring",
    "kids playing football",
    "plate of food",
    "old clock tower",
    "snowy mountain peak",
    "wooden boat at dawn",
]
N = len(CAPTIONS)


def _png(path: Path, k: int, fmt: str = "PNG") -> None:
    img = Image.new("RGB", (12, 12), (20 * k, 100, 200 - 15 * k))
    ImageDraw.Draw(img).rectangle((2, 2, 2 + k % 8, 8), fill=(255, 255, 255))
    img.save(path, format=fmt)


def make_dataset(root: Path) -> tuple[Path, Path, dict]:
    """10 images (image 1 a JPEG); image 4 without OCR text, image 5 without a vqa block,
    image 6 with empty all_answers, image 7 with 6 captions. Returns (json, image root, doc)."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    data = []
    for k in range(N):
        fn = f"sub/img_{k:02d}.jpg" if k == 1 else f"img_{k:02d}.png"
        _png(images / fn, k, "JPEG" if k == 1 else "PNG")
        item = {
            "image_info": {"file_name": fn, "height": 12, "width": 12},
            "vqa": {"question": f"What is in image {k}?", "answer": f"thing{k}", "all_answers": [f"thing{k}", "stuff"]},
            "ocr": {"text": f"WORD{k}", "bbox": [1, 2, 3.5, 4]},
            "captions": [{"caption": CAPTIONS[k]}, {"caption": f"another view {k}"}],
        }
        data.append(item)
    data[4]["ocr"] = {"text": "", "bbox": []}
    del data[5]["vqa"]
    data[6]["vqa"]["all_answers"] = []
    data[7]["captions"] = [{"caption": f"caption {j} of seven"} for j in range(6)]
    doc = {"info": "fake", "data": data}
    path = root / "hones.json"
    path.write_text(json.dumps(doc))
    return path, images, doc


def run(tmp_path: Path, doc: dict | None = None, out: str = "bench", **kw) -> pd.DataFrame:
    """Import the dataset in ``tmp_path`` (made on first use; ``doc`` replaces its JSON) into ``out``."""
    json_path, images = tmp_path / "hones.json", tmp_path / "images"
    if not json_path.exists():
        make_dataset(tmp_path)
    if doc is not None:
        json_path.write_text(json.dumps(doc))
    args = dict(seed=0, n_discovery=2, n_dev=2, n_test=2, n_negatives=1) | kw
    return import_hones_coco(json_path, images, tmp_path / out, **args)


def _jaccard(a: str, b: str) -> float:
    x, y = set(caption_words(a)), set(caption_words(b))
    return len(x & y) / len(x | y)


# ------------------------------------------------------------------ the table


def test_columns_rows_and_references(tmp_path):
    df = run(tmp_path)
    out = tmp_path / "bench"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "hones.json", "images"]
    assert pq.read_schema(out / "annotations.parquet").equals(ANNOTATION_SCHEMA, check_metadata=False)
    back = read_annotations(out / "annotations.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert list(df.columns) == ANNOTATION_SCHEMA.names
    assert df["positive_index"].dtype == np.int32
    for col in ("item_id", "image_id", "split", "task", "question_type", "prompt"):
        assert all(isinstance(v, str) for v in df[col]), col
    assert (df["question_type"] == "").all()

    rows = {(r.image_id, r.task): r for r in df.itertuples()}
    assert df["item_id"].tolist() == [f"{r.image_id}-{r.task}-0" for r in df.itertuples()]
    # one row per (image, task) present: 10 vqa - 1, 10 ocr - 1, 10 caption, 10 retrieval
    assert df["task"].value_counts().to_dict() == {"caption": 10, "retrieval": 10, "vqa": 9, "ocr": 9}
    assert ("img_04", "ocr") not in rows and ("img_05", "vqa") not in rows

    v = rows[("img_03", "vqa")]
    assert v.prompt == "What is in image 3?" and list(v.references) == ["thing3", "stuff"]
    assert list(rows[("img_06", "vqa")].references) == ["thing6"]  # empty all_answers -> [answer]
    o = rows[("img_01", "ocr")]
    assert o.prompt == PROMPTS["ocr"] and list(o.references) == ["WORD1"]
    c = rows[("img_07", "caption")]
    assert c.prompt == PROMPTS["caption"] and list(c.references) == [f"caption {j} of seven" for j in range(5)]
    assert list(rows[("img_02", "caption")].references) == [CAPTIONS[2], "another view 2"]
    for r in df[df.task != "retrieval"].itertuples():
        assert len(r.candidates) == 0 and r.positive_index == -1

    images = ImageTable(out / "images.parquet")
    assert len(images) == N
    assert images["img_01"].size == (12, 12) and images["img_05"].mode == "RGB"
    raw = dict(zip(*pq.read_table(out / "images.parquet").to_pydict().values()))
    assert raw["img_01"] == (tmp_path / "images/sub/img_01.jpg").read_bytes()  # JPEG kept as is
    assert raw["img_00"][:4] == b"\x89PNG"


def test_splits_are_image_disjoint_with_requested_sizes(tmp_path):
    df = run(tmp_path, n_discovery=3, n_dev=2, n_test=2)
    per_image = df.groupby("image_id")["split"].nunique()
    assert (per_image == 1).all()  # every image's rows lie in one split
    sizes = df.drop_duplicates("image_id")["split"].value_counts().to_dict()
    assert sizes == {"train": 3, "discovery": 3, "dev": 2, "test": 2}


def test_retrieval_candidates_and_hard_negative_order(tmp_path):
    df = run(tmp_path, n_discovery=0, n_dev=0, n_test=0, n_negatives=3)
    first = {r.image_id: r.references[0] for r in df[df.task == "caption"].itertuples()}
    ret = df[df.task == "retrieval"]
    assert (ret["prompt"] == PROMPTS["retrieval"]).all() and "{candidate}" in PROMPTS["retrieval"]
    positions = set()
    for r in ret.itertuples():
        cands = list(r.candidates)
        assert len(cands) == 4 and len(set(cands)) == 4
        assert cands[r.positive_index] == first[r.image_id] == r.references[0]
        positions.add(int(r.positive_index))
        negs = cands[: r.positive_index] + cands[r.positive_index + 1 :]
        assert all(n in first.values() and n != first[r.image_id] for n in negs)
        scores = [_jaccard(first[r.image_id], n) for n in negs]
        assert scores == sorted(scores, reverse=True)
        others = [c for i, c in first.items() if i != r.image_id and c not in negs]
        assert min(scores) >= max(_jaccard(first[r.image_id], c) for c in others)
    assert len(positions) > 1  # the positive is not always in the same slot
    r0 = ret[ret.image_id == "img_00"].iloc[0]
    negs0 = [c for i, c in enumerate(r0.candidates) if i != r0.positive_index]
    assert negs0 == [CAPTIONS[2], CAPTIONS[1], CAPTIONS[3]]


def test_rank_hard_negatives_ties_and_duplicates():
    caps = ["a dog", "A dog.", "a cat", "one bird", "two fish", "the moon"]
    out = rank_hard_negatives(caps, 3, np.random.default_rng(0))
    assert out[0][0] == "a cat" and "A dog." not in out[0]  # same words as the positive: never a negative
    assert out[1][0] == "a cat" and "a dog" not in out[1]
    again = rank_hard_negatives(caps, 3, np.random.default_rng(0))
    assert again == out
    with pytest.raises(BenchmarkError, match="only 5 distinct captions"):
        rank_hard_negatives(caps, 5, np.random.default_rng(0))


def test_the_majority_answer_is_the_first_reference(tmp_path):
    """The first reference is the target (heads, dump, training): the authors' majority answer,
    not the first annotator's; the annotators' answers stay, each once, for the accuracy."""
    _, _, doc = make_dataset(tmp_path)
    doc["data"][2]["vqa"] = {"question": "q?", "answer": "sneakers", "all_answers": ["loafer", "sneakers", "sneakers"]}
    doc["data"][3]["vqa"] = {"question": "q?", "answer": "four", "all_answers": ["4", "0"]}
    refs = {r.image_id: list(r.references) for r in run(tmp_path, doc).query("task == 'vqa'").itertuples()}
    assert refs["img_02"] == ["sneakers", "loafer", "sneakers"]
    assert refs["img_03"] == ["four", "4", "0"]  # no annotator gave it: prepended


def test_no_caption_of_the_positives_image_is_a_negative(tmp_path):
    """COCO repeats captions across images: image 0's second caption is image 2's first, its
    hardest negative before; it is excluded, the next hardest move up."""
    _, _, doc = make_dataset(tmp_path)
    doc["data"][0]["captions"] = [{"caption": CAPTIONS[0]}, {"caption": CAPTIONS[2]}]
    df = run(tmp_path, doc, n_discovery=0, n_dev=0, n_test=0, n_negatives=3)
    r0 = df[(df.task == "retrieval") & (df.image_id == "img_00")].iloc[0]
    negs0 = [c for i, c in enumerate(r0.candidates) if i != r0.positive_index]
    assert CAPTIONS[2] not in negs0 and negs0[:2] == [CAPTIONS[1], CAPTIONS[3]]

    caps = ["a dog", "a cat", "one bird"]
    out = rank_hard_negatives(caps, 1, np.random.default_rng(0), excluded=[["A cat."], [], []])
    assert out[0] == ["one bird"] and out[1] == ["a dog"]
    with pytest.raises(BenchmarkError, match=r"caption 'a dog' has only 1 distinct captions left"):
        rank_hard_negatives(caps, 2, np.random.default_rng(0), excluded=[["a cat"], [], []])


def test_several_questions_about_one_image(tmp_path):
    """VQA and TextVQA ask several questions about an image: records of the same image file add
    their questions (one VQA item each), the image and its other tasks stay one."""
    _, _, doc = make_dataset(tmp_path)
    again = {
        "image_info": {"file_name": "img_02.png"},
        "vqa": {"question": "How many buses?", "answer": "one", "all_answers": ["one", "1"]},
        "captions": doc["data"][2]["captions"],
    }
    doc["data"].append(again)
    df = run(tmp_path, doc, n_discovery=0, n_dev=0, n_test=0)
    rows = df[df.image_id == "img_02"]
    assert rows.groupby("task").size().to_dict() == {"vqa": 2, "ocr": 1, "caption": 1, "retrieval": 1}
    vqa = rows[rows.task == "vqa"].set_index("item_id")
    assert vqa.loc["img_02-vqa-1", "prompt"] == "How many buses?" and list(vqa.loc["img_02-vqa-1", "references"]) == [
        "one",
        "1",
    ]
    assert vqa.loc["img_02-vqa-0", "prompt"] == "What is in image 2?"
    assert len(ImageTable(tmp_path / "bench/images.parquet")) == N
    # The same question twice, or the image's captions told two ways, is refused naming both records.
    doc["data"][-1]["vqa"]["question"] = "What is in image 2?"
    with pytest.raises(BenchmarkError, match=r"data\[2\] and data\[10\] .*'What is in image 2\?' is asked twice"):
        run(tmp_path, doc, out="twice")
    doc["data"][-1]["vqa"]["question"] = "Where?"
    doc["data"][-1]["captions"] = [{"caption": "something else"}]
    with pytest.raises(BenchmarkError, match=r"data\[2\] and data\[10\] .*the same image with different captions"):
        run(tmp_path, doc, out="other")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "other").exists()


def test_the_authors_split_files_as_given(tmp_path):
    """A folder of discovery.json, dev.json and test.json (the authors' data) keeps each file's
    images in its split, each split its first n_<split> images; no train split without train.json."""
    _, images, doc = make_dataset(tmp_path)
    folder = tmp_path / "coco"
    folder.mkdir()
    parts = {"discovery": doc["data"][:5], "dev": doc["data"][5:7], "test": doc["data"][7:]}
    for split, data in parts.items():
        (folder / f"{split}.json").write_text(json.dumps({"data": data}))
    kw = dict(seed=0, n_negatives=1)
    df = import_hones_coco(folder, images, tmp_path / "bench", n_discovery=4, n_dev=9, n_test=3, **kw)
    kept = df.groupby("split")["image_id"].unique().map(sorted).to_dict()
    assert kept == {
        "discovery": ["img_00", "img_01", "img_02", "img_03"],
        "dev": ["img_05", "img_06"],
        "test": ["img_07", "img_08", "img_09"],
    }
    assert len(ImageTable(tmp_path / "bench/images.parquet")) == 9
    # An image in two split files, or a folder without any, is named.
    (folder / "dev.json").write_text(json.dumps({"data": doc["data"][4:7]}))
    with pytest.raises(
        BenchmarkError, match=r"dev\.json: data\[0\] \(file_name 'img_04.png'\) is also in .*discovery\.json"
    ):
        import_hones_coco(folder, images, tmp_path / "again", n_discovery=4, n_dev=9, n_test=3, **kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError, match=r"empty: no split file; expected any of \['train.json'"):
        import_hones_coco(empty, images, tmp_path / "none", n_discovery=1, n_dev=1, n_test=1, **kw)
    assert not (tmp_path / "again").exists() and not (tmp_path / "none").exists()


def test_deterministic_for_a_seed(tmp_path):
    a = run(tmp_path, out="a", n_negatives=1)
    b = run(tmp_path, out="b", n_negatives=1)
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "a/images.parquet").read_bytes() == (tmp_path / "b/images.parquet").read_bytes()
    c = run(tmp_path, out="c", seed=1, n_negatives=1)
    assert not a["split"].equals(c["split"])


def test_max_images_and_overwrite(tmp_path):
    run(tmp_path)
    df = run(tmp_path, max_images=6, n_discovery=2, n_dev=0, n_test=2)
    assert df["image_id"].nunique() == 6
    assert len(ImageTable(tmp_path / "bench/images.parquet")) == 6


# ------------------------------------------------------------------ errors


def _broken(tmp_path: Path, edit) -> dict:
    _, images, doc = make_dataset(tmp_path)
    edit(doc, images)
    return doc


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda d, im: (im / "img_03.png").unlink(), r"data\[3\] \(file_name 'img_03.png'\).*not found"),
        (
            lambda d, im: (im / "img_02.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"),
            r"data\[2\] \(file_name 'img_02.png'\).*cannot be decoded",
        ),
        (
            lambda d, im: d["data"][4]["vqa"].update(question="  "),
            r"data\[4\] \(file_name 'img_04.png'\): field 'vqa.question'",
        ),
        (
            lambda d, im: d["data"][8]["image_info"].update(file_name="sub/img_03.png"),
            r"data\[3\] \('img_03.png'\) and data\[8\] \('sub/img_03.png'\).*'img_03'",
        ),
        (
            lambda d, im: d["data"][1]["captions"].append({"caption": ""}),
            r"data\[1\] \(file_name 'sub/img_01.jpg'\): field 'captions\[2\].caption'",
        ),
        (
            lambda d, im: d["data"][0]["vqa"].update(answer=3, all_answers=[]),
            r"data\[0\].*'vqa.answer' must be a string",
        ),
        (lambda d, im: d["data"][9]["ocr"].update(bbox=[1, 2, 3]), r"data\[9\].*'ocr.bbox'"),
        (
            lambda d, im: d["data"][2].update(caption=d["data"][2].pop("captions")),
            r"data\[2\] \(file_name 'img_02.png'\): field 'caption' is not a field.*did you mean 'captions'",
        ),
        (
            lambda d, im: d["data"][5].update(VQA={"question": "q?", "answer": "a"}),
            r"data\[5\].*field 'VQA' is not a field.*did you mean 'vqa'",
        ),
        (
            lambda d, im: d["data"][4]["vqa"].update(question="why " * 10**6),
            rf"data\[4\].*field 'vqa.question' is 4,000,000 characters long \(at most {MAX_TEXT_CHARS:,}\)",
        ),
        (
            lambda d, im: d["data"][6]["captions"].append({"caption": "x" * (MAX_TEXT_CHARS + 1)}),
            r"data\[6\].*field 'captions\[2\].caption' is 1,001 characters long",
        ),
        (
            lambda d, im: (
                (im / "img_07.png").rename(im / "real_07.png"),
                (im / "img_07.png").symlink_to("real_07.png"),
            ),
            r"data\[7\] \(file_name 'img_07.png'\).*is a symbolic link",
        ),
    ],
    ids=[
        "missing-file",
        "corrupt-image",
        "empty-question",
        "duplicate-id",
        "empty-caption",
        "answer-type",
        "bbox",
        "misspelt-captions",
        "misspelt-vqa",
        "huge-question",
        "long-caption",
        "linked-image",
    ],
)
def test_errors_name_the_item_and_leave_nothing(tmp_path, edit, pattern):
    doc = _broken(tmp_path, edit)
    with pytest.raises(BenchmarkError, match=pattern):
        run(tmp_path, doc)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "bench.tmp").exists()


def test_deep_nesting_and_a_linked_image_root_are_named(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BenchmarkError, match=r"deep.json: nested too deeply"):
        import_hones_coco(
            tmp_path / "deep.json", tmp_path / "images", tmp_path / "bench", seed=0, n_discovery=0, n_dev=0, n_test=0
        )
    (tmp_path / "linked").symlink_to(tmp_path / "images")
    with pytest.raises(BenchmarkError, match=r"image root .*linked is a symbolic link: DVC does not follow"):
        import_hones_coco(
            tmp_path / "hones.json", tmp_path / "linked", tmp_path / "bench", seed=0, n_discovery=0, n_dev=0, n_test=0
        )
    assert not (tmp_path / "bench").exists() and not (tmp_path / "bench.tmp").exists()


def test_sizes_too_large(tmp_path):
    with pytest.raises(BenchmarkError, match=r"exceed the 10 images"):
        run(tmp_path, n_discovery=7, n_dev=2, n_test=3)
    with pytest.raises(BenchmarkError, match=r"split 'dev'.*needs 3 negatives"):
        run(tmp_path, n_discovery=0, n_dev=2, n_test=0, n_negatives=3)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "bench.tmp").exists()


def test_failed_import_keeps_previous_output(tmp_path):
    run(tmp_path)
    before = (tmp_path / "bench/annotations.parquet").read_bytes()
    (tmp_path / "images/img_05.png").write_bytes(b"not an image")
    with pytest.raises(BenchmarkError, match="img_05"):
        run(tmp_path)
    assert (tmp_path / "bench/annotations.parquet").read_bytes() == before
    assert not (tmp_path / "bench.tmp").exists()


# ------------------------------------------------------------------ config and stage


def test_config_and_stage(tmp_path, monkeypatch, caplog):
    # Paths are relative to the repository root, under data/inputs (the stage's data dependency).
    monkeypatch.chdir(tmp_path)
    json_path, images, _ = make_dataset(Path("data/inputs"))
    section = {
        "json_path": str(json_path),
        "image_root": str(images),
        "seed": 3,
        "n_discovery": 2,
        "n_dev": 2,
        "n_test": 2,
        "n_negatives": 1,
    }
    key = "benchmark.hones_coco"
    cfg = validate_section(CocoImportConfig, section, key)
    assert cfg.max_images is None
    with pytest.raises(ConfigError, match="benchmark.hones_coco.n_dev"):
        validate_section(CocoImportConfig, section | {"n_dev": -1}, key)
    with pytest.raises(ConfigError, match="benchmark.hones_coco.typo"):
        validate_section(CocoImportConfig, section | {"typo": 1}, key)
    with pytest.raises(ConfigError, match="benchmark.hones_coco.json_path: .* is not under data/inputs/"):
        validate_section(CocoImportConfig, section | {"json_path": str(tmp_path / "x.json")}, key)

    import yaml

    from stages import benchmark as benchmark_stage

    params = tmp_path / "params.yaml"
    study = {
        "tasks": ["vqa"],
        "studied_models": ["m"],
        "pretrained_models": ["m"],
        "models": {"m": {"source": "pretrained", "path": "x"}},
    }
    params.write_text(yaml.safe_dump(study | {"benchmark": {"source": "hones_coco", "hones_coco": section}}))
    monkeypatch.setattr(sys, "argv", ["benchmark", "--params", str(params), "--out", str(tmp_path / "st")])
    benchmark_stage.main()
    assert len(read_annotations(tmp_path / "st/annotations.parquet")) == 38

    params.write_text(
        yaml.safe_dump(study | {"benchmark": {"source": "hones_coco", "hones_coco": section | {"n_test": 99}}})
    )
    with pytest.raises(SystemExit) as exc:
        benchmark_stage.main()
    assert exc.value.code == 2
    assert (
        "exceed the 10 images (params: benchmark.hones_coco.n_discovery, benchmark.hones_coco.n_dev, "
        "benchmark.hones_coco.n_test)"
    ) in caplog.text


@pytest.mark.slow
def test_dvc_add_of_an_input_folder_can_be_committed(tmp_path):
    """data/inputs/README.md's `dvc add data/inputs/coco_images`: git tracks the .dvc file it writes
    (data/inputs/.gitignore keeps the data out of git but not that file)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    inputs = tmp_path / "data" / "inputs"
    inputs.mkdir(parents=True)
    shutil.copy(root / "data/inputs/.gitignore", inputs / ".gitignore")
    make_dataset(inputs)
    (inputs / "images").rename(inputs / "coco_images")

    def sh(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert sh("git", "init", "-q").returncode == 0
    assert sh(sys.executable, "-m", "dvc", "init", "-q").returncode == 0
    added = sh(sys.executable, "-m", "dvc", "add", "-q", "data/inputs/coco_images")
    assert added.returncode == 0, added.stderr
    staged = sh("git", "add", "data/inputs/coco_images.dvc", "data/inputs/.gitignore")
    assert staged.returncode == 0, staged.stderr
    assert sh("git", "check-ignore", "-q", "data/inputs/coco_images/img_00.png").returncode == 0  # data: not git's
