"""The layout of an activation store: its sizes, chunking and write blocks, its per-item
arrays, where it is built, and whether the disk can hold it. The table of the store's arrays,
its chunking and its write blocks are described in ``pipeline.method.store.activations``.

- ``FORMAT_VERSION`` (of activation stores and attribution arrays), ``Z_DIMS``, ``DONE_DIR``.
- ``StoreLayout``: sizes, chunking and write blocks of one store (``plan``).
- ``check_free_space`` / ``human_bytes``: the disk check before a dump writes anything.
- ``ITEM_ARRAYS`` / ``item_array_dtype``: the per-item arrays beside ``z`` and their dtypes.
- ``scratch_path``: where the store is built before ``finalize`` moves it.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import PARTIAL_PREFIX
from pipeline.method.store.io import StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
Z_DIMS = ("condition", "item", "layer", "neuron")
DONE_DIR = "_done"


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


def item_array_dtype(name: str, store_dtype: str) -> str:
    """The stored dtype of per-item array ``name`` in a store of ``store_dtype``."""
    dtype = ITEM_ARRAYS[name][1]
    return store_dtype if dtype == "float" else dtype


def scratch_path(path: Path, params_hash: str) -> Path:
    """``<path>/.partial-<params_hash>``: where the store at ``path`` is built (``pipeline.io.resumable_scratch``)."""
    return Path(path) / f"{PARTIAL_PREFIX}{params_hash}"
