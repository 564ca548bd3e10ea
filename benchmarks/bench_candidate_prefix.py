"""Retrieval candidates after their shared prefix against every candidate in full.

    python benchmarks/bench_candidate_prefix.py [--model data/models/tiny-llava]
        [--masks data/masks/tiny-llava.parquet] [--items 10] [--threads 2] [--repeats 2]

Runs the retrieval work of two stages both ways, in one process: the heads stage's exhaustive
sweep (every head substituted, ``score_heads_per_item``, on the first ``--items`` discovery
items) and the evaluate stage's likelihood of every mask of ``--masks`` (``run_suppression_job``
on the first ``--items`` test items). "full" runs every (item, candidate, condition) row in
full, sharing the vision tower and the layers below each batch's lowest intervention across
conditions (the path before ``pipeline.model.hooks.candidates``); "shared" runs each item's
candidates under one condition after one pass over the prefix they share. Prints the wall
seconds (fastest of ``--repeats``), rows/s, the speed-up and the largest difference between
the two ways' results (head scores; per-item likelihoods). Needs the default's models and
masks (``dvc repro masks``). Not run by CI.

``--image-tokens N --candidates K`` instead times a model of a real VLM's shape on the CPU: a
random LLaVA of the default's text size whose image is N tokens (576: LLaVA-1.5's), retrieval
items of K candidates (50: the paper's COCO setup; the benchmark's captions, repeated), the
likelihood under ``--conditions`` neuron-zeroing conditions, both ways.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
from _common import REPO, load_model_and_images, require, table


def main() -> None:
    from pipeline.method.heads import score_heads_per_item
    from pipeline.outcomes.suppression import mask_conditions, run_suppression_job, suppression_jobs
    from pipeline.tasks.items import read_annotations

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "data" / "models" / "tiny-llava")
    p.add_argument("--masks", type=Path, default=None, help="default: data/masks/<model name>.parquet")
    p.add_argument("--benchmark", type=Path, default=REPO / "data" / "benchmark")
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--image-tokens", type=int, default=None, help="time a random LLaVA with this many image tokens")
    p.add_argument("--candidates", type=int, default=50, help="with --image-tokens: candidates per retrieval item")
    p.add_argument("--conditions", type=int, default=4, help="with --image-tokens: neuron-zeroing conditions")
    args = p.parse_args()
    if args.image_tokens is not None:
        synthetic(args)
        return
    masks = args.masks or REPO / "data" / "masks" / f"{args.model.name}.parquet"
    if not require(args.model, args.benchmark) or not masks.is_file():
        return
    adapter, images = load_model_and_images(args.model, args.benchmark, args.threads)
    notes = read_annotations(args.benchmark / "annotations.parquet")
    retrieval = notes[notes["task"] == "retrieval"]
    discovery = retrieval[retrieval["split"] == "discovery"].head(args.items).reset_index(drop=True)
    test = retrieval[retrieval["split"] == "test"].head(args.items).reset_index(drop=True)
    conditions = mask_conditions(pd.read_parquet(masks))

    def heads() -> np.ndarray:
        scores, _, _ = score_heads_per_item(adapter, "retrieval", discovery, images, batch_size=args.batch_size)
        return scores["score"].to_numpy()

    def evaluate() -> np.ndarray:
        (job,) = [j for j in suppression_jobs(test, conditions, generative=False) if j.eval_task == "retrieval"]
        out = run_suppression_job(
            (adapter, images), job, items=test, conditions=conditions, batch_size=args.batch_size, max_new_tokens=None
        )
        return np.stack([r.per_item for _, per in sorted(out.items()) for _, r in sorted(per.items())])

    rows = []
    for what, work in (("heads (every head substituted)", heads), ("evaluate (every mask, likelihood)", evaluate)):
        result, seconds, n_rows = both_ways(work, args.repeats)
        diff = float(np.max(np.abs(result["full"] - result["shared"])))
        for way in ("full", "shared"):
            rows.append(
                (
                    what,
                    way,
                    round(seconds[way], 2),
                    n_rows[way],
                    n_rows[way] / seconds[way],
                    f"{seconds['full'] / seconds[way]:.2f}x",
                    f"{diff:.2g}" if way == "shared" else "",
                )
            )
    print(f"{args.model.name}: {args.items} retrieval items, {len(conditions)} masks, {args.threads} threads")
    print(table(("work", "way", "s", "rows", "rows/s", "speed-up", "max |difference|"), rows))


def both_ways(work: Callable[[], np.ndarray], repeats: int) -> tuple[dict, dict, dict]:
    """({way: work()'s result}, {way: fastest wall seconds of ``repeats``}, {way: rows run}) for
    way "full" (candidate sharing switched off) and "shared"."""
    from pipeline.model import evaluation
    from pipeline.model.batching import rows_completed

    result, seconds, n_rows = {}, {}, {}
    for way in ("full", "shared"):
        families = frozenset() if way == "full" else evaluation.CANDIDATE_PREFIX_FAMILIES
        best = float("inf")
        for _ in range(repeats):
            before = rows_completed()
            with mock.patch.object(evaluation, "CANDIDATE_PREFIX_FAMILIES", families):
                start = time.perf_counter()
                result[way] = work()
                best = min(best, time.perf_counter() - start)
            n_rows[way] = rows_completed() - before
        seconds[way] = best
    return result, seconds, n_rows


def synthetic(args: argparse.Namespace) -> None:
    """Retrieval on a random LLaVA whose image is ``--image-tokens`` tokens, both ways."""
    import math
    import warnings

    import torch

    from pipeline.model import evaluation
    from pipeline.model.adapter import ModelAdapter
    from pipeline.model.default import (
        DefaultModelSpec,
        benchmark_vocabulary,
        build_model,
        build_processor,
        build_tokenizer,
    )
    from pipeline.model.hooks import condition_scales
    from pipeline.tasks.items import ImageTable, read_annotations

    side = math.isqrt(args.image_tokens)
    if side * side != args.image_tokens:
        raise SystemExit(f"--image-tokens {args.image_tokens} must be a square (a side of patches)")
    torch.set_num_threads(args.threads)
    notes = read_annotations(args.benchmark / "annotations.parquet")
    spec = DefaultModelSpec(family="llava", patch_size=4, image_size=4 * side, vision_layers=2, seed=0)
    tokenizer = build_tokenizer(benchmark_vocabulary(notes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(tokenizer, spec).eval()
    adapter = ModelAdapter.from_model(model, build_processor(tokenizer, spec))
    images = ImageTable(args.benchmark / "images.parquet")
    retrieval = notes[(notes["task"] == "retrieval") & (notes["split"] == "test")].head(args.items)
    pool = [c for cands in retrieval["candidates"] for c in cands]
    items = retrieval.reset_index(drop=True).copy()
    items["candidates"] = [[pool[(i * 7 + k) % len(pool)] for k in range(args.candidates)] for i in range(len(items))]
    items["positive_index"] = 0
    rng = np.random.default_rng(0)
    L, I = adapter.num_layers, adapter.ffn_width
    conditions = [{}] + [
        {(int(l), int(n)): 0.0 for l, n in zip(rng.integers(0, L, 20), rng.integers(0, I, 20))}
        for _ in range(args.conditions - 1)
    ]
    hooks = condition_scales(adapter, conditions)

    def likelihoods() -> np.ndarray:
        out = evaluation.evaluate_task(
            adapter,
            "retrieval",
            items,
            images,
            batch_size=args.batch_size,
            utility="likelihood",
            n_conditions=len(conditions),
            condition_hooks=hooks,
            progress=False,
        )
        return np.stack([r.per_item for r in out])

    result, seconds, n_rows = both_ways(likelihoods, args.repeats)
    diff = float(np.max(np.abs(result["full"] - result["shared"])))
    print(
        f"random LLaVA, {args.image_tokens} image tokens, text hidden {spec.text_hidden} x {spec.text_layers} layers; "
        f"{len(items)} items x {args.candidates} candidates x {len(conditions)} conditions, batch {args.batch_size}, "
        f"{args.threads} threads"
    )
    rows = [
        (way, round(seconds[way], 2), n_rows[way], n_rows[way] / seconds[way], f"{seconds['full'] / seconds[way]:.2f}x")
        for way in ("full", "shared")
    ]
    print(table(("way", "s", "rows", "rows/s", "speed-up"), rows))
    print(f"largest difference of the per-item likelihoods: {diff:.2g}")


if __name__ == "__main__":
    main()
