"""The activation store: one Zarr v3 group per (model, task); the only module that knows its layout.

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

Every chunk of every array this module writes (activation stores and attribution arrays) ends
with its crc32c, which zarr verifies on every read; chunks equal to the fill value are written
too, so a missing chunk file is damage, never zeros. ``open`` checks that every array's metadata
parses and every chunk file exists; a read that fails its checksum names the store, the array
and the chunk; ``verify`` reads every chunk (``python -m pipeline.tools.verify``).

Map of this module:
- ``StoreLayout``: sizes, chunking and write blocks of one store (``plan``).
- ``StoreIndex``: the item and condition arrays of a new store (checked, padded, written).
- ``ActivationStore``: ``create_or_resume`` / ``open_scratch`` / ``write_block`` / ``finalize``
  (writing, resumable; a new scratch store is made by ``_create``) and ``open`` /
  ``iter_blocks`` / ``conditions`` / ``head_scores`` / ``targets`` (reading).
- ``write_importance`` / ``read_importance`` (an ``ImportanceArray``) /
  ``read_importance_on_ablation_items``: the attribution array [method, task, layer, neuron],
  and the same computed on the ground truth's items only.
- ``create_checked_array`` (how every array is created), ``open_finished_group`` and
  ``read_checked`` (how every finished group is opened and read), ``verify`` (a ``StoreCheck``
  of one store, every chunk read).
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.errors import PipelineError
from pipeline.io import PARTIAL_PREFIX, atomic_directory, publish_scratch, resumable_scratch

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
Z_DIMS = ("condition", "item", "layer", "neuron")
DONE_DIR = "_done"
STORE_KIND = "activation store"


class StoreError(PipelineError):
    """The store is missing, incomplete, damaged, or does not match what is asked of it."""


def create_checked_array(
    group: zarr.Group,
    name: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype,
    dims: tuple[str, ...],
    shards: tuple[int, ...] | None = None,
    fill_value=0,
    attributes: dict | None = None,
    checksum: bool = True,
) -> zarr.Array:
    """Create ``name`` in ``group`` as every array of this project is made: uncompressed (zstd
    gains 1.09x on activations and halves the write speed), each chunk followed by its crc32c
    (zarr checks it on every read; a sharded array's index carries its own), and every chunk
    written even when it equals the fill value (so a missing chunk file means damage).
    ``checksum=False`` exists for the store benchmark's comparison only."""
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        compressors=[Crc32cCodec()] if checksum else None,
        fill_value=fill_value,
        dimension_names=dims,
        attributes=attributes or {},
        config={"write_empty_chunks": True},
    )


def _restore_hint(path: Path, stage: str) -> str:
    # --force: DVC refuses to overwrite an output that differs from its cache (a damaged one) without it.
    return f"restore it with `dvc checkout --force {path}` or re-run the {stage} stage"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _storage_chunks(arr: zarr.Array, items: slice | None = None) -> Iterator[tuple[str, tuple[slice, ...]]]:
    """(storage key, region) of every chunk file of ``arr`` (a shard's, when sharded), in grid
    order; with ``items``, only those whose region along the first axis named "item" meets it."""
    grid = arr.metadata.chunk_grid.chunk_shape
    dims = list(arr.metadata.dimension_names or ())
    axis = dims.index("item") if "item" in dims else None
    for coords in itertools.product(*(range(math.ceil(n / c)) for n, c in zip(arr.shape, grid))):
        region = tuple(slice(k * c, min(n, (k + 1) * c)) for k, c, n in zip(coords, grid, arr.shape))
        if items is not None and axis is not None:
            r = region[axis]
            if r.stop <= items.start or r.start >= items.stop:
                continue
        yield arr.metadata.encode_chunk_key(coords), region


def _checksummed(arr: zarr.Array) -> bool:
    """True when every chunk of ``arr`` carries a crc32c (the last codec, or inside its shards)."""
    codecs = arr.metadata.to_dict().get("codecs", [])
    if codecs and codecs[0].get("name") == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]
    return bool(codecs) and codecs[-1].get("name") == "crc32c"


