"""Params validation: bad keys, types and ranges stop a stage with a message naming the key,
before any model is loaded."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import (
    ConfigError,
    HeadsConfig,
    ParamsFile,
    SyntheticBenchmarkConfig,
    TrainedModelConfig,
    params_hash,
    validate_section,
)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"heads\.topk"):
        validate_section(HeadsConfig, {"topk": 3}, "heads")


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"heads\.top_k.*got 'many'"):
        validate_section(HeadsConfig, {"top_k": "many"}, "heads")


def test_out_of_range_is_named() -> None:
    with pytest.raises(ConfigError, match=r"heads\.top_k: Input should be greater than or equal to 1"):
        validate_section(HeadsConfig, {"top_k": 0}, "heads")
    with pytest.raises(ConfigError, match="retrieval_hard_negatives"):
        validate_section(
            SyntheticBenchmarkConfig, {"retrieval_negatives": 2, "retrieval_hard_negatives": 3}, "benchmark"
        )
    with pytest.raises(ConfigError, match="unknown split"):
        validate_section(SyntheticBenchmarkConfig, {"n_images": {"validation": 3}}, "benchmark")
    with pytest.raises(ConfigError, match="divisible"):
        validate_section(TrainedModelConfig, {"text_hidden": 130, "text_heads": 4}, "models.m")
    with pytest.raises(ConfigError, match=r"heads.guided.candidates = 3 is below heads.top_k = 4"):
        validate_section(HeadsConfig, {"top_k": 4, "guided": {"candidates": 3}}, "heads")
    with pytest.raises(ConfigError, match=r"heads.screened.candidates = 2 is below heads.top_k = 4"):
        validate_section(HeadsConfig, {"top_k": 4, "screened": {"candidates": 2}}, "heads")
    with pytest.raises(ConfigError, match=r"heads\.screened\.items"):
        validate_section(HeadsConfig, {"screened": {"items": 0}}, "heads")
    with pytest.raises(ConfigError, match=r"heads\.localisation"):
        validate_section(HeadsConfig, {"localisation": "gradient"}, "heads")


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        validate_section(HeadsConfig, [1, 2], "heads")


def test_params_hash_is_stable_and_sensitive() -> None:
    a = validate_section(HeadsConfig, {"top_k": 3}, "heads")
    assert params_hash(a) == params_hash(validate_section(HeadsConfig, {"top_k": 3}, "heads"))
    assert params_hash(a) != params_hash(validate_section(HeadsConfig, {"top_k": 4}, "heads"))


def test_stage_stops_before_loading_the_model(tmp_path, monkeypatch, caplog) -> None:
    import pipeline.model.adapter
    from stages import heads as heads_stage

    params = {
        "runtime": {"threads": 1},
        "heads": {"top_k": 2, "max_items": -5},
        "tasks": ["vqa"],
        "studied_models": ["m"],
        "pretrained_models": ["m"],
        "models": {"m": {"source": "pretrained", "path": str(tmp_path / "no-such-model")}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def never(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before params were validated")

    monkeypatch.setattr(pipeline.model.adapter.ModelAdapter, "load", classmethod(never))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "heads",
            "--params",
            str(tmp_path / "params.yaml"),
            "--model",
            "m",
            "--task",
            "vqa",
            "--benchmark",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        heads_stage.main()
    assert exc.value.code == 2
    assert "heads.max_items" in caplog.text
    assert not (tmp_path / "o").exists()


def test_readme_snippet_for_your_own_model_is_the_tested_one_and_valid() -> None:
    """The README's "Study your own model" block is tests/e2e/params_pretrained.yaml verbatim, and
    merged into params.yaml it validates."""
    root = Path(__file__).resolve().parents[1]
    snippet = (root / "tests/e2e/params_pretrained.yaml").read_text()
    assert "```yaml\n" + snippet + "```" in (root / "README.md").read_text()
    params = yaml.safe_load((root / "params.yaml").read_text())
    block = yaml.safe_load(snippet)
    merged = {
        **params,
        **{k: v for k, v in block.items() if k != "models"},
        "models": {**params["models"], **block["models"]},
    }
    parsed = ParamsFile.model_validate(merged)
    assert parsed.models["my-vlm"].path == "/path/to/my-vlm" and parsed.pretrained_models == ["my-vlm"]


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"path": "a", "hub_id": "org/a"}, "give exactly one of 'path' (a local folder) and 'hub_id'"),
        ({}, "give exactly one of 'path' (a local folder) and 'hub_id'"),
        ({"path": "a", "revision": "v1"}, "'revision' needs 'hub_id': a local folder has no revisions"),
    ],
)
def test_pretrained_entry_names_one_location(entry, message) -> None:
    data = {
        "studied_models": ["m"],
        "pretrained_models": ["m"],
        "tasks": ["vqa"],
        "models": {"m": {"source": "pretrained", **entry}},
    }
    with pytest.raises(ConfigError, match=re.escape(f"models.m: {message}")):
        validate_section(ParamsFile, data, "")


def test_every_studied_model_has_a_producer() -> None:
    data = {"studied_models": ["m"], "tasks": ["vqa"], "models": {"m": {"source": "pretrained", "path": "a"}}}
    with pytest.raises(
        ConfigError,
        match=r"studied_models: \['m'\] are in none of trained_models, "
        r"shipped_models and pretrained_models, so no stage provides them",
    ):
        validate_section(ParamsFile, data, "")
    with pytest.raises(ConfigError, match=r"pretrained_models: \['t'\] have source 'train'"):
        validate_section(
            ParamsFile, {**data, "pretrained_models": ["t"], "models": {**data["models"], "t": {"source": "train"}}}, ""
        )


def test_shipped_models_are_recipes_that_are_not_also_trained() -> None:
    models = {"t": {"source": "train"}, "p": {"source": "pretrained", "path": "a"}}
    ok = validate_section(
        ParamsFile, {"studied_models": ["t"], "tasks": ["vqa"], "shipped_models": ["t"], "models": models}, ""
    )
    assert ok.shipped_models == ["t"] and ok.trained_models == []
    with pytest.raises(ConfigError, match=r"\['t'\] are in both trained_models and shipped_models"):
        validate_section(
            ParamsFile,
            {
                "studied_models": ["t"],
                "tasks": ["vqa"],
                "shipped_models": ["t"],
                "trained_models": ["t"],
                "models": models,
            },
            "",
        )
    with pytest.raises(ConfigError, match=r"shipped_models: \['p'\] have source 'pretrained'"):
        validate_section(
            ParamsFile, {"studied_models": ["p"], "tasks": ["vqa"], "shipped_models": ["p"], "models": models}, ""
        )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"format": "vizwiz", "records": "data/inputs/a.json", "images": "data/inputs/i"},
            r"ood_benchmarks\.s\.format",
        ),
        (
            {"format": "gqa", "records": "elsewhere/a.json", "images": "data/inputs/i"},
            r"'elsewhere/a.json' is not under",
        ),
        ({"format": "gqa", "records": "data/inputs/a.json"}, r"ood_benchmarks\.s\.images: Field required"),
        (
            {"format": "gqa", "records": "data/inputs/a.json", "images": "data/inputs/i", "max_records": 0},
            "max_records",
        ),
    ],
)
def test_an_ood_benchmark_entry_is_checked_by_key(entry, message) -> None:
    base = {"studied_models": ["t"], "tasks": ["vqa"], "shipped_models": ["t"], "models": {"t": {"source": "train"}}}
    with pytest.raises(ConfigError, match=message):
        validate_section(ParamsFile, {**base, "ood_benchmarks": {"s": entry}}, "")
    good = {"format": "gqa", "records": "data/inputs/gqa/q.json", "images": "data/inputs/gqa/images"}
    assert (
        validate_section(ParamsFile, {**base, "ood_benchmarks": {"gqa_dev": good}}, "")
        .ood_benchmarks["gqa_dev"]
        .skip_bad
        is False
    )
    # The name becomes a folder and part of stage names.
    with pytest.raises(ConfigError, match=r"\['GQA dev'\]: a benchmark name is lower-case"):
        validate_section(ParamsFile, {**base, "ood_benchmarks": {"GQA dev": good}}, "")
