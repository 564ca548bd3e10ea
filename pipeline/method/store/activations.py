"""The activation store: one Zarr v3 group per (model, task).

Layout of ``<task>.zarr`` (dimension names are stored in each array's ``dimension_names``):

========================  ==========================================  =========  ===============
array                     shape                                        dtype      chunks
========================  ==========================================  =========  ===============
``z``                     [condition, item, layer, neuron]             float16/32 [1, B, L, I]
``dvp``                   [item, layer, neuron]                        float16/32   [B, L, I]
``dvp_logprob``           [item, layer, neuron]                        float16/32   [B, L, I]
``atp``                   [item, layer, neuron]                        float16/32   [B, L, I]
``gate_sum``              [item, layer, neuron]                        float16/32   [B, L, I]
``gate_positive``         [item, layer, neuron]                        int32      [B, L, I]
``prompt_tokens``         [item]                                       int32      [B]
``item_id``               [item]                                       str        all
``target_ids``            [item, target_token]  (-1 = padding)         int32      all
``target_weights``        [item, target_token]  (0 = padding)          float32    all
``condition_layer``       [condition]  (-1 for the base condition)     int32      all
``condition_head``        [condition]  (-1 for the base condition)     int32      all
``condition_head_score``  [condition]  (S_t of the head; NaN for base)  float64    all
========================  ==========================================  =========  ===============

- ``z[c, n, l, i]`` is the FFN activation (input of down_proj) of neuron i in layer l at the last
  prompt token of item n, under condition c: c = 0 is the unmodified model, c >= 1 has the
  c-th critical head mean-substituted.
- ``dvp[n, l, i] = < W_down[l][:, i], u_y(n) >``: the direct vocabulary projection of the
  neuron's write direction onto the item's normalised target direction, so that the
  contribution ``c = z * dvp`` needs no model (docs/method.md section 3).
- ``dvp_logprob[n, l, i] = < W_down[l][:, i], g(n) >`` with g the gradient of the item's
  weighted mean target log-probability at the last prompt token with respect to the residual
  stream entering the final norm: the direct path's linearised change of the log-probability
  (nats per unit of activation; ``hones_lp``).
- ``atp[n, l, i]``: gradient x activation of the item's teacher-forced answer log-probability
  (the ground truth's utility), summed over every position: the first-order estimate of
  zeroing the neuron everywhere (nats).
- ``gate_sum`` / ``gate_positive`` / ``prompt_tokens``: over the item's prompt tokens (image and
  text), the sum of act(gate) (act(fc1) for plain MLPs), the number of tokens where it is > 0,
  and the number of tokens: what the published MA / AP / LAPE baselines need, per item.
- The item axis is chunked in blocks of B items so that one chunk of ``z`` is about
  ``target_chunk_bytes`` (1 MiB by default: fastest on our machines, see README). When that
  would make more than ``max_files`` chunk files, chunks are grouped into shards along the
  item axis. The *write block* (a chunk, or a shard when sharded) is the unit of writing and
  of resumption: a writer always writes whole blocks, and each block is marked done by an
  empty marker file only after its data are written.

The store is built under ``<path>/.partial-<params hash>/`` and moved to ``<path>`` by
``finalize`` once every block is marked done, so a half-written store is never read as done (a
Zarr reader finds no ``zarr.json`` at ``<path>``), and a scratch directory made under different
params is never resumed. Group attributes carry provenance (model, params hash, code version)
and the layout.

- ``ItemArrays`` / ``ItemBlock``: the per-item arrays of a block, and a block read back.
- ``StoreIndex``: the item and condition arrays of a new store (checked, padded, written).
- ``ActivationStore``: ``create_or_resume`` / ``open_scratch`` / ``write_block`` / ``finalize``
  (writing, resumable; a new scratch store is made by ``_create``) and ``open`` /
  ``iter_blocks`` / ``conditions`` / ``head_scores`` / ``targets`` (reading).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.io import PARTIAL_PREFIX, atomic_directory, publish_scratch, resumable_scratch
from pipeline.method.store.io import StoreError, create_checked_array, open_finished_group, read_checked
from pipeline.method.store.layout import (
    DONE_DIR,
    FORMAT_VERSION,
    ITEM_ARRAYS,
    Z_DIMS,
    StoreLayout,
    item_array_dtype,
    scratch_path,
)

log = logging.getLogger(__name__)

STORE_KIND = "activation store"


def _as_float32(values: np.ndarray) -> np.ndarray:
    """Float arrays as float32 (what the attribution computes in); integer arrays unchanged."""
    return values.astype(np.float32, copy=False) if values.dtype.kind == "f" else values


def _to_stored(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """``values`` cast to the stored ``dtype``; StoreError naming ``what`` where a finite value
    would overflow float16 (it would be stored as inf and poison every sum after it)."""
    with np.errstate(over="ignore"):
        out = np.asarray(values).astype(dtype, copy=False)
    if dtype == "float16" and np.isinf(out).any() and not np.isinf(np.asarray(values)).any():
        raise StoreError(
            f"{what}: values up to {float(np.nanmax(np.abs(values))):.4g} overflow float16; "
            "set dump.store_dtype: float32"
        )
    return out


@dataclass(frozen=True)
class ItemArrays:
    """The per-item arrays of a block of n items (``ITEM_ARRAYS``): ``dvp``, ``dvp_logprob``,
    ``atp``, ``gate_sum`` (float32) and ``gate_positive`` (counts) [n, layer, neuron];
    ``prompt_tokens`` [n]."""

    dvp: np.ndarray
    dvp_logprob: np.ndarray
    atp: np.ndarray
    gate_sum: np.ndarray
    gate_positive: np.ndarray
    prompt_tokens: np.ndarray

    def take(self, index: np.ndarray | slice) -> "ItemArrays":
        """The items ``index`` (positions or a slice) of every array."""
        return ItemArrays(**{name: np.asarray(getattr(self, name))[index] for name in ITEM_ARRAYS})

    def check(self, n: int, n_layers: int, n_neurons: int, what: str) -> None:
        """StoreError naming ``what`` unless every array has n items and its declared shape."""
        for name, (dims, _, _) in ITEM_ARRAYS.items():
            want = (n, n_layers, n_neurons) if dims else (n,)
            got = np.shape(getattr(self, name))
            if got != want:
                raise StoreError(f"{what}: {name} has shape {got}, expected {want}")


@dataclass(frozen=True)
class ItemBlock:
    """One block of items read back: ``z`` [condition, item, layer, neuron] (float32), the
    per-item ``arrays`` (``ItemArrays``), and the item slice they cover."""

    items: slice
    z: np.ndarray
    arrays: ItemArrays

    @property
    def dvp(self) -> np.ndarray:
        return self.arrays.dvp


@dataclass(frozen=True)
class StoreIndex:
    """The small arrays of a store, as given to ``create_or_resume``.

    ``conditions``: (layer, head, head score) per condition, the base condition first as
    (-1, -1, nan). ``item_ids``, ``target_ids``, ``target_weights``: per item, its id and its
    target token ids and their weights (ragged lists of equal lengths per item).
    """

    ARRAYS = ("item_id", "target_ids", "target_weights", "condition_layer", "condition_head", "condition_head_score")

    conditions: list[tuple[int, int, float]]
    item_ids: list[str]
    target_ids: list[list[int]]
    target_weights: list[list[float]]

    def check(self, layout: StoreLayout) -> None:
        """``StoreError`` unless the counts match ``layout`` and every item has a non-empty
        target with one weight per token."""
        n, C = layout.n_items, layout.n_conditions
        if len(self.item_ids) != n or len(self.target_ids) != n or len(self.target_weights) != n:
            raise StoreError(
                f"layout has {n} items but got {len(self.item_ids)} ids, {len(self.target_ids)} target lists, "
                f"{len(self.target_weights)} weight lists"
            )
        if len(self.conditions) != C:
            raise StoreError(f"layout has {C} conditions but {len(self.conditions)} were described")
        for iid, ids, w in zip(self.item_ids, self.target_ids, self.target_weights):
            if len(ids) == 0:
                raise StoreError(f"item {iid!r} has an empty target: no token to project onto")
            if len(ids) != len(w):
                raise StoreError(f"item {iid!r}: {len(ids)} target ids but {len(w)} weights")

    def padded_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """(target_ids [item, T] int32 padded with -1, target_weights [item, T] float32 padded
        with 0), T the longest target."""
        n, T = len(self.target_ids), max(len(t) for t in self.target_ids)
        tid = np.full((n, T), -1, dtype=np.int32)
        tw = np.zeros((n, T), dtype=np.float32)
        for k, (ids, w) in enumerate(zip(self.target_ids, self.target_weights)):
            tid[k, : len(ids)] = ids
            tw[k, : len(w)] = w
        return tid, tw

    def write(self, group: zarr.Group) -> None:
        """Create and fill the item and condition arrays (see the module docstring's table) in ``group``."""
        tid, tw = self.padded_targets()
        conditions = self.conditions
        small = {
            "item_id": (np.array(self.item_ids, dtype=object), ("item",), str),
            "target_ids": (tid, ("item", "target_token"), "int32"),
            "target_weights": (tw, ("item", "target_token"), "float32"),
            "condition_layer": (np.array([c[0] for c in conditions], dtype=np.int32), ("condition",), "int32"),
            "condition_head": (np.array([c[1] for c in conditions], dtype=np.int32), ("condition",), "int32"),
            "condition_head_score": (np.array([c[2] for c in conditions], dtype=np.float64), ("condition",), "float64"),
        }
        for name, (data, dims, dtype) in small.items():
            arr = create_checked_array(
                group, name, shape=data.shape, chunks=data.shape, dtype=dtype, dims=dims, fill_value=None
            )
            arr[...] = data


def _create_activation_arrays(group: zarr.Group, layout: StoreLayout) -> None:
    """Create the empty (fill 0, checksummed) ``z`` [condition, item, layer, neuron] and the
    per-item arrays (``ITEM_ARRAYS``), chunked (and sharded) along items as ``layout`` plans."""
    C, n, L, I = layout.n_conditions, layout.n_items, layout.n_layers, layout.n_neurons
    create_checked_array(
        group,
        "z",
        shape=(C, n, L, I),
        chunks=(1, layout.chunk_items, L, I),
        shards=(1, layout.block_items, L, I) if layout.sharded else None,
        dtype=layout.dtype,
        dims=Z_DIMS,
        attributes={"units": "FFN activation (input of down_proj) at the last prompt token"},
    )
    for name, (dims, _, units) in ITEM_ARRAYS.items():
        tail = (L, I) if dims else ()
        create_checked_array(
            group,
            name,
            shape=(n, *tail),
            chunks=(layout.chunk_items, *tail),
            shards=(layout.block_items, *tail) if layout.sharded else None,
            dtype=item_array_dtype(name, layout.dtype),
            dims=("item", *dims),
            attributes={"units": units},
        )


def _store_attrs(attrs: dict, layout: StoreLayout, params_hash: str) -> dict:
    """The group attributes of a new scratch store: the caller's ``attrs`` (provenance), then
    the format version, params hash, layout, dimension names and ``complete`` False."""
    return {
        **attrs,
        "format_version": FORMAT_VERSION,
        "params_hash": params_hash,
        "layout": asdict(layout),
        "dimensions": {"z": list(Z_DIMS), **{name: ["item", *dims] for name, (dims, _, _) in ITEM_ARRAYS.items()}},
        "complete": False,
    }


class ActivationStore:
    """Read and write one task's activation store.

    >>> store = ActivationStore.create(path, layout, conditions, item_ids, target_ids, weights, attrs, params_hash)
    >>> for k in store.pending_blocks(): store.write_block(k, z_block, item_arrays)
    >>> store = store.finalize()               # renames <path>.partial-<hash> to <path>
    >>> for block in ActivationStore.open(path).iter_blocks(): ...
    """

    def __init__(self, root: Path, final_path: Path, group: zarr.Group):
        self.root = Path(root)
        self.final_path = Path(final_path)
        self.group = group
        self.layout = StoreLayout(**group.attrs["layout"])

    # --- creation and resumption -----------------------------------------------------------

    @classmethod
    def create_or_resume(
        cls,
        path: Path,
        layout: StoreLayout,
        conditions: list[tuple[int, int, float]],
        item_ids: list[str],
        target_ids: list[list[int]],
        target_weights: list[list[float]],
        attrs: dict,
        params_hash: str,
    ) -> "ActivationStore":
        """Open the scratch store for ``params_hash`` if one exists, else create it.

        Everything else under ``path`` (a finished store of an earlier run, scratch of *other*
        params hashes) is stale and removed (``pipeline.io.resumable_scratch``).
        ``conditions``: (layer, head, head score) per condition, the base condition first as
        (-1, -1, nan). ``target_ids``/``target_weights``: per item, the target token ids and
        their weights (ragged; padded here).
        """
        path = Path(path)
        scratch = resumable_scratch(path, params_hash)
        if scratch.exists():
            try:
                group = zarr.open_group(str(scratch), mode="r+")
                ok = group.attrs.get("params_hash") == params_hash and "layout" in group.attrs
            except (FileNotFoundError, ValueError, KeyError):
                ok = False
            if ok and StoreLayout(**group.attrs["layout"]) == layout:
                store = cls(scratch, path, group)
                store._clean_partial_files()
                log.info(
                    "resuming %s: %d of %d blocks already done", scratch, len(store.done_blocks()), layout.n_blocks
                )
                return store
            log.warning("scratch store %s is unreadable or has another layout; starting afresh", scratch)
            shutil.rmtree(scratch)
        return cls._create(
            scratch,
            path,
            layout,
            StoreIndex(conditions, item_ids, target_ids, target_weights),
            _store_attrs(attrs, layout, params_hash),
        )

    @classmethod
    def _create(
        cls, scratch: Path, path: Path, layout: StoreLayout, index: "StoreIndex", attrs: dict
    ) -> "ActivationStore":
        """A new, empty scratch store at ``scratch`` (to be finalized to ``path``): built in a
        temporary sibling and renamed (``pipeline.io.atomic_directory``), so a crash never leaves
        a half-made scratch store."""
        index.check(layout)
        with atomic_directory(scratch) as tmp:
            group = zarr.open_group(str(tmp), mode="w")
            _create_activation_arrays(group, layout)
            index.write(group)
            group.attrs.update(attrs)
            (tmp / DONE_DIR).mkdir()
        log.info(
            "created %s: %d conditions x %d items x %d layers x %d neurons (%s), %d blocks of %d items, %.1f MiB",
            scratch,
            layout.n_conditions,
            layout.n_items,
            layout.n_layers,
            layout.n_neurons,
            layout.dtype,
            layout.n_blocks,
            layout.block_items,
            layout.nbytes() / 2**20,
        )
        return cls(scratch, path, zarr.open_group(str(scratch), mode="r+"))

    @classmethod
    def open_scratch(cls, path: Path, params_hash: str, layout: StoreLayout) -> "ActivationStore":
        """The scratch store another process (rank 0) created, opened without cleaning anything:
        other ranks may be writing into it."""
        scratch = scratch_path(path, params_hash)
        if not (scratch / "zarr.json").is_file():
            raise StoreError(f"rank 0 did not create the scratch store {scratch} (did it fail? see its log)")
        group = zarr.open_group(str(scratch), mode="r+")
        if group.attrs.get("params_hash") != params_hash or StoreLayout(**group.attrs["layout"]) != layout:
            raise StoreError(
                f"scratch store {scratch} has another params hash or layout than this process "
                "computed; do all ranks run the same code and params?"
            )
        return cls(scratch, Path(path), group)

    def wait_until_done(self, poll_seconds: float = 2.0, timeout_seconds: float | None = None) -> None:
        """Block until every write block has its done marker (other ranks' included), polling."""
        n = self.layout.n_blocks
        start = last_log = time.monotonic()
        while len(done := self.done_blocks()) < n:
            now = time.monotonic()
            if timeout_seconds is not None and now - start > timeout_seconds:
                missing = sorted(set(range(n)) - done)
                raise StoreError(
                    f"{self.root}: blocks {missing[:10]} ({len(missing)} missing) still not done "
                    f"after {timeout_seconds:.0f} s; rerun to resume"
                )
            if now - last_log > 60:
                log.info("waiting for %d of %d blocks", n - len(done), n)
                last_log = now
            time.sleep(poll_seconds)

    def _clean_partial_files(self) -> None:
        # LocalStore writes *.partial then renames; a hard kill can leave them behind.
        for p in self.root.rglob("*.partial"):
            p.unlink()

    # --- writing ------------------------------------------------------------------------------

    def done_blocks(self) -> set[int]:
        d = self.root / DONE_DIR
        return {int(p.stem) for p in d.glob("*.done")} if d.is_dir() else set(range(self.layout.n_blocks))

    def pending_blocks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Blocks not yet done that belong to ``rank`` (blocks are dealt round-robin)."""
        done = self.done_blocks()
        return [k for k in range(self.layout.n_blocks) if k % world_size == rank and k not in done]

    def write_block(self, k: int, z: np.ndarray, arrays: ItemArrays) -> None:
        """Write block ``k``: ``z`` [condition, items, layer, neuron] and the items' ``arrays``."""
        sl = self.layout.block(k)
        n = sl.stop - sl.start
        lay = self.layout
        want_z = (lay.n_conditions, n, lay.n_layers, lay.n_neurons)
        if z.shape != want_z:
            raise StoreError(f"block {k}: got z {z.shape}, expected {want_z}")
        arrays.check(n, lay.n_layers, lay.n_neurons, f"block {k}")
        self.group["z"][:, sl] = _to_stored(z, lay.dtype, f"block {k}: z")
        for name in ITEM_ARRAYS:
            self.group[name][sl] = _to_stored(
                getattr(arrays, name), item_array_dtype(name, lay.dtype), f"block {k}: {name}"
            )
        # The marker goes last: a block without one is rewritten on resume.
        (self.root / DONE_DIR / f"{k:06d}.done").touch()

    def finalize(self) -> "ActivationStore":
        """Check every block is done, drop the markers, mark complete, rename to the final path."""
        missing = sorted(set(range(self.layout.n_blocks)) - self.done_blocks())
        if missing:
            raise StoreError(f"{self.root}: blocks {missing[:10]} are not written yet; cannot finalize")
        shutil.rmtree(self.root / DONE_DIR, ignore_errors=True)
        self.group.attrs["complete"] = True
        publish_scratch(self.root, self.final_path)
        return ActivationStore.open(self.final_path)

    # --- reading ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> "ActivationStore":
        """Open a finished store read-only; an unfinished one is refused, and so is one whose
        metadata does not parse or that misses an array or a chunk file (one line naming it)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            partial = sorted(path.glob(f"{PARTIAL_PREFIX}*"))
            hint = (
                f"an unfinished build exists at {partial[0]}; re-run the dump stage to finish it"
                if partial
                else "run the dump stage to build it"
            )
            raise StoreError(f"no activation store at {path}: {hint}")
        group = open_finished_group(path, STORE_KIND, "dump", ("z", *ITEM_ARRAYS, *StoreIndex.ARRAYS))
        if not group.attrs.get("complete", False):
            raise StoreError(f"activation store {path} is not complete; re-run the dump stage")
        if group.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"activation store {path} has format {group.attrs.get('format_version')}, "
                f"this code reads format {FORMAT_VERSION}; re-run the dump stage"
            )
        return cls(path, path, group)

    def _read(self, name: str, selection=slice(None), items: slice | None = None) -> np.ndarray:
        return read_checked(self.group, name, selection, self.root, STORE_KIND, "dump", items)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def item_ids(self) -> list[str]:
        return [str(s) for s in self._read("item_id")]

    def conditions(self) -> list[tuple[int, int, float]]:
        """(layer, head, head score S_t) per condition; the base condition is (-1, -1, nan)."""
        return list(
            zip(
                self._read("condition_layer").tolist(),
                self._read("condition_head").tolist(),
                self._read("condition_head_score").tolist(),
            )
        )

    def head_scores(self) -> np.ndarray:
        """[condition - 1] float64: the head score S_t of each critical-head condition (base excluded)."""
        return np.array([s for _, _, s in self.conditions()[1:]], dtype=np.float64)

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """(target_ids [item, token] with -1 padding, target_weights [item, token])."""
        return self._read("target_ids"), self._read("target_weights")

    def read_items(self, sl: slice) -> ItemBlock:
        """Items ``sl`` of every array (z as float32); StoreError naming the array and the chunk
        when one fails its checksum or cannot be decoded."""
        arrays = ItemArrays(**{name: _as_float32(self._read(name, sl, sl)) for name in ITEM_ARRAYS})
        return ItemBlock(sl, self._read("z", (slice(None), sl), sl).astype(np.float32, copy=False), arrays)

    def item_slices(self, items_per_block: int | None = None) -> list[slice]:
        """The item slices ``iter_blocks`` reads (default: the write blocks)."""
        step = items_per_block or self.layout.block_items
        return [slice(s, min(self.layout.n_items, s + step)) for s in range(0, self.layout.n_items, step)]

    def iter_blocks(self, items_per_block: int | None = None) -> Iterator[ItemBlock]:
        """Stream the store in item blocks (default: its write blocks); memory is O(block)."""
        for sl in self.item_slices(items_per_block):
            yield self.read_items(sl)
