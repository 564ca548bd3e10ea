"""The activation store: layout planning, write/finalize/read round trip, resumption, errors."""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import zarr
from conftest import item_arrays_like

from pipeline.method.store import (
    DONE_DIR,
    ActivationStore,
    StoreError,
    StoreLayout,
    create_checked_array,
    read_importance,
    scratch_path,
    verify,
    write_importance,
)

C, N, L, I = 3, 11, 2, 8
CONDITIONS = [(-1, -1, float("nan")), (0, 1, 0.5), (1, 3, -0.25)]
ITEM_IDS = [f"item-{k}" for k in range(N)]
TARGET_IDS = [[5 + k % 3] * (1 + k % 3) for k in range(N)]  # ragged: 1-3 tokens
TARGET_WEIGHTS = [[1.0 + 0.5 * j for j in range(len(t))] for t in TARGET_IDS]
ATTRS = {"model": "tiny", "code_version": "test", "task": "vqa"}


def small_layout(chunk_items: int = 3, **kw) -> StoreLayout:
    item_bytes = L * I * 4
    return StoreLayout.plan(C, N, L, I, "float32", target_chunk_bytes=chunk_items * item_bytes, **kw)


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((C, N, L, I)).astype(np.float32)
    dvp = rng.standard_normal((N, L, I)).astype(np.float32)
    return z, dvp


def create(path, layout, params_hash="h1", **kw) -> ActivationStore:
    args = dict(
        conditions=CONDITIONS,
        item_ids=ITEM_IDS,
        target_ids=TARGET_IDS,
        target_weights=TARGET_WEIGHTS,
        attrs=ATTRS,
        params_hash=params_hash,
    )
    args.update(kw)
    return ActivationStore.create_or_resume(path, layout, **args)


def write(store: ActivationStore, z, dvp, blocks=None) -> None:
    for k in store.pending_blocks() if blocks is None else blocks:
        sl = store.layout.block(k)
        store.write_block(k, z[:, sl], item_arrays_like(dvp[sl]))


# ------------------------------------------------------------------------------ layout
def test_plan_chunks_are_about_target_bytes():
    lay = StoreLayout.plan(5, 1000, 4, 512, "float32", target_chunk_bytes=1 << 20)
    item_bytes = 4 * 512 * 4
    assert lay.chunk_items == 128 and abs(lay.chunk_items * item_bytes - (1 << 20)) <= item_bytes / 2
    assert not lay.sharded and lay.block_items == lay.chunk_items and lay.n_blocks == math.ceil(1000 / 128)
    # float16 halves the bytes per item, so twice the items fit a chunk.
    assert StoreLayout.plan(5, 1000, 4, 512, "float16").chunk_items == 256
    # Odd sizes round to the nearest item count; never 0 items, never more than there are.
    lay = StoreLayout.plan(1, 50, 3, 100, "float32", target_chunk_bytes=10_000)
    assert lay.chunk_items == round(10_000 / 1200) == 8
    assert StoreLayout.plan(1, 50, 3, 100, "float32", target_chunk_bytes=1).chunk_items == 1
    assert StoreLayout.plan(1, 5, 3, 100, "float32", target_chunk_bytes=1 << 30).chunk_items == 5
    # z (1 condition) + dvp, dvp_logprob, atp, gate_sum, gate_positive (4 bytes each) + prompt_tokens.
    assert lay.nbytes() == 50 * 300 * (4 + 5 * 4) + 50 * 4


def test_plan_shards_when_files_would_exceed_max_files():
    lay = StoreLayout.plan(5, 1000, 4, 512, "float32", target_chunk_bytes=1 << 20, max_files=10)
    # 5 conditions x 8 chunks = 40 files > 10: shards of whole chunks, at most 10 files.
    assert lay.sharded and lay.chunk_items == 128
    assert lay.block_items % lay.chunk_items == 0
    assert 5 * lay.n_blocks <= 10
    assert [lay.block(k) for k in range(lay.n_blocks)][-1].stop == 1000
    # Exhaustively: z never needs more files than allowed (when a shard per condition fits at all),
    # and shards always hold whole chunks.
    for c in range(1, 6):
        for n in range(1, 25):
            for m in range(c, 30):
                lay = StoreLayout.plan(c, n, 1, 1, "float32", target_chunk_bytes=4, max_files=m)
                assert c * lay.n_blocks <= m, (c, n, m, lay)
                assert lay.block_items % lay.chunk_items == 0, (c, n, m, lay)
                assert sum(lay.block(k).stop - lay.block(k).start for k in range(lay.n_blocks)) == n


