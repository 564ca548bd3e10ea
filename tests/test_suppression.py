"""Held-out suppression: relative drops, summaries, and batched mask conditions vs separate runs."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.model.evaluation import evaluate_task
from pipeline.model.hooks import scale_neurons
from pipeline.report.html import Section, build_report
from pipeline.outcomes.suppression import relative_drop, suppression_matrices, suppression_summary, suppression_table


def test_relative_drop() -> None:
    assert relative_drop(0.5, 0.25) == 50.0
    assert relative_drop(-2.0, -3.0) == 50.0  # |base| in the denominator (log-probabilities)
    assert math.isnan(relative_drop(0.0, 0.1))


def test_summary_diagonal_and_selectivity() -> None:
    m = pd.DataFrame([[10.0, 2.0], [4.0, 20.0]], index=["a", "b"], columns=["a", "b"])
    s = suppression_summary(m)
    assert s["on_target_drop"] == 15.0 and s["off_target_drop"] == 3.0 and s["selectivity"] == 12.0


def test_batched_masks_equal_separate_runs(tiny_adapter, annotations, images) -> None:
    items = annotations[(annotations["split"] == "discovery") & annotations["task"].isin(["vqa", "retrieval"])]
    items = items.groupby("task").head(3)
    masks = pd.DataFrame({
        "method": ["m1", "m1", "m2", "m1", "m2"],
        "task": ["vqa", "vqa", "vqa", "retrieval", "retrieval"],
        "layer": [0, 1, 1, 0, 1], "neuron": [3, 7, 7, 1, 2],
    })
    table = suppression_table(tiny_adapter, items, images, masks, batch_size=8, max_new_tokens=4,
                              utility="teacher_forced")
    assert len(table) == 4 * 2  # (method, target) pairs x evaluated tasks
    for (method, target), g in masks.groupby(["method", "task"]):
        by_layer: dict[int, list[int]] = {}
        for l, n in zip(g["layer"], g["neuron"]):
            by_layer.setdefault(int(l), []).append(int(n))
        for eval_task in ("vqa", "retrieval"):
            sub = items[items["task"] == eval_task]
            with scale_neurons(tiny_adapter, {l: (n, 0.0) for l, n in by_layer.items()}):
                want = evaluate_task(tiny_adapter, eval_task, sub, images, batch_size=8, utility="teacher_forced",
                                     progress=False)[0].utility
            got = table[(table["method"] == method) & (table["target_task"] == target)
                        & (table["eval_task"] == eval_task)]["masked"].item()
            assert got == pytest.approx(want, abs=1e-5)
    mats = suppression_matrices(table)
    assert set(mats) == {"m1", "m2"} and list(mats["m1"].columns) == ["vqa", "retrieval"]


def test_report_is_self_contained(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png")
    build_report("R", "intro", [Section("t", "what it shows", table=pd.DataFrame({"a": [1.0]}),
                                        images=[tmp_path / "f.png", tmp_path / "missing.png"])], tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html and "what it shows" in html and "missing figure" in html
    assert "src=\"http" not in html and "<script" not in html
