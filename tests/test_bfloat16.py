"""bfloat16 weights on the CPU, per task: the dump (hooks under every head condition, z cast to
the store dtype, the gradient pass) and the likelihood utilities give finite results that rank
neurons as the float32 run of the same model does.

The model is the random tiny Qwen2.5-VL (the paper's second model) of ``tests/tiny_models``,
saved and loaded as a lab's checkpoint is, once as float32 and once as bfloat16. The whole graph
in bfloat16 through DVC runs in ``tests/e2e/test_families.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import discovery_items
from scipy.stats import spearmanr
from tiny_models import add_words, tiny_qwen2_5_vl

from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations
from pipeline.model.adapter import ModelAdapter

pytestmark = pytest.mark.slow
TASKS = ("vqa", "ocr", "caption", "retrieval")
HEADS = pd.DataFrame({"layer": [1, 0], "head": [2, 1], "score": [0.3, 0.1]})
# Per-neuron means over 8 items of a random model: bfloat16 keeps 8 bits of mantissa, so small
# contributions swap places; the ranking as a whole must survive.
MIN_SPEARMAN = 0.9


@pytest.fixture(scope="module")
def twins(tmp_path_factory, annotations):
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted(
        {
            w
            for text in annotations["prompt"].tolist() + [r for refs in annotations["references"] for r in refs]
            for w, _ in Whitespace().pre_tokenize_str(text)
        }
        | {"Yes", "No"}
    )
    model, processor = tiny_qwen2_5_vl(seed=0)
    add_words(model, processor, words)
    folder = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {dtype: ModelAdapter.load(str(folder), dtype=dtype) for dtype in ("float32", "bfloat16")}


def _dump(adapter, items, images, out):
    return dump_activations(
        adapter,
        DumpRequest(items, images, HEADS, caption_idf=True),
        out,
        DumpStorage(dtype="float32", params_hash="p", attrs={"model": "qwen"}),
        DumpExecution(batch_size=8, gradient_batch_size=4),
    )


@pytest.mark.parametrize("task", TASKS)
def test_bfloat16_dump_ranks_neurons_like_float32(tmp_path, twins, annotations, images, task):
    items = discovery_items(annotations, task, 8)
    blocks = {
        dtype: next(_dump(a, items, images, tmp_path / f"{dtype}.zarr").iter_blocks(len(items)))
        for dtype, a in twins.items()
    }
    low, full = blocks["bfloat16"], blocks["float32"]
    assert twins["bfloat16"].dtype == torch.bfloat16
    assert np.abs(low.z - full.z).max() > 0, "the bfloat16 run computed in float32"
    correlations = {}
    for name, (a, b) in {
        "z": (low.z, full.z),
        "dvp contribution": (low.z[0] * low.dvp, full.z[0] * full.dvp),
        "dvp_logprob": (low.arrays.dvp_logprob, full.arrays.dvp_logprob),
        "atp": (low.arrays.atp, full.arrays.atp),
    }.items():
        assert np.isfinite(a).all(), name
        # Rank the per-neuron means over items (what every method ranks), condition by condition for z.
        a_mean, b_mean = a.mean(axis=-3), b.mean(axis=-3)
        correlations[name] = float(spearmanr(a_mean.ravel(), b_mean.ravel()).statistic)
    print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in correlations.items()))
    assert min(correlations.values()) > MIN_SPEARMAN, correlations


@pytest.mark.parametrize("task", TASKS)
def test_bfloat16_likelihood_utilities_are_finite_and_close(twins, annotations, images, task):
    from pipeline.model.evaluation import evaluate_task

    items = discovery_items(annotations, task, 6)
    got = {}
    for dtype, a in twins.items():
        (result,) = evaluate_task(a, task, items, images, batch_size=16, utility="likelihood")
        got[dtype] = result.per_item
        assert np.isfinite(got[dtype]).all(), dtype
    np.testing.assert_allclose(got["bfloat16"], got["float32"], atol=0.05)
