"""The published baselines, the gradient baseline and the log-probability DVP against direct
reimplementations: LAPE as identify.py computes it, MINER's per-item, per-layer min-max MA/AP,
act(gate) statistics against act_fn(gate_proj(x)) recomputed from the MLP input, atp and the
log-probability DVP against finite differences of the model itself, and the authors' caption
targets on a hand-made caption set."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import discovery_items, utility64

from pipeline.method.attribution import (
    StreamingContributions,
    lape_candidates,
    lape_scores,
    lape_selection,
)
from pipeline.method.dump import CAPTION_MAX_TOKENS, item_arrays, item_targets
from pipeline.method.store import ItemArrays
from pipeline.model.hooks import capture_ffn, scale_neurons, trace_ffn
from pipeline.tasks.items import item_prompts, teacher_forced_answers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------ LAPE
def identify_py(
    over_zero: torch.Tensor, n: torch.Tensor, top_rate: float, filter_rate: float, bar_ratio: float
) -> list[set[tuple[int, int]]]:
    """RUCAIBox/Language-Specific-Neurons identify.py's activation(), step by step (float64):
    over_zero [layer, neuron, task] counts, n [task] tokens; returns each task's (layer, neuron) set."""
    activation_probs = over_zero.double() / n.double()
    normed = activation_probs / activation_probs.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    log_probs = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * log_probs, dim=-1)
    flattened_probs = activation_probs.flatten()
    top_prob_value = flattened_probs.kthvalue(round(len(flattened_probs) * filter_rate)).values.item()
    top_position = (activation_probs > top_prob_value).sum(dim=-1)
    entropy[top_position == 0] = torch.inf
    flattened_entropy = entropy.flatten()
    _, index = flattened_entropy.topk(round(len(flattened_entropy) * top_rate), largest=False)
    row_index, col_index = index // entropy.size(1), index % entropy.size(1)
    selected_probs = activation_probs[row_index, col_index].transpose(0, 1)  # task x selected
    activation_bar = flattened_probs.kthvalue(round(len(flattened_probs) * bar_ratio)).values.item()
    lang, indice = torch.where(selected_probs > activation_bar)
    out: list[set[tuple[int, int]]] = [set() for _ in range(over_zero.shape[-1])]
    for t, k in zip(lang.tolist(), indice.tolist()):
        out[t].add((int(row_index[k]), int(col_index[k])))
    return out


def hand_made_counts() -> tuple[torch.Tensor, torch.Tensor]:
    """over_zero [layer 3, neuron 40, task 3] and n [task]: random counts with planted neurons,
    no two neurons of equal entropy (so the top-k boundary has no ties)."""
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([1000, 1500, 800])
    probs = torch.rand(3, 40, 3, generator=g) * 0.3
    probs[0, 0] = torch.tensor([0.90, 0.02, 0.03])  # task 0 only: low entropy, high AP
    probs[1, 5] = torch.tensor([0.85, 0.80, 0.01])  # tasks 0 and 1: assigned to both
    probs[2, 7] = torch.tensor([0.001, 0.0, 0.0])  # entropy 0, AP tiny: filtered out by identify.py
    probs[2, 9] = torch.tensor([0.02, 0.95, 0.94])  # tasks 1 and 2
    over_zero = torch.round(probs * n).long()
    return over_zero, n


def test_lape_selection_equals_identify_py():
    over_zero, n = hand_made_counts()
    ap = (over_zero.double() / n.double()).permute(2, 0, 1).numpy()  # [task, layer, neuron]
    for top_rate in (0.02, 0.05, 0.1):
        want = identify_py(over_zero, n, top_rate, 0.95, 0.95)
        got = lape_selection(ap, top_rate, 0.95, 0.95)
        for t in range(3):
            assert {(int(l), int(i)) for l, i in zip(*np.nonzero(got[t]))} == want[t], (top_rate, t)
    want = identify_py(over_zero, n, 0.05, 0.95, 0.95)
    assert (0, 0) in want[0] and (0, 0) not in want[1] | want[2]
    assert (1, 5) in want[0] and (1, 5) in want[1]  # multi-task assignment
    assert (2, 9) in want[1] and (2, 9) in want[2]
    assert all((2, 7) not in s for s in want)  # entropy 0 but filtered
    # Other quantiles follow identify.py too.
    want = identify_py(over_zero, n, 0.1, 0.9, 0.8)
    got = lape_selection(ap, 0.1, 0.9, 0.8)
    for t in range(3):
        assert {(int(l), int(i)) for l, i in zip(*np.nonzero(got[t]))} == want[t]


