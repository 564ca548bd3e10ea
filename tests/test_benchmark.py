"""The synthetic benchmark: determinism, split disjointness, well-posed tasks, and table validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.tasks.benchmark import (
    COLORS,
    POSITIONS,
    SHAPES,
    BenchmarkSpec,
    Scene,
    SceneObject,
    build_benchmark,
    caption_references,
    hard_negative,
    sample_scene,
    vqa_examples,
)
from pipeline.tasks.items import PROMPTS, BenchmarkError, ImageTable, read_annotations

SPEC = BenchmarkSpec(
    seed=3,
    image_size=48,
    n_images={"train": 12, "discovery": 5, "dev": 3, "test": 4},
    vqa_per_image={"train": 2},
    retrieval_negatives=5,
    retrieval_hard_negatives=3,
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("bench") / "b"
    return out, build_benchmark(SPEC, out)


def test_same_seed_same_bytes(built, tmp_path) -> None:
    out, _ = built
    again = build_benchmark(SPEC, tmp_path / "again")
    assert again is not None
    for name in ("annotations.parquet", "images.parquet"):
        assert _digest(out / name) == _digest(tmp_path / "again" / name)
    other = build_benchmark(BenchmarkSpec(**{**SPEC.__dict__, "seed": 4}), tmp_path / "other")
    assert not other["prompt"].equals(read_annotations(out / "annotations.parquet")["prompt"]) or _digest(
        out / "images.parquet"
    ) != _digest(tmp_path / "other" / "images.parquet")


def test_split_sizes_are_independent(tmp_path) -> None:
    small = build_benchmark(SPEC, tmp_path / "small")
    bigger = build_benchmark(
        BenchmarkSpec(**{**SPEC.__dict__, "n_images": {**SPEC.n_images, "train": 30}}), tmp_path / "bigger"
    )
    test_a = small[small["split"] == "test"].reset_index(drop=True)
    test_b = bigger[bigger["split"] == "test"].reset_index(drop=True)
    pd.testing.assert_frame_equal(test_a, test_b)


def test_table_shape_and_disjoint_splits(built) -> None:
    out, df = built
    assert list(pq.read_schema(out / "annotations.parquet").names) == [
        "item_id",
        "image_id",
        "split",
        "task",
        "question_type",
        "prompt",
        "references",
        "candidates",
        "positive_index",
    ]
    by_split = {s: set(g["image_id"]) for s, g in df.groupby("split")}
    assert {s: len(v) for s, v in by_split.items()} == SPEC.n_images
    splits = list(by_split)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not by_split[a] & by_split[b]
    counts = df.groupby(["split", "task"]).size()
    assert counts[("train", "vqa")] == 2 * 12 and counts[("test", "vqa")] == 4
    assert counts.xs("ocr", level="task").to_dict() == SPEC.n_images
    images = ImageTable(out / "images.parquet")
    assert len(images) == sum(SPEC.n_images.values())
    assert images["test-000000"].size == (48, 48)


def test_retrieval_items_are_well_formed(built) -> None:
    _, df = built
    retrieval = df[df["task"] == "retrieval"]
    assert (retrieval["prompt"] == PROMPTS["retrieval"]).all()
    for rec in retrieval.itertuples():
        assert len(rec.candidates) == 6 and len(set(rec.candidates)) == 6
        assert rec.candidates[rec.positive_index] == rec.references[0]
    caption = df[(df["task"] == "caption")].set_index("image_id")["references"]
    for rec in retrieval.itertuples():
        assert rec.references[0] == caption[rec.image_id][0]


def test_hard_negative_changes_exactly_one_attribute() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        neg = hard_negative(scene, rng)
        assert neg != scene and neg.word == scene.word
        a = {(o.color, o.shape, o.position) for o in scene.objects}
        b = {(o.color, o.shape, o.position) for o in neg.objects}
        # one object changed (1 removed + 1 added), one added/dropped, or two swapped
        assert len(a ^ b) in (1, 2, 4)
        assert all(o.color in COLORS and o.shape in SHAPES and o.position in POSITIONS for o in neg.objects)


def test_vqa_answers_follow_the_scene() -> None:
    scene = Scene((SceneObject("red", "circle", "left"), SceneObject("blue", "circle", "right")), "cat")
    qa = {q: a for _, q, a in vqa_examples(scene)}
    assert qa["How many shapes are there?"] == "2"
    assert "What color is the circle?" not in qa  # ambiguous: two circles
    assert qa["What shape is the blue object?"] == "circle"
    assert qa["Where is the red circle?"] == "left"
    refs = caption_references(scene)
    assert refs[0] == "a red circle on the left and a blue circle on the right ."
    assert len(refs) == 5 and len(set(refs)) == 5


def test_read_annotations_rejects_bad_tables(built, tmp_path) -> None:
    out, df = built
    with pytest.raises(BenchmarkError, match="not found"):
        read_annotations(tmp_path / "missing.parquet")
    bad = df.copy()
    bad["references"] = [[""]] + [list(r) for r in bad["references"].iloc[1:]]
    bad.to_parquet(tmp_path / "empty_ref.parquet")
    with pytest.raises(BenchmarkError, match=str(bad["item_id"].iloc[0])):
        read_annotations(tmp_path / "empty_ref.parquet")
    dup = pd.concat([df, df.head(1)])
    dup.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(BenchmarkError, match="duplicate item_id"):
        read_annotations(tmp_path / "dup.parquet")
    df.drop(columns=["candidates"]).to_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(BenchmarkError, match="missing columns"):
        read_annotations(tmp_path / "nocol.parquet")


def test_out_of_distribution_split_is_shifted_and_leaves_the_others_alone(built, tmp_path) -> None:
    """The ood split renders and words its items as no other split does; adding it changes no
    other split's items or images and adds no word to the vocabulary a tokenizer is built on."""
    from pipeline.model.default import benchmark_vocabulary
    from pipeline.tasks.benchmark import IN_DISTRIBUTION, OUT_OF_DISTRIBUTION

    out, base = built
    spec = BenchmarkSpec(**{**SPEC.__dict__, "n_images": {**SPEC.n_images, "ood": 6}})
    shifted = build_benchmark(spec, tmp_path / "ood")
    pd.testing.assert_frame_equal(shifted[shifted["split"] != "ood"].reset_index(drop=True), base)
    images = pq.read_table(tmp_path / "ood" / "images.parquet").to_pandas()
    before = pq.read_table(out / "images.parquet").to_pandas()
    pd.testing.assert_frame_equal(images[~images["image_id"].str.startswith("ood-")].reset_index(drop=True), before)

    # Every word of the reworded prompts is one the in-distribution prompts or captions use.
    def words(texts: list[str]) -> set[str]:
        rows = pd.DataFrame({"prompt": texts, "references": [[]] * len(texts), "candidates": [[]] * len(texts)})
        return set(benchmark_vocabulary(rows))

    def templates(rendering) -> list[str]:
        return [*rendering.questions.values(), *rendering.prompts.values()]

    scene = Scene((SceneObject("red", "circle", "left"), SceneObject("blue", "square", "middle")), "cat")
    known = words(templates(IN_DISTRIBUTION) + caption_references(scene))
    assert words(templates(OUT_OF_DISTRIBUTION)) <= known | {"{shape}", "{color}"} | set(SHAPES) | set(COLORS)

    ood = shifted[shifted["split"] == "ood"]
    assert len(ood) == 6 * 4 and set(ood["task"]) == {"vqa", "ocr", "caption", "retrieval"}
    seen = set(base["prompt"])
    assert not set(ood["prompt"]) & seen, "an ood prompt is worded as in the other splits"
    for task in ("ocr", "caption", "retrieval"):
        assert set(ood[ood["task"] == task]["prompt"]) == {OUT_OF_DISTRIBUTION.prompts[task]}
        assert OUT_OF_DISTRIBUTION.prompts[task] != IN_DISTRIBUTION.prompts[task]
    # The background is darker: the corner pixel's grey level lies in each rendering's band.
    table = ImageTable(tmp_path / "ood" / "images.parquet")
    for image_id in images["image_id"]:
        level = np.asarray(table[image_id])[0, 0].astype(int)
        band = OUT_OF_DISTRIBUTION if image_id.startswith("ood-") else IN_DISTRIBUTION
        assert ((band.background - 18 <= level) & (level < band.background + 18)).all(), image_id