def test_plan_rejects_bad_arguments():
    with pytest.raises(StoreError, match="float16"):
        StoreLayout.plan(1, 1, 1, 1, "bfloat16")
    with pytest.raises(StoreError, match="items=0"):
        StoreLayout.plan(1, 0, 1, 1)
    with pytest.raises(StoreError, match="out of range"):
        small_layout().block(99)


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("sharded", [False, True])
def test_write_finalize_open_round_trip(tmp_path, sharded):
    lay = small_layout(3, max_files=4) if sharded else small_layout(3)
    assert lay.sharded == sharded
    z, dvp = data()
    path = tmp_path / "vqa.zarr"
    store = create(path, lay)
    assert store.root == scratch_path(path, "h1") and not (path / "zarr.json").exists()
    assert store.pending_blocks() == list(range(lay.n_blocks))
    write(store, z, dvp)
    assert store.pending_blocks() == []
    final = store.finalize()
    assert path.is_dir() and not scratch_path(path, "h1").exists()

    opened = ActivationStore.open(path)
    assert opened.layout == lay == final.layout
    blocks = list(opened.iter_blocks())
    assert [b.items for b in blocks] == [lay.block(k) for k in range(lay.n_blocks)]
    np.testing.assert_array_equal(np.concatenate([b.z for b in blocks], axis=1), z)  # bitwise
    np.testing.assert_array_equal(np.concatenate([b.dvp for b in blocks]), dvp)
    for step in (1, 4, 100):
        got = list(opened.iter_blocks(items_per_block=step))
        assert len(got) == math.ceil(N / step)
        np.testing.assert_array_equal(np.concatenate([b.z for b in got], axis=1), z)

    g = opened.group
    assert tuple(g["z"].metadata.dimension_names) == ("condition", "item", "layer", "neuron")
    assert tuple(g["dvp"].metadata.dimension_names) == ("item", "layer", "neuron")
    assert tuple(g["target_ids"].metadata.dimension_names) == ("item", "target_token")
    assert tuple(g["condition_head"].metadata.dimension_names) == ("condition",)
    assert g["z"].dtype == np.float32 and g["dvp"].dtype == np.float32
    if sharded:
        assert g["z"].shards == (1, lay.block_items, L, I) and g["z"].chunks == (1, lay.chunk_items, L, I)

    attrs = opened.attrs
    for key, value in ATTRS.items():
        assert attrs[key] == value
    assert attrs["params_hash"] == "h1" and attrs["complete"] is True and attrs["format_version"] == 2
    assert attrs["dimensions"]["z"] == ["condition", "item", "layer", "neuron"]

    assert opened.item_ids == ITEM_IDS
    cond = opened.conditions()
    assert [c[:2] for c in cond] == [c[:2] for c in CONDITIONS] and math.isnan(cond[0][2])
    assert [c[2] for c in cond[1:]] == [0.5, -0.25]
    tid, tw = opened.targets()
    for k in range(N):
        n = len(TARGET_IDS[k])
        assert tid[k, :n].tolist() == TARGET_IDS[k] and (tid[k, n:] == -1).all()
        assert tw[k, :n].tolist() == TARGET_WEIGHTS[k] and (tw[k, n:] == 0).all()
    assert not (path / DONE_DIR).exists()


def test_float16_store_reads_back_as_float32(tmp_path):
    lay = StoreLayout.plan(C, N, L, I, "float16", target_chunk_bytes=4 * L * I * 2)
    z, dvp = data()
    store = create(tmp_path / "s.zarr", lay)
    write(store, z, dvp)
    opened = store.finalize()
    block = next(opened.iter_blocks(items_per_block=N))
    assert block.z.dtype == np.float32
    np.testing.assert_array_equal(block.z, z.astype(np.float16).astype(np.float32))
    # The per-item float arrays follow the store's dtype; the counts stay integers.
    assert opened.group["dvp"].dtype == np.float16 and opened.group["gate_positive"].dtype == np.int32
    assert block.dvp.dtype == np.float32 and block.arrays.gate_positive.dtype == np.int32
    np.testing.assert_array_equal(block.dvp, dvp.astype(np.float16).astype(np.float32))
    assert lay.nbytes() == N * L * I * (C * 2 + 4 * 2 + 4) + N * 4


def test_float16_overflow_is_refused_naming_the_array(tmp_path):
    lay = StoreLayout.plan(C, N, L, I, "float16")
    z, dvp = data()
    dvp[0, 0, 0] = 1e6
    store = create(tmp_path / "s.zarr", lay)
    with pytest.raises(
        StoreError, match=r"block 0: dvp: values up to 1e\+06 overflow float16; set dump.store_dtype: float32"
    ):
        write(store, z, dvp)