def test_lape_ranking_has_the_published_set_as_prefix():
    over_zero, n = hand_made_counts()
    ap = (over_zero.double() / n.double()).permute(2, 0, 1).numpy()
    scores = lape_scores(ap)
    cand = lape_candidates(ap)
    for top_rate in (0.02, 0.05, 0.1, 0.3):
        sel = lape_selection(ap, top_rate)
        for t in range(3):
            k = int(sel[t].sum())
            order = np.argsort(-scores[t].ravel(), kind="stable")
            assert set(order[:k].tolist()) == set(np.flatnonzero(sel[t].ravel()).tolist()), (top_rate, t)
    # Candidates outrank every other neuron; the others are ordered by their AP share.
    for t in range(3):
        assert scores[t][cand[t]].min() > 2.0 >= 1.0 >= scores[t][~cand[t]].max()
        share = ap[t] / ap.sum(0)
        np.testing.assert_allclose(scores[t][~cand[t]], np.nan_to_num(share[~cand[t]]))


# ------------------------------------------------------------------------------ MINER MA / AP
def test_miner_statistics_from_a_hand_made_activation_tensor():
    """act(gate) values [item, token, layer, neuron] with ragged prompts -> per-item arrays ->
    streaming sums equal MINER's save_ISM_with_token_mask_in_one_layer summed over items, and
    LAPE's token-level AP."""
    rng = np.random.default_rng(3)
    n_items, T, L, I = 5, 9, 2, 6
    lengths = [9, 4, 7, 1, 6]
    act = rng.normal(size=(n_items, T, L, I))
    act[act < -0.5] = 0.0
    act[1, :, 0, 2] = 0.0  # one neuron never fires on item 1
    arrays = ItemArrays(
        dvp=np.zeros((n_items, L, I), np.float32),
        dvp_logprob=np.zeros((n_items, L, I), np.float32),
        atp=np.zeros((n_items, L, I), np.float32),
        gate_sum=np.stack([act[k, : lengths[k]].sum(0) for k in range(n_items)]).astype(np.float32),
        gate_positive=np.stack([(act[k, : lengths[k]] > 0).sum(0) for k in range(n_items)]).astype(np.int32),
        prompt_tokens=np.array(lengths, np.int32),
    )
    stats = StreamingContributions(1, L, I)
    stats.add(np.zeros((1, n_items, L, I), np.float32), arrays)

    def min_max(x: torch.Tensor) -> torch.Tensor:  # MINER's min_max_normalize
        return (x - x.min()) / (x.max() - x.min())

    ma, ap = torch.zeros(L, I, dtype=torch.float64), torch.zeros(L, I, dtype=torch.float64)
    for k in range(n_items):
        for l in range(L):
            tensor = torch.tensor(act[k, : lengths[k], l])  # [tokens, neurons]: one layer, the modality's tokens
            ap[l] += min_max((tensor > 0).sum(dim=0).double() / tensor.size(0))  # float64 here
            ma[l] += min_max(torch.mean(tensor, dim=0))
    np.testing.assert_allclose(stats.gate_mean_normalised(), ma.numpy() / n_items, rtol=1e-6)
    np.testing.assert_allclose(stats.gate_probability_normalised(), ap.numpy() / n_items, rtol=1e-12)
    tokens = [act[k, : lengths[k]] for k in range(n_items)]
    lape_ap = sum((x > 0).sum(0) for x in tokens) / sum(lengths)
    np.testing.assert_allclose(stats.gate_probability(), lape_ap, rtol=1e-12)


