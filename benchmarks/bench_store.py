"""Zarr write / read throughput of activation-store layouts against raw numpy on the same data.

    python benchmarks/bench_store.py [--mib 256] [--layers 32] [--neurons 2048] [--dir /path/on/the/data/disk]

For float16 and float32, an array z [1, items, layers, neurons] of --mib MiB is created as the
store creates its arrays (``store.create_checked_array``), written block by block as
``ActivationStore.write_block`` does (``arr[:, block] = ...``) and read back block by block as
``iter_blocks`` does, for: the layout ``StoreLayout.plan`` picks (~1 MiB chunks) without and
with the crc32c checksum every store carries, and, checksummed, one item per chunk, ~16 MiB
chunks and the plan forced into shards (``--max-files``). numpy: ``np.save`` of the whole
array and ``np.load``. MB = 1e6 bytes. The page cache is warm (reads follow writes); files are
written under --dir (default: the system temp dir). Each variant runs ``--repeats`` times and
the median is printed. Not run by CI.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.method.store import StoreLayout, create_checked_array  # noqa: E402


def _count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def bench_zarr(
    data: np.ndarray, root: Path, chunk_items: int, block_items: int, checksum: bool
) -> tuple[float, float, int]:
    import zarr

    n, L, I = data.shape[1:]
    path = root / "z.zarr"
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    g = zarr.open_group(str(path), mode="w")
    arr = create_checked_array(
        g,
        "z",
        shape=data.shape,
        chunks=(1, chunk_items, L, I),
        shards=(1, block_items, L, I) if block_items != chunk_items else None,
        dtype=data.dtype,
        dims=("condition", "item", "layer", "neuron"),
        checksum=checksum,
    )
    for s in range(0, n, block_items):
        arr[:, s : s + block_items] = data[:, s : s + block_items]
    t_write = time.perf_counter() - t0
    files = _count_files(path)
    t0 = time.perf_counter()
    arr = zarr.open_group(str(path), mode="r")["z"]
    total = 0.0
    for s in range(0, n, block_items):
        total += float(np.asarray(arr[:, s : s + block_items])[0, 0, 0, 0])
    t_read = time.perf_counter() - t0
    shutil.rmtree(path)
    return t_write, t_read, files


def bench_numpy(data: np.ndarray, root: Path) -> tuple[float, float, int]:
    path = root / "z.npy"
    t0 = time.perf_counter()
    np.save(path, data)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = np.load(path)
    t_read = time.perf_counter() - t0
    assert back.shape == data.shape
    path.unlink()
    return t_write, t_read, 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--neurons", type=int, default=2048)
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    p.add_argument("--max-files", type=int, default=16, help="file budget that forces the sharded variant")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; the median is printed")
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_store_") as tmp:
        root = Path(tmp)
        for dtype in args.dtypes:
            item_bytes = args.layers * args.neurons * np.dtype(dtype).itemsize
            n = max(1, int(args.mib * 2**20 // item_bytes))
            rng = np.random.default_rng(0)
            data = rng.standard_normal((1, n, args.layers, args.neurons), dtype=np.float32).astype(dtype)
            nbytes = data.nbytes
            plan = StoreLayout.plan(1, n, args.layers, args.neurons, dtype)
            sharded = StoreLayout.plan(1, n, args.layers, args.neurons, dtype, max_files=args.max_files)
            big = max(1, min(n, round(16 * 2**20 / item_bytes)))
            plan_name = f"{plan.chunk_items} items/chunk ({plan.chunk_items * item_bytes / 2**20:.2f} MiB)"
            variants = [
                ("numpy .npy (whole array)", None),
                (f"zarr plan, no checksum: {plan_name}", (plan.chunk_items, plan.block_items, False)),
                (f"zarr plan + crc32c (the store): {plan_name}", (plan.chunk_items, plan.block_items, True)),
                (f"zarr 1 item/chunk + crc32c ({item_bytes / 2**20:.2f} MiB)", (1, 1, True)),
                (f"zarr {big} items/chunk + crc32c ({big * item_bytes / 2**20:.1f} MiB)", (big, big, True)),
                (
                    f"zarr plan sharded + crc32c: {sharded.block_items // sharded.chunk_items} chunks/shard",
                    (sharded.chunk_items, sharded.block_items, True),
                ),
            ]
            if not sharded.sharded:  # too few chunks for the file budget to force shards
                variants = [v for v in variants if "sharded" not in v[0]]
            for name, spec in variants:
                runs = [
                    bench_numpy(data, root) if spec is None else bench_zarr(data, root, *spec)
                    for _ in range(args.repeats)
                ]
                tw, tr = float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))
                rows.append((dtype, f"{nbytes / 2**20:.0f}", name, runs[0][2], nbytes / tw / 1e6, nbytes / tr / 1e6))
            del data

    head = ("dtype", "MiB", "layout", "files", "write MB/s", "read MB/s")
    widths = [
        max(len(str(h)), *(len(f"{r[i]:.0f}" if isinstance(r[i], float) else str(r[i])) for r in rows))
        for i, h in enumerate(head)
    ]

    def fmt(r):
        cells = ((f"{v:.0f}" if isinstance(v, float) else str(v)).ljust(w) for v, w in zip(r, widths))
        return "| " + " | ".join(cells) + " |"

    print(f"z [1, items, {args.layers}, {args.neurons}], written block by block and read back (page cache warm)")
    print(fmt(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