# ------------------------------------------------------------------------------ open errors
def test_open_refuses_missing_path(tmp_path):
    with pytest.raises(StoreError, match="run the dump stage") as exc:
        ActivationStore.open(tmp_path / "nothing.zarr")
    assert "nothing.zarr" in str(exc.value)


def test_open_refuses_unfinished_store(tmp_path):
    lay = small_layout()
    z, dvp = data()
    path = tmp_path / "vqa.zarr"
    store = create(path, lay)
    write(store, z, dvp, blocks=[0])
    with pytest.raises(StoreError, match="unfinished build") as exc:
        ActivationStore.open(path)
    assert str(scratch_path(path, "h1")) in str(exc.value) and "re-run the dump stage" in str(exc.value)
    with pytest.raises(StoreError, match="not written yet"):
        store.finalize()
    # A store whose complete flag is off at the final path (e.g. copied by hand) is refused too.
    write(store, z, dvp)
    store.finalize()
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match="not complete; re-run the dump stage"):
        ActivationStore.open(path)


def test_open_refuses_other_format(tmp_path):
    store = create(tmp_path / "s.zarr", small_layout())
    write(store, *data())
    store.finalize()
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format 99"):
        ActivationStore.open(tmp_path / "s.zarr")


# ------------------------------------------------------------------------------ resumption
def test_resume_skips_done_blocks_and_rewrites_unmarked_ones(tmp_path):
    lay = small_layout(2)
    assert lay.n_blocks >= 4
    z, dvp = data()
    path = tmp_path / "vqa.zarr"
    store = create(path, lay)
    write(store, z, dvp, blocks=[0, 2])
    # Block 3 written but "killed" before its marker: it must be pending again.
    sl = lay.block(3)
    store.write_block(3, z[:, sl], item_arrays_like(dvp[sl]))
    (store.root / DONE_DIR / "000003.done").unlink()

    resumed = create(path, lay)
    assert resumed.root == store.root
    assert resumed.done_blocks() == {0, 2}
    assert resumed.pending_blocks() == [k for k in range(lay.n_blocks) if k not in (0, 2)]
    # Round-robin dealing across ranks covers the pending blocks exactly once.
    dealt = sorted(resumed.pending_blocks(0, 2) + resumed.pending_blocks(1, 2))
    assert dealt == resumed.pending_blocks()
    write(resumed, z, dvp)
    got = resumed.finalize()
    np.testing.assert_array_equal(next(got.iter_blocks(items_per_block=N)).z, z)


def test_resume_cleans_partial_leftovers(tmp_path):
    lay = small_layout()
    z, dvp = data()
    path = tmp_path / "vqa.zarr"
    store = create(path, lay)
    write(store, z, dvp, blocks=[0])
    leftovers = [store.root / "z" / "c" / "0" / "1" / "0" / "0.0123abcd.partial", store.root / "dvp" / "x.partial"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"torn write")
    resumed = create(path, lay)
    assert not any(p.exists() for p in leftovers)
    assert resumed.done_blocks() == {0}
    write(resumed, z, dvp)
    resumed.finalize()
    assert not list(path.rglob("*.partial"))


def test_scratch_of_other_params_is_removed(tmp_path):
    lay = small_layout()
    z, dvp = data()
    path = tmp_path / "vqa.zarr"
    old = create(path, lay, params_hash="old")
    write(old, z, dvp, blocks=[0, 1])
    new = create(path, lay, params_hash="new")
    assert not scratch_path(path, "old").exists()
    assert new.root == scratch_path(path, "new") and new.done_blocks() == set()
    # A scratch with the same params hash but another layout starts afresh too.
    write(new, z, dvp, blocks=[0])
    other = create(path, small_layout(5), params_hash="new")
    assert other.layout.chunk_items == 5 and other.done_blocks() == set()
    # Siblings of other stores are left alone.
    sibling = create(tmp_path / "ocr.zarr", lay, params_hash="x")
    create(path, lay, params_hash="again")
    assert sibling.root.exists()


def test_finalize_replaces_an_older_final_store(tmp_path):
    path = tmp_path / "vqa.zarr"
    z1, d1 = data(1)
    s = create(path, small_layout(), params_hash="a")
    write(s, z1, d1)
    s.finalize()
    z2, d2 = data(2)
    s = create(path, small_layout(), params_hash="b")
    write(s, z2, d2)
    got = s.finalize()
    assert got.attrs["params_hash"] == "b"
    np.testing.assert_array_equal(next(got.iter_blocks(items_per_block=N)).z, z2)


