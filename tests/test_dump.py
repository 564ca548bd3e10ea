"""Dumping activations: the store equals direct computations; kill -9 and resume is bitwise exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from conftest import TESTS_DIR, direct_dvp, direct_targets, direct_z, discovery_items

import pipeline.method.dump as dump_module
from pipeline.errors import PipelineError
from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations, item_targets
from pipeline.method.store import DONE_DIR, ActivationStore, StoreError, StoreLayout
from pipeline.tasks.items import IMAGE_SCHEMA, ImageTable

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HEADS = pd.DataFrame({"layer": [1, 0, 1], "head": [2, 3, 0], "score": [0.4, -0.1, 0.25]})
ONE_ITEM_PER_BLOCK = 1  # target_chunk_bytes < one item's bytes -> blocks of one item


def run_dump(adapter, items, images, out, *, heads=HEADS, params_hash="p", batch_size=5, target_chunk_bytes=1 << 20):
    return dump_activations(
        adapter,
        DumpRequest(items, images, heads, caption_idf=True),
        out,
        DumpStorage(
            dtype="float32",
            params_hash=params_hash,
            attrs={"model": "test-tiny"},
            target_chunk_bytes=target_chunk_bytes,
        ),
        DumpExecution(batch_size=batch_size),
    )


def read_arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: arr[...] for name, arr in g.arrays()}


# ------------------------------------------------------------------------------ (a) equals direct
@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval"])
def test_dump_equals_direct_computation(tmp_path, tiny_adapter, annotations, images, task):
    a = tiny_adapter
    items = discovery_items(annotations, task, 6)
    store = run_dump(a, items, images, tmp_path / f"{task}.zarr", target_chunk_bytes=2 * a.num_layers * a.ffn_width * 4)
    assert store.layout.n_blocks == 3 and store.layout.n_conditions == 4
    block = next(store.iter_blocks(items_per_block=len(items)))

    want_z = direct_z(a, images, items, HEADS)
    assert np.abs(want_z).max() > 1e-3  # not a degenerate model
    # Head substitution changes z (else the comparison below would not see a mixed-up condition).
    assert np.abs(want_z[1:] - want_z[:1]).max() > 1e-4
    np.testing.assert_allclose(block.z, want_z, rtol=1e-4, atol=1e-5 * np.abs(want_z).max())

    ids, weights = direct_targets(a.tokenizer, items)
    got_ids, got_w = store.targets()
    for n in range(len(items)):
        k = len(ids[n])
        assert got_ids[n, :k].tolist() == ids[n] and (got_ids[n, k:] == -1).all()
        np.testing.assert_allclose(got_w[n, :k], weights[n], rtol=1e-6)
    if task == "caption":
        assert len({round(w, 6) for ws in weights for w in ws}) > 1  # the IDF weights are not all equal
    want_dvp = direct_dvp(a, ids, weights)
    np.testing.assert_allclose(block.dvp, want_dvp, rtol=1e-4, atol=1e-5 * np.abs(want_dvp).max())

    assert store.item_ids == items["item_id"].tolist()
    assert store.conditions()[1:] == [(1, 2, 0.4), (0, 3, -0.1), (1, 0, 0.25)]
    assert store.attrs["task"] == task and store.attrs["model"] == "test-tiny"


def test_caption_idf_off_gives_unit_weights(tiny_adapter, annotations):
    items = discovery_items(annotations, "caption", 4)
    ids, w = item_targets(tiny_adapter.tokenizer, items, caption_idf=False)
    assert all(x == 1.0 for ws in w for x in ws) and all(len(i) == len(x) for i, x in zip(ids, w))


# ------------------------------------------------------------------------------ (b) kill and resume
_CHILD = r"""
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
import pandas as pd
import pipeline.method.dump as dump
from pipeline.tasks.items import ImageTable
from conftest import build_tiny_adapter, discovery_items
from pipeline.tasks.items import read_annotations

bench = {bench!r}
adapter = build_tiny_adapter(bench)
items = discovery_items(read_annotations(bench + "/annotations.parquet"), {task!r}, {n_items})
heads = pd.DataFrame({heads!r})
original = dump.capture_block
def slow_capture_block(*args, **kw):  # a slower model: the kill lands while a block is computed
    time.sleep({delay})
    return original(*args, **kw)
dump.capture_block = slow_capture_block
print("start", flush=True)
dump.dump_activations(adapter, dump.DumpRequest(items, ImageTable(bench + "/images.parquet"), heads, caption_idf=True),
    __import__("pathlib").Path({out!r}),
    dump.DumpStorage(dtype="float32", params_hash="kill", attrs={{"model": "test-tiny"}}, target_chunk_bytes=1),
    dump.DumpExecution(batch_size=3))
