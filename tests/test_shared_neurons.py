"""Shared neurons: which neurons a pair of masks shares, the size-matched draws, the statistics
and the verdict rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.model.evaluation import TaskResult
from pipeline.outcomes.shared_neurons import (
    no_shared_neurons,
    shared_conditions,
    shared_neuron_statistics,
    shared_sets,
)
from pipeline.report.verdict import shared_neuron_rows

TASKS = ["vqa", "ocr", "caption"]


def _masks(by_task: dict[str, list[tuple[int, int]]], rho: float = 0.05) -> pd.DataFrame:
    rows = [
        ("hones", t, rho, 0, False, rank, l, n, 1.0)
        for t, neurons in by_task.items()
        for rank, (l, n) in enumerate(neurons)
    ]
    return pd.DataFrame(rows, columns=["method", "task", "rho", "draw", "headline", "rank", "layer", "neuron", "score"])


MASKS = _masks(
    {
        "vqa": [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6)],
        "ocr": [(0, 2), (1, 3), (3, 7), (3, 8), (3, 9)],
        "caption": [(0, 1), (3, 10), (3, 11)],
    }
)


def test_shared_sets_pairs_draws_and_errors() -> None:
    sets = shared_sets(MASKS, TASKS, 0.05, draws=3, seed=0)
    # ocr and caption share nothing: no pair.
    assert [(s.a, s.b, s.shared) for s in sets] == [
        ("vqa", "ocr", ((0, 2), (1, 3))),
        ("vqa", "caption", ((0, 1),)),
    ]
    vqa_ocr = sets[0]
    for task, pool in (("vqa", {(0, 1), (1, 4), (2, 5), (2, 6)}), ("ocr", {(3, 7), (3, 8), (3, 9)})):
        assert len(vqa_ocr.subsets[task]) == 3
        for draw in vqa_ocr.subsets[task]:
            assert len(draw) == 2 and set(draw) <= pool, (task, draw)
    assert shared_sets(MASKS, TASKS, 0.05, draws=3, seed=0) == sets
    conds = shared_conditions(sets, 0.05)
    assert [(c.method, c.target_task, c.draw) for c in conds[:4]] == [
        ("shared", "vqa&ocr", 0),
        ("subset:vqa", "vqa&ocr", 0),
        ("subset:vqa", "vqa&ocr", 1),
        ("subset:vqa", "vqa&ocr", 2),
    ]
    assert len(conds) == 2 * (1 + 2 * 3)
    with pytest.raises(PipelineError, match=r"no hones mask of size 0.01 for task\(s\) \['vqa', 'ocr', 'caption'\]"):
        shared_sets(MASKS, TASKS, 0.01, draws=1, seed=0)
    with pytest.raises(PipelineError, match="draws must be >= 1"):
        shared_sets(MASKS, TASKS, 0.05, draws=0, seed=0)


def _result(task: str, values: np.ndarray) -> TaskResult:
    return TaskResult(task, "likelihood", float(values.mean()), values)


def test_statistics_match_relative_drops_computed_by_hand() -> None:
    """Every item's likelihood is 0.5 at base; a condition that scales a task's items by f drops
    it by 100 (1 - f) %. The shared neurons of vqa&ocr drop vqa and ocr by 20%, caption by 10%;
    every subset drops nothing; vqa&caption's shared neuron drops everything by 4%."""
    sets = shared_sets(MASKS, TASKS, 0.05, draws=2, seed=0)
    conds = shared_conditions(sets, 0.05)
    factor = {}
    for k, c in enumerate(conds, start=1):
        if c.method == "shared" and c.target_task == "vqa&ocr":
            factor[k] = {"vqa": 0.8, "ocr": 0.8, "caption": 0.9}
        elif c.method == "shared":
            factor[k] = {t: 0.96 for t in TASKS}
        else:
            factor[k] = {t: 1.0 for t in TASKS}
    base = np.full(12, 0.5)
    scores = {
        ("likelihood", t): {0: _result(t, base), **{k: _result(t, base * f[t]) for k, f in factor.items()}}
        for t in TASKS
    }
    record = shared_neuron_statistics(
        scores, conds, sets, mask_size=0.05, n_resamples=50, seed=0, equivalence_margin=0.5
    )
    vqa_ocr = record.pairs["vqa&ocr"]
    assert vqa_ocr.shared_neurons == 2
    assert vqa_ocr.on_pair["shared"].value == pytest.approx(20.0)
    assert vqa_ocr.cross_task["shared"].value == pytest.approx(10.0)
    assert vqa_ocr.on_pair["subset:ocr"].value == pytest.approx(0.0)
    assert vqa_ocr.shared_minus_subset.on_pair.value == pytest.approx(20.0)
    assert record.pairs["vqa&caption"].on_pair["shared"].value == pytest.approx(4.0)
    # Every pair holds VQA: there is no other pair to compare with.
    assert record.claims.vqa_pairs_minus_others is None
    assert record.claims.shared_minus_subset.value == pytest.approx((20.0 + 4.0) / 2)
    assert record.claims.shared_minus_subset.verdict == "holds"
    assert record.document()["mask_size"] == 0.05 and "vqa_pairs_minus_others" not in record.document()["claims"]

    rows = shared_neuron_rows("m", record)
    assert [(r["claim"], r["verdict"]) for r in rows] == [
        ("shared neurons drop their pair's tasks more than as many other neurons of the masks", "holds")
    ]
    nothing_shared = no_shared_neurons(0.05)
    assert nothing_shared.document() == {"mask_size": 0.05, "utility": "likelihood", "pairs": {}, "claims": {}}
    assert shared_neuron_rows("m", nothing_shared) == []


def test_vqa_pairs_are_compared_with_the_other_pairs() -> None:
    masks = _masks(
        {"vqa": [(0, 1), (0, 2)], "ocr": [(0, 1), (1, 1)], "caption": [(1, 1), (2, 2)]},
    )
    sets = shared_sets(masks, TASKS, 0.05, draws=1, seed=0)
    assert [s.pair for s in sets] == ["vqa&ocr", "ocr&caption"]
    conds = shared_conditions(sets, 0.05)
    drop = {("shared", "vqa&ocr"): 0.7, ("shared", "ocr&caption"): 0.9}
    base = np.full(8, 0.4)
    scores = {
        ("likelihood", t): {
            0: _result(t, base),
            **{k: _result(t, base * drop.get((c.method, c.target_task), 1.0)) for k, c in enumerate(conds, start=1)},
        }
        for t in TASKS
    }
    record = shared_neuron_statistics(scores, conds, sets, mask_size=0.05, n_resamples=50, seed=0)
    claim = record.claims.vqa_pairs_minus_others
    # Cross-task: vqa&ocr's shared neurons drop caption by 30%, ocr&caption's drop vqa by 10%.
    assert claim.value == pytest.approx(20.0)
    assert claim.pairs_with_vqa == ["vqa&ocr"] and claim.other_pairs == ["ocr&caption"]
