"""GPU-ready batching: an out-of-memory error halves the batch and retries the same rows, and
the results equal a run at the smaller batch from the start; the dump checks the disk first.

Out-of-memory errors are simulated: the model's forward raises ``torch.OutOfMemoryError`` (what
CUDA raises) for batches above a size, from a chosen call on.
"""

from __future__ import annotations

import logging
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from conftest import discovery_items
from test_dump import ONE_ITEM_PER_BLOCK, read_arrays, run_dump

from pipeline.method.store import StoreError
from pipeline.model import batching
from pipeline.model.batching import BatchTooLarge, for_each_batch, largest_fitting_batch, reset_batch_limit
from pipeline.model.evaluation import evaluate_task


@pytest.fixture(autouse=True)
def _fresh_limit():
    reset_batch_limit()
    yield
    reset_batch_limit()


def test_halves_and_retries_the_same_rows():
    seen: list[tuple[int, int]] = []

    def run(sl: slice) -> None:
        if sl.stop - sl.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append((sl.start, sl.stop))

    for_each_batch(10, 8, run, what="test rows", progress=False)
    assert seen == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert largest_fitting_batch(8) == 2 and largest_fitting_batch(1) == 1
    seen.clear()
    for_each_batch(5, 8, run, what="next call", progress=False)
    assert seen == [(0, 2), (2, 4), (4, 5)], "the next call started at the old size again"


def test_out_of_memory_at_one_row_is_one_clear_error():
    def run(sl: slice) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(BatchTooLarge, match="capture z: out of memory at 1 sequence per batch; use a smaller dtype"):
        for_each_batch(3, 4, run, what="capture z", progress=False)


def test_other_errors_pass_through_untouched():
    def run(sl: slice) -> None:
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        for_each_batch(3, 4, run, what="x", progress=False)
    assert largest_fitting_batch(4) == 4


class FakeOOM:
    """A forward pre-hook on ``adapter.model``: batches above ``fits`` rows raise
    OutOfMemoryError once ``after_calls`` forward passes have gone through (removed at teardown)."""

    def __init__(self, request, adapter, fits: int, after_calls: int) -> None:
        self.fits, self.after, self.calls, self.sizes = fits, after_calls, 0, []
        handle = adapter.model.register_forward_pre_hook(self, with_kwargs=True)
        request.addfinalizer(handle.remove)

    def __call__(self, module, args, kwargs):
        rows = int(kwargs["input_ids"].shape[0])
        if self.calls >= self.after and rows > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.calls += 1
        self.sizes.append(rows)


def test_dump_after_out_of_memory_equals_a_run_at_the_smaller_batch(
    tmp_path, tiny_adapter, annotations, images, request, caplog
):
    items = discovery_items(annotations, "vqa", 4)
    reference = run_dump(
        tiny_adapter, items, images, tmp_path / "ref.zarr", batch_size=2, target_chunk_bytes=ONE_ITEM_PER_BLOCK
    )
    # Blocks of one item x 4 conditions: block 0 runs at 4 rows, then 4 no longer fits.
    fake = FakeOOM(request, tiny_adapter, fits=2, after_calls=1)
    with caplog.at_level(logging.WARNING, logger=batching.__name__):
        got = run_dump(
            tiny_adapter, items, images, tmp_path / "oom.zarr", batch_size=4, target_chunk_bytes=ONE_ITEM_PER_BLOCK
        )
    # Per block: z under 4 conditions (4 rows, then 2 + 2), then the gradient pass of its one item.
    assert fake.sizes == [4, 1] + [2, 2, 1] * 3, fake.sizes
    assert "capture z: out of memory at 4 sequences per batch; retrying rows 0.. at 2" in caplog.text
    want, have = read_arrays(reference.root), read_arrays(got.root)
    assert want.keys() == have.keys()
    for name in want:
        # Block 0's z ran at 4 rows, the reference's at 2: on some CPUs (an AVX-512 Xeon with AMX,
        # kernels pinned to AVX2) a matmul's last bits depend on the rows in its batch, so equal
        # to float32 rounding, not bitwise; every other block ran at 2 rows, as the reference did.
        if np.issubdtype(want[name].dtype, np.floating):
            np.testing.assert_allclose(have[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(have[name], want[name], err_msg=name)
    # z is [condition, item, layer, neuron]: the items after block 0's are bitwise the reference's.
    np.testing.assert_array_equal(have["z"][:, 1:], want["z"][:, 1:])


# Forward passes of the first batch that go through before the simulated OOM: one (a prefill,
# a teacher-forced pass), or two for retrieval (the candidates' shared prefix, then their suffixes).
@pytest.mark.parametrize(
    "task,utility,first_calls",
    [("vqa", "generative", 1), ("ocr", "teacher_forced", 1), ("retrieval", "generative", 2)],
)
def test_evaluation_after_out_of_memory_equals_a_run_at_the_smaller_batch(
    tiny_adapter, annotations, images, request, task, utility, first_calls
):
    items = discovery_items(annotations, task, 8)
    assert len(items) > 4
    kw = dict(max_new_tokens=3, utility=utility, progress=False)
    reference = evaluate_task(tiny_adapter, task, items, images, batch_size=2, **kw)[0]
    fake = FakeOOM(request, tiny_adapter, fits=2, after_calls=first_calls)
    got = evaluate_task(tiny_adapter, task, items, images, batch_size=4, **kw)[0]
    assert max(fake.sizes[first_calls:]) <= 2 < max(fake.sizes[:first_calls])
    np.testing.assert_array_equal(got.per_item, reference.per_item)
    assert got.predictions == reference.predictions and got.utility == reference.utility


def test_dump_stops_before_writing_when_the_disk_is_too_small(
    tmp_path, tiny_adapter, annotations, images, monkeypatch, caplog
):
    items = discovery_items(annotations, "vqa", 2)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StoreError, match=r"store .*full.zarr: needs [0-9.]+ KiB but only 1000 B are free on "):
        run_dump(tiny_adapter, items, images, tmp_path / "full.zarr")
    assert list(tmp_path.iterdir()) == [], "the dump wrote something before checking the disk"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 10**12))
    with caplog.at_level(logging.INFO):
        run_dump(tiny_adapter, items, images, tmp_path / "ok.zarr")
    assert "KiB to write" in caplog.text and "931.32 GiB free on" in caplog.text