# ------------------------------------------------------------------------------ model-side arrays
def target64(logits: torch.Tensor, last: torch.Tensor, ids: list[list[int]], w: list[list[float]]) -> np.ndarray:
    """[item] sum_t w_t log p(y_t) / sum_t w_t at the last prompt token, float64."""
    logp = torch.log_softmax(logits.double()[torch.arange(len(ids)), last], dim=-1)
    return np.array(
        [
            float((logp[b, t] * torch.tensor(wt, dtype=torch.float64)).sum() / sum(wt))
            for b, (t, wt) in enumerate(zip(ids, w))
        ]
    )


def _inputs(annotations, images, task: str, n: int):
    items = discovery_items(annotations, task, n)
    imgs = [images[i] for i in items["image_id"]]
    return items, imgs, item_prompts(items), teacher_forced_answers(items)


def test_gate_statistics_equal_act_of_gate_proj(tiny_adapter, annotations, images):
    a = tiny_adapter
    items, imgs, prompts, answers = _inputs(annotations, images, "vqa", 3)
    inputs = a.build_inputs(imgs, prompts, answers=answers)
    last = inputs.last_prompt_index
    mask = inputs.attention_mask.bool() & (torch.arange(inputs.input_ids.shape[1])[None] <= last[:, None])
    seen: dict[int, torch.Tensor] = {}
    handles = [
        a.mlp(l).register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0].detach()))
        for l in range(a.num_layers)
    ]
    try:
        with torch.enable_grad(), trace_ffn(a, last, mask) as trace:
            a.model(**inputs.tensors)
    finally:
        for h in handles:
            h.remove()
    for l in range(a.num_layers):
        mlp = a.mlp(l)
        gate = mlp.act_fn(mlp.gate_proj(seen[l])).float() * mask[..., None]  # [B, S, I]
        torch.testing.assert_close(trace.gate_sum[l], gate.sum(1), rtol=1e-5, atol=1e-5)
        assert torch.equal(trace.gate_positive[l], (gate > 0).sum(1))
    assert (mask.sum(1) < inputs.attention_mask.sum(1)).all()  # answers are not prompt tokens


def test_atp_equals_finite_differences_of_the_ground_truth_utility(adapter64, annotations, images):
    """atp[l, i] = d U / d s at s = 1, U the mean answer log-probability with neuron (l, i)
    scaled by s at every position: central differences (eps 1e-4, float64 model) agree to 1e-3
    relative (the model keeps float32 islands: eager attention's softmax, and atp's utility
    takes its log-softmax in float32 as the ground truth does); and it is the first-order estimate of zeroing (Spearman > 0.9 with the exact
    zeroing effect over the sampled neurons)."""
    a = adapter64
    items, imgs, prompts, answers = _inputs(annotations, images, "caption", 2)
    ids, w = item_targets(a.tokenizer, items)
    arrays = item_arrays(a, imgs, prompts, answers, ids, w, batch_size=2)
    rng = np.random.default_rng(0)
    neurons = [(l, int(i)) for l in range(a.num_layers) for i in rng.choice(a.ffn_width, 6, replace=False)]
    eps = 1e-4

    def utility(layer: int, neuron: int, s: float) -> np.ndarray:
        with torch.no_grad(), scale_neurons(a, {layer: ([neuron], s)}):
            return utility64(a, imgs, prompts, answers)

    with torch.no_grad():
        base = utility64(a, imgs, prompts, answers)
    fd, exact = [], []
    for l, i in neurons:
        fd.append((utility(l, i, 1 + eps) - utility(l, i, 1 - eps)) / (2 * eps))
        exact.append(base - utility(l, i, 0.0))
    fd, exact = np.array(fd).T, np.array(exact).T  # [item, neuron]
    got = np.array([[arrays.atp[k, l, i] for l, i in neurons] for k in range(len(items))])
    scale = np.abs(fd).max()
    assert scale > 1e-6
    np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-4 * scale)
    from scipy.stats import spearmanr

    assert spearmanr(got.ravel(), exact.ravel())[0] > 0.9


