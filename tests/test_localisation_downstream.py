"""What a cheaper head localisation changes downstream: the heads each keeps, the HONES mask
recomputed under them as the pipeline computes it, and the drop compared on held-out items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import discovery_items

from pipeline.method.attribution import importance_matrix, task_statistics
from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations
from pipeline.method.heads import score_heads_per_item, top_heads, with_estimate
from pipeline.method.masks import build_masks, headline_mask
from pipeline.outcomes.localisation_downstream import (
    DumpSettings,
    alternative_heads,
    hones_mask_under,
    localisation_downstream,
)
from pipeline.outcomes.suppression import MaskCondition, relative_drops, score_suppression

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SETTINGS = DumpSettings(True, "joined", "float32", 1 << 20, batch_size=16, gradient_batch_size=4)


def test_alternative_heads_are_the_heads_each_localisation_keeps():
    # Head 0.0 scores best over every item but nothing on the first two; the estimate ranks it last.
    values = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # base
            [1.0, 1.0, 0.0, 0.0],  # 0.0: 0.5 overall
            [0.5, 0.5, 1.0, 1.0],  # 0.1: 0.25
            [0.8, 0.8, 0.8, 0.8],  # 0.2: 0.2
            [1.0, 1.0, 1.0, 1.0],  # 0.3: 0
        ]
    )
    scores = pd.DataFrame(
        {
            "layer": np.zeros(4, dtype=np.int32),
            "head": np.arange(4, dtype=np.int32),
            "score": values[0].mean() - values[1:].mean(axis=1),
            "estimate": [0.0, 3.0, 2.0, 1.0],
        }
    )
    heads = alternative_heads(scores, values, "mean", 1, guided_candidates=2, screen=(2, 2))
    assert {n: [f"{l}.{h}" for l, h in zip(t["layer"], t["head"])] for n, t in heads.items()} == {
        "exhaustive": ["0.0"],
        "guided": ["0.1"],
        "screened": ["0.1"],
    }
    assert heads["guided"]["score"].tolist() == [0.25]  # its exact score over every item
    every = alternative_heads(scores, values, "mean", 1, guided_candidates=4, screen=(4, 2))
    assert all(t["head"].tolist() == [0] for t in every.values())  # a screen of every item is the sweep


@pytest.fixture(scope="module")
def vqa_heads(tiny_adapter, annotations, images):
    items = discovery_items(annotations, "vqa", 4)
    scores, values, kind = score_heads_per_item(
        tiny_adapter, "vqa", items, images, batch_size=16, utility="teacher_forced"
    )
    return (
        items,
        with_estimate(scores, np.zeros((len(items), tiny_adapter.num_layers, tiny_adapter.num_heads))),
        values,
        kind,
    )


def test_the_mask_under_other_heads_is_the_pipelines_mask(tiny_adapter, images, vqa_heads, tmp_path):
    items, scores, _, _ = vqa_heads
    heads = top_heads(scores, 2)
    store = dump_activations(
        tiny_adapter,
        DumpRequest(items, images, heads, True, "joined"),
        tmp_path / "vqa.zarr",
        DumpStorage("float32", "test", {}),
        DumpExecution(16, 4),
    )
    methods, tasks, importance = importance_matrix({"vqa": task_statistics(store)}, seed=0)
    masks = build_masks(methods, tasks, importance, [0.05], 0.05)
    expected = tuple(sorted(headline_mask(masks, "hones", "vqa")))
    assert hones_mask_under(tiny_adapter, items, images, heads, SETTINGS, 0.05, tmp_path / "scratch") == expected
    assert not (tmp_path / "scratch").exists()  # the scratch dump is removed


def test_downstream_compares_the_masks_on_held_out_items(tiny_adapter, annotations, images, vqa_heads, tmp_path):
    items, scores, _, _ = vqa_heads
    exhaustive = top_heads(scores, 2)
    best = (scores["layer"] == exhaustive["layer"][0]) & (scores["head"] == exhaustive["head"][0])
    other = top_heads(scores[~best], 2)  # the best head missed
    exhaustive_mask = hones_mask_under(tiny_adapter, items, images, exhaustive, SETTINGS, 0.05, tmp_path / "a")
    held_out = annotations[(annotations["split"] == "test") & (annotations["task"] == "vqa")].head(4)
    out = localisation_downstream(
        tiny_adapter,
        "vqa",
        {"exhaustive": exhaustive, "guided": other, "screened": exhaustive},
        exhaustive_mask,
        discovery=items,
        held_out=held_out,
        images=images,
        settings=SETTINGS,
        rho=0.05,
        n_resamples=50,
        seed=0,
        confidence=0.95,
        scratch=tmp_path / "scratch",
    )
    assert out["screened"] == {"top_heads": out["screened"]["top_heads"], "same_heads": True, "mask_jaccard": 1.0}
    guided = out["guided"]
    assert not guided["same_heads"] and 0 <= guided["mask_jaccard"] <= 1
    other_mask = hones_mask_under(tiny_adapter, items, images, other, SETTINGS, 0.05, tmp_path / "b")
    a, b = set(exhaustive_mask), set(other_mask)
    assert guided["mask_jaccard"] == pytest.approx(len(a & b) / len(a | b))
    # The drops are the evaluate stage's arithmetic on the same conditions.
    conditions = [MaskCondition("hones", "vqa", 0.05, 0, True, m) for m in (exhaustive_mask, other_mask)]
    scored = score_suppression(
        held_out, conditions, lambda: (tiny_adapter, images), batch_size=16, max_new_tokens=None, generative=False
    )
    cells = relative_drops({"vqa": scored[("likelihood", "vqa")]}, 50, 0).cells
    assert guided["exhaustive_on_target_drop"]["value"] == pytest.approx(cells[(1, "vqa")][0], abs=1e-4)
    assert guided["on_target_drop"]["value"] == pytest.approx(cells[(2, "vqa")][0], abs=1e-4)
    diff = guided["difference"]
    assert diff["value"] == pytest.approx(cells[(2, "vqa")][0] - cells[(1, "vqa")][0], abs=1e-4)
    assert diff["ci_low"] <= diff["value"] <= diff["ci_high"]