# ------------------------------------------------------------------------------ errors
def test_empty_target_is_an_error_naming_the_item(tmp_path):
    ids = [list(t) for t in TARGET_IDS]
    ws = [list(w) for w in TARGET_WEIGHTS]
    ids[4], ws[4] = [], []
    with pytest.raises(StoreError, match="'item-4' has an empty target"):
        create(tmp_path / "s.zarr", small_layout(), target_ids=ids, target_weights=ws)
    ws[4] = [1.0]
    ids[4] = [1, 2]
    with pytest.raises(StoreError, match="'item-4': 2 target ids but 1 weights"):
        create(tmp_path / "s.zarr", small_layout(), target_ids=ids, target_weights=ws)
    with pytest.raises(StoreError, match="3 conditions but 2 were described"):
        create(tmp_path / "s.zarr", small_layout(), conditions=CONDITIONS[:2])
    with pytest.raises(StoreError, match="10 ids"):
        create(tmp_path / "s.zarr", small_layout(), item_ids=ITEM_IDS[:10])


def test_write_block_with_wrong_shapes(tmp_path):
    lay = small_layout(3)
    store = create(tmp_path / "s.zarr", lay)
    z, dvp = data()
    sl = lay.block(0)
    with pytest.raises(StoreError, match="block 0"):
        store.write_block(0, z[:, : sl.stop + 1], item_arrays_like(dvp[sl]))  # one item too many
    with pytest.raises(StoreError, match="block 0"):
        store.write_block(0, z[:2, sl], item_arrays_like(dvp[sl]))  # a condition missing
    with pytest.raises(StoreError, match="block 0: dvp"):
        store.write_block(0, z[:, sl], item_arrays_like(dvp[sl][..., :-1]))  # dvp of the wrong width
    short = item_arrays_like(dvp[sl])
    with pytest.raises(StoreError, match="block 0: prompt_tokens"):
        store.write_block(0, z[:, sl], dataclasses.replace(short, prompt_tokens=short.prompt_tokens[:-1]))
    last = lay.n_blocks - 1
    sl = lay.block(last)
    with pytest.raises(StoreError, match=f"block {last}"):
        # The last block is short (11 items, blocks of 3): a full-size block does not fit it.
        store.write_block(
            last, np.zeros((C, lay.block_items, L, I)), item_arrays_like(np.zeros((lay.block_items, L, I)))
        )
    assert store.done_blocks() == set()


def test_importance_round_trip_with_and_without_the_matched_items_array(tmp_path):
    from pipeline.method.store import read_importance, read_importance_on_ablation_items, write_importance

    rng = np.random.default_rng(0)
    imp = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    matched = rng.normal(size=imp.shape).astype(np.float32)
    write_importance(
        tmp_path / "a.zarr",
        ["hones", "atp", "ablation"],
        ["vqa", "ocr"],
        imp,
        {"model": "m"},
        on_ablation_items=matched,
    )
    methods, tasks, got, attrs = read_importance(tmp_path / "a.zarr")
    assert methods == ["hones", "atp", "ablation"] and tasks == ["vqa", "ocr"] and attrs["model"] == "m"
    np.testing.assert_array_equal(got, imp)
    np.testing.assert_array_equal(read_importance_on_ablation_items(tmp_path / "a.zarr"), matched)
    write_importance(tmp_path / "b.zarr", ["hones", "atp", "ablation"], ["vqa", "ocr"], imp, {})
    assert read_importance_on_ablation_items(tmp_path / "b.zarr") is None
    with pytest.raises(StoreError, match="ablation items"):
        write_importance(
            tmp_path / "c.zarr", ["hones", "atp", "ablation"], ["vqa", "ocr"], imp, {}, on_ablation_items=matched[:, :1]
        )
    assert not (tmp_path / "c.zarr").exists()


# ------------------------------------------------------------------------------ checksums and verify
def _finished(tmp_path, sharded=False):
    lay = small_layout(3, max_files=4) if sharded else small_layout(3)
    z, dvp = data()
    store = create(tmp_path / "vqa.zarr", lay, attrs={**ATTRS, "params_hash": "h1"})
    write(store, z, dvp)
    return store.finalize(), z


