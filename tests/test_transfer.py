"""Transfer: the steer stage's choices read back, the variants, their evaluation and the verdict rows."""

from __future__ import annotations

import contextlib

import pandas as pd
import pytest
import torch
from conftest import discovery_items

from pipeline.errors import PipelineError
from pipeline.model.evaluation import evaluate_task
from pipeline.model.hooks import scale_neurons
from pipeline.outcomes.records import SteeringRecord, SuppressionRecord
from pipeline.outcomes.steering import steering_statistics
from pipeline.outcomes.suppression import MaskCondition, score_suppression, suppression_scores
from pipeline.outcomes.transfer import (
    TransferSteeringJob,
    chosen_grid_scales,
    run_transfer_steering_job,
    transfer_outcomes,
    transfer_variants,
)
from pipeline.report.verdict import transfer_rows


def _steering(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(t, v, "dev" if v.startswith("grid@") else "test", u, "m") for t, v, u in rows],
        columns=["task", "variant", "split", "utility", "metric"],
    )


def test_grid_scale_is_read_back_with_the_steer_stage_rule() -> None:
    """Highest utility on the grid; ties to the scale closest to 1, then the smaller; the
    evaluation-split variants are not grid candidates."""
    table = _steering(
        [
            ("vqa", "grid@0.5", 0.8),
            ("vqa", "grid@1.5", 0.9),
            ("vqa", "grid@2", 0.9),
            ("vqa", "learned", 0.99),
            ("ocr", "grid@0.75", 0.7),
            ("ocr", "grid@1.25", 0.7),
            ("ocr", "grid@1", 0.6),
        ]
    )
    assert chosen_grid_scales(table) == {"vqa": 1.5, "ocr": 0.75}
    with pytest.raises(PipelineError, match="steering.parquet: no grid@"):
        chosen_grid_scales(table[~table["variant"].str.startswith("grid@")])


def test_variants_and_what_is_missing_is_named() -> None:
    masks = {"vqa": [(0, 1), (1, 2)]}
    learned = pd.DataFrame({"task": ["vqa", "vqa"], "layer": [0, 1], "neuron": [1, 2], "scale": [1.2, 0.9]})
    got = transfer_variants(masks, learned, {"vqa": 1.5}, ["vqa"])
    assert got == {
        "vqa": {"base": {}, "grid_search": {(0, 1): 1.5, (1, 2): 1.5}, "learned": {(0, 1): 1.2, (1, 2): 0.9}}
    }
    with pytest.raises(PipelineError, match="no HONES mask for task 'ocr'"):
        transfer_variants(masks, learned, {"vqa": 1.5}, ["ocr"])
    with pytest.raises(PipelineError, match="no grid-search scale for task 'vqa'"):
        transfer_variants(masks, learned, {}, ["vqa"])
    with pytest.raises(PipelineError, match="cover 1 neurons, not the 2"):
        transfer_variants(masks, learned.head(1), {"vqa": 1.5}, ["vqa"])


def test_each_variant_equals_the_model_steered_alone(tiny_adapter, annotations, images) -> None:
    """The variants run as conditions of shared batches; each equals a separate evaluation
    under ``scale_neurons`` with its scales, and the statistics compare learned with both."""
    items = discovery_items(annotations, "vqa", 4).assign(split="ood")
    scales = {"base": {}, "grid_search": {(0, 3): 0.0, (1, 5): 0.0}, "learned": {(0, 3): 1.7, (1, 5): 0.2}}
    job = TransferSteeringJob("vqa", items, tuple(scales.items()), "dev", "generative", 8, 4)
    run = run_transfer_steering_job((tiny_adapter, images), job)
    assert (run.train_split, run.eval_split) == ("dev", "ood")
    for name, s in scales.items():
        spec = {}
        for (layer, neuron), v in s.items():
            spec.setdefault(layer, ([], []))
            spec[layer][0].append(neuron)
            spec[layer][1].append(v)
        spec = {l: (torch.tensor(n), torch.tensor(v)) for l, (n, v) in spec.items()}
        with scale_neurons(tiny_adapter, spec) if spec else contextlib.nullcontext():
            alone = evaluate_task(
                tiny_adapter, "vqa", items, images, batch_size=8, max_new_tokens=4, utility="likelihood"
            )[0]
        assert run.likelihood[name].per_item == pytest.approx(alone.per_item, abs=1e-5), name
    stats = steering_statistics([run], "generative", n_resamples=50, seed=0)
    assert {"learned-minus-base", "learned-minus-grid_search"} <= {str(c) for c in stats.likelihood.differences}


