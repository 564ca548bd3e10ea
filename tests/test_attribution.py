"""Attribution from the store against in-memory and model-side references; masks and faithfulness."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import direct_dvp, direct_targets, direct_z, discovery_items, random_item_arrays

from pipeline.method.attribution import (
    STORE_METHODS,
    StreamingContributions,
    accumulate,
    ape_scores,
    hones_importance,
    importance_matrix,
    task_statistics,
)
from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations
from pipeline.method.masks import (
    build_masks,
    faithfulness,
    headline_mask,
    mask_layer_budget,
    mask_size,
    mask_topk,
    overlap,
)
from pipeline.method.store import ActivationStore, StoreLayout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

C, N, L, I = 4, 23, 3, 16
HEAD_SCORES = [0.3, -0.2, 0.1]


def random_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((C, N, L, I)).astype(np.float32)
    z[:, rng.random(N) < 0.3, 0, :4] = 0.0  # exact zeros: not "active" for AP
    arrays = random_item_arrays(rng, N, L, I)
    return z, arrays


@pytest.fixture
def random_store(tmp_path):
    z, arrays = random_arrays()
    lay = StoreLayout.plan(C, N, L, I, "float32", target_chunk_bytes=4 * L * I * 4)  # blocks of 4 items
    conditions = [(-1, -1, math.nan)] + [(k, k, s) for k, s in enumerate(HEAD_SCORES)]
    store = ActivationStore.create_or_resume(
        tmp_path / "t.zarr",
        lay,
        conditions,
        [f"i{k}" for k in range(N)],
        [[1]] * N,
        [[1.0]] * N,
        {},
        "h",
    )
    for k in store.pending_blocks():
        sl = lay.block(k)
        store.write_block(k, z[:, sl], arrays.take(sl))
    return store.finalize(), z, arrays


def in_memory(z, arrays):
    z64, d64 = z.astype(np.float64), arrays.dvp.astype(np.float64)
    cbar = (z64 * d64[None]).mean(axis=1)
    return cbar, z64[0].mean(axis=0), (z[0] > 0).mean(axis=0)


def in_memory_new(z, arrays) -> dict[str, np.ndarray]:
    """The statistics of the new methods, item by item with plain loops (MINER's per-item,
    per-layer min-max; LAPE's token-level AP)."""
    n_items, n_layers = z.shape[1], z.shape[2]
    out = {
        "lp": (z.astype(np.float64) * arrays.dvp_logprob.astype(np.float64)[None]).mean(axis=1),
        "atp": arrays.atp.astype(np.float64).mean(axis=0),
        "gate_probability": arrays.gate_positive.sum(0) / arrays.prompt_tokens.sum(),
    }
    ma, ap = np.zeros((n_layers, I)), np.zeros((n_layers, I))
    for n in range(n_items):
        for l in range(n_layers):
            for acc, x in (
                (ma, arrays.gate_sum[n, l] / arrays.prompt_tokens[n]),
                (ap, arrays.gate_positive[n, l] / arrays.prompt_tokens[n]),
            ):
                x = x.astype(np.float64)
                acc[l] += (x - x.min()) / (x.max() - x.min())
    out["ma"], out["ap"] = ma / n_items, ap / n_items
    return out


def assert_same(stats: StreamingContributions, cbar, ma, ap, rtol=1e-12):
    np.testing.assert_allclose(stats.mean_contribution(), cbar, rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(stats.mean_activation(), ma, rtol=rtol, atol=1e-15)
    np.testing.assert_array_equal(stats.activation_probability(), ap)


def assert_same_new(stats: StreamingContributions, want: dict[str, np.ndarray], rtol=1e-12):
    np.testing.assert_allclose(stats.mean_logprob_contribution(), want["lp"], rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(stats.mean_atp(), want["atp"], rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(stats.gate_probability(), want["gate_probability"], rtol=rtol)
    np.testing.assert_allclose(stats.gate_mean_normalised(), want["ma"], rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(stats.gate_probability_normalised(), want["ap"], rtol=rtol, atol=1e-15)


# ------------------------------------------------------------------------------ streaming sums
def test_streaming_equals_in_memory(random_store):
    store, z, arrays = random_store
    assert store.layout.n_blocks == 6
    stats = accumulate(store)
    assert stats.n_items == N
    assert stats.sums["contribution_sum"].dtype == np.float64 and stats.sums["activation_sum"].dtype == np.float64
    cbar, ma, ap = in_memory(z, arrays)
    assert_same(stats, cbar, ma, ap)
    assert_same_new(stats, in_memory_new(z, arrays))
    assert 0 < ap.min() < ap.max() < 1 and ap[0, :4].max() < ap[0, 4:].max()

    ts = task_statistics(store)
    np.testing.assert_allclose(ts.mean_contribution, cbar, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(ts.head_scores, HEAD_SCORES)
    assert ts.n_items == N


@pytest.mark.parametrize("items_per_block", [1, 5, 7, N])
def test_block_size_does_not_change_the_result(random_store, items_per_block):
    store, z, arrays = random_store
    ref = accumulate(store)
    got = accumulate(store, items_per_block=items_per_block)
    assert_same(got, ref.mean_contribution(), ref.mean_activation(), ref.activation_probability())
    assert_same_new(got, in_memory_new(z, arrays), rtol=1e-10)


def test_state_dict_round_trip_and_merge(random_store):
    store, z, arrays = random_store
    one = accumulate(store)
    state = one.state_dict()
    restored = StreamingContributions(C, L, I)
    restored.load_state_dict(state)
    state["contribution_sum"][:] = 0  # the state is a copy, not a view
    assert_same(restored, one.mean_contribution(), one.mean_activation(), one.activation_probability())
    assert restored.sums["positive_count"].dtype == np.int64

    # Two halves summed elsewhere, the second resumed from a state dict, then merged.
    first, second = StreamingContributions(C, L, I), StreamingContributions(C, L, I)
    blocks = list(store.iter_blocks(items_per_block=5))
    for b in blocks[:2]:
        first.add(b.z, b.arrays)
    second.add(blocks[2].z, blocks[2].arrays)
    resumed = StreamingContributions(C, L, I)
    resumed.load_state_dict(second.state_dict())
    for b in blocks[3:]:
        resumed.add(b.z, b.arrays)
    first.merge(resumed)
    assert first.n_items == N
    assert_same(first, one.mean_contribution(), one.mean_activation(), one.activation_probability())
    assert_same_new(first, in_memory_new(z, arrays), rtol=1e-10)


def test_empty_statistics_refuse():
    with pytest.raises(ValueError, match="no items"):
        StreamingContributions(2, 1, 1).mean_contribution()


# ------------------------------------------------------------------------------ importance formulas
def loop_hones(cbar: np.ndarray, scores) -> np.ndarray:
    """I_{l,i} = sum_h w_h max(c_0 - c_h, 0) / sum_h w_h, w_h = max(S_h, 0); no positive w -> c_0."""
    w = [max(s, 0.0) for s in scores]
    out = np.zeros(cbar.shape[1:])
    for l in range(cbar.shape[1]):
        for i in range(cbar.shape[2]):
            if sum(w) <= 0:
                out[l, i] = cbar[0, l, i]
                continue
            out[l, i] = sum(w[h] * max(cbar[0, l, i] - cbar[h + 1, l, i], 0.0) for h in range(len(w))) / sum(w)
    return out


def test_hones_importance_equals_the_formula():
    rng = np.random.default_rng(1)
    cbar = rng.standard_normal((4, 3, 5))
    for scores in ([0.3, -0.2, 0.1], [2.0, 0.0, 0.0], [0.5, 0.5, 0.5]):
        got = hones_importance(cbar, np.array(scores))
        np.testing.assert_allclose(got, loop_hones(cbar, scores), rtol=1e-12, atol=0)
        assert (got >= 0).all()
    # A negative head has no weight: changing its condition changes nothing.
    other = cbar.copy()
    other[2] += 10
    np.testing.assert_array_equal(hones_importance(other, [0.3, -0.2, 0.1]), hones_importance(cbar, [0.3, -0.2, 0.1]))
    # No positive head: fall back to the plain base contribution.
    for scores in ([-0.1, 0.0, -3.0], [0.0, 0.0, 0.0]):
        got = hones_importance(cbar, scores)
        np.testing.assert_array_equal(got, cbar[0])
        assert (got < 0).any()  # the fallback keeps signs (it is not the clipped drop)
    np.testing.assert_array_equal(hones_importance(cbar[:1], []), cbar[0])
    with pytest.raises(ValueError, match="3 head conditions but 2 head scores"):
        hones_importance(cbar, [1.0, 2.0])


def test_ape_scores_on_a_two_task_example():
    # neuron:      0: equal   1: only A   2: never    3: A below the floor   4: 3:1
    ap = np.array([[[0.5, 0.2, 0.0, 0.04, 0.6]], [[0.5, 0.0, 0.0, 0.30, 0.2]]])
    got = ape_scores(ap, min_probability=0.05)
    assert got.shape == (2, 1, 5)
    log2 = math.log(2)

    def specific(p):  # p * (log T - H(p, 1 - p))
        h = -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)
        return p * (log2 - h)

    want = np.array([[[0.0, log2, 0.0, 0.0, specific(0.75)]], [[0.0, 0.0, 0.0, specific(0.3 / 0.34), specific(0.25)]]])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # With no floor, neuron 3 is also (weakly) specific to task A.
    assert ape_scores(ap, 0.0)[0, 0, 3] == pytest.approx(specific(0.04 / 0.34))


def test_importance_matrix_methods():
    rng = np.random.default_rng(2)
    from pipeline.method.attribution import BaselineSettings, TaskStatistics, lape_scores

    stats = {
        t: TaskStatistics(
            rng.standard_normal((3, 2, 6)),
            rng.standard_normal((3, 2, 6)),
            rng.random((2, 6)),
            rng.random((2, 6)),
            rng.standard_normal((2, 6)),
            rng.random((2, 6)),
            rng.random((2, 6)),
            rng.random((2, 6)),
            np.array([0.5, -1.0]),
            10,
        )
        for t in ("vqa", "ocr")
    }
    settings = BaselineSettings(ape_min_probability=0.05, lape_filter_quantile=0.9, lape_bar_quantile=0.8)
    methods, tasks, scores = importance_matrix(stats, seed=0, baselines=settings)
    assert methods == list(STORE_METHODS) and tasks == ["vqa", "ocr"] and scores.shape == (len(methods), 2, 2, 6)
    ape = ape_scores(np.stack([stats[t].activation_probability for t in tasks]), 0.05)
    lape = lape_scores(np.stack([stats[t].gate_probability for t in tasks]), 0.9, 0.8)
    for j, t in enumerate(tasks):
        s = stats[t]
        want = {
            "hones": hones_importance(s.mean_contribution, s.head_scores),
            "hones_nohead": s.mean_contribution[0],
            "hones_lp": hones_importance(s.mean_logprob_contribution, s.head_scores),
            "hones_lp_nohead": s.mean_logprob_contribution[0],
            "atp": s.mean_atp,
            "ma": s.gate_mean_normalised,
            "ap": s.gate_probability_normalised,
            "lape": lape[j],
            "ma_last": s.mean_activation,
            "ap_last": s.activation_probability,
            "ape_last": ape[j],
        }
        for m, w in want.items():
            np.testing.assert_allclose(scores[methods.index(m), j], w, rtol=1e-6, err_msg=m)
    rand = scores[methods.index("random")]
    assert ((rand >= 0) & (rand < 1)).all() and not np.array_equal(rand[0], rand[1])
    np.testing.assert_array_equal(importance_matrix(stats, seed=0, baselines=settings)[2], scores)


# ------------------------------------------------------------------------------ end to end
def test_hones_from_store_equals_direct_model_computation(tmp_path, tiny_adapter, annotations, images):
    """HONES from a dumped store == re-running the model with each head substituted (no store)."""
    a = tiny_adapter
    items = discovery_items(annotations, "caption", 6)
    heads = pd.DataFrame({"layer": [0, 1, 1, 0], "head": [1, 3, 0, 2], "score": [0.2, 0.5, -0.3, 0.05]})
    store = dump_activations(
        a,
        DumpRequest(items, images, heads, caption_idf=True),
        tmp_path / "caption.zarr",
        DumpStorage(
            dtype="float32", params_hash="e2e", attrs={}, target_chunk_bytes=2 * a.num_layers * a.ffn_width * 4
        ),
        DumpExecution(batch_size=7),
    )
    assert store.layout.n_blocks == 3
    got = hones_importance(*(lambda s: (s.mean_contribution, s.head_scores))(task_statistics(store)))

    # Direct: z at the last prompt token under base and under each head, one row at a time;
    # contributions z * <W_down[:, i], u_y>, averaged over items; then the HONES formula.
    z = direct_z(a, images, items, heads).astype(np.float64)  # [condition, item, layer, neuron]
    ids, weights = direct_targets(a.tokenizer, items)
    dvp = direct_dvp(a, ids, weights)  # [item, layer, neuron]
    cbar = np.stack([(z[c] * dvp).mean(axis=0) for c in range(z.shape[0])])
    want = loop_hones(cbar, heads["score"].tolist())

    scale = np.abs(want).max()
    assert scale > 0 and (want > 0).sum() > 10
    assert not np.allclose(want, np.maximum(cbar[0], 0))  # the head conditioning matters here
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    # The baselines from the same store equal their definitions too.
    ts = task_statistics(store)
    np.testing.assert_allclose(ts.mean_contribution[0], cbar[0], rtol=1e-5, atol=1e-5 * np.abs(cbar).max())
    np.testing.assert_allclose(ts.mean_activation, z[0].mean(axis=0), rtol=1e-5, atol=1e-5 * np.abs(z).max())
    # AP may only differ where z sits within rounding of 0.
    np.testing.assert_allclose(ts.activation_probability, (z[0] > 0).mean(axis=0), atol=1 / len(items) + 1e-12)
    assert np.mean(ts.activation_probability == (z[0] > 0).mean(axis=0)) > 0.95


# ------------------------------------------------------------------------------ masks
def test_mask_topk_size_order_and_ties():
    scores = np.array([[0.1, 0.9, 0.5, np.nan], [0.9, 0.2, 0.5, 0.3], [0.0, 0.9, -1.0, 0.7]])
    assert mask_size(3, 4, 0.25) == 3 and mask_size(3, 4, 0.26) == 4 and mask_size(3, 4, 0.01) == 1
    assert mask_size(1, 100, 0.07) == 7 and mask_size(4, 512, 0.01) == math.ceil(20.48)
    with pytest.raises(ValueError, match="rho"):
        mask_size(3, 4, 0.0)
    m = mask_topk(scores, 0.5)  # ceil(0.5 * 12) = 6
    assert list(m.columns) == ["rank", "layer", "neuron", "score"]
    # Ties at 0.9 and 0.5 are ordered by (layer, neuron).
    assert list(zip(m["layer"], m["neuron"])) == [(0, 1), (1, 0), (2, 1), (2, 3), (0, 2), (1, 2)]
    assert m["rank"].tolist() == list(range(1, 7))
    np.testing.assert_array_equal(m["score"], [0.9, 0.9, 0.9, 0.7, 0.5, 0.5])
    full = mask_topk(scores, 1.0)
    assert len(full) == 12 and (full["layer"].iloc[-1], full["neuron"].iloc[-1]) == (0, 3)  # NaN last


def test_mask_layer_budget_respects_the_budget():
    rng = np.random.default_rng(3)
    scores = rng.random((4, 10))
    budget = {0: 3, 2: 1, 3: 0}
    m = mask_layer_budget(scores, budget)
    assert m.groupby("layer").size().to_dict() == {0: 3, 2: 1}
    for layer, n in budget.items():
        chosen = set(m.loc[m["layer"] == layer, "neuron"])
        assert chosen == set(np.argsort(-scores[layer])[:n].tolist())
    assert m["score"].is_monotonic_decreasing and m["rank"].tolist() == [1, 2, 3, 4]
    assert len(mask_layer_budget(scores, {})) == 0


def test_build_masks_gives_random_the_budget_of_hones():
    rng = np.random.default_rng(4)
    methods = ["hones", "ma", "random"]
    scores = rng.random((3, 2, 4, 25))
    scores[0, 0, 3] += 1.0  # hones of task 0 prefers layer 3
    scores[0, 1, 1] += 0.5  # hones of task 1 prefers layer 1, less sharply
    all_sizes = build_masks(methods, ["vqa", "ocr"], scores, [0.05, 0.2], 0.1, random_draws=3, seed=0)
    assert list(all_sizes.columns) == ["method", "task", "rho", "draw", "headline", "rank", "layer", "neuron", "score"]
    assert sorted(all_sizes["rho"].unique()) == [0.05, 0.1, 0.2]  # the headline size joins the grid
    sizes = all_sizes.groupby(["rho", "method", "task", "draw"]).size()
    for rho in (0.05, 0.1, 0.2):
        assert (sizes.loc[rho] == mask_size(4, 25, rho)).all()
    # three random draws at the headline size only, each with hones's budget, all different
    draws = all_sizes[(all_sizes.method == "random") & (all_sizes.task == "vqa")].groupby("rho")["draw"].nunique()
    assert draws.to_dict() == {0.05: 1, 0.1: 3, 0.2: 1}
    head_random = all_sizes[(all_sizes.method == "random") & (all_sizes.task == "vqa") & all_sizes.headline]
    sets = [frozenset(zip(g.layer, g.neuron)) for _, g in head_random.groupby("draw")]
    assert len(set(sets)) == 3
    assert all(
        g.groupby("layer").size().to_dict() == head_random[head_random.draw == 0].groupby("layer").size().to_dict()
        for _, g in head_random.groupby("draw")
    )
    masks = all_sizes[all_sizes.headline & (all_sizes.draw == 0)]
    k = mask_size(4, 25, 0.1)
    assert (masks.groupby(["method", "task"]).size() == k).all()
    assert headline_mask(all_sizes, "hones", "vqa") == list(
        zip(
            masks[(masks.method == "hones") & (masks.task == "vqa")].layer,
            masks[(masks.method == "hones") & (masks.task == "vqa")].neuron,
        )
    )
    for task in ("vqa", "ocr"):
        per_layer = {
            m: masks[(masks.method == m) & (masks.task == task)].groupby("layer").size().to_dict() for m in methods
        }
        assert per_layer["random"] == per_layer["hones"]
    assert masks[(masks.method == "hones") & (masks.task == "vqa")]["layer"].eq(3).all()
    # ma is a plain global top-k (it does not follow the hones budget).
    ma = masks[(masks.method == "ma") & (masks.task == "vqa")]
    assert set(zip(ma.layer, ma.neuron)) == set(zip(*np.unravel_index(np.argsort(-scores[1, 0].ravel())[:k], (4, 25))))


def test_faithfulness_and_overlap():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 20))
    f = faithfulness(x, x, k=6)
    assert f["spearman"] == pytest.approx(1.0) and f["precision_at_k"] == 1.0 and f["k"] == 6
    g = faithfulness(-x, x, k=6)
    assert g["spearman"] == pytest.approx(-1.0) and g["precision_at_k"] == 0.0
    y = x.copy()
    y[0, np.argmax(x[0])] = np.nan  # the non-finite entry is left out of both
    assert faithfulness(y, x, k=6)["spearman"] == pytest.approx(1.0)
    # captured effect: the ground truth's own top k captures all of it; a top k of zeros none
    truth = np.zeros((3, 20))
    truth[0, :6] = 1.0
    assert faithfulness(truth, truth, k=6)["captured_effect"] == 1.0
    half = truth.copy()
    half[0, 3:6], half[1, :3] = 0.0, 2.0
    assert faithfulness(half, truth, k=6)["captured_effect"] == 0.5
    # Spearman over the neurons whose effect is distinguishable from zero (|effect| > 1.96 se)
    se = np.full((3, 20), 10.0)
    se[0] = 0.01
    noisy = x.copy()
    noisy[1:] = -x[1:]  # agreement only on row 0, the significant one
    h = faithfulness(noisy, x, k=6, ground_truth_se=se)
    assert h["n_significant"] == 20 and h["spearman_significant"] == pytest.approx(1.0) and h["spearman"] < 0.9

    masks = pd.DataFrame(
        {
            "method": ["hones"] * 7 + ["ma"],
            "task": ["vqa"] * 3 + ["ocr"] * 4 + ["vqa"],
            "rank": [1, 2, 3, 1, 2, 3, 4, 1],
            "layer": [0, 0, 1, 0, 1, 2, 2, 5],
            "neuron": [1, 2, 3, 1, 3, 0, 1, 5],
            "score": 1.0,
            "rho": 0.01,
            "draw": 0,
            "headline": True,
        }
    )
    other_size = masks.assign(rho=0.02, headline=False, neuron=masks["neuron"] + 7)
    jac = overlap(pd.concat([masks, other_size]), "hones")  # the headline masks only
    assert list(jac.index) == ["vqa", "ocr"] == list(jac.columns)
    # vqa {(0,1),(0,2),(1,3)}, ocr {(0,1),(1,3),(2,0),(2,1)}: 2 shared of 5.
    assert jac.loc["vqa", "ocr"] == jac.loc["ocr", "vqa"] == pytest.approx(2 / 5)
    assert jac.loc["vqa", "vqa"] == jac.loc["ocr", "ocr"] == 1.0


def test_statistics_of_chosen_items_equal_in_memory_on_those_items(random_store):
    """The matched-items path (attribute_on_items: faithfulness on the ground truth's items)
    equals the in-memory sums over exactly those items, whatever blocks they fall in."""
    from pipeline.errors import PipelineError
    from pipeline.method.attribution import attribute_on_items

    store, z, arrays = random_store
    chosen = [1, 5, 6, 20]
    stats = accumulate(store, items=np.array(chosen))
    assert stats.n_items == len(chosen)
    sub_z, sub_arrays = z[:, chosen], arrays.take(np.array(chosen))
    assert_same(stats, *in_memory(sub_z, sub_arrays))
    assert_same_new(stats, in_memory_new(sub_z, sub_arrays), rtol=1e-10)

    ids = [store.item_ids[k] for k in (20, 1, 6, 5)]  # any order
    methods, tasks, scores = attribute_on_items({"vqa": store}, {"vqa": ids}, seed=0)
    want = task_statistics(store, items=np.array(chosen))
    np.testing.assert_allclose(scores[methods.index("atp"), 0], want.mean_atp, rtol=1e-6)
    np.testing.assert_allclose(scores[methods.index("hones_nohead"), 0], want.mean_contribution[0], rtol=1e-6)
    with pytest.raises(PipelineError, match="nope"):
        attribute_on_items({"vqa": store}, {"vqa": ["nope"]}, seed=0)
