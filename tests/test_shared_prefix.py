"""Shared prefixes (``hooks.forward_sharing_prefix``) against the plain per-row forward, on
every supported family's tiny model (LLaVA's text model has GQA: 4 query, 2 key/value heads),
with left padding (the distinct sequences have different lengths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import PROMPTS, WITH_PROCESSOR, make_images
from tiny_models import cached_adapter as adapter_for

from pipeline.errors import PipelineError
from pipeline.model.adapter import ModelAdapter, find_vision_tower
from pipeline.model.hooks import (
    ablate_neurons_per_row,
    forward_sharing_prefix,
    lowest_layer,
    substitute_heads,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SOURCES = [0, 0, 0, 1, 1, 1, 0]  # two distinct sequences, rows interleaved out of order at the end


def _inputs(a: ModelAdapter):
    images = make_images(2)
    prompts = [PROMPTS[0], PROMPTS[2]]  # different lengths: the shorter row is left-padded
    unique = a.build_inputs(images, prompts).tensors
    rows = a.build_inputs([images[s] for s in SOURCES], [prompts[s] for s in SOURCES]).tensors
    return unique, rows


def _row_heads(a: ModelAdapter, first: int):
    """Per row: untouched, or heads at layers >= first (one row with two heads)."""
    L, H = a.num_layers, a.num_heads
    top = L - 1
    return [None, (first, 0), (top, H - 1), (first, 1), None, [(first, 2), (top, 0)], (top, 1)]


@pytest.mark.parametrize("family", WITH_PROCESSOR)
@pytest.mark.parametrize("first", [0, 1])
def test_shared_prefix_equals_plain_forward_with_heads_substituted(family, first):
    a = adapter_for(family)
    unique, rows = _inputs(a)
    heads = _row_heads(a, first)
    assert lowest_layer(heads) == first
    with torch.no_grad(), substitute_heads(a, heads):
        expected = a.model(**rows).logits
    got = forward_sharing_prefix(
        a, unique, rows, torch.tensor(SOURCES), first, lambda: substitute_heads(a, heads)
    ).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The interventions changed the logits: the test compares something that matters.
    with torch.no_grad():
        plain = a.model(**rows).logits
    assert (plain - expected).abs().max() > 1e-4


@pytest.mark.parametrize("family", WITH_PROCESSOR)
def test_shared_prefix_equals_plain_forward_with_neurons_ablated(family):
    a = adapter_for(family)
    unique, rows = _inputs(a)
    top = a.num_layers - 1
    neurons = [(top, i) for i in range(len(SOURCES))]
    with torch.no_grad(), ablate_neurons_per_row(a, neurons):
        expected = a.model(**rows).logits
    got = forward_sharing_prefix(
        a, unique, rows, torch.tensor(SOURCES), top, lambda: ablate_neurons_per_row(a, neurons), logits_to_keep=3
    ).logits
    torch.testing.assert_close(got, expected[:, -3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_shared_prefix_computes_the_tower_for_distinct_images_and_one_more(family):
    a = adapter_for(family)
    unique, rows = _inputs(a)
    tower = find_vision_tower(a.model)
    seen: set[int] = set()  # batch sizes the tower's linear layers computed
    handles = [
        m.register_forward_pre_hook(lambda m, args: seen.add(int(args[0].shape[0])))
        for m in tower.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        forward_sharing_prefix(a, unique, rows, torch.tensor(SOURCES), 1, lambda: substitute_heads(a, [(1, 0)] * 7))
    finally:
        for h in handles:
            h.remove()
    assert seen == {2, 1}  # the two distinct images, then one image standing in for the seven rows
    assert "forward" not in vars(tower)  # the real tower is back
    assert all("forward" not in vars(layer) for layer in a.layers)


def test_intervention_below_the_first_layer_is_an_error():
    a = adapter_for("llava")
    unique, rows = _inputs(a)
    with pytest.raises(ValueError, match="below first_layer=1"):
        forward_sharing_prefix(a, unique, rows, torch.tensor(SOURCES), 1, lambda: substitute_heads(a, [(0, 0)] * 7))
    assert all("forward" not in vars(layer) for layer in a.layers)
    assert all(not layer._forward_pre_hooks for layer in a.layers)


def test_rows_that_are_not_copies_are_an_error():
    a = adapter_for("llava")
    unique, _ = _inputs(a)
    other = a.build_inputs(make_images(7, seed=3), [PROMPTS[1]] * 7).tensors  # another length
    with pytest.raises(ValueError, match="copies of the distinct sequences"):
        forward_sharing_prefix(a, unique, other, torch.tensor(SOURCES), 1, None)


# --- evaluation: rows ordered by their condition's first layer, prefixes shared -------------------
from conftest import discovery_items  # noqa: E402

from pipeline.model.evaluation import evaluate_conditions  # noqa: E402
from pipeline.model.hooks import condition_scales, lowest_scaled_layer  # noqa: E402


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_evaluation_with_condition_layers_equals_plain_rows(tiny_adapter, annotations, images, task):
    """Retrieval's margins (generative and likelihood) and caption likelihood (several references
    per item) under per-condition neuron scales starting at different layers, with and without
    ``condition_layers``: the same per-item scores to 1e-5."""
    a = tiny_adapter
    items = discovery_items(annotations, task, 3)
    top = a.num_layers - 1
    strong = {(1, i): 30.0 for i in range(40)}  # the tiny random model's margins move little otherwise
    conditions = [{}, {(0, 1): 0.0, (top, 2): 3.0}, {(top, 5): 0.0, (top, 7): 4.0}, {(top, 3): 1.0}, strong]
    layers = [lowest_scaled_layer(c) for c in conditions]
    assert layers == [None, 0, top, None, 1]
    wanted = {"likelihood": range(len(conditions))}
    if task == "retrieval":
        wanted["generative"] = range(len(conditions))
    kw = dict(batch_size=7, condition_hooks=condition_scales(a, conditions), progress=False)
    plain = evaluate_conditions(a, task, items, images, wanted, **kw)
    shared = evaluate_conditions(a, task, items, images, wanted, condition_layers=layers, **kw)
    moved = 0.0
    for utility, by_cond in plain.items():
        for c, res in by_cond.items():
            np.testing.assert_allclose(shared[utility][c].per_item, res.per_item, atol=1e-5, rtol=0)
            moved = max(moved, float(np.abs(res.per_item - by_cond[0].per_item).max()))
    assert moved > 1e-4  # the conditions move the scores by more than the tolerance: not vacuous


def test_condition_layers_must_cover_the_conditions(tiny_adapter, annotations, images):
    a = tiny_adapter
    items = discovery_items(annotations, "caption", 1)
    hooks = condition_scales(a, [{}, {(0, 1): 0.0}])
    with pytest.raises(PipelineError, match="condition 1 has no entry"):
        evaluate_conditions(
            a,
            "caption",
            items,
            images,
            {"likelihood": [0, 1]},
            batch_size=4,
            condition_hooks=hooks,
            condition_layers=[None],
            progress=False,
        )


def test_ablation_effects_with_shared_prefix_equal_full_rows(tiny_adapter, annotations, images):
    """The ground truth's single-neuron ablation: batches that straddle a layer boundary start at
    the lower layer; effects equal the full rows' to 1e-5."""
    from pipeline.method.ablation import neuron_ablation_effects

    a = tiny_adapter
    items = discovery_items(annotations, "vqa", 2)
    batch = a.ffn_width // 3 + 1  # not a divisor of the layer width: some batches span two layers
    shared, se_shared = neuron_ablation_effects(a, items, images, batch_size=batch)
    full, se_full = neuron_ablation_effects(a, items, images, batch_size=batch, share_prefix=False)
    np.testing.assert_allclose(shared, full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(se_shared, se_full, atol=1e-5, rtol=0)
    assert np.abs(full).max() > 1e-3


def test_capture_block_with_shared_prefix_equals_full_rows(tiny_adapter, annotations, images):
    """The dump's z under head conditions at every layer, copied below each batch's first layer
    from the base rows: equal to the full rows' (batches mixing base and head rows included)."""
    from pipeline.method.dump import capture_block
    from pipeline.tasks.items import item_prompts

    a = tiny_adapter
    items = discovery_items(annotations, "ocr", 5)
    imgs, prompts = [images[i] for i in items["image_id"]], item_prompts(items)
    row_heads = [None, (1, 2), (0, 3), [(1, 0), (1, 1)]]
    shared = capture_block(a, imgs, prompts, row_heads, batch_size=4)
    full = capture_block(a, imgs, prompts, row_heads, batch_size=4, share_prefix=False)
    np.testing.assert_allclose(shared, full, atol=1e-5 * np.abs(full).max(), rtol=0)
    assert np.abs(full[1:] - full[:1]).max() > 1e-4


@pytest.mark.parametrize("family", WITH_PROCESSOR)
def test_repeated_rows_equal_the_processors_rows(family):
    """Where a family's tensors are indexed by row, repeating the distinct rows' tensors gives
    bitwise what the processor gives for the repeated rows; elsewhere the processor runs."""
    from pipeline.model.evaluation import _ROW_INDEXED_FAMILIES, _repeated_rows

    a = adapter_for(family)
    images, prompts, answers = make_images(2), [PROMPTS[0], PROMPTS[2]], ["red circle", "a cat"]
    unique = a.build_inputs(images, prompts, answers=answers)
    got = _repeated_rows(a, unique, torch.tensor(SOURCES))
    if family not in _ROW_INDEXED_FAMILIES:
        assert got is None
        return
    want = a.build_inputs(
        [images[s] for s in SOURCES], [prompts[s] for s in SOURCES], answers=[answers[s] for s in SOURCES]
    )
    assert got.tensors.keys() == want.tensors.keys()
    for key, t in want.tensors.items():
        assert torch.equal(got.tensors[key], t), key
    assert torch.equal(got.last_prompt_index, want.last_prompt_index)
    assert torch.equal(got.answer_mask, want.answer_mask)