def test_one_job_list_equals_suppression_and_steering_run_apart(tiny_adapter, annotations, images) -> None:
    """``transfer_outcomes`` deals suppression and steering jobs from one list (each worker
    loads the model once); its results equal each part run on its own."""
    items = pd.concat([discovery_items(annotations, t, 3) for t in ("vqa", "ocr")]).assign(split="ood")
    conditions = [MaskCondition("hones", "vqa", 0.01, 0, True, ((0, 3), (1, 5)))]
    scales = (("base", {}), ("learned", {(0, 3): 1.7, (1, 5): 0.2}))
    jobs = [
        TransferSteeringJob(t, items[items["task"] == t], scales, "dev", "likelihood", 8, 4) for t in ("vqa", "ocr")
    ]
    scores, runs = transfer_outcomes(
        items, conditions, jobs, lambda: (tiny_adapter, images), batch_size=8, max_new_tokens=4
    )
    apart = suppression_scores(tiny_adapter, items, images, conditions, batch_size=8, max_new_tokens=4)
    assert list(scores) == list(apart)
    for key in apart:
        for c, r in apart[key].items():
            assert scores[key][c].per_item == pytest.approx(r.per_item, abs=1e-6), (key, c)
    assert [r.task for r in runs] == ["vqa", "ocr"]
    for job, run in zip(jobs, runs):
        alone = run_transfer_steering_job((tiny_adapter, images), job)
        for name in ("base", "learned"):
            assert run.likelihood[name].per_item == pytest.approx(alone.likelihood[name].per_item, abs=1e-6)
    likelihood_only = score_suppression(
        items, conditions, lambda: (tiny_adapter, images), batch_size=8, max_new_tokens=None, generative=False
    )
    assert {u for u, _ in likelihood_only} == {"likelihood"}
    with pytest.raises(PipelineError, match="max_new_tokens"):
        score_suppression(items, conditions, lambda: (tiny_adapter, images), batch_size=8, max_new_tokens=None)


def _iv(value: float, low: float, high: float, verdict: str | None = None) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high, **({"verdict": verdict} if verdict else {})}


def _hones_summary(on_target: dict) -> dict:
    """A summary holding HONES alone, its on-target drop ``on_target`` (the other figures 0)."""
    zero = _iv(0.0, 0.0, 0.0)
    return {"hones": {"on_target_drop": on_target, "off_target_drop": zero, "selectivity": zero}}


def test_transfer_rows_decide_from_the_intervals() -> None:
    undecided = _iv(4.0, -1.0, 8.0, "undecided")
    suppression = SuppressionRecord.model_validate(
        {
            "confidence": 0.95,
            "resamples": 10,
            "equivalence_margin": 0.5,
            "items_per_task": {},
            "likelihood": {
                "baseline": {},
                "relative_drop": {},
                "summary": _hones_summary(_iv(5.0, 1.0, 9.0)),
                "differences": {"hones-minus-random": {"on_target_drop": undecided, "selectivity": undecided}},
            },
            "generative": {"baseline": {}, "relative_drop": {}, "summary": _hones_summary(_iv(0.1, -0.2, 0.3))},
        }
    )
    steering = SteeringRecord.model_validate(
        {
            "confidence": 0.95,
            "resamples": 10,
            "likelihood": {
                "utility": {},
                "differences": {
                    "learned-minus-base": {"mean": _iv(0.01, 0.005, 0.02, "holds")},
                    "learned-minus-grid_search": {"mean": _iv(-0.01, -0.02, -0.005, "fails")},
                },
            },
            "scale_movement": {},
        }
    )
    rows = {
        (r["claim"], r["utility"]): r["verdict"] for r in transfer_rows("m", suppression, steering, "likelihood", 0.5)
    }
    assert rows == {
        ("out of distribution: HONES masks drop their task (on-target drop)", "likelihood"): "holds",
        ("out of distribution: HONES on-target drop exceeds random's", "likelihood"): "undecided",
        # The whole interval lies within the 0.5-point margin: equivalent to no drop.
        ("out of distribution: HONES masks drop their task (on-target drop)", "generative"): "equivalent",
        (
            "out of distribution: learned steering scales improve utility over base (mean over tasks)",
            "likelihood",
        ): "holds",
        ("out of distribution: learned steering scales beat Grid-Search (mean over tasks)", "likelihood"): "fails",
    }
    assert transfer_rows("m", None, None, "likelihood", 0.5) == []
    # On a set you brought, every claim names it.
    brought = transfer_rows("m", suppression, steering, "likelihood", 0.5, ood_set="gqa")
    assert {r["claim"] for r in brought} == {
        c.replace("out of distribution:", "out of distribution (gqa):") for c, _ in rows
    }
