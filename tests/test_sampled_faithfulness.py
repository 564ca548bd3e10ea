"""The sampled ground truth's estimators: equal to the exhaustive faithfulness when the sample is
every neuron, close to it (within their intervals) on a sample, and strict about bad samples."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.method.masks import faithfulness
from pipeline.outcomes.sampled_faithfulness import (
    census_methods,
    draw_sample,
    sample_from_table,
    sample_neurons,
    sample_table,
    sampled_faithfulness,
    sampled_ground_truth,
)


def _population(seed: int = 0, shape=(4, 300)):
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))  # heavy-tailed effects
    scores = {
        "good": truth + 0.3 * rng.standard_normal(shape),
        "noisy": truth + 3.0 * rng.standard_normal(shape),
        "unrelated": rng.standard_normal(shape),
    }
    return truth, scores


def test_a_sample_of_every_neuron_gives_the_exhaustive_figures():
    truth, scores = _population()
    k = 12
    sample = sample_neurons(scores, k, truth.size, truth.size, rng=np.random.default_rng(1))
    (near, near_drawn), (far, far_drawn) = sample.strata
    assert (near == near_drawn).all() and (far == far_drawn).all() and sample.sampled.all()
    assert not (sample.census & near).any() and not (sample.census & far).any() and not (near & far).any()
    out = sampled_faithfulness(scores, truth, sample, k, n_resamples=20, seed=0)
    for method, s in scores.items():
        exact = faithfulness(s, truth, k)
        for figure in ("spearman", "precision_at_k", "captured_effect"):
            got = out[method][figure]
            assert got["value"] == pytest.approx(exact[figure], abs=1e-12), (method, figure)
            # Resampling a stratum that is the whole rest: every resample is a valid estimate.
            assert got["ci_low"] <= got["ci_high"]
    sizes = out["sample"]
    assert sizes["population"] == truth.size and sizes["k"] == k
    assert sizes["census"] + sizes["near"] + sizes["far"] == truth.size


def test_a_small_sample_estimates_within_its_intervals():
    truth, scores = _population(seed=3)
    k = 12
    sample = sample_neurons(scores, k, 40, 100, rng=np.random.default_rng(2))
    for method, s in scores.items():  # every method's top k is measured exactly
        top = np.argsort(-s.ravel(), kind="stable")[:k]
        assert sample.census.ravel()[top].all()
    assert sample.sizes()["near"] == 40 and sample.sizes()["far"] == 100
    poisoned = truth.copy()
    poisoned[~sample.sampled] = np.nan  # only the sample's effects may be read
    out = sampled_faithfulness(scores, poisoned, sample, k, n_resamples=300, seed=0)
    inside = 0
    for method, s in scores.items():
        exact = faithfulness(s, truth, k)
        for figure in ("spearman", "precision_at_k", "captured_effect"):
            got = out[method][figure]
            inside += got["ci_low"] - 0.02 <= exact[figure] <= got["ci_high"] + 0.02
    assert inside >= 8  # of 9 figures
    # The ordering of the methods survives the sampling.
    assert out["good"]["spearman"]["value"] > out["noisy"]["spearman"]["value"] > out["unrelated"]["spearman"]["value"]


def test_bad_samples_are_refused():
    truth, scores = _population()
    sample = sample_neurons(scores, 5, 10, 10, rng=np.random.default_rng(0))
    holes = truth.copy()
    holes[sample.strata[1][1]] = np.nan
    with pytest.raises(PipelineError, match="a sampled neuron has no finite effect"):
        sampled_faithfulness(scores, holes, sample, 5, n_resamples=2, seed=0)
    with pytest.raises(PipelineError, match="top 6 is not in the census"):
        sampled_faithfulness(scores, truth, sample, 6, n_resamples=2, seed=0)
    with pytest.raises(PipelineError, match="noisy scores have shape"):
        sample_neurons({"good": truth, "noisy": truth[:2]}, 5, 10, 10, np.random.default_rng(0))
    with pytest.raises(PipelineError, match="near and far are shares of the census"):
        draw_sample(scores, 5, near=-1.0, far=0.5, seed=0, index=0)
    with pytest.raises(PipelineError, match=r"evaluate.methods: \['lape'\] not among"):
        census_methods(["hones", "lape", "ablation"], ["hones", "atp", "ablation"])
    with pytest.raises(PipelineError, match="at least one method besides ablation"):
        census_methods(["ablation"], ["hones", "ablation"])
    assert census_methods(["atp", "ablation", "hones"], ["hones", "atp", "ablation"]) == ["atp", "hones"]


def test_draw_sample_sizes_its_strata_from_the_census():
    _, scores = _population(seed=4)
    sample = draw_sample(scores, 12, near=1.0, far=0.5, seed=7, index=2)
    sizes = sample.sizes()
    assert sizes["near"] == sizes["census"] and sizes["far"] == sizes["census"] // 2
    again = draw_sample(scores, 12, near=1.0, far=0.5, seed=7, index=2)
    assert (again.sampled == sample.sampled).all()  # seeded: the report and the stage agree
    assert not (draw_sample(scores, 12, near=1.0, far=0.5, seed=7, index=3).sampled == sample.sampled).all()


def test_a_sample_table_reads_back_and_refuses_holes():
    truth, scores = _population(seed=6)
    sample = sample_neurons(scores, 5, 30, 20, np.random.default_rng(0))
    se = np.abs(truth) / 10
    table = sample_table(sample, np.where(sample.sampled, truth, np.nan), se)
    assert len(table) == truth.size and list(table["stratum"].cat.categories) == ["census", "near", "far"]
    assert table["effect"].notna().sum() == sample.sampled.sum() == table["sampled"].sum()
    back, effect = sample_from_table(table.sample(frac=1.0, random_state=0), "t.parquet (vqa)")
    assert (back.census == sample.census).all()
    for (p0, d0), (p1, d1) in zip(back.strata, sample.strata):
        assert (p0 == p1).all() and (d0 == d1).all()
    np.testing.assert_array_equal(effect[sample.sampled], truth[sample.sampled])
    holed = table.copy()
    holed.loc[holed.index[holed["sampled"]][0], "effect"] = np.nan
    with pytest.raises(PipelineError, match=r"t.parquet \(vqa\): a sampled neuron has no finite effect"):
        sample_from_table(holed, "t.parquet (vqa)")
    with pytest.raises(PipelineError, match="rows, expected one per neuron"):
        sample_from_table(table.iloc[1:], "t.parquet (vqa)")


def test_sampled_ground_truth_compares_with_the_exhaustive_one_where_it_has_it():
    truth, scores = _population(seed=5)
    sample = draw_sample(scores, 12, near=1.0, far=0.5, seed=0, index=0)
    measured = np.where(sample.sampled, truth + 1e-9, np.nan)  # the same zeroing, run again
    out = sampled_ground_truth(
        {"vqa": scores, "ocr": scores},
        {"vqa": (sample, measured), "ocr": (sample, measured)},
        12,
        exhaustive={"vqa": truth, "ocr": np.full_like(truth, np.nan)},
        n_resamples=100,
        seed=0,
    )
    assert out["figures"] == 9 and out["within"] >= 7  # only vqa has an exhaustive ground truth
    good = out["by_task"]["vqa"]["good"]["spearman"]
    assert good["exhaustive"] == pytest.approx(faithfulness(scores["good"], truth, 12)["spearman"])
    assert good["within"] == (good["ci_low"] <= good["exhaustive"] <= good["ci_high"])
    assert out["by_task"]["vqa"]["effect_max_abs_difference"] == pytest.approx(1e-9, abs=1e-12)
    ocr = out["by_task"]["ocr"]
    assert "exhaustive" not in ocr["good"]["spearman"] and "effect_max_abs_difference" not in ocr
    assert ocr["good"]["spearman"]["value"] == good["value"]
