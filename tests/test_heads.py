"""Critical-head localisation: batched scoring equals the one-head-at-a-time reference; top_heads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import discovery_items

from pipeline.method.heads import HEAD_COLUMNS, all_heads, score_heads, score_heads_naive, top_heads
from pipeline.model.evaluation import evaluate_task

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def check_equal(batched: pd.DataFrame, naive: pd.DataFrame, n_heads: int) -> None:
    assert list(batched.columns) == list(HEAD_COLUMNS) == list(naive.columns)
    assert len(batched) == len(naive) == n_heads
    assert (batched[["layer", "head"]].values == naive[["layer", "head"]].values).all()
    for col in ("score", "baseline", "intervened"):
        assert np.abs(batched[col].to_numpy() - naive[col].to_numpy()).max() <= 1e-5, col
    np.testing.assert_allclose(batched["score"], batched["baseline"] - batched["intervened"], atol=1e-12)
    assert (batched[["metric", "utility"]].values == naive[["metric", "utility"]].values).all()


def test_batched_equals_naive_teacher_forced(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "caption", 3)
    # batch_size 7 does not divide the 3 x 9 rows: batches mix items and conditions.
    batched = score_heads(a, "caption", items, images, batch_size=7, utility="teacher_forced")
    naive = score_heads_naive(a, "caption", items, images, batch_size=7, utility="teacher_forced")
    check_equal(batched, naive, a.num_layers * a.num_heads)
    assert batched["metric"].iloc[0] == "answer_logprob"
    assert batched["baseline"].iloc[0] < 0  # a mean log-probability
    assert np.abs(batched["score"]).max() > 1e-4  # substituting a head changes the utility
    assert batched["score"].nunique() == len(batched)  # ... and each head differently
    assert list(zip(batched["layer"], batched["head"])) == all_heads(a.num_layers, a.num_heads)


def test_batched_equals_naive_generative(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "vqa", 4)
    # A random model answers garbage; take its own greedy answers as references, so that the base
    # utility is 1 and a head that changes an answer has a positive score.
    base = evaluate_task(a, "vqa", items, images, batch_size=8, max_new_tokens=3, progress=False)[0]
    items["references"] = [[p] for p in base.predictions]
    heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
    batched = score_heads(a, "vqa", items, images, batch_size=6, max_new_tokens=3, heads=heads)
    naive = score_heads_naive(a, "vqa", items, images, batch_size=6, max_new_tokens=3, heads=heads)
    check_equal(batched, naive, len(heads))
    assert batched["metric"].iloc[0] == "vqa_accuracy" and (batched["utility"] == "generative").all()
    assert batched["baseline"].iloc[0] == pytest.approx(1.0)
    assert batched["score"].max() > 0


def test_teacher_forced_retrieval_batched_equals_naive(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "retrieval", 2)
    heads = [(0, 1), (1, 3)]
    batched = score_heads(a, "retrieval", items, images, batch_size=4, utility="teacher_forced", heads=heads)
    naive = score_heads_naive(a, "retrieval", items, images, batch_size=4, utility="teacher_forced", heads=heads)
    check_equal(batched, naive, len(heads))


def test_top_heads_order_and_ties():
    scores = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1, 2, 2],
            "head": [0, 1, 0, 1, 0, 1],
            "score": [0.1, 0.5, 0.5, np.nan, -0.2, 0.5],
            "baseline": 1.0,
            "intervened": 0.0,
            "metric": "m",
            "utility": "generative",
        }
    ).sample(frac=1.0, random_state=3)  # input order must not matter
    top = top_heads(scores, 4)
    # Ties at 0.5 are broken by layer, then head; NaN sorts last.
    assert list(zip(top["layer"], top["head"])) == [(0, 1), (1, 0), (2, 1), (0, 0)]
    assert top["rank"].tolist() == [1, 2, 3, 4] and top["rank"].dtype == np.int32
    assert top.index.tolist() == [0, 1, 2, 3]
    everything = top_heads(scores, 6)
    assert len(everything) == 6 and everything["score"].iloc[:5].is_monotonic_decreasing
    assert np.isnan(everything["score"].iloc[-1])
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        top_heads(scores, 0)
    # More heads than the model has is an error naming the caller's key, never a silent cut.
    with pytest.raises(
        ValueError,
        match=r"heads\.top_k = 100 but the model has 6 attention heads "
        r"\(3 layers x 2 heads\); set heads\.top_k to at most 6",
    ):
        top_heads(scores, 100, name="heads.top_k")


def test_retrieval_margins_batched_equals_naive(tiny_adapter, annotations, images):
    """Retrieval's NDCG@5 from the candidates' margins: the batched heads share the tower and the
    layers below each batch's lowest head (``condition_layers``); the naive loop does not."""
    a = tiny_adapter
    items = discovery_items(annotations, "retrieval", 2)
    heads = [(0, 2), (1, 0), (1, 3)]
    batched = score_heads(a, "retrieval", items, images, batch_size=5, heads=heads)
    naive = score_heads_naive(a, "retrieval", items, images, batch_size=5, heads=heads)
    check_equal(batched, naive, len(heads))


