"""Paired bootstrap, intervals and verdicts on hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.outcomes.statistics import (
    Interval,
    bootstrap_counts,
    cramers_v,
    distribution,
    interval,
    layer_preference,
    log_rho_auc,
    relative_drop,
    relative_drop_replicates,
    utility_replicates,
    verdict,
)
from pipeline.tasks.metrics import paper_bleu_statistics, paper_corpus_bleu


def test_counts_are_resamples_of_n_items():
    counts = bootstrap_counts(7, 50, np.random.default_rng(0))
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all() and counts.min() >= 0
    again = bootstrap_counts(7, 50, np.random.default_rng(0))
    assert (counts == again).all()  # seeded


def test_mean_interval_matches_the_normal_theory_answer():
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(2.0, 3.0, n)
    point, reps = utility_replicates(x[None, :], bootstrap_counts(n, 4000, np.random.default_rng(2)))
    iv = interval(float(point[0]), reps[0])
    se = x.std(ddof=0) / math.sqrt(n)
    assert iv.value == pytest.approx(x.mean())
    assert iv.half_width == pytest.approx(1.96 * se, rel=0.08)
    assert iv.ci_low < x.mean() < iv.ci_high


def test_pairing_keeps_a_constant_shift_exact():
    """masked = base - 0.1 on every item: the paired relative drop has no sampling noise
    beyond that of the base mean in the denominator, far less than an unpaired comparison."""
    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 1.0, 200)
    values = np.stack([base, base - 0.1])
    point, reps = utility_replicates(values, bootstrap_counts(200, 2000, np.random.default_rng(4)))
    dp, dr = relative_drop_replicates(point, reps)
    assert dp[0] == 0.0 and dp[1] == pytest.approx(100 * 0.1 / base.mean())
    paired = interval(float(dp[1]), dr[1])
    # unpaired: masked resampled independently of base
    other = utility_replicates(values[1:], bootstrap_counts(200, 2000, np.random.default_rng(5)))[1][0]
    unpaired = interval(float(dp[1]), relative_drop(reps[0], other))
    assert paired.ci_low > 0 and paired.half_width < unpaired.half_width / 4


def test_corpus_bleu_replicates_equal_bleu_of_the_resampled_corpus():
    preds = ["a red square", "a blue circle on the left", "two shapes", "a green diamond in the middle"]
    refs = [
        ["a red square"],
        ["a blue circle on the left", "blue circle"],
        ["two shapes here"],
        ["a green diamond in the middle", "a diamond"],
    ]
    stats = paper_bleu_statistics(preds, refs)
    assert float(utility_replicates(stats[None], np.ones((1, 4), int), "corpus_bleu")[0][0]) == pytest.approx(
        paper_corpus_bleu(preds, refs)
    )
    counts = bootstrap_counts(4, 5, np.random.default_rng(6))
    _, reps = utility_replicates(stats[None], counts, "corpus_bleu")
    for b, row in enumerate(counts):
        picked = [i for i, c in enumerate(row) for _ in range(c)]
        assert reps[0, b] == pytest.approx(paper_corpus_bleu([preds[i] for i in picked], [refs[i] for i in picked]))


@pytest.mark.parametrize(
    ("iv", "threshold", "want"),
    [
        (Interval(2.0, 0.5, 3.5), 0.0, "holds"),
        (Interval(-2.0, -3.5, -0.5), 0.0, "fails"),
        (Interval(0.4, -0.1, 0.9), 0.0, "undecided"),
        (Interval(0.4, 0.0, 0.9), 0.0, "undecided"),  # touching the threshold decides nothing
        (Interval(0.5, 0.3, 0.7), 0.25, "holds"),
        (Interval(0.2, 0.1, 0.24), 0.25, "fails"),
        (Interval(1.0, math.nan, math.nan), 0.0, "undecided"),
    ],
)
def test_verdict_from_the_interval(iv, threshold, want):
    assert verdict(iv, threshold) == want


def test_interval_drops_nan_replicates_and_flags_undefined_values():
    iv = interval(1.0, np.array([0.0, 1.0, 2.0, np.nan] * 50))
    assert iv.ci_low == pytest.approx(0.0) and iv.ci_high == pytest.approx(2.0)
    assert math.isnan(interval(math.nan, np.ones(10)).ci_low)
    assert interval(1.0, np.ones(10)).as_dict() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_distribution_of_random_draws():
    d = distribution(np.arange(41, dtype=float))
    assert d["mean"] == 20.0 and d["p2.5"] == pytest.approx(1.0) and d["p97.5"] == pytest.approx(39.0) and d["n"] == 41


def test_layer_preference_separates_distinct_from_shared_layers():
    rng = np.random.default_rng(7)
    distinct = pd.DataFrame({"task": ["a"] * 20 + ["b"] * 20, "layer": [0] * 18 + [1] * 2 + [3] * 18 + [2] * 2})
    res = layer_preference(distinct, 4, rng, n_resamples=300)
    assert res["interval"].value > 0.8 and verdict(res["interval"], res["null_q95"]) == "holds"
    assert res["p_value"] < 0.01
    shared = pd.DataFrame({"task": ["a"] * 20 + ["b"] * 20, "layer": list(range(4)) * 10})
    res = layer_preference(shared, 4, rng, n_resamples=300)
    assert res["interval"].value == 0.0 and verdict(res["interval"], res["null_q95"]) != "holds"
    assert cramers_v(np.array([[5, 0], [0, 5]])) == pytest.approx(1.0)


def test_log_rho_auc_is_the_mean_height_over_log_rho():
    rhos = [0.001, 0.01, 0.1]
    assert log_rho_auc(rhos, np.array([4.0, 4.0, 4.0])) == pytest.approx(4.0)
    assert log_rho_auc(rhos, np.array([0.0, 1.0, 2.0])) == pytest.approx(1.0)  # linear in log10(rho)
    reps = np.array([[0.0, 2.0], [1.0, 2.0], [2.0, 2.0]])  # [rho, replicate]
    assert log_rho_auc(rhos, reps) == pytest.approx([1.0, 2.0])