def test_logprob_dvp_is_the_first_order_change_in_the_last_layer(adapter64, annotations, images):
    """For a last-layer neuron, z * dvp_logprob (the hones_lp_nohead contribution of one item)
    equals d T / d s at s = 1, T the item's weighted mean target log-probability at the last
    prompt token and s the neuron's scale: central differences (eps 1e-4, float64 model) agree
    to 1e-3 relative. The published DVP (a logit, not a log-probability) does not."""
    a = adapter64
    last_layer = a.num_layers - 1
    for task in ("caption", "retrieval"):
        items, imgs, prompts, answers = _inputs(annotations, images, task, 2)
        ids, w = item_targets(a.tokenizer, items)
        arrays = item_arrays(a, imgs, prompts, answers, ids, w, batch_size=2)
        inputs = a.build_inputs(imgs, prompts)
        with torch.no_grad(), capture_ffn(a, [last_layer], inputs.last_prompt_index) as z:
            a.model(**inputs.tensors)
        z_last = z[last_layer].double().numpy()  # [item, neuron]

        def target(neuron: int, s: float) -> np.ndarray:
            with torch.no_grad(), scale_neurons(a, {last_layer: ([neuron], s)}):
                logits = a.model(**inputs.tensors).logits
            return target64(logits, inputs.last_prompt_index, ids, w)

        neurons = list(range(0, a.ffn_width, 5))
        eps = 1e-4
        fd = np.array([(target(i, 1 + eps) - target(i, 1 - eps)) / (2 * eps) for i in neurons]).T
        got = z_last[:, neurons] * arrays.dvp_logprob[:, last_layer, neurons]
        scale = np.abs(fd).max()
        assert scale > 1e-6
        np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-4 * scale, err_msg=task)
        published = z_last[:, neurons] * arrays.dvp[:, last_layer, neurons]
        assert not np.allclose(published, fd, rtol=0.1, atol=0.1 * scale)


# ------------------------------------------------------------------------------ caption targets
class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary; id 0 is a special token ("<s>")."""

    all_special_ids = [0]

    def __init__(self) -> None:
        self.vocab = {"<s>": 0}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def caption_items(references: list[list[str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"item_id": [f"c{k}" for k in range(len(references))], "task": "caption", "references": references}
    )


def test_caption_targets_as_published_and_distinct():
    tok = WordTokenizer()
    refs = [["a red cat", "a cat", "red <s>", "x", "y", "z never used"], ["a dog"]]
    ids, w = item_targets(tok, caption_items(refs))  # the default: the authors' joined target
    v = tok.vocab
    k = math.log(3 / 2) + 1  # idf of a token in one of the two items
    # First five references joined: "a red cat a cat red <s> x y"; the special token is dropped,
    # every occurrence kept (so "a" and "cat" count twice in the direction), "z" is the sixth reference.
    assert ids[0] == [v["a"], v["red"], v["cat"], v["a"], v["cat"], v["red"], v["x"], v["y"]]
    assert w[0] == pytest.approx([1.0, k, k, 1.0, k, k, k, k])  # "a" is in both items: idf 1
    assert ids[1] == [v["a"], v["dog"]] and w[1] == pytest.approx([1.0, k])

    ids_d, w_d = item_targets(tok, caption_items(refs), caption_target="distinct")
    assert ids_d[0] == [v["a"], v["red"], v["cat"], v["x"], v["y"], v["z"], v["never"], v["used"]]
    assert w_d[0] == pytest.approx([1.0] + [k] * 7)
    _, w_flat = item_targets(tok, caption_items(refs), caption_idf=False)
    assert w_flat[0] == [1.0] * 8

    long = [[" ".join(f"w{j}" for j in range(100)), " ".join(f"v{j}" for j in range(100))], ["a"]]
    ids_long, _ = item_targets(tok, caption_items(long))
    assert len(ids_long[0]) == CAPTION_MAX_TOKENS == 128 and ids_long[0][-1] == tok.vocab["v27"]
    with pytest.raises(ValueError, match="caption_target"):
        item_targets(tok, caption_items(refs), caption_target="all")