def _head_table(n_layers: int, n_heads: int, values: np.ndarray) -> pd.DataFrame:
    from pipeline.method.heads import _table, all_heads

    point = values.mean(axis=1)
    return _table(all_heads(n_layers, n_heads), float(point[0]), list(point[1:]), "vqa_accuracy", "generative")


def test_head_stability_of_a_clear_winner_and_of_noise() -> None:
    from pipeline.outcomes.head_stability import head_stability

    rng = np.random.default_rng(0)
    n = 60
    base = np.ones(n)
    # head 1.0 drops every item's score by 0.5; every other head by noise around 0
    heads = rng.normal(0.0, 0.05, size=(4, n)) + base
    heads[2] = base - 0.5
    values = np.vstack([base, heads])
    table = _head_table(2, 2, values)
    st = head_stability(table, values, "mean", 1, n_resamples=200, seed=0)
    assert st["top_heads"] == ["1.0"] and st["recall"]["mean"] == 1.0 and st["selection_frequency"] == {"1.0": 1.0}
    assert not st["degenerate"] and st["hones_reduces_to"] is None
    # with k = 2, the second head is a coin toss among three noisy ones: recall well below 1
    st2 = head_stability(table, values, "mean", 2, n_resamples=200, seed=0)
    assert st2["top_heads"][0] == "1.0" and 0.5 <= st2["recall"]["mean"] < 0.95
    assert st2["selection_frequency"]["1.0"] == 1.0 and len(st2["selection_frequency"]) >= 3


def test_head_stability_names_degenerate_scores() -> None:
    from pipeline.outcomes.head_stability import head_stability

    values = np.ones((5, 10))  # no substitution changes any item: every score is 0
    st = head_stability(_head_table(2, 2, values), values, "mean", 2, n_resamples=50, seed=0)
    assert st["positive_heads"] == 0 and st["degenerate"] and st["hones_reduces_to"] == "hones_nohead"
    assert st["top_heads"] == ["0.0", "0.1"]  # the tie-break of top_heads, as the dump would take them


def test_head_stability_follows_the_per_item_scores_of_score_heads(tiny_adapter, annotations, images) -> None:
    from pipeline.method.heads import score_heads_per_item, top_heads
    from pipeline.outcomes.head_stability import head_stability

    items = discovery_items(annotations, "vqa", 6)
    table, values, kind = score_heads_per_item(
        tiny_adapter, "vqa", items, images, batch_size=8, max_new_tokens=3, utility="likelihood"
    )
    assert kind == "mean" and values.shape == (1 + len(table), len(items))
    np.testing.assert_allclose(values[0].mean() - values[1:].mean(axis=1), table["score"], rtol=1e-9, atol=1e-12)
    from pipeline.method.heads import per_item_table, per_item_values

    back, back_kind = per_item_values(per_item_table(values, kind).sample(frac=1.0, random_state=0))
    assert back_kind == kind and np.array_equal(back, values)
    bleu = np.random.default_rng(0).integers(0, 9, size=(3, 4, 10)).astype(np.float64)
    back, back_kind = per_item_values(per_item_table(bleu, "corpus_bleu"))
    assert back_kind == "corpus_bleu" and np.array_equal(back, bleu)
    st = head_stability(table, values, kind, 3, n_resamples=100, seed=0)
    top = top_heads(table, 3)
    assert st["top_heads"] == [f"{l}.{h}" for l, h in zip(top["layer"], top["head"])]
    assert 0.0 <= st["recall"]["p2.5"] <= st["recall"]["mean"] <= 1.0
