"""Peak memory of attribution at N and 4N items: streaming stays flat, loading the store grows.

    python benchmarks/bench_attribute_memory.py [--items 256] [--layers 8] [--neurons 1024] [--conditions 5]

Builds float32 stores of N and 4N items (random activations, ``pipeline.method.store``), then, in a
fresh subprocess per (method, size), reads ``ru_maxrss`` after the imports and after the
computation:
- ``streaming``: ``pipeline.method.attribution.task_statistics`` (one write block at a time);
- ``dask``: ``pipeline.method.distributed.attribute_dask`` on dask's threaded scheduler;
- ``load-all``: the same sums in numpy after reading all of z and dvp (what streaming avoids).
Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
import numpy as np
from pipeline.method.attribution import task_statistics
from pipeline.method.distributed import attribute_dask
from pipeline.method.store import ActivationStore
import dask.array  # imported by every method, so the baselines compare
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
store = ActivationStore.open({path!r})
before = rss()
method = {method!r}
if method == "streaming":
    stats = task_statistics(store)
elif method == "dask":
    stats = attribute_dask(store)
else:
    z = np.asarray(store.group["z"][...], dtype=np.float64)
    dvp = np.asarray(store.group["dvp"][...], dtype=np.float64)
    s = np.einsum("cnli,nli->cli", z, dvp) / z.shape[1]
print(json.dumps({{"before": before, "after": rss()}}))
"""


def build_store(path: Path, n_items: int, C: int, L: int, I: int) -> int:
    from pipeline.method.store import ActivationStore, ItemArrays, StoreLayout

    lay = StoreLayout.plan(C, n_items, L, I, "float32")
    s = ActivationStore.create_or_resume(
        path,
        lay,
        [(-1, -1, float("nan"))] + [(0, h, 0.1) for h in range(C - 1)],
        [f"i{k}" for k in range(n_items)],
        [[1]] * n_items,
        [[1.0]] * n_items,
        {"model": "bench"},
        "bench",
    )
    rng = np.random.default_rng(0)
    for k in s.pending_blocks():
        n = lay.block(k).stop - lay.block(k).start
        dvp = rng.standard_normal((n, L, I), dtype=np.float32)
        s.write_block(
            k,
            rng.standard_normal((C, n, L, I), dtype=np.float32),
            ItemArrays(dvp, dvp, dvp, dvp, (dvp > 0).astype(np.int32), np.full(n, 8, dtype=np.int32)),
        )
    s.finalize()
    return lay.nbytes()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=256, help="N (the second size is 4N)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--neurons", type=int, default=1024)
    p.add_argument("--conditions", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["streaming", "dask", "load-all"])
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_attr_") as tmp:
        for n in (args.items, 4 * args.items):
            path = Path(tmp) / f"s{n}.zarr"
            nbytes = build_store(path, n, args.conditions, args.layers, args.neurons)
            for method in args.methods:
                code = CHILD.format(repo=str(REPO), path=str(path), method=method)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((method, n, nbytes / 2**20, r["before"], r["after"], r["after"] - r["before"]))
    print(f"store: {args.conditions} conditions x items x {args.layers} layers x {args.neurons} neurons, float32")
    print("| method | items | store MiB | peak RSS after imports (MiB) | peak RSS after (MiB) | growth (MiB) |")
    print("|---|---|---|---|---|---|")
    for m, n, mib, b, a, g in rows:
        print(f"| {m} | {n} | {mib:.0f} | {b:.0f} | {a:.0f} | {g:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