def open_finished_group(path: Path, what: str, stage: str, arrays: tuple[str, ...] = ()) -> zarr.Group:
    """Open the finished Zarr group at ``path`` read-only, after the cheap checks: every array's
    metadata parses, each of ``arrays`` exists, and every chunk file of every array exists.

    ``what`` names the kind of store and ``stage`` the stage that writes it, for the messages:
    one line naming the store, the array and the chunk, and how to restore it.
    """
    path = Path(path)
    hint = _restore_hint(path, stage)
    try:
        group = zarr.open_group(str(path), mode="r")
        names = sorted(group.array_keys())
        nodes = {name: group[name] for name in names}  # parse every array's metadata now, not mid-stream
    except (ValueError, KeyError, TypeError, OSError) as exc:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"{what} {path} has unreadable metadata ({_one_line(exc)}); {hint}") from None
    for name in arrays:
        if name not in nodes:
            raise StoreError(f"{what} {path} has no array {name!r} (its zarr.json is missing); {hint}")
    for name, arr in nodes.items():
        for key, region in _storage_chunks(arr):
            if not (path / name / key).is_file():
                raise StoreError(
                    f"{what} {path}: array {name!r} chunk {key} ({_region_text(arr, region)}) is missing; {hint}"
                )
    return group


def _region_text(arr: zarr.Array, region: tuple[slice, ...]) -> str:
    dims = arr.metadata.dimension_names or tuple(f"dim{k}" for k in range(len(region)))
    return ", ".join(f"{d} {r.start}-{r.stop - 1}" for d, r in zip(dims, region))


def read_checked(
    group: zarr.Group, name: str, selection, path: Path, what: str, stage: str, items: slice | None = None
) -> np.ndarray:
    """``group[name][selection]`` as numpy; when a chunk fails its checksum or cannot be decoded,
    StoreError naming the store, the array and the chunk (found by reading the chunks the
    selection touches, ``items`` along the item axis, one by one)."""
    arr = group[name]
    try:
        return np.asarray(arr[selection])
    except (ValueError, OSError) as exc:  # a checksum mismatch, or a truncated chunk that cannot be reshaped
        for key, region in _storage_chunks(arr, items):
            _read_chunk(arr, name, key, region, path, what, stage)
        raise StoreError(
            f"{what} {path}: array {name!r} cannot be read ({_one_line(exc)}); {_restore_hint(path, stage)}"
        ) from None


def _read_chunk(
    arr: zarr.Array, name: str, key: str, region: tuple[slice, ...], path: Path, what: str, stage: str
) -> np.ndarray:
    """The chunk file ``key`` of ``arr`` (its ``region``), checksum checked; StoreError naming
    the store, the array and the chunk when it fails."""
    try:
        return np.asarray(arr[region])
    except (ValueError, OSError) as exc:
        raise StoreError(
            f"{what} {path}: array {name!r} chunk {key} ({_region_text(arr, region)}) is "
            f"damaged ({_one_line(exc)}); {_restore_hint(path, stage)}"
        ) from None


