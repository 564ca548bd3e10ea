"""Scale-out: a 2-rank torchrun dump equals the single-process dump bitwise; dask attribution
equals the streaming one.

- torchrun --standalone --nproc_per_node=2 (gloo, CPU) of ``python -m pipeline.method.distributed dump``
  on the tiny model, resuming a scratch store that a third "rank" of an earlier, interrupted
  run had started, gives bitwise the store of one in-process ``dump_activations`` (same params
  hash), with uneven ranks (5 blocks over 2 ranks) and each block written exactly once.
- ``attribute_dask`` on a 2-worker LocalCluster (worker processes: the graph is pickled) equals
  ``task_statistics`` to 1e-12 relative, for a plain and a sharded store; the ``attribute``
  subcommand writes the importance of ``stages.attribute``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from conftest import TESTS_DIR, random_item_arrays, resolve_pretrained

from pipeline.method.attribution import attribute, task_statistics
from pipeline.method.distributed import attribute_dask, importance_dask
from pipeline.method.dump import DumpExecution, DumpRequest, dump_activations
from pipeline.method.store import DONE_DIR, ActivationStore, StoreError, StoreLayout, read_importance, scratch_path
from pipeline.tasks.items import ImageTable
from stages.dump import READS, dump_inputs
from stages.params import read_params

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = TESTS_DIR.parent
N_ITEMS = 5


def _arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: arr[...] for name, arr in g.arrays()}


def _assert_same_store(got_path, want_path):
    got, want = _arrays(got_path), _arrays(want_path)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if want[name].dtype.kind in "fiu":
            assert got[name].tobytes() == want[name].tobytes(), f"{name} differs"
        else:
            np.testing.assert_array_equal(got[name], want[name])
    a = dict(zarr.open_group(str(got_path), mode="r").attrs)
    b = dict(zarr.open_group(str(want_path), mode="r").attrs)
    a.pop("code_version"), b.pop("code_version")  # "dirty" may flip while others edit pipeline/
    assert a == b


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_adapter) -> Path:
    out = tmp_path_factory.mktemp("model") / "test-tiny"
    tiny_adapter.model.save_pretrained(out)
    tiny_adapter.processor.save_pretrained(out)
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(tmp_path, model_dir, benchmark_dir, monkeypatch):
    import torch

    from pipeline.model.adapter import ModelAdapter

    params = {
        "studied_models": ["test-tiny"],
        "pretrained_models": ["test-tiny"],
        "tasks": ["vqa"],
        "models": {"test-tiny": {"source": "pretrained", "path": str(model_dir), "dtype": "float32", "device": "cpu"}},
        "runtime": {"threads": 2, "batch_sequences": 4},
        "dump": {"split": "discovery", "max_items": N_ITEMS, "store_dtype": "float32", "target_chunk_mib": 1e-6},
        "heads": {"top_k": 2},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    resolve_pretrained(tmp_path / "params.yaml", "test-tiny", tmp_path, monkeypatch)
    scores = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 3, 2, 1], "score": [0.1, -0.2, 0.4, 0.3]})
    scores.to_parquet(tmp_path / "scores.parquet")
    args = Namespace(
        params=tmp_path / "params.yaml",
        model="test-tiny",
        task="vqa",
        benchmark=benchmark_dir,
        heads=tmp_path / "scores.parquet",
        out=tmp_path / "dist" / "vqa.zarr",
        critical_heads=tmp_path / "dist" / "vqa.heads.parquet",
    )
    items, heads, storage = dump_inputs(read_params(args.params, READS, model="test-tiny", task="vqa"), args)
    assert len(items) == N_ITEMS and heads["layer"].tolist() == [1, 1]

    adapter = ModelAdapter.load(str(model_dir), dtype="float32", device="cpu")
    images = ImageTable(benchmark_dir / "images.parquet")
    request = DumpRequest(items, images, heads, caption_idf=True)
    reference = dump_activations(
        adapter, request, tmp_path / "single" / "vqa.zarr", storage, DumpExecution(batch_size=4)
    )
    assert reference.layout.n_blocks == N_ITEMS  # one item per block: uneven ranks (3 + 2 blocks)

    # An earlier, interrupted 3-rank run: "rank 0" wrote blocks 0 and 3, then gave up waiting for the others.
    args.out.parent.mkdir()
    with pytest.raises(StoreError, match="still not done"):
        dump_activations(
            adapter,
            request,
            args.out,
            storage,
            DumpExecution(batch_size=4, rank=0, world_size=3, timeout_seconds=0.0, poll_seconds=0.01),
        )
    scratch = scratch_path(args.out, storage.params_hash)
    assert sorted(int(p.stem) for p in (scratch / DONE_DIR).glob("*.done")) == [0, 3]

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stages.dump",
        "--params",
        str(args.params),
        "--model",
        "test-tiny",
        "--task",
        "vqa",
        "--benchmark",
        str(benchmark_dir),
        "--heads",
        str(args.heads),
        "--out",
        str(args.out),
        "--critical-heads",
        str(args.critical_heads),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Rank 0 resumed: blocks 2 and 4 are left for it, block 1 for rank 1 (0 and 3 were done).
    assert re.search(r"rank 0/2: 2 of 5 blocks to write", log), log[-3000:]
    assert re.search(r"rank 1/2: 1 of 5 blocks to write", log), log[-3000:]
    assert not scratch.exists()
    store = ActivationStore.open(args.out)
    assert store.attrs["params_hash"] == reference.attrs["params_hash"] == storage.params_hash
    _assert_same_store(args.out, reference.root)
    assert pd.read_parquet(args.critical_heads)[["layer", "head"]].values.tolist() == [[1, 2], [1, 1]]
    assert torch.get_num_threads() >= 1


# ------------------------------------------------------------------------------ dask
def _random_store(path: Path, task: str, *, n_items: int, dtype: str, max_files: int, seed: int) -> ActivationStore:
    C, L, I = 3, 2, 16
    layout = StoreLayout.plan(
        C, n_items, L, I, dtype, target_chunk_bytes=4 * L * I * np.dtype(dtype).itemsize, max_files=max_files
    )
    rng = np.random.default_rng(seed)
    conditions = [(-1, -1, float("nan")), (1, 0, 0.5), (0, 2, -0.25)]
    ids = [f"{task}-{n}" for n in range(n_items)]
    store = ActivationStore.create_or_resume(
        path,
        layout,
        conditions,
        ids,
        [[3]] * n_items,
        [[1.0]] * n_items,
        {"model": "random", "task": task},
        params_hash=f"h{seed}",
    )
    for k in store.pending_blocks():
        sl = layout.block(k)
        n = sl.stop - sl.start
        store.write_block(k, rng.normal(0.1, 1, (C, n, L, I)), random_item_arrays(rng, n, L, I))
    return store.finalize()


@pytest.fixture(scope="module")
def random_stores(tmp_path_factory) -> dict[str, ActivationStore]:
    root = tmp_path_factory.mktemp("stores")
    stores = {
        "vqa": _random_store(root / "vqa.zarr", "vqa", n_items=37, dtype="float16", max_files=1000, seed=1),
        "ocr": _random_store(root / "ocr.zarr", "ocr", n_items=41, dtype="float32", max_files=9, seed=2),
    }
    assert not stores["vqa"].layout.sharded and stores["ocr"].layout.sharded
    return stores


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


def _rel_close(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.slow
def test_attribute_dask_equals_streaming(random_stores, dask_cluster):
    from dask.distributed import Client

    with Client(dask_cluster) as client:
        got = attribute_dask(random_stores, client=client)
        single = attribute_dask(random_stores["ocr"], client=client, items_per_chunk=5)
    for task, store in random_stores.items():
        want = task_statistics(store)
        g = got[task]
        assert g.n_items == want.n_items == store.layout.n_items
        _rel_close(g.mean_contribution, want.mean_contribution)
        _rel_close(g.mean_activation, want.mean_activation)
        np.testing.assert_array_equal(g.activation_probability, want.activation_probability)
        np.testing.assert_array_equal(g.head_scores, want.head_scores)
    _rel_close(single.mean_contribution, task_statistics(random_stores["ocr"]).mean_contribution)


@pytest.mark.slow
def test_attribute_stage_dask_engine_equals_streaming(tmp_path, random_stores, dask_cluster, monkeypatch):
    act = tmp_path / "activations"
    act.mkdir()
    for task, store in random_stores.items():
        shutil.copytree(store.root, act / f"{task}.zarr")
    abl = tmp_path / "ablation"
    abl.mkdir()
    pd.DataFrame({"layer": [0, 1], "neuron": [3, 5], "effect": [0.5, -0.1]}).to_parquet(abl / "vqa.parquet")
    pd.DataFrame(
        {
            "layer": pd.Series([], dtype="int64"),
            "neuron": pd.Series([], dtype="int64"),
            "effect": pd.Series([], dtype="float64"),
        }
    ).to_parquet(abl / "ocr.parquet")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "tasks": ["vqa", "ocr"],
                "studied_models": ["random"],
                "pretrained_models": ["random"],
                "models": {"random": {"source": "pretrained", "path": "unused"}},
                "attribute": {
                    "seed": 3,
                    "ape_min_probability": 0.05,
                    "engine": "dask",
                    "dask_scheduler": dask_cluster.scheduler_address,
                },
            }
        )
    )
    out = tmp_path / "attribution.zarr"
    from stages import attribute as attribute_stage
    from stages.attribute import ablation_matrix

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "attribute",
            "--params",
            str(tmp_path / "params.yaml"),
            "--model",
            "random",
            "--activations",
            str(act),
            "--ablation",
            str(abl),
            "--benchmark",
            str(tmp_path),
            "--out",
            str(out),
        ],
    )
    attribute_stage.main()
    methods, tasks, got, attrs = read_importance(out)

    stores = {t: ActivationStore.open(act / f"{t}.zarr") for t in ("vqa", "ocr")}
    truth = {t: ablation_matrix(abl / f"{t}.parquet", (2, 16)) for t in stores}
    want_m, want_t, want = attribute(stores, truth, seed=3)
    assert (methods, tasks) == (want_m, want_t)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.nanmax(np.abs(want)), equal_nan=True)
    m2, t2, direct = importance_dask(stores, truth, seed=3)  # threaded scheduler
    np.testing.assert_allclose(direct, want, rtol=1e-6, atol=1e-7 * np.nanmax(np.abs(want)), equal_nan=True)
