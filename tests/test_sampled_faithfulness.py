"""The sampled ground truth's estimators: equal to the exhaustive faithfulness when the sample is
every neuron, close to it (within their intervals) on a sample, and strict about bad samples."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.method.masks import faithfulness
from pipeline.outcomes.sampled_faithfulness import check_against_exhaustive, sample_neurons, sampled_faithfulness


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
    with pytest.raises(PipelineError, match="method 'ablation'"):
        check_against_exhaustive(["good"], ["t"], truth[None, None], 5, n_resamples=2, seed=0)


def test_check_against_exhaustive_reads_the_ground_truth_row():
    truth, scores = _population(seed=5)
    methods = ["ablation", *scores]
    importance = np.stack([truth, *scores.values()])[:, None]  # [method, task, layer, neuron]
    out = check_against_exhaustive(methods, ["vqa"], importance, 12, n_resamples=100, seed=0)
    assert out["figures"] == 9 and out["within"] >= 7
    good = out["by_task"]["vqa"]["good"]["spearman"]
    assert good["exhaustive"] == pytest.approx(faithfulness(scores["good"], truth, 12)["spearman"])
    assert good["within"] == (good["ci_low"] <= good["exhaustive"] <= good["ci_high"])
