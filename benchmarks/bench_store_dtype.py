"""What storing the activations in float16 or bfloat16 would do to every method's ranking.

Reads a model's float32 activation stores (``data/activations/<model>/<task>.zarr``, written by
``dvc repro``), rounds them to a 16-bit float and back, recomputes every method's importance with
``pipeline.method.attribution`` and prints, per rounding, method and task, the Spearman
correlation of the neurons' importance with the float32 one and the share of the float32 top-1%
neurons that the rounded ranking also puts in its top 1% (the mask the evaluation zeroes).

Two roundings per dtype: ``z`` (what ``dump.store_dtype: float16`` stores today) and ``z+items``
(z and the per-item float arrays dvp, dvp_logprob, atp and gate_sum as well: what the store would
hold if those followed ``dump.store_dtype``, half the bytes of a 7B store at the paper's protocol).

    python benchmarks/bench_store_dtype.py --model tiny-llava --model tiny-idefics3
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from scipy.stats import spearmanr

from pipeline.method.attribution import StreamingContributions, TaskStatistics, importance_matrix
from pipeline.method.store import ITEM_ARRAYS, ActivationStore

ROUNDED_ARRAYS = ("dvp", "dvp_logprob", "atp", "gate_sum")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _round(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` (to nearest) and back to float32."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).to(torch.float32).numpy()


def statistics(store: ActivationStore, dtype: torch.dtype | None, items_too: bool) -> TaskStatistics:
    """One streaming pass over ``store`` with z (and with ``items_too`` the per-item float arrays)
    rounded to ``dtype`` first (None: as stored)."""
    lay = store.layout
    sums = StreamingContributions(lay.n_conditions, lay.n_layers, lay.n_neurons)
    for block in store.iter_blocks():
        z, arrays = block.z, block.arrays
        if dtype is not None:
            z = _round(z, dtype)
            if items_too:
                arrays = replace(arrays, **{name: _round(getattr(arrays, name), dtype) for name in ROUNDED_ARRAYS})
        sums.add(z, arrays)
    return TaskStatistics.from_sums(sums, store)


def top_share(reference: np.ndarray, other: np.ndarray, fraction: float) -> float:
    """Share of ``reference``'s top ``fraction`` of neurons that ``other``'s top set also holds."""
    k = max(1, math.ceil(fraction * reference.size))
    top = lambda x: set(np.argsort(-x.ravel(), kind="stable")[:k].tolist())  # noqa: E731
    return len(top(reference) & top(other)) / k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="a studied model (repeatable); default tiny-llava")
    p.add_argument("--activations", type=Path, default=Path("data/activations"))
    p.add_argument("--tasks", nargs="+", default=["vqa", "ocr", "caption", "retrieval"])
    p.add_argument("--top", type=float, default=0.01, help="the mask size compared (fraction of all neurons)")
    args = p.parse_args()
    if not set(ROUNDED_ARRAYS) <= set(ITEM_ARRAYS):
        raise SystemExit(f"the store's per-item arrays changed: {sorted(ITEM_ARRAYS)}")
    for model in args.model or ["tiny-llava"]:
        stores = {t: ActivationStore.open(args.activations / model / f"{t}.zarr") for t in args.tasks}
        lay = next(iter(stores.values())).layout
        first = stores[args.tasks[0]]
        item_bytes = {name: first.group[name].dtype.itemsize for name in ("z", *ROUNDED_ARRAYS)}
        print(
            f"\n## {model}: {lay.n_layers} layers x {lay.n_neurons} neurons, {lay.n_conditions} conditions; "
            f"stored bytes per value: {item_bytes}\n"
        )
        reference = importance_matrix({t: statistics(s, None, False) for t, s in stores.items()}, seed=0)
        variants = [(name, dtype, items_too) for name, dtype in DTYPES.items() for items_too in (False, True)]
        cells: dict[str, list[str]] = {m: [] for m in reference.methods if m != "random"}
        for name, dtype, items_too in variants:
            rounded = importance_matrix({t: statistics(s, dtype, items_too) for t, s in stores.items()}, seed=0)
            for method in cells:
                m = reference.methods.index(method)
                pairs = [
                    (reference.scores[m, j].ravel(), rounded.scores[m, j].ravel()) for j in range(len(reference.tasks))
                ]
                gap = max((1 - spearmanr(a, b).statistic) if np.ptp(a) > 0 else 0.0 for a, b in pairs)
                share = min(top_share(a, b, args.top) for a, b in pairs)
                cells[method].append(f"{gap:.1e} / {share:.3f}")
        print(
            f"Worst task of {', '.join(reference.tasks)}: 1 - Spearman of the importance with float32's, and the "
            f"share of float32's top {args.top:.0%} that the rounded ranking keeps in its top {args.top:.0%}.\n"
        )
        print("| method | " + " | ".join(f"{n} {'z+items' if i else 'z'}" for n, _, i in variants) + " |")
        print("|---|" + "---|" * len(variants))
        for method, row in cells.items():
            print(f"| {method} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