print("finished", flush=True)
"""


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(tmp_path, tiny_adapter, annotations, images, benchmark_dir, monkeypatch):
    task, n_items = "vqa", 6
    items = discovery_items(annotations, task, n_items)
    killed = tmp_path / "killed" / f"{task}.zarr"
    killed.parent.mkdir()
    script = _CHILD.format(
        tests=str(TESTS_DIR),
        threads=torch.get_num_threads(),
        bench=str(benchmark_dir),
        task=task,
        n_items=n_items,
        heads=HEADS.to_dict("list"),
        delay=0.4,
        out=str(killed),
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    n_blocks = StoreLayout.plan(
        len(HEADS) + 1, n_items, tiny_adapter.num_layers, tiny_adapter.ffn_width, "float32", 1
    ).n_blocks
    assert n_blocks == n_items >= 4
    done: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = [p for d in killed.glob(".partial-*") for p in (d / DONE_DIR).glob("*.done")]
            if done:
                break
            time.sleep(0.01)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert alive, f"the dump finished or failed before it could be killed:\n{out}\n{err[-3000:]}"
    assert done and "finished" not in out
    (scratch,) = killed.glob(".partial-*")
    done_before = {int(p.stem) for p in (scratch / DONE_DIR).glob("*.done")}
    assert 1 <= len(done_before) < n_blocks

    # The killed output is not a store: open() refuses it and says how to finish it.
    with pytest.raises(StoreError, match="unfinished build.*re-run the dump stage"):
        ActivationStore.open(killed)
    # As a hard kill inside zarr's atomic write would, leave a torn temporary file behind.
    torn = scratch / "z" / "c" / "0" / f"{n_blocks - 1}" / "0" / "0.deadbeef.partial"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\0" * 7)

    # Resume in this process: only the blocks not marked done are computed again.
    computed = []
    original = dump_module.capture_block

    def counting(*args, **kw):
        computed.append(args[2])
        return original(*args, **kw)

    monkeypatch.setattr(dump_module, "capture_block", counting)
    resumed = run_dump(
        tiny_adapter, items, images, killed, params_hash="kill", batch_size=3, target_chunk_bytes=ONE_ITEM_PER_BLOCK
    )
    assert len(computed) == n_blocks - len(done_before)
    assert not list(killed.rglob("*.partial")) and not scratch.exists()
    monkeypatch.setattr(dump_module, "capture_block", original)

    clean = run_dump(
        tiny_adapter,
        items,
        images,
        tmp_path / "clean" / f"{task}.zarr",
        params_hash="kill",
        batch_size=3,
        target_chunk_bytes=ONE_ITEM_PER_BLOCK,
    )
    got, want = read_arrays(resumed.root), read_arrays(clean.root)
    assert sorted(got) == sorted(want) and {"z", "dvp", "item_id", "target_ids"} <= set(got)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if want[name].dtype.kind == "f":
            assert got[name].tobytes() == want[name].tobytes(), f"{name} differs after kill and resume"
        else:
            np.testing.assert_array_equal(got[name], want[name])
    assert ActivationStore.open(killed).attrs["params_hash"] == "kill"


# ------------------------------------------------------------------------------ (c) bad input
def test_empty_reference_is_an_error_naming_the_item(tmp_path, tiny_adapter, annotations, images):
    for refs in ([""], [], ["<unk>"]):
        items = discovery_items(annotations, "vqa", 3)
        items.at[1, "references"] = refs
        bad = items.at[1, "item_id"]
        with pytest.raises(PipelineError, match=f"item '{bad}'.*empty target"):
            run_dump(tiny_adapter, items, images, tmp_path / "vqa.zarr")
    items = discovery_items(annotations, "caption", 3)
    items.at[2, "references"] = ["", " "]
    with pytest.raises(PipelineError, match=f"item '{items.at[2, 'item_id']}'"):
        run_dump(tiny_adapter, items, images, tmp_path / "caption.zarr")
    assert not (tmp_path / "vqa.zarr").exists() and not (tmp_path / "caption.zarr").exists()


def test_corrupt_image_is_an_error_naming_the_image(tmp_path, tiny_adapter, annotations, benchmark_dir):
    items = discovery_items(annotations, "ocr", 3)
    table = pq.read_table(benchmark_dir / "images.parquet").to_pylist()
    bad = items.at[2, "image_id"]
    for row in table:
        if row["image_id"] == bad:
            row["png"] = row["png"][:40]  # a truncated PNG
    path = tmp_path / "images.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=IMAGE_SCHEMA), path)
    with pytest.raises(PipelineError, match=f"image '{bad}'.*cannot be decoded"):
        run_dump(tiny_adapter, items, ImageTable(path), tmp_path / "ocr.zarr")
    # A missing image is named too.
    items.at[0, "image_id"] = "no-such-image"
    with pytest.raises(PipelineError, match="image 'no-such-image' is not in"):
        run_dump(tiny_adapter, items, ImageTable(path), tmp_path / "ocr.zarr", params_hash="q")


def test_no_items_is_an_error(tmp_path, tiny_adapter, annotations, images):
    with pytest.raises(PipelineError, match="no items"):
        run_dump(tiny_adapter, discovery_items(annotations, "vqa", 0), images, tmp_path / "vqa.zarr")