@dataclass(frozen=True)
class StoreLayout:
    """Sizes of one task's store; ``block_items`` items per write block (chunk or shard)."""

    n_conditions: int
    n_items: int
    n_layers: int
    n_neurons: int
    chunk_items: int
    block_items: int
    dtype: str

    @classmethod
    def plan(
        cls,
        n_conditions: int,
        n_items: int,
        n_layers: int,
        n_neurons: int,
        dtype: str = "float32",
        target_chunk_bytes: int = 1 << 20,
        max_files: int = 2000,
    ) -> "StoreLayout":
        if dtype not in ("float16", "float32"):
            raise StoreError(f"store dtype {dtype!r} is not supported; use 'float16' or 'float32'")
        if min(n_conditions, n_items, n_layers, n_neurons) < 1:
            raise StoreError(
                f"store dimensions must be positive: conditions={n_conditions} items={n_items} "
                f"layers={n_layers} neurons={n_neurons}"
            )
        item_bytes = n_layers * n_neurons * np.dtype(dtype).itemsize
        chunk_items = int(min(n_items, max(1, round(target_chunk_bytes / item_bytes))))
        n_chunks = math.ceil(n_items / chunk_items)
        block_items = chunk_items
        if n_conditions * n_chunks > max_files:
            # A shard holds a whole number of chunks (zarr requires it; the last shard may reach
            # past n_items) and there are at most max_files // n_conditions shards per condition.
            per_shard = math.ceil(n_chunks / max(1, max_files // n_conditions))
            block_items = chunk_items * per_shard
        return cls(n_conditions, n_items, n_layers, n_neurons, chunk_items, block_items, dtype)

    @property
    def sharded(self) -> bool:
        return self.block_items != self.chunk_items

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_items / self.block_items)

    def block(self, k: int) -> slice:
        if not 0 <= k < self.n_blocks:
            raise StoreError(f"block {k} out of range: the store has {self.n_blocks} blocks")
        return slice(k * self.block_items, min(self.n_items, (k + 1) * self.block_items))

    def nbytes(self) -> int:
        """Bytes of ``z`` plus the per-item arrays (the expected disk use, uncompressed)."""
        per = self.n_layers * self.n_neurons
        item_bytes = sum(
            np.dtype(item_array_dtype(name, self.dtype)).itemsize * (per if dims else 1)
            for name, (dims, _, _) in ITEM_ARRAYS.items()
        )
        return self.n_items * (per * self.n_conditions * np.dtype(self.dtype).itemsize + item_bytes)


def check_free_space(path: Path, layout: StoreLayout, params_hash: str) -> None:
    """Log the bytes the store at ``path`` will take and the free space where it goes; StoreError
    before anything is written when the disk cannot hold it. Blocks already in this params
    hash's scratch store (a resumed dump) count as written."""
    path = Path(path)
    scratch = scratch_path(path, params_hash)
    written = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file()) if scratch.is_dir() else 0
    needed = max(0, layout.nbytes() - written)
    where = path.parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    log.info(
        "store %s: %s to write (%s of z and the per-item arrays, uncompressed, %s already written); %s free on %s",
        path,
        human_bytes(needed),
        human_bytes(layout.nbytes()),
        human_bytes(written),
        human_bytes(free),
        where.resolve(),
    )
    if needed > free:
        raise StoreError(
            f"store {path}: needs {human_bytes(needed)} but only {human_bytes(free)} are free on "
            f"{where.resolve()}; "
            "free space, point the DVC workspace elsewhere, or shrink it (dump.store_dtype: float16, "
            "dump.max_items)"
        )


