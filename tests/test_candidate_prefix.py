"""Candidates scored after their shared prefix (``hooks.candidates``) against the full forward,
on every family's tiny model: equal logits where the family shares, None (nothing computed)
where it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import WITH_PROCESSOR, make_images
from tiny_models import cached_adapter as adapter_for

from pipeline.model.evaluation import evaluate_task
from pipeline.model.hooks import ablate_neurons_per_row, substitute_heads
from pipeline.model.hooks.candidates import CANDIDATE_PREFIX_FAMILIES, last_logits_sharing_candidates

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TEMPLATES = ["is this {candidate} ? answer yes or no", "{candidate} . does it describe the image ?"]
CANDIDATES = ["a red circle", "a blue square on the left", "cat", "a red circle and a cat"]


def _rows():
    """Rows of two items (image, template) x their candidates x two conditions, the
    conditions' rows of an item interleaved, one item's candidates split by the other's."""
    images = make_images(2)
    rows = []
    for item, cands in ((0, CANDIDATES), (1, CANDIDATES[:3])):
        for cond in (0, 1):
            for cand in cands:
                rows.append((item, cond, TEMPLATES[item].format(candidate=cand)))
    rows = rows[:5] + rows[-3:] + rows[5:-3]
    return (
        [images[i] for i, _, _ in rows],
        [p for _, _, p in rows],
        [i for i, _, _ in rows],
        [(i, c) for i, c, _ in rows],
        [c for _, c, _ in rows],
    )


def _full_last_logits(a, images, prompts, hooks):
    inputs = a.build_inputs(images, prompts)
    with torch.no_grad(), hooks():
        logits = a.model(**inputs.tensors).logits
    return logits[torch.arange(len(prompts)), inputs.last_prompt_index]


def _conditions(a, conds):
    """Condition 1: a head substituted in layer 0 and a neuron of the top layer zeroed."""
    top = a.num_layers - 1

    def heads(rows):
        return substitute_heads(a, [(0, 1) if conds[r] == 1 else None for r in rows])

    def neurons(rows):
        return ablate_neurons_per_row(a, [[(top, 3), (0, 5)] if conds[r] == 1 else None for r in rows])

    def both(rows):
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(heads(rows))
        stack.enter_context(neurons(rows))
        return stack

    return both


# suffix_rows 3: the suffix passes cut groups of 3 and 4 candidates, each from a copy of the cache.
@pytest.mark.parametrize("suffix_rows", [None, 3])
@pytest.mark.parametrize("family", sorted(CANDIDATE_PREFIX_FAMILIES))
def test_shared_candidate_prefix_equals_the_full_forward(family, suffix_rows):
    a = adapter_for(family)
    images, prompts, items, groups, conds = _rows()
    interventions = _conditions(a, conds)
    got = last_logits_sharing_candidates(a, images, prompts, items, groups, interventions, suffix_rows=suffix_rows)
    assert got is not None
    expected = _full_last_logits(a, images, prompts, lambda: interventions(list(range(len(prompts)))))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The interventions changed the logits of condition 1's rows: the comparison covers them.
    plain = _full_last_logits(a, images, prompts, lambda: interventions([]))
    changed = [b for b, c in enumerate(conds) if c == 1]
    assert (plain[changed] - expected[changed]).abs().max() > 1e-4


@pytest.mark.parametrize("family", sorted(set(WITH_PROCESSOR) - CANDIDATE_PREFIX_FAMILIES))
def test_other_families_do_not_share(family):
    a = adapter_for(family)
    images, prompts, items, groups, conds = _rows()

    def refuse(rows):
        raise AssertionError("nothing may run for a family that does not share")

    assert last_logits_sharing_candidates(a, images, prompts, items, groups, refuse) is None


def test_a_prefix_that_stops_before_the_image_does_not_share(monkeypatch):
    """An image token after the first token where the candidates differ: nothing to share, None
    (here the candidate's own word stands in for the image token)."""
    import pipeline.model.hooks.candidates as candidates

    a = adapter_for("llava")
    images, prompts, items, groups, conds = _rows()
    cat = a.tokenizer("cat", add_special_tokens=False)["input_ids"][-1]
    monkeypatch.setattr(candidates, "_image_token_id", lambda adapter: cat)

    def refuse(rows):
        raise AssertionError("nothing may run when the prefix cannot hold the image")

    assert last_logits_sharing_candidates(a, images, prompts, items, groups, refuse) is None


def _null():
    from contextlib import nullcontext

    return nullcontext()


def test_rows_of_one_group_must_share_the_item():
    a = adapter_for("llava")
    images = make_images(2)
    prompts = [TEMPLATES[0].format(candidate=c) for c in CANDIDATES[:2]]
    with pytest.raises(ValueError, match="several items"):
        last_logits_sharing_candidates(a, images, prompts, [0, 1], [0, 0], lambda rows: _null())


def test_the_default_models_retrieval_runs_every_batch_after_the_shared_prefix(
    tiny_adapter, annotations, images, monkeypatch
):
    """The embedded default's retrieval prompts (the candidate after the image) share their prefix:
    no batch falls back to the full rows, and the margins are the full rows' (NDCG identical,
    likelihood to float rounding)."""
    from conftest import discovery_items

    from pipeline.model import evaluation
    from pipeline.model.hooks import condition_scales

    a = tiny_adapter
    items = discovery_items(annotations, "retrieval", 3)
    top = a.num_layers - 1
    conditions = [{}, {(top, 1): 0.0, (0, 2): 0.0}, {(0, 0): 2.0}]
    kw = dict(
        batch_size=7,
        n_conditions=len(conditions),
        condition_hooks=condition_scales(a, conditions),
        progress=False,
    )
    full = {}
    for utility in ("generative", "likelihood"):
        with monkeypatch.context() as m:
            m.setattr(evaluation, "CANDIDATE_PREFIX_FAMILIES", frozenset())
            full[utility] = evaluate_task(a, "retrieval", items, images, utility=utility, **kw)

    def no_full_rows(*args, **kwargs):
        raise AssertionError("a batch ran its candidates in full")

    monkeypatch.setattr(evaluation, "yes_no_margin", no_full_rows)
    for utility in ("generative", "likelihood"):
        shared = evaluate_task(a, "retrieval", items, images, utility=utility, **kw)
        for s, f in zip(shared, full[utility]):
            np.testing.assert_allclose(s.per_item, f.per_item, rtol=1e-5, atol=1e-6)
    # The conditions changed the likelihoods: the comparison covers the interventions.
    assert not np.allclose(full["likelihood"][0].per_item, full["likelihood"][1].per_item)