@pytest.mark.parametrize("sharded", [False, True])
def test_every_chunk_is_checksummed_and_verify_reads_them_all(tmp_path, sharded):
    store, z = _finished(tmp_path, sharded)
    for name in ("z", "dvp", "item_id", "target_ids"):
        codecs = store.group[name].metadata.to_dict()["codecs"]
        flat = codecs if not sharded or name not in ("z", "dvp") else codecs[0]["configuration"]["codecs"]
        assert flat[-1] == {"name": "crc32c"}, (name, codecs)
    check = verify(store.root)
    assert check.ok and check.kind == "activation store", check.line()
    n_files = sum(1 for p in store.root.rglob("c/**/*") if p.is_file())
    assert check.chunks == n_files and check.nbytes >= z.nbytes
    assert check.line().startswith(f"OK         {store.root}: activation store, 13 arrays, {n_files} chunks")


@pytest.mark.parametrize("sharded", [False, True])
def test_flipped_byte_is_caught_on_read_and_by_verify(tmp_path, sharded):
    store, _ = _finished(tmp_path, sharded)
    chunks = sorted(p for p in (store.root / "dvp").rglob("c/**/*") if p.is_file())
    chunk = chunks[-1]  # the last chunk (shard, when sharded) file
    key = chunk.relative_to(store.root / "dvp").as_posix()
    raw = bytearray(chunk.read_bytes())
    raw[8] ^= 0x01  # one bit
    chunk.write_bytes(bytes(raw))
    reopened = ActivationStore.open(store.root)  # the files are all there: opening is cheap and passes
    with pytest.raises(
        StoreError,
        match=rf"array 'dvp' chunk {key} \(item \d+-\d+, layer 0-{L - 1}, neuron "
        rf"0-{I - 1}\) is damaged .*restore it with `dvc checkout",
    ):
        list(reopened.iter_blocks())
    check = verify(store.root)
    assert check.status == "damaged" and f"array 'dvp' chunk {key}" in check.line()


def test_missing_chunk_and_array_are_named_at_open(tmp_path):
    store, _ = _finished(tmp_path)
    (store.root / "atp" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(
        StoreError, match=rf"array 'atp' chunk c/2/0/0 \(item 6-8, layer 0-{L - 1}, neuron 0-{I - 1}\) is missing"
    ):
        ActivationStore.open(store.root)
    assert verify(store.root).status == "damaged"
    shutil.rmtree(store.root / "atp")
    with pytest.raises(StoreError, match="has no array 'atp'"):
        ActivationStore.open(store.root)


def test_verify_reports_unfinished_builds_and_missing_provenance(tmp_path):
    lay = small_layout(3)
    z, dvp = data()
    store = create(tmp_path / "vqa.zarr", lay, attrs={"model": "tiny"})  # no code_version
    write(store, z, dvp, blocks=[0, 1])
    check = verify(tmp_path / "vqa.zarr")
    assert check.status == "incomplete" and f"2 of {lay.n_blocks} blocks done" in check.line()
    write(store, z, dvp)
    final = store.finalize()
    check = verify(final.root)
    assert check.status == "damaged" and "provenance attributes ['code_version'] are missing" in check.line()
    assert verify(tmp_path / "nothing.zarr").status == "missing"


@pytest.mark.slow
def test_verify_command_prints_one_line_per_store_and_fails_on_damage(tmp_path, capsys):
    from pipeline.tools.verify import main

    _finished(tmp_path / "a")
    _finished(tmp_path / "b")
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["OK", "OK"] and lines[-1] == "2 of 2 stores verified"
    chunk = tmp_path / "b" / "vqa.zarr" / "z" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        "DAMAGED" in out and "array 'z' chunk c/0/0/0/0" in out and out.endswith("1 of 2 stores verified; 1 failed\n")
    )


def test_verify_flags_a_store_written_without_checksums(tmp_path):
    import zarr

    store, _ = _finished(tmp_path)
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    create_checked_array(g, "x", shape=(4,), chunks=(2,), dtype="float32", dims=("item",), checksum=False)[...] = 1
    g.attrs.update({"code_version": "c", "params_hash": "p"})
    check = verify(tmp_path / "old.zarr")
    assert check.status == "unchecked" and "none of its 1 arrays carries a checksum" in check.line()
    assert verify(store.root).ok


def test_importance_array_is_checksummed(tmp_path):
    path = tmp_path / "attr.zarr"
    imp = np.random.default_rng(0).standard_normal((2, 2, L, I)).astype(np.float32)
    write_importance(path, ["a", "b"], ["vqa", "ocr"], imp, {"code_version": "c", "params_hash": "p"})
    assert verify(path).ok
    chunk = path / "importance" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0x80
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"attribution array .*: array 'importance' chunk c/1/0/0/0 .* is damaged"):
        read_importance(path)
