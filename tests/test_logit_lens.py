"""The residual-stream capture on every family and the logit lens built on it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import discovery_items
from tiny_models import FACTORIES, built, tiny_phi

from pipeline.method.logit_lens import COMPONENTS, LENS_COLUMNS, decode_answer_logprob, lens_summary, logit_lens
from pipeline.model.adapter import AdapterError, ModelAdapter
from pipeline.model.hooks import capture_layer_inputs, capture_residual_stream
from pipeline.model.scoring import mean_answer_logprob, model_answer_logprobs
from pipeline.tasks.items import item_prompts, teacher_forced_answers

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("family", list(FACTORIES))
def test_residual_stream_splits_into_attention_and_ffn(family):
    """after_attention - layer_input is what the layer's attention adds (its output, through the
    post-attention norm where the family has one, as Gemma 3 does); the final residual decodes to
    the model's own log-probabilities, at exactly the chosen positions."""
    model, _ = built(family)
    adapter = ModelAdapter.from_model(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(5, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    chosen = torch.zeros(2, 6, dtype=torch.bool)
    chosen[0, [1, 4]] = True
    chosen[1, [0, 2, 5]] = True
    added = {}

    def keep(layer):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            layer_module = adapter.layers[layer]
            if hasattr(layer_module, "pre_feedforward_layernorm"):
                out = layer_module.post_attention_layernorm(out)
            added[layer] = out.detach().float()[:, :6][chosen]

        return hook

    handles = [adapter._attention(l).register_forward_hook(keep(l)) for l in range(adapter.num_layers)]
    try:
        with torch.no_grad(), capture_residual_stream(adapter, chosen) as trace:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in handles:
            h.remove()
    assert trace.final.shape == (5, adapter.hidden_size)
    for l in range(adapter.num_layers):
        torch.testing.assert_close(trace.after_attention[l] - trace.layer_input[l], added[l], atol=1e-4, rtol=1e-4)
    targets = ids[:, 1:][chosen]
    expected = torch.log_softmax(logits[:, :6][chosen].float(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(decode_answer_logprob(adapter, trace.final, targets), expected, atol=1e-4, rtol=1e-4)


def test_parallel_blocks_are_refused_by_name():
    """Phi runs attention and FFN in parallel: there is no residual between them to read."""
    adapter = ModelAdapter.from_model(tiny_phi()[0])
    with pytest.raises(AdapterError, match="norm before the FFN .* layer 0 .*PhiDecoderLayer"):
        with capture_residual_stream(adapter, torch.ones(1, 3, dtype=torch.bool)):
            pass


@pytest.fixture(scope="module")
def lens(tiny_adapter, annotations, images):
    items = pd.concat(
        [discovery_items(annotations, "vqa", 3)]
        + [discovery_items(annotations, t, 2) for t in ("ocr", "caption", "retrieval")],
        ignore_index=True,
    )
    table, utility = logit_lens(tiny_adapter, items, images, batch_size=4, progress=False)
    return items, table, utility


def test_last_residual_is_the_model_utility(lens, tiny_adapter, images):
    items, table, utility = lens
    inputs = tiny_adapter.build_inputs(
        [images[i] for i in items["image_id"]], item_prompts(items), answers=teacher_forced_answers(items)
    )
    with torch.no_grad():
        own = mean_answer_logprob(*model_answer_logprobs(tiny_adapter, inputs)).double().numpy()
    np.testing.assert_allclose(utility, own, atol=1e-6)
    last = table[(table["layer"] == tiny_adapter.num_layers - 1) & (table["component"] == "residual")]
    np.testing.assert_allclose(last["answer_logprob"].to_numpy(), own, atol=1e-5)


def test_lens_table_and_an_inner_layer_by_hand(lens, tiny_adapter, images):
    """Row layout, and layer 0's residual value recomputed from the residual entering layer 1."""
    items, table, _ = lens
    L = tiny_adapter.num_layers
    assert list(table.columns) == LENS_COLUMNS
    assert len(table) == len(items) * L * len(COMPONENTS)
    assert np.isfinite(table["answer_logprob"]).all() and (table["answer_logprob"] <= 0).all()
    first = items.iloc[[0]]
    inputs = tiny_adapter.build_inputs(
        [images[first["image_id"].iloc[0]]], item_prompts(first), answers=teacher_forced_answers(first)
    )
    mask, targets = inputs.answer_targets()
    with torch.no_grad(), capture_layer_inputs(tiny_adapter, [1]) as seen:
        tiny_adapter.model(**inputs.tensors)
    h = seen[1][:, :-1][mask]
    normed = tiny_adapter.final_norm()(h)
    logp = torch.log_softmax(normed @ tiny_adapter.unembedding().T, -1).gather(1, targets[mask][:, None])
    got = table[
        (table["item_id"] == first["item_id"].iloc[0]) & (table["layer"] == 0) & (table["component"] == "residual")
    ]["answer_logprob"]
    assert got.iloc[0] == pytest.approx(float(logp.mean()), abs=1e-5)


def test_summary_means_per_task_layer_component(lens):
    _, table, _ = lens
    summary = lens_summary(table)
    assert len(summary) == table.groupby(["task", "layer", "component"]).ngroups
    row = summary[(summary["task"] == "vqa") & (summary["layer"] == 1) & (summary["component"] == "ffn")].iloc[0]
    values = table[(table["task"] == "vqa") & (table["layer"] == 1) & (table["component"] == "ffn")]["answer_logprob"]
    assert row["items"] == 3
    assert row["mean_logprob"] == pytest.approx(values.mean())
    assert row["mean_probability"] == pytest.approx(np.exp(values).mean())
