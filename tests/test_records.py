"""The typed records of the result files the report reads (``pipeline.outcomes.records``):
each loads a document of its stage's shape and dumps it back unchanged, a missing field stops
the load naming the file and the field, and the verdict rows built from them are the report's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.outcomes.records import (
    AttributionRecord,
    Comparison,
    QualityRecord,
    RecordError,
    SharedNeuronsRecord,
    SteeringRecord,
    SuppressionRecord,
    as_record,
    load_record,
    load_transfer,
    parse_comparison,
    write_record,
)
from pipeline.report.study import read_study_results, report_metrics, study_verdicts
from pipeline.report.verdict import verdict_metrics, verdict_rows

REPO = Path(__file__).resolve().parents[1]


def _iv(value, low, high, verdict: str | None = None) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high, **({"verdict": verdict} if verdict else {})}


def _figures(on: float, off: float) -> dict:
    return {"on_target_drop": _iv(on, on - 1, on + 1), "off_target_drop": _iv(off, off - 1, off + 1)}


def _summary(on: float, off: float) -> dict:
    return {**_figures(on, off), "selectivity": _iv(on - off, on - off - 1, on - off + 1)}


def _utility_suppression(with_curves: bool) -> dict:
    tasks = ("vqa", "ocr")
    out = {
        "baseline": {t: _iv(0.9, 0.85, 0.95) for t in tasks},
        "relative_drop": {m: {t: {s: _iv(1.0, 0.0, 2.0) for s in tasks} for t in tasks} for m in ("hones", "random")},
        "summary": {"hones": _summary(5.0, 1.0), "random": _summary(0.0, 0.5), "ablation": _summary(3.0, 0.1)},
    }
    if with_curves:
        out["random_draws"] = {
            k: {"mean": 0.1, "p2.5": -0.2, "p97.5": 0.4, "n": 5}
            for k in ("on_target_drop", "off_target_drop", "selectivity")
        }
    out["differences"] = {
        "hones-minus-random": {
            "on_target_drop": _iv(5.0, 1.0, 9.0, "holds"),
            "selectivity": _iv(4.5, 0.5, 8.5, "holds"),
        },
        "hones_lp-minus-hones": {
            "on_target_drop": _iv(-1.0, -3.0, 1.0, "undecided"),
            "selectivity": _iv(None, None, None, "undecided"),
        },
    }
    if with_curves:
        out["curve"] = {"hones": {"0.01": _figures(1.0, 0.0), "0.05": _figures(5.0, 1.0)}}
        out["auc"] = {"hones": _figures(3.0, 0.5)}
    out["sensitivity"] = {
        "ground_truth_on_target_drop": _iv(3.0, 2.0, 4.0),
        "excludes_zero": True,
        "half_width_within_third": True,
        "per_task": {t: _iv(3.0, 2.0, 4.0) for t in tasks},
    }
    return out


SUPPRESSION = {
    "confidence": 0.95,
    "resamples": 100,
    "equivalence_margin": 0.5,
    "items_per_task": {"likelihood": {"vqa": 30, "ocr": 30}, "generative": {"vqa": 30, "ocr": 30}},
    "likelihood": _utility_suppression(with_curves=True),
    "generative": _utility_suppression(with_curves=False),
}


def _utility_steering(variants: tuple[str, ...]) -> dict:
    cells = ("vqa", "ocr", "mean")
    return {
        "utility": {t: {v: _iv(0.5, 0.4, 0.6) for v in ("base", "learned", *variants)} for t in cells},
        "differences": {
            f"learned-minus-{v}": {t: _iv(0.01, 0.005, 0.02, "holds") for t in cells} for v in ("base", *variants)
        },
    }


STEERING = {
    "confidence": 0.95,
    "resamples": 100,
    "generative": _utility_steering(("fixed_amp", "grid_search")),
    "likelihood": _utility_steering(("grid_search",)),
    "scale_movement": {"vqa": {"mean_abs_change": 0.1, "max_abs_change": 0.5}},
}

_FAITH = {"spearman": 0.5, "precision_at_k": 0.25, "k": 4, "captured_effect": 0.75}
ATTRIBUTION = {
    "mask_size": 4,
    "faithfulness": {
        "vqa": {
            "hones": {**_FAITH, "n_significant": 12, "spearman_significant": float("nan")},
            "random": {**_FAITH, "n_significant": 12, "spearman_significant": 0.1},
            "ground_truth_se": {"median": 0.01, "max": 0.2},
        },
        "ocr": {"hones": _FAITH},
    },
    "faithfulness_on_ablation_items": {"vqa": {"hones": _FAITH}},
    "overlap_jaccard_hones": {"vqa": {"vqa": 1.0, "ocr": 0.1}, "ocr": {"vqa": 0.1, "ocr": 1.0}},
    "layer_preference_hones": {
        "cramers_v": _iv(0.3, 0.2, 0.4),
        "null_q95": 0.1,
        "p_value": 0.001,
        "verdict": "holds",
    },
}

QUALITY = {
    "generative": {"vqa": 0.9, "ocr": 1, "caption": 0.41, "retrieval": 0.85},
    "likelihood": {"vqa": 0.8, "ocr": 0.99, "caption": 0.7, "retrieval": 0.6},
    "generative_by_question_type": {"vqa": {"color": 0.95, "count": 1, "position": 0.8}},
}

SHARED = {
    "mask_size": 0.05,
    "utility": "likelihood",
    "confidence": 0.95,
    "resamples": 100,
    "pairs": {
        "vqa&ocr": {
            "shared_neurons": 3,
            "on_pair": {"shared": _iv(2.0, 1.0, 3.0), "subset:vqa": _iv(0.5, 0.0, 1.0)},
            "cross_task": {"shared": _iv(1.0, 0.0, 2.0), "subset:vqa": _iv(0.2, 0.0, 0.4)},
            "shared_minus_subset": {"on_pair": _iv(1.5, 0.5, 2.5), "cross_task": _iv(0.8, -0.2, 1.8)},
        }
    },
    "claims": {
        "shared_minus_subset": {**_iv(1.5, 0.5, 2.5, "holds"), "pairs": ["vqa&ocr"]},
    },
}

RECORDS = [
    (SuppressionRecord, SUPPRESSION),
    (SteeringRecord, STEERING),
    (AttributionRecord, ATTRIBUTION),
    (QualityRecord, QUALITY),
    (SharedNeuronsRecord, SHARED),
    (SharedNeuronsRecord, {"mask_size": 0.05, "utility": "likelihood", "pairs": {}, "claims": {}}),
]


def _write(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


@pytest.mark.parametrize(("cls", "document"), RECORDS, ids=lambda x: getattr(x, "__name__", ""))
def test_each_record_loads_its_document_and_dumps_it_back_unchanged(tmp_path, cls, document) -> None:
    path = _write(tmp_path / "doc.json", document)
    record = load_record(cls, path)
    assert json.dumps(record.document(), indent=2) + "\n" == path.read_text()  # ints stay ints, NaN stays NaN


def test_records_expose_the_fields_typed() -> None:
    supp = SuppressionRecord.model_validate(SUPPRESSION)
    assert supp.likelihood.summary["hones"].on_target_drop.value == 5.0
    assert list(supp.likelihood.differences) == [Comparison("hones", "random"), Comparison("hones_lp", "hones")]
    assert supp.likelihood.difference("hones", "random").selectivity.verdict == "holds"
    assert supp.likelihood.difference("hones", "atp") is None
    assert supp.likelihood.difference("hones_lp", "hones").selectivity.value is None  # non-finite when written
    assert supp.generative.random_draws is None and supp.generative.auc is None
    steer = SteeringRecord.model_validate(STEERING)
    assert steer.of("likelihood").mean_difference("learned", "grid_search").verdict == "holds"
    assert steer.of("likelihood").mean_difference("learned", "fixed_amp") is None
    attribution = AttributionRecord.model_validate(ATTRIBUTION)
    assert list(attribution.faithfulness["vqa"].methods) == ["hones", "random"]
    assert attribution.faithfulness["vqa"].ground_truth_se.max == 0.2
    assert attribution.faithfulness["ocr"].methods["hones"].figures() == _FAITH
    assert QualityRecord.model_validate(QUALITY).generative["ocr"] == 1
    assert SharedNeuronsRecord.model_validate(SHARED).claims.vqa_pairs_minus_others is None


def test_a_comparison_name_is_parsed_once_and_other_forms_are_refused(tmp_path) -> None:
    assert parse_comparison("hones_lp-minus-hones") == Comparison("hones_lp", "hones")
    assert str(Comparison("learned", "grid_search")) == "learned-minus-grid_search"
    for bad in ("hones-vs-random", "hones-minus-", "hones-minus-random-minus-atp", "hones minus random"):
        with pytest.raises(ValueError, match="not of the form"):
            parse_comparison(bad)
    doc = json.loads(json.dumps(SUPPRESSION))
    doc["likelihood"]["differences"]["hones-vs-random"] = doc["likelihood"]["differences"].pop("hones-minus-random")
    path = _write(tmp_path / "suppression.json", doc)
    with pytest.raises(
        RecordError, match=r"suppression\.json: .*likelihood\.differences\.hones-vs-random.*not of the form"
    ):
        load_record(SuppressionRecord, path)


@pytest.mark.parametrize(
    ("cls", "document", "drop", "field"),
    [
        (SuppressionRecord, SUPPRESSION, ("likelihood", "summary", "hones", "selectivity", "ci_low"), None),
        (
            SuppressionRecord,
            SUPPRESSION,
            ("likelihood", "differences", "hones-minus-random", "on_target_drop", "verdict"),
            None,
        ),
        (SuppressionRecord, SUPPRESSION, ("likelihood",), None),
        (SteeringRecord, STEERING, ("scale_movement",), None),
        (SteeringRecord, STEERING, ("generative", "differences", "learned-minus-base", "mean", "value"), None),
        (AttributionRecord, ATTRIBUTION, ("faithfulness", "vqa", "hones", "k"), "faithfulness.vqa.methods.hones.k"),
        (AttributionRecord, ATTRIBUTION, ("mask_size",), None),
        (SharedNeuronsRecord, SHARED, ("pairs", "vqa&ocr", "shared_minus_subset", "on_pair"), None),
        (SharedNeuronsRecord, SHARED, ("claims",), None),
    ],
)
def test_a_missing_field_is_an_error_naming_the_file_and_the_field(tmp_path, cls, document, drop, field) -> None:
    doc = json.loads(json.dumps(document))
    parent = doc
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    path = _write(tmp_path / "result.json", doc)
    with pytest.raises(RecordError) as err:
        load_record(cls, path)
    message = str(err.value)
    assert isinstance(err.value, PipelineError) and "\n" not in message
    assert message.startswith(f"{path}: ") and f"{field or '.'.join(drop)}: Field required" in message


def test_an_unknown_field_or_a_wrong_type_is_an_error(tmp_path) -> None:
    doc = json.loads(json.dumps(SUPPRESSION))
    doc["likelihood"]["summary"]["hones"]["on_target_drop"]["ci_hgih"] = 1.0
    doc["likelihood"]["sensitivity"]["per_task"]["vqa"]["value"] = "12"
    with pytest.raises(RecordError, match=r"ci_hgih: Extra inputs are not permitted.*per_task\.vqa\.value"):
        load_record(SuppressionRecord, _write(tmp_path / "s.json", doc))
    with pytest.raises(RecordError, match=r"absent\.json: file not found"):
        load_record(QualityRecord, tmp_path / "absent.json")


def test_a_producer_result_becomes_its_record_and_is_written_unchanged(tmp_path) -> None:
    record = as_record(SuppressionRecord, SUPPRESSION, "suppression statistics")
    write_record(record, tmp_path / "suppression.json")
    assert (tmp_path / "suppression.json").read_text() == json.dumps(SUPPRESSION, indent=2) + "\n"


def test_a_producer_result_that_is_not_its_record_stops_before_anything_is_written(tmp_path) -> None:
    missing = {k: v for k, v in SUPPRESSION.items() if k != "items_per_task"}
    with pytest.raises(RecordError, match=r"^suppression statistics: not a valid SuppressionRecord: items_per_task"):
        as_record(SuppressionRecord, missing, "suppression statistics")
    # Every field present but not in the record's order: the file would not be what was computed.
    reordered = {"resamples": SUPPRESSION["resamples"], **{k: v for k, v in SUPPRESSION.items() if k != "resamples"}}
    with pytest.raises(RecordError, match="does not write back the document it was made from"):
        as_record(SuppressionRecord, reordered, "suppression statistics")
    assert not list(tmp_path.iterdir())


def test_a_transfer_that_measured_nothing_is_none(tmp_path) -> None:
    _write(tmp_path / "t" / "suppression.json", {})
    _write(tmp_path / "t" / "steering_intervals.json", {})
    nothing = load_transfer(tmp_path / "t")
    assert nothing.suppression is None and nothing.steering is None
    _write(tmp_path / "t" / "suppression.json", SUPPRESSION)
    _write(tmp_path / "t" / "steering_intervals.json", {**STEERING, "confidence": None})
    with pytest.raises(RecordError, match=r"t/steering_intervals\.json: .*confidence"):
        load_transfer(tmp_path / "t")


def _study(tmp_path: Path, model: str = "m") -> tuple[Path, Path]:
    data, metrics = tmp_path / "data", tmp_path / "metrics"
    _write(metrics / "model_quality" / f"{model}.json", QUALITY)
    _write(metrics / "attribution" / f"{model}.json", ATTRIBUTION)
    _write(metrics / "logit_lens" / f"{model}.json", {})
    _write(data / "evaluate" / model / "suppression.json", SUPPRESSION)
    _write(data / "steer" / model / "steering_intervals.json", STEERING)
    _write(data / "transfer" / model / "suppression.json", SUPPRESSION)
    _write(data / "transfer" / model / "steering_intervals.json", STEERING)
    _write(data / "shared_neurons" / model / "shared.json", SHARED)
    (data / "models" / model).mkdir(parents=True)
    return data, metrics


def test_the_study_reads_records_and_its_verdict_rows_are_the_reports(tmp_path) -> None:
    data, metrics = _study(tmp_path)
    results = read_study_results(data, metrics, ["m"])
    rows = study_verdicts(
        results,
        {},
        data,
        steer_utility="generative",
        n_resamples=10,
        seed=0,
        confidence=0.95,
        equivalence_margin=0.5,
    )
    claims = [(r["claim"], r["utility"], r["verdict"]) for r in rows]
    assert claims[:4] == [
        ("HONES on-target drop exceeds random's", "likelihood", "holds"),
        ("hones_lp on-target drop exceeds hones's", "likelihood", "undecided"),
        ("HONES selectivity exceeds random's", "likelihood", "holds"),
        ("hones_lp selectivity exceeds hones's", "likelihood", "undecided"),
    ]
    assert ("learned steering beats Grid-Search (mean over tasks)", "generative", "holds") in claims
    assert ("task neurons prefer different layers (Cramér's V of HONES masks)", "-", "holds") in claims
    assert ("out of distribution: HONES on-target drop exceeds random's", "generative", "holds") in claims
    assert claims[-1] == (
        "shared neurons drop their pair's tasks more than as many other neurons of the masks",
        "likelihood",
        "holds",
    )
    null_row = next(
        r for r in rows if r["claim"] == "hones_lp selectivity exceeds hones's" and r["utility"] == "likelihood"
    )
    assert (null_row["value"], null_row["ci_low"], null_row["ci_high"]) == (None, None, None)
    written = report_metrics(results, rows, {}, {}, {})
    assert written["verdict.json"] == verdict_metrics(rows)
    # The metrics that carry the stages' documents carry them as written.
    assert written["steering.json"] == {"m": STEERING}
    assert written["shared_neurons.json"] == {"m": SHARED}
    assert written["suppression_summary.json"]["m"]["generative"] == {
        k: SUPPRESSION["generative"][k] for k in ("baseline", "summary", "differences", "sensitivity")
    }
    assert written["transfer.json"]["m"]["steering"] == STEERING
    assert written["transfer_ood.json"] == {}


IMPORTED = {"format": "gqa", "records_file": "q.json", "split": "ood", "items": {"vqa": 4}, "images": 2, "skipped": []}


def test_a_brought_set_adds_its_rows_and_metrics_and_must_be_there(tmp_path) -> None:
    data, metrics = _study(tmp_path)
    folder = data / "transfer_ood" / "m-gqa"
    _write(folder / "suppression.json", SUPPRESSION)
    _write(folder / "steering_intervals.json", STEERING)
    _write(folder / "import.json", IMPORTED)
    results = read_study_results(data, metrics, ["m"], ["gqa"])
    assert results.ood_transfer["m"]["gqa"].imported.items == {"vqa": 4}
    kw = dict(steer_utility="generative", n_resamples=10, seed=0, confidence=0.95, equivalence_margin=0.5)
    rows = study_verdicts(results, {}, data, **kw)
    assert ("out of distribution (gqa): HONES on-target drop exceeds random's", "generative", "holds") in [
        (r["claim"], r["utility"], r["verdict"]) for r in rows
    ]
    written = report_metrics(results, rows, {}, {}, {})
    assert written["transfer_ood.json"]["m"]["gqa"]["import"] == IMPORTED
    assert written["transfer_ood.json"]["m"]["gqa"]["steering"] == STEERING
    # A listed set whose stage wrote nothing, or an import summary lacking a field, is named.
    (folder / "import.json").unlink()
    with pytest.raises(RecordError, match=r"m-gqa/import\.json: file not found"):
        read_study_results(data, metrics, ["m"], ["gqa"])
    _write(folder / "import.json", {k: v for k, v in IMPORTED.items() if k != "skipped"})
    with pytest.raises(RecordError, match=r"m-gqa/import\.json: .*skipped: Field required"):
        read_study_results(data, metrics, ["m"], ["gqa"])


def test_a_study_result_missing_a_field_stops_the_report_naming_it(tmp_path) -> None:
    data, metrics = _study(tmp_path)
    broken = json.loads(json.dumps(STEERING))
    del broken["likelihood"]["differences"]["learned-minus-grid_search"]["vqa"]["verdict"]
    path = _write(data / "steer" / "m" / "steering_intervals.json", broken)
    with pytest.raises(
        RecordError,
        match=rf"{path}: .*likelihood\.differences\.learned-minus-grid_search\.vqa\.verdict: Field required",
    ):
        read_study_results(data, metrics, ["m"])


@pytest.mark.skipif(not (REPO / "metrics" / "verdict.json").is_file(), reason="no checked-out study results")
def test_the_checked_out_verdicts_are_rebuilt_from_the_records() -> None:
    """Where the study's results are checked out: every model's own rows rebuilt from its records
    are the rows the report wrote into metrics/verdict.json (the recipes' rows need the per-item
    scores and are left to the report stage)."""
    from stages.params import read_params

    params = read_params(REPO / "params.yaml", ("studied_models", "steer.utility"))
    models = [m for m in params.studied_models if (REPO / "data" / "evaluate" / m / "suppression.json").is_file()]
    if not models:
        pytest.skip("no checked-out evaluate results")
    results = read_study_results(REPO / "data", REPO / "metrics", models)
    written = json.loads((REPO / "metrics" / "verdict.json").read_text())
    for m in models:
        rows = verdict_rows(
            m, results.suppression[m], results.steering[m], results.attribution[m], params.steer.utility
        )
        rebuilt = verdict_metrics(rows)[m]
        assert {c: written[m][c] for c in rebuilt} == rebuilt
