"""Steering (pipeline.outcomes.steering, stages.steer) on the tiny LLaVA and the tiny benchmark."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import resolve_pretrained

from pipeline.io import write_parquet
from pipeline.model.adapter import ModelAdapter
from pipeline.model.hooks import scale_neurons
from pipeline.model.scoring import model_answer_logprobs
from pipeline.outcomes.steering import (
    FIXED_AMP_SCALE,
    VARIANTS,
    SteeringJob,
    SteeringSettings,
    apply_steering,
    condition_scales,
    load_scales,
    scales_table,
    steer_task,
    train_scales,
)
from pipeline.tasks.items import likelihood_sequences_per_item, training_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
torch.set_num_threads(1)

NEURONS = [(0, 1), (0, 5), (1, 3), (1, 10)]
RANDOM = [(0, 7), (0, 9), (1, 20), (1, 40)]


def split_items(annotations, task, split="dev", n=2):
    return annotations[(annotations["split"] == split) & (annotations["task"] == task)].head(n).reset_index(drop=True)


def answer_batch(adapter, images, items):
    imgs, prompts, answers = training_rows(items, seed=0)
    return adapter.build_inputs([images[i] for i in imgs], prompts, answers)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs.tensors).logits


def as_spec(neurons, values):
    spec: dict[int, tuple[list[int], list[float]]] = {}
    for (l, n), v in zip(neurons, values):
        spec.setdefault(l, ([], []))
        spec[l][0].append(n)
        spec[l][1].append(float(v))
    return {l: (torch.tensor(i), torch.tensor(s)) for l, (i, s) in spec.items()}


def test_training_rows_retrieval_positive_and_negative(annotations):
    items = split_items(annotations, "retrieval")
    _, prompts, answers = training_rows(items, seed=0)
    assert answers == ["Yes", "No"] * len(items)
    for k, rec in enumerate(items.itertuples()):
        assert prompts[2 * k] == rec.prompt.format(candidate=rec.candidates[rec.positive_index])
        assert prompts[2 * k + 1] != prompts[2 * k]


def test_steering_jobs_are_weighed_by_the_sequences_they_run(annotations):
    """Retrieval scores every candidate and caption every reference: those jobs go out first."""
    jobs = [
        SteeringJob(
            task,
            split_items(annotations, task, "dev", 2),
            split_items(annotations, task, "test", 3),
            (),
            None,
            SteeringSettings(beta=0.5, l2=0.0, train_batch_size=4, seed=0),
            8,
            4,
        )
        for task in ("vqa", "ocr", "caption", "retrieval")
    ]
    for job in jobs:
        column = {"retrieval": "candidates", "caption": "references"}.get(job.task)
        per_item = job.eval_items[column].map(len).mean() if column else 1.0
        assert likelihood_sequences_per_item(job.eval_items, job.task) == per_item
        assert job.cost == per_item * (len(job.train_items) + len(job.eval_items)) > 0
    assert {j.task for j in sorted(jobs, key=lambda j: -j.cost)[:2]} == {"retrieval", "caption"}
    assert likelihood_sequences_per_item(jobs[3].eval_items.head(0), "retrieval") == 1.0


def test_answer_positions_match_evaluation_logprob(tiny_adapter, images, annotations):
    from pipeline.model.evaluation import answer_logprob

    items = pd.concat([split_items(annotations, "caption", n=1), split_items(annotations, "vqa", n=1)])
    imgs, prompts, answers = training_rows(items, seed=0)
    inputs = tiny_adapter.build_inputs([images[i] for i in imgs], prompts, answers)
    assert inputs.answer_mask.sum(1).unique().numel() == 2  # answers of different lengths
    with torch.no_grad():
        logp, target, mask = model_answer_logprobs(tiny_adapter, inputs)
    per_row = (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum(1) / mask.sum(1)
    want = answer_logprob(tiny_adapter, [images[i] for i in imgs], prompts, answers)
    np.testing.assert_allclose(per_row.numpy(), want, rtol=1e-5, atol=1e-5)


def test_lambda_starts_at_zero_and_unit_scales_are_no_op(tiny_adapter, images, annotations):
    items = split_items(annotations, "vqa")
    lam = train_scales(
        tiny_adapter,
        items,
        images,
        NEURONS,
        SteeringSettings(beta=0.5, l2=1e-4, lr=0.0, epochs=1, grad_accum=1, train_batch_size=2, seed=0),
        progress=False,
    )
    np.testing.assert_array_equal(lam, np.zeros(len(NEURONS)))
    inputs = answer_batch(tiny_adapter, images, items)
    base = logits(tiny_adapter.model, inputs)
    with scale_neurons(tiny_adapter, as_spec(NEURONS, 1.0 + lam)):
        assert torch.equal(logits(tiny_adapter.model, inputs), base)
    with condition_scales(tiny_adapter, [{nr: 1.0 for nr in NEURONS}])([0] * inputs.batch_size):
        assert torch.equal(logits(tiny_adapter.model, inputs), base)


def test_training_moves_clamps_and_leaves_model_untouched(tiny_adapter, images, annotations):
    model = copy.deepcopy(tiny_adapter.model)  # a copy: the session adapter stays read-only
    for p in model.parameters():
        p.requires_grad_(True)
    adapter = ModelAdapter.from_model(model, tiny_adapter.processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clamp = 0.05
    lam = train_scales(
        adapter,
        split_items(annotations, "vqa"),
        images,
        NEURONS,
        SteeringSettings(beta=0.5, l2=1e-4, lr=1.0, epochs=2, grad_accum=1, train_batch_size=1, clamp=clamp, seed=0),
        progress=False,
    )
    assert lam.shape == (len(NEURONS),)
    assert np.abs(lam).max() > 0
    assert np.all(np.abs(lam) <= clamp + 1e-7)
    assert np.isclose(np.abs(lam), clamp).any()  # lr 1.0 drives some lambda into the clamp
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_beta_changes_the_learned_scales(tiny_adapter, images, annotations):
    items = split_items(annotations, "caption")
    kw = dict(l2=0.0, lr=0.05, epochs=2, grad_accum=1, train_batch_size=1, seed=0)
    with_kl = train_scales(tiny_adapter, items, images, NEURONS, SteeringSettings(beta=10.0, **kw), progress=False)
    no_kl = train_scales(tiny_adapter, items, images, NEURONS, SteeringSettings(beta=0.0, **kw), progress=False)
    assert np.abs(with_kl).max() > 0 and np.abs(no_kl).max() > 0
    assert not np.allclose(with_kl, no_kl, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in tiny_adapter.model.parameters())  # the fixture's flags, restored


def test_condition_rows_match_scale_neurons(tiny_adapter, images, annotations):
    items = split_items(annotations, "vqa", n=1)
    conditions = [{}, {nr: 2.0 for nr in NEURONS}, {nr: s for nr, s in zip(RANDOM, [0.0, 0.5, 1.5, 3.0])}]
    imgs, prompts, answers = training_rows(items, seed=0)
    inputs = tiny_adapter.build_inputs([images[imgs[0]]] * 3, prompts * 3, answers * 3)
    with condition_scales(tiny_adapter, conditions)([0, 1, 2]):
        got = logits(tiny_adapter.model, inputs)
    for c, cond in enumerate(conditions):
        with scale_neurons(tiny_adapter, as_spec(list(cond), list(cond.values())) if cond else {}):
            want = logits(tiny_adapter.model, inputs)
        torch.testing.assert_close(got[c], want[c], rtol=0, atol=0)


def test_steer_task_variants_and_baseline_scale_sets(tiny_adapter, images, annotations):
    cfg = SteeringSettings(
        beta=0.5,
        l2=1e-4,
        epochs=1,
        grad_accum=1,
        train_batch_size=2,
        grid=(0.5, 1.0, 2.0),
        utility="teacher_forced",
        seed=0,
    )
    run = steer_task(
        tiny_adapter,
        "vqa",
        split_items(annotations, "vqa"),
        split_items(annotations, "vqa", "test"),
        images,
        NEURONS,
        RANDOM,
        cfg,
        batch_size=8,
        max_new_tokens=2,
    )
    assert tuple(run.results) == VARIANTS
    assert run.scales["base"] == {}
    assert run.scales["fixed_amp"] == {nr: FIXED_AMP_SCALE for nr in NEURONS}
    assert set(run.grid) == {0.5, 1.0, 2.0}
    best = max(u.utility for u in run.grid.values())
    assert run.grid[run.grid_scale].utility == best
    assert run.scales["grid_search"] == {nr: run.grid_scale for nr in NEURONS}
    assert list(run.scales["learned"]) == NEURONS and list(run.scales["no_kl"]) == NEURONS
    assert list(run.scales["random_learned"]) == RANDOM
    for v in ("learned", "no_kl", "random_learned"):
        assert all(1 - cfg.clamp <= s <= 1 + cfg.clamp for s in run.scales[v].values())
    # the grid's scale-1 condition is the unsteered model on dev
    from pipeline.model.evaluation import evaluate_task

    plain = evaluate_task(
        tiny_adapter, "vqa", split_items(annotations, "vqa"), images, batch_size=8, utility="teacher_forced"
    )[0]
    assert run.grid[1.0].utility == pytest.approx(plain.utility, abs=1e-5)
    table = scales_table([run])
    assert list(table.columns) == ["task", "layer", "neuron", "scale"] and len(table) == len(NEURONS)


def test_apply_steering_matches_scale_neurons_and_cleans_up(tiny_adapter, images, annotations, tmp_path):
    scales = pd.DataFrame(
        {
            "task": ["vqa"] * 4 + ["ocr"],
            "layer": [0, 0, 1, 1, 0],
            "neuron": [1, 5, 3, 10, 2],
            "scale": [1.7, 0.2, 2.2, -0.3, 0.0],
        }
    )
    path = tmp_path / "scales.parquet"
    write_parquet(scales, path)
    assert len(load_scales(path)) == 5
    fresh = copy.deepcopy(tiny_adapter.model)
    inputs = answer_batch(tiny_adapter, images, split_items(annotations, "vqa"))
    base = logits(fresh, inputs)
    with scale_neurons(tiny_adapter, as_spec(NEURONS, [1.7, 0.2, 2.2, -0.3])):
        want = logits(tiny_adapter.model, inputs)
    with apply_steering(fresh, path, "vqa"):
        got = logits(fresh, inputs)
    assert torch.equal(got, want) and not torch.equal(got, base)
    fresh_adapter = ModelAdapter.from_model(fresh)
    downs = [fresh_adapter.ffn_down_proj(l) for l in range(fresh_adapter.num_layers)]
    assert all(len(d._forward_pre_hooks) == 0 for d in downs)
    assert torch.equal(logits(fresh, inputs), base)
    with pytest.raises(ValueError, match="no steering scales for task"):
        with apply_steering(fresh, scales, "caption"):
            pass


def test_stage_writes_declared_outputs(tiny_adapter, benchmark_dir, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    tiny_adapter.model.save_pretrained(model_dir)
    tiny_adapter.processor.save_pretrained(model_dir)
    tasks = ["vqa", "retrieval"]
    masks = pd.DataFrame(
        [
            (m, t, 0.01, 0, True, r + 1, l, n, 1.0)
            for t in tasks
            for m, nrs in (("hones", NEURONS), ("random", RANDOM))
            for r, (l, n) in enumerate(nrs)
        ],
        columns=["method", "task", "rho", "draw", "headline", "rank", "layer", "neuron", "score"],
    )
    write_parquet(masks, tmp_path / "masks.parquet")
    params = {
        "studied_models": ["tiny"],
        "pretrained_models": ["tiny"],
        "tasks": tasks,
        "models": {"tiny": {"source": "pretrained", "path": str(model_dir), "dtype": "float32", "device": "cpu"}},
        "runtime": {"threads": 1, "batch_sequences": 16, "max_new_tokens": 2},
        "steer": {"epochs": 1, "grad_accum": 1, "train_batch_size": 4, "max_items": 2, "grid": [1.0, 2.0]},
        "statistics": {"bootstrap_resamples": 200},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    resolve_pretrained(tmp_path / "params.yaml", "tiny", tmp_path, monkeypatch)
    out = tmp_path / "steer"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "steer",
            "--params",
            str(tmp_path / "params.yaml"),
            "--model",
            "tiny",
            "--benchmark",
            str(benchmark_dir),
            "--masks",
            str(tmp_path / "masks.parquet"),
            "--out",
            str(out),
        ],
    )
    from stages.steer import main

    main()
    torch.set_num_threads(1)
    scales = load_scales(out / "scales.parquet")
    assert set(scales["task"]) == set(tasks) and len(scales) == 2 * len(NEURONS)
    table = pd.read_parquet(out / "steering.parquet")
    assert list(table.columns) == ["task", "variant", "split", "utility", "metric"]
    summary = json.loads((out / "steering.json").read_text())
    assert set(summary) == {*tasks, "mean"}
    for key in (*tasks, "mean"):
        assert list(summary[key]) == list(VARIANTS)
    assert summary["mean"]["base"] == pytest.approx(np.mean([summary[t]["base"] for t in tasks]), abs=1e-6)

    intervals = json.loads((out / "steering_intervals.json").read_text())
    assert intervals["resamples"] == 200 and set(intervals) >= {"generative", "likelihood", "scale_movement"}
    for utility in ("generative", "likelihood"):
        util = intervals[utility]["utility"]
        assert set(util) == {*tasks, "mean"} and list(util["mean"]) == list(VARIANTS)
        for iv in util["mean"].values():
            assert iv["ci_low"] <= iv["value"] <= iv["ci_high"]
        diff = intervals[utility]["differences"]["learned-minus-grid_search"]["mean"]
        assert diff["verdict"] in ("holds", "fails", "undecided")
    assert intervals["generative"]["utility"]["mean"]["base"]["value"] == pytest.approx(
        summary["mean"]["base"], abs=1e-5
    )
    moved = intervals["scale_movement"]
    assert set(moved) == set(tasks) and all(0 < m["mean_abs_change"] <= m["max_abs_change"] for m in moved.values())
