"""Jobs spread over worker processes (pipeline.model.workers): the same results as one process,
in the order given, and a failing job named."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_adapter, discovery_items

from pipeline.errors import PipelineError
from pipeline.method.ablation import ablation_shard_job, merge_ablation_shards, neuron_ablation_effects
from pipeline.model import batching
from pipeline.model.workers import map_jobs, split_threads
from pipeline.outcomes.suppression import (
    MaskCondition,
    merge_suppression_scores,
    run_suppression_job,
    suppression_jobs,
    suppression_scores,
)
from pipeline.tasks.items import ImageTable


def tiny_state(benchmark_dir: Path):
    """(adapter, images) of the test fixture, as a worker loads it."""
    return build_tiny_adapter(benchmark_dir), ImageTable(Path(benchmark_dir) / "images.parquet")


def _square(state, job: int) -> tuple[int, int]:
    import os

    return job * job, os.getpid()


def _fail_on_three(state, job: int) -> int:
    if job == 3:
        raise ValueError("three is not allowed")
    return job


@pytest.mark.slow
def test_results_come_back_in_job_order_from_other_processes() -> None:
    import os

    out = map_jobs(_square, [5, 1, 4, 2, 3], dict, workers=2)
    assert [v for v, _ in out] == [25, 1, 16, 4, 9]
    assert {pid for _, pid in out} - {os.getpid()}, "no job ran in a worker process"
    # One worker: in this process, same results.
    assert [v for v, _ in map_jobs(_square, [5, 1], dict, workers=1)] == [25, 1]


@pytest.mark.slow
def test_a_failing_job_is_named_with_its_cause() -> None:
    with pytest.raises(
        PipelineError, match=r"demo: job number 3 failed in a worker: ValueError: three is not allowed"
    ) as err:
        map_jobs(_fail_on_three, [1, 2, 3, 4], dict, workers=2, describe=lambda j: f"number {j}", what="demo")
    assert isinstance(err.value.__cause__, ValueError)
    # In this process the job's own exception propagates unchanged.
    with pytest.raises(ValueError, match="three is not allowed"):
        map_jobs(_fail_on_three, [1, 3], dict, workers=1)
    with pytest.raises(PipelineError, match="workers"):
        map_jobs(_square, [1], dict, workers=0)


def test_split_threads() -> None:
    assert split_threads(2, 2) == 1
    assert split_threads(8, 3) == 2
    assert split_threads(1, 4) == 1


def _conditions(adapter) -> list[MaskCondition]:
    rng = np.random.default_rng(0)
    out = []
    for k, task in enumerate(["vqa", "caption", "retrieval", "vqa", "ocr"]):
        neurons = {(int(rng.integers(adapter.num_layers)), int(rng.integers(adapter.ffn_width))) for _ in range(40)}
        out.append(MaskCondition(f"m{k % 2}", task, 0.01, 0, k < 4, tuple(sorted(neurons))))
    return out


@pytest.mark.slow
def test_suppression_over_workers_equals_one_process(benchmark_dir, tiny_adapter, annotations, images) -> None:
    items = annotations[annotations["split"] == "discovery"].groupby("task", sort=False).head(3).reset_index(drop=True)
    conditions = _conditions(tiny_adapter)
    before = batching.rows_completed()
    serial = suppression_scores(tiny_adapter, items, images, conditions, batch_size=7, max_new_tokens=4)
    serial_rows = batching.rows_completed() - before
    jobs = suppression_jobs(items, conditions, shards_per_task=3)
    assert {j.eval_task for j in jobs} == set(items["task"])
    assert [j.cost for j in jobs] == sorted((j.cost for j in jobs), reverse=True)
    parts = map_jobs(
        partial(run_suppression_job, items=items, conditions=conditions, batch_size=7, max_new_tokens=4),
        jobs,
        partial(tiny_state, benchmark_dir),
        workers=2,
    )
    parallel = merge_suppression_scores(parts, items)
    # The workers' rows reach this process's count (the stage's timing record).
    assert batching.rows_completed() - before - serial_rows == serial_rows > 0
    assert list(parallel) == list(serial)
    moved = 0.0
    for key, by_cond in serial.items():
        assert list(parallel[key]) == list(by_cond)
        for c, r in by_cond.items():
            np.testing.assert_allclose(parallel[key][c].per_item, r.per_item, atol=1e-5, err_msg=f"{key} {c}")
            moved = max(moved, float(np.max(np.abs(np.asarray(r.per_item) - np.asarray(by_cond[0].per_item)))))
    assert moved > 1e-4, "the masks change nothing: the comparison would hold for any sharding"


def test_a_condition_scored_twice_is_an_error(tiny_adapter, annotations, images) -> None:
    items = discovery_items(annotations, "vqa", 2)
    conditions = _conditions(tiny_adapter)[:2]
    [job] = suppression_jobs(items, conditions)
    part = run_suppression_job(
        (tiny_adapter, images), job, items=items, conditions=conditions, batch_size=8, max_new_tokens=4
    )
    with pytest.raises(PipelineError, match="scored by two jobs"):
        merge_suppression_scores([part, part], items)


@pytest.mark.slow
def test_ablation_shards_over_workers_equal_one_pass(benchmark_dir, tiny_adapter, annotations, images) -> None:
    items = discovery_items(annotations, "vqa", 2)
    effect, se = neuron_ablation_effects(tiny_adapter, items, images, batch_size=16)
    # 3 shards of a 2-layer model: the third has no layer.
    parts = map_jobs(
        partial(ablation_shard_job, items=items, batch_size=16),
        [(k, 3) for k in range(3)],
        partial(tiny_state, benchmark_dir),
        workers=2,
    )
    assert [layers for layers, _, _ in parts] == [[0], [1], []]
    merged_effect, merged_se = merge_ablation_shards(parts)
    assert not np.isnan(merged_effect).any()
    np.testing.assert_allclose(merged_effect, effect, atol=1e-5)
    np.testing.assert_allclose(merged_se, se, atol=1e-5)
    assert np.abs(effect).max() > 1e-4


def test_a_sampled_ground_truth_measures_the_exhaustive_effects_of_its_neurons(tiny_adapter, annotations, images):
    """The sampled_ground_truth stage's shards: only the sample's neurons are zeroed, each with the
    effect the exhaustive ablation gives it; a shard whose layers hold none of them runs nothing."""
    items = discovery_items(annotations, "ocr", 2)
    effect, se = neuron_ablation_effects(tiny_adapter, items, images, batch_size=16)
    neurons = [(0, 3), (0, 17), (1, 5)]
    state = (tiny_adapter, images)
    parts = [ablation_shard_job(state, (k, 3), items=items, batch_size=16, neurons=neurons) for k in range(3)]
    assert [layers for layers, _, _ in parts] == [[0], [1], []]
    measured, measured_se = merge_ablation_shards(parts)
    chosen = np.zeros(effect.shape, dtype=bool)
    chosen[tuple(np.array(neurons).T)] = True
    assert np.isnan(measured[~chosen]).all() and np.isfinite(measured[chosen]).all()
    np.testing.assert_allclose(measured[chosen], effect[chosen], atol=1e-5)
    np.testing.assert_allclose(measured_se[chosen], se[chosen], atol=1e-5)
    none_here = ablation_shard_job(state, (1, 2), items=items, batch_size=16, neurons=[(0, 3)])
    assert none_here[0] == [1] and np.isnan(none_here[1]).all()


def test_worker_plan_keeps_accelerator_models_in_one_process(monkeypatch) -> None:
    import stages._load as load
    from stages.params import load_params_file

    params = load_params_file(Path(__file__).resolve().parents[1] / "params.yaml")
    params = params.model_copy(update={"runtime": params.runtime.model_copy(update={"workers": 2, "threads": 4})})
    monkeypatch.setattr(load, "model_device", lambda p, name: "cpu")
    assert load.worker_plan(params, "tiny-llava") == (2, 2)
    monkeypatch.setattr(load, "model_device", lambda p, name: "cuda")
    assert load.worker_plan(params, "tiny-llava") == (1, 4)
