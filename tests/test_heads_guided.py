"""Gradient-guided head localisation: the substitution probe, its gradient against finite
differences, guided scoring against the exhaustive sweep, and the comparison the report shows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import discovery_items, utility64

from pipeline.errors import PipelineError
from pipeline.method.heads import (
    all_heads,
    estimate_head_scores,
    guided_candidates,
    per_item_table,
    per_item_values,
    score_heads,
    score_heads_guided,
    score_heads_per_item,
    score_heads_screened,
    top_heads,
    with_estimate,
)
from pipeline.model.hooks import substitute_heads, trace_head_substitution
from pipeline.outcomes.head_stability import guided_localisation, head_stability, screened_localisation
from pipeline.tasks.items import item_prompts, teacher_forced_answers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _batch(annotations, images, task: str, n: int):
    items = discovery_items(annotations, task, n)
    return items, [images[i] for i in items["image_id"]], item_prompts(items), teacher_forced_answers(items)


def test_probe_at_one_is_the_mean_substitution(tiny_adapter, annotations, images):
    a = tiny_adapter
    _, imgs, prompts, answers = _batch(annotations, images, "vqa", 3)
    inputs = a.build_inputs(imgs, prompts, answers=answers)
    rows = [(0, 1), None, (1, 3)]
    with torch.no_grad(), substitute_heads(a, rows):
        expected = a.model(**inputs.tensors).logits
    with torch.no_grad(), trace_head_substitution(a, 3) as alphas:
        alphas[0][0, 1] = 1.0
        alphas[1][2, 3] = 1.0
        got = a.model(**inputs.tensors).logits
    with torch.no_grad():
        base = a.model(**inputs.tensors).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[0] - base[0]).abs().max() > 1e-3  # the probe did act
    torch.testing.assert_close(got[1], base[1], atol=1e-6, rtol=1e-6)  # and only on its rows


def test_estimate_equals_central_finite_differences(adapter64, annotations, images):
    """The estimate is -dU/dalpha at 0; U(alpha = +-eps) in float64 gives the same slope."""
    a = adapter64
    items, imgs, prompts, answers = _batch(annotations, images, "caption", 2)
    estimate = estimate_head_scores(a, items, images, batch_size=2, progress=False)
    assert estimate.shape == (2, a.num_layers, a.num_heads)
    eps = 1e-4
    fd = np.zeros_like(estimate)
    for l, h in all_heads(a.num_layers, a.num_heads):
        u = {}
        for sign in (1.0, -1.0):
            with torch.no_grad(), trace_head_substitution(a, 2) as alphas:
                alphas[l][:, h] = sign * eps
                u[sign] = utility64(a, imgs, prompts, answers)
        fd[:, l, h] = -(u[1.0] - u[-1.0]) / (2 * eps)
    assert np.abs(fd).max() > 1e-3  # the heads do move the utility
    np.testing.assert_allclose(estimate, fd, rtol=1e-4, atol=1e-6)


def test_guided_with_every_head_as_candidate_is_the_exhaustive_sweep(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "caption", 3)
    n_heads = a.num_layers * a.num_heads
    kw = dict(batch_size=7, utility="teacher_forced")
    exhaustive, ex_values, _ = score_heads_per_item(a, "caption", items, images, **kw)
    guided, values, kind = score_heads_guided(
        a, "caption", items, images, candidates=n_heads, gradient_batch_items=2, **kw
    )
    assert guided["exact"].all() and len(guided) == n_heads
    assert (guided[["layer", "head"]].to_numpy() == exhaustive[["layer", "head"]].to_numpy()).all()
    np.testing.assert_allclose(guided["score"], exhaustive["score"], atol=1e-5)
    np.testing.assert_allclose(values, ex_values, atol=1e-5)
    assert kind == "mean"
    for k in (1, 4, n_heads):
        pd.testing.assert_frame_equal(
            top_heads(guided, k)[["layer", "head", "rank"]], top_heads(exhaustive, k)[["layer", "head", "rank"]]
        )


def test_guided_scores_exactly_only_the_top_estimates(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "vqa", 3)
    guided, values, kind = score_heads_guided(
        a, "vqa", items, images, candidates=3, gradient_batch_items=2, batch_size=8, utility="teacher_forced"
    )
    estimate = estimate_head_scores(a, items, images, batch_size=3, progress=False).mean(axis=0)
    np.testing.assert_allclose(guided["estimate"], estimate[guided["layer"], guided["head"]], atol=1e-6)
    expected = set(guided_candidates(guided, 3))
    exact = guided[guided["exact"]]
    assert {(int(l), int(h)) for l, h in zip(exact["layer"], exact["head"])} == expected
    assert guided.loc[~guided["exact"], ["score", "intervened"]].isna().all().all()
    assert values.shape == (4, 3)  # the base, then the three candidates
    reference = score_heads(a, "vqa", items, images, batch_size=8, utility="teacher_forced", heads=sorted(expected))
    np.testing.assert_allclose(exact["score"], reference["score"], atol=1e-5)
    assert len(top_heads(guided, 3)) == 3
    with pytest.raises(PipelineError, match="only 3 of the model's 8 heads have exact scores"):
        top_heads(guided, 4, name="heads.top_k")
    # The stability check resamples the candidates alone; the per-item table round-trips.
    stability = head_stability(guided, *per_item_values(per_item_table(values, kind)), 2, n_resamples=20, seed=0)
    assert set(stability["top_heads"]) <= {f"{l}.{h}" for l, h in expected}
    with pytest.raises(PipelineError, match="exhaustive heads table"):
        guided_localisation(guided, 2, 3)


def test_screen_of_every_item_and_head_is_the_exhaustive_sweep(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "vqa", 3)
    n_heads = a.num_layers * a.num_heads
    kw = dict(batch_size=7, utility="teacher_forced")
    exhaustive, ex_values, ex_kind = score_heads_per_item(a, "vqa", items, images, **kw)
    for screen_items in (3, 10):  # the screen covers every item, or asks for more than there are
        screened, values, kind = score_heads_screened(
            a, "vqa", items, images, screen_items=screen_items, candidates=n_heads, **kw
        )
        assert screened["exact"].all() and kind == ex_kind
        pd.testing.assert_frame_equal(screened[list(exhaustive.columns)], exhaustive)
        np.testing.assert_array_equal(screened["screen_score"], exhaustive["score"])
        np.testing.assert_array_equal(values, ex_values)


def test_screen_keeps_its_best_heads_and_scores_them_on_every_item(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "caption", 4)
    kw = dict(batch_size=8, utility="teacher_forced")
    screened, values, kind = score_heads_screened(
        a, "caption", items, images, screen_items=2, candidates=3, name="heads.screened.candidates", **kw
    )
    screen = score_heads(a, "caption", items.iloc[:2], images, **kw)
    np.testing.assert_allclose(screened["screen_score"], screen["score"], atol=1e-6)
    expected = sorted((int(l), int(h)) for l, h in zip(*top_heads(screen, 3)[["layer", "head"]].to_numpy().T))
    exact = screened[screened["exact"]]
    assert [(int(l), int(h)) for l, h in zip(exact["layer"], exact["head"])] == expected
    assert screened.loc[~screened["exact"], ["score", "intervened"]].isna().all().all()
    assert values.shape == (4, 4) and kind == "mean"  # the base and three candidates, on all four items
    # The candidates' scores are over every item: as a sweep of those heads alone computes them.
    reference, ref_values, _ = score_heads_per_item(a, "caption", items, images, heads=expected, **kw)
    np.testing.assert_allclose(exact["score"], reference["score"], atol=1e-5)
    np.testing.assert_allclose(values, ref_values, atol=1e-5)
    np.testing.assert_allclose(screened["baseline"], reference["baseline"].iloc[0], atol=1e-5)
    # Downstream reads it as it reads a guided table: the top k among the candidates only.
    assert len(top_heads(screened, 3)) == 3
    with pytest.raises(PipelineError, match="only 3 of the model's 8 heads have exact scores"):
        top_heads(screened, 4, name="heads.top_k")
    stability = head_stability(screened, values, kind, 2, n_resamples=20, seed=0)
    assert set(stability["top_heads"]) <= {f"{l}.{h}" for l, h in expected}
    # The report's measure of the screen, from an exhaustive sweep's per-item values, keeps the
    # heads the screen itself keeps.
    exhaustive, ex_values, ex_kind = score_heads_per_item(a, "caption", items, images, **kw)
    measured = screened_localisation(exhaustive, ex_values, ex_kind, 2, 3, (2,))["2"]
    assert measured["screened_top_heads"] == [
        f"{l}.{h}" for l, h in zip(*top_heads(screened, 2)[["layer", "head"]].to_numpy().T)
    ]
    with pytest.raises(PipelineError, match="heads.screened.candidates = 9 but the model has 8"):
        score_heads_screened(
            a, "caption", items, images, screen_items=2, candidates=9, name="heads.screened.candidates", **kw
        )
    with pytest.raises(PipelineError, match="screen_items must be >= 1, got 0"):
        score_heads_screened(a, "caption", items, images, screen_items=0, candidates=3, **kw)


def _table(score, estimate) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": np.zeros(len(score), dtype=np.int32),
            "head": np.arange(len(score), dtype=np.int32),
            "score": np.asarray(score, dtype=np.float64),
            "estimate": np.asarray(estimate, dtype=np.float64),
        }
    )


def test_guided_localisation_recall():
    # The estimate ranks head 0, the best by exact score, last.
    scores = _table([6, 5, 4, 3, 2, 1], [1, 6, 5, 4, 3, 2])
    out = guided_localisation(scores, 2, 3)
    assert out["exhaustive_top_heads"] == ["0.0", "0.1"]
    assert out["guided_top_heads"] == ["0.1", "0.2"]
    assert out["recall"] == out["recall_estimate_only"] == out["candidate_recall"] == 0.5
    assert not out["same_heads"]
    assert out["spearman"] == pytest.approx(1 - 6 * (25 + 5 * 1) / (6 * 35))
    everything = guided_localisation(scores, 2, 6)
    assert everything["recall"] == 1.0 and everything["same_heads"] and everything["recall_estimate_only"] == 0.5
    with pytest.raises(PipelineError, match="heads.guided.candidates = 7 but the model has 6"):
        guided_localisation(scores, 2, 7)
    # A degenerate task (no head changes the utility): recall is defined, the correlation is not.
    flat = guided_localisation(_table([0, 0, 0, 0], [1, 2, 3, 4]), 2, 2)
    assert np.isnan(flat["spearman"]) and flat["exhaustive_top_heads"] == ["0.0", "0.1"]
    # Every head ties: guided keeps heads 2 and 3, as good as the sweep's 0 and 1.
    assert flat["guided_top_heads"] == ["0.2", "0.3"] and flat["recall"] == 0.0
    assert flat["recall_ties_counted"] == 1.0
    # A tie at the k-th score only: head 2 ties the sweep's second head, head 3 is below it.
    tied = guided_localisation(_table([3, 1, 1, 0], [0, 0, 2, 1]), 2, 2)
    assert tied["guided_top_heads"] == ["0.2", "0.3"] and tied["recall"] == 0.0
    assert tied["recall_ties_counted"] == 0.5
    assert out["recall_ties_counted"] == 0.5


def test_screened_localisation_keeps_the_screens_candidates():
    # Head 0 matters only on the last two items: a screen of the first two misses it.
    values = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # base
            [1.0, 1.0, 0.0, 0.0],  # head 0: drop 0.5 overall, 0 on the first two items
            [0.5, 0.5, 1.0, 1.0],  # head 1: 0.25, 0.5
            [0.8, 0.8, 0.8, 0.8],  # head 2: 0.2, 0.2
            [1.0, 1.0, 1.0, 1.0],  # head 3: 0, 0
        ]
    )
    scores = _table(values[0].mean() - values[1:].mean(axis=1), [0, 0, 0, 0])
    two = screened_localisation(scores, values, "mean", 1, 2, (1, 2, 4))
    assert list(two) == ["1", "2"]
    assert two["2"] == {
        "items": 2,
        "candidates": 2,
        "recall": 0.0,
        "recall_ties_counted": 0.0,
        "screened_top_heads": ["0.1"],
    }
    # A third candidate: heads 0 and 3 tie at 0 on the screen, and the layer order takes head 0.
    three = screened_localisation(scores, values, "mean", 1, 3, (2,))
    assert three["2"]["screened_top_heads"] == ["0.0"] and three["2"]["recall"] == 1.0
    with pytest.raises(PipelineError, match="heads.screened.candidates = 5 but the model has 4"):
        screened_localisation(scores, values, "mean", 1, 5, (2,))
    guided = scores.assign(score=[0.5, np.nan, 0.2, 0.0])
    with pytest.raises(PipelineError, match="exhaustive heads table"):
        screened_localisation(guided, values, "mean", 1, 2, (2,))


def test_with_estimate_marks_exact_rows():
    scores = _table([1.0, np.nan], [0, 0]).drop(columns="estimate")
    out = with_estimate(scores, np.array([[[0.5, -1.0]], [[1.5, 1.0]]]))
    np.testing.assert_allclose(out["estimate"], [1.0, 0.0])
    assert out["exact"].tolist() == [True, False]