def human_bytes(n: float) -> str:
    """``n`` bytes for a person: "512 B", "9.38 MiB", "3.21 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# The per-item arrays beside z: name -> (dimensions after item, dtype, units). dtype "float" is
# the store's dtype (``StoreLayout.dtype``, as z): rounding them to float16 changes no method's
# top-1% set on the default models (docs/benchmarks.md, bench_store_dtype.py); reads give float32.
ITEM_ARRAYS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "dvp": (("layer", "neuron"), "float", "<W_down[:, i], u_y>: logit-space write per unit of activation"),
    "dvp_logprob": (
        ("layer", "neuron"),
        "float",
        "<W_down[:, i], d log p(target) / d residual> at the last prompt token: nats per unit of activation",
    ),
    "atp": (
        ("layer", "neuron"),
        "float",
        "sum over positions of z * d(answer log-probability)/dz: first-order effect of zeroing (nats)",
    ),
    "gate_sum": (("layer", "neuron"), "float", "sum over prompt tokens of act(gate) (act(fc1) for plain MLPs)"),
    "gate_positive": (("layer", "neuron"), "int32", "prompt tokens with act(gate) > 0"),
    "prompt_tokens": ((), "int32", "prompt tokens (image and text) of the item"),
}


def _as_float32(values: np.ndarray) -> np.ndarray:
    """Float arrays as float32 (what the attribution computes in); integer arrays unchanged."""
    return values.astype(np.float32, copy=False) if values.dtype.kind == "f" else values


def item_array_dtype(name: str, store_dtype: str) -> str:
    """The stored dtype of per-item array ``name`` in a store of ``store_dtype``."""
    dtype = ITEM_ARRAYS[name][1]
    return store_dtype if dtype == "float" else dtype


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


def scratch_path(path: Path, params_hash: str) -> Path:
    """``<path>/.partial-<params_hash>``: where the store at ``path`` is built (``pipeline.io.resumable_scratch``)."""
    return Path(path) / f"{PARTIAL_PREFIX}{params_hash}"


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


# --- the attribution array --------------------------------------------------------------------

IMPORTANCE_DIMS = ("method", "task", "layer", "neuron")


ON_ABLATION_ITEMS = "importance_on_ablation_items"


def write_importance(
    path: Path,
    methods: list[str],
    tasks: list[str],
    importance: np.ndarray,
    attrs: dict,
    on_ablation_items: np.ndarray | None = None,
) -> None:
    """Write ``importance`` [method, task, layer, neuron] (float32) with its coordinates, atomically;
    and ``on_ablation_items`` (same shape, NaN for tasks without ground truth: the methods
    computed from only the items the ground truth was measured on), when given."""
    path = Path(path)
    if importance.shape[:2] != (len(methods), len(tasks)):
        raise StoreError(f"importance has shape {importance.shape}, expected ({len(methods)}, {len(tasks)}, L, I)")
    if on_ablation_items is not None and on_ablation_items.shape != importance.shape:
        raise StoreError(
            f"importance on the ablation items has shape {on_ablation_items.shape}, expected {importance.shape}"
        )
    with atomic_directory(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        M, T, L, I = importance.shape
        arrays = {"importance": (importance, "method-specific; higher = more important to the task")}
        if on_ablation_items is not None:
            arrays[ON_ABLATION_ITEMS] = (on_ablation_items, "as importance, from the ground truth's items only")
        for name, (values, units) in arrays.items():
            arr = create_checked_array(
                group,
                name,
                shape=values.shape,
                chunks=(1, 1, L, I),
                dtype="float32",
                dims=IMPORTANCE_DIMS,
                fill_value=np.nan,
                attributes={"units": units},
            )
            arr[...] = values.astype(np.float32)
        for name, values in (("method", methods), ("task", tasks)):
            coord = create_checked_array(
                group, name, shape=(len(values),), chunks=(len(values),), dtype=str, dims=(name,), fill_value=None
            )
            coord[...] = np.array(values, dtype=object)
        group.attrs.update({**attrs, "format_version": FORMAT_VERSION, "dimensions": list(IMPORTANCE_DIMS)})


class ImportanceArray(NamedTuple):
    """The attribution array read back: ``importance`` [method, task, layer, neuron] (float32),
    its coordinates ``methods`` and ``tasks``, and its group ``attrs``. Unpacks as
    ``methods, tasks, importance, attrs = ...``."""

    methods: list[str]
    tasks: list[str]
    importance: np.ndarray
    attrs: dict


IMPORTANCE_KIND = "attribution array"


def _open_importance(path: Path) -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"no attribution array at {path}; run the attribute stage")
    return open_finished_group(path, IMPORTANCE_KIND, "attribute", ("importance", "method", "task"))


def read_importance(path: Path) -> ImportanceArray:
    """(methods, tasks, importance [method, task, layer, neuron], attrs)."""
    group = _open_importance(path)

    def read(name: str) -> np.ndarray:
        return read_checked(group, name, slice(None), Path(path), IMPORTANCE_KIND, "attribute")

    return ImportanceArray(
        [str(s) for s in read("method")], [str(s) for s in read("task")], read("importance"), dict(group.attrs)
    )


def read_importance_on_ablation_items(path: Path) -> np.ndarray | None:
    """The importance computed on the ground truth's items only [method, task, layer, neuron]
    (same coordinates as ``read_importance``), or None when the array was not written."""
    group = _open_importance(path)
    if ON_ABLATION_ITEMS not in group:
        return None
    return read_checked(group, ON_ABLATION_ITEMS, slice(None), Path(path), IMPORTANCE_KIND, "attribute")


# --- verification -------------------------------------------------------------------------------

PROVENANCE_KEYS = ("code_version", "params_hash")


@dataclass(frozen=True)
class StoreCheck:
    """The verdict of ``verify`` on one path: ``status`` is "ok", "incomplete" (an unfinished
    build: ``detail`` says how many blocks are done), "damaged", "unchecked" (readable, but
    written without checksums, before they existed) or "missing"; ``kind`` what the
    group is; ``arrays`` / ``chunks`` / ``nbytes`` what was read and checksummed."""

    path: Path
    status: str
    kind: str
    detail: str
    arrays: int = 0
    chunks: int = 0
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        """One line for a person: ``OK       data/activations/m/vqa.zarr: ...``."""
        return f"{self.status.upper():<10} {self.path}: {self.detail}"


def _scratch_progress(path: Path) -> str:
    """``"3 of 5 blocks done"`` for each unfinished build under ``path`` (``; ``-joined)."""
    parts = []
    for scratch in sorted(path.glob(f"{PARTIAL_PREFIX}*")):
        try:
            layout = StoreLayout(**zarr.open_group(str(scratch), mode="r").attrs["layout"])
            done = len(list((scratch / DONE_DIR).glob("*.done")))
            parts.append(f"{scratch.name}: {done} of {layout.n_blocks} blocks done")
        except (ValueError, KeyError, TypeError, OSError):
            parts.append(f"{scratch.name}: unreadable (it will be rebuilt)")
    return "; ".join(parts)


def verify(path: Path, progress: bool = False) -> StoreCheck:
    """Check the store at ``path`` end to end: every array's metadata and every chunk file
    present, every chunk read and its checksum verified, the build complete (no done markers
    left, ``complete`` set) and the provenance attributes (``PROVENANCE_KEYS``, and ``model`` for
    an activation store) present. Never raises for damage: the result says what is wrong."""
    from tqdm import tqdm

    path = Path(path)
    if not (path / "zarr.json").is_file():
        if path.is_dir() and any(path.glob(f"{PARTIAL_PREFIX}*")):
            return StoreCheck(
                path,
                "incomplete",
                STORE_KIND,
                f"unfinished build ({_scratch_progress(path)}); re-run its stage to finish it",
            )
        return StoreCheck(path, "missing", "?", "no Zarr group here (no zarr.json)")
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return StoreCheck(
            path,
            "damaged",
            "?",
            f"unreadable group metadata ({_one_line(exc)}); restore it with `dvc checkout --force {path}`",
        )
    if "layout" in attrs:
        kind, stage, required = STORE_KIND, "dump", ("z", *ITEM_ARRAYS, *StoreIndex.ARRAYS)
    elif attrs.get("dimensions") == list(IMPORTANCE_DIMS):
        kind, stage, required = IMPORTANCE_KIND, "attribute", ("importance", "method", "task")
    else:
        kind, stage, required = "zarr group", "its", ()
    try:
        group = open_finished_group(path, kind, stage, required)
        chunks = nbytes = 0
        arrays = sorted(group.array_keys())
        todo = [(name, key, region) for name in arrays for key, region in _storage_chunks(group[name])]
        for name, key, region in tqdm(todo, desc=f"verify {path.name}", disable=not progress, leave=False):
            nbytes += _read_chunk(group[name], name, key, region, path, kind, stage).nbytes
            chunks += 1
    except StoreError as exc:
        return StoreCheck(path, "damaged", kind, " ".join(str(exc).split()))
    missing = [k for k in PROVENANCE_KEYS + (("model",) if kind == STORE_KIND else ()) if not attrs.get(k)]
    unchecked = [name for name in arrays if not _checksummed(group[name])]
    if kind == STORE_KIND and (not attrs.get("complete") or (path / DONE_DIR).exists()):
        return StoreCheck(
            path, "incomplete", kind, "not marked complete; re-run the dump stage", len(arrays), chunks, nbytes
        )
    if missing:
        return StoreCheck(
            path,
            "damaged",
            kind,
            f"provenance attributes {missing} are missing; {_restore_hint(path, stage)}",
            len(arrays),
            chunks,
            nbytes,
        )
    if unchecked:
        which = (
            f"arrays {unchecked} carry" if len(unchecked) < len(arrays) else f"none of its {len(arrays)} arrays carries"
        )
        return StoreCheck(
            path,
            "unchecked",
            kind,
            f"readable, but {which} a checksum (written before checksums "
            f"existed); re-run the {stage} stage to rewrite it",
            len(arrays),
            chunks,
            nbytes,
        )
    what = f"model {attrs['model']}, " if "model" in attrs else ""
    return StoreCheck(
        path,
        "ok",
        kind,
        f"{kind}, {len(arrays)} arrays, {chunks} chunks read and checksummed "
        f"({human_bytes(nbytes)}); {what}params {attrs['params_hash']}, code {attrs['code_version']}",
        len(arrays),
        chunks,
        nbytes,
    )
