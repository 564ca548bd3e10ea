"""Training throughput of the default models' language phase: the frozen-tower cache and length-bucketed batches.

    python benchmarks/bench_train.py [--models tiny-llava tiny-idefics3] [--steps 60] [--images 2000] [--threads 2]

For each model (as params.yaml specifies it, untrained: a step costs the same), times
``--steps`` language steps (``_training_step``: inputs built by the processor, forward,
backward, clipping, AdamW) over the same training examples (one resampled pass over the train
rows of ``--images`` train images, as ``_refill_pool`` draws it), three ways:
- before: batches in the pass's random order, the real image processor and vision tower in
  every step;
- cached: the same batches with ``FrozenVisionCache`` installed (each image processed once,
  the frozen tower's outputs computed once up front);
- cached + bucketed: the same examples reordered by ``_length_bucketed`` (batches of similar
  length, so less padding).
The first 5 steps of each are not timed (allocator warm-up; the cache's lazy image
processing). Prints steps/s (a step is ``batch_size`` examples in every column, so steps/s
compare as examples/s), the speed-ups over "before", and the one-off cost of building the
cache per 1,000 images. Needs ``data/benchmark`` (``dvc repro benchmark``). Not run by CI.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import REPO, table

from pipeline.model import default as dm  # noqa: E402
from pipeline.model.adapter import ModelAdapter  # noqa: E402
from pipeline.tasks.items import training_examples  # noqa: E402
from stages.params import load_params_file  # noqa: E402

WARMUP = 5


def _steps_per_second(adapter, spec, batches, decoded) -> float:
    optimizer = dm._language_optimizer(adapter.model, spec)
    adapter.model.train()
    dm.vision_tower(adapter.model).eval()
    for k, batch in enumerate(batches):
        if k == WARMUP:
            t0 = time.perf_counter()
        dm._training_step(adapter, optimizer, batch, decoded, spec.lr)
    return (len(batches) - WARMUP) / (time.perf_counter() - t0)


def measure(name: str, spec, benchmark: Path, steps: int, n_images: int) -> tuple:
    data = dm._read_train_split(benchmark)
    spec = replace(spec, image_size=dm._image_size(data))
    ids = sorted(data.train["image_id"].unique())[:n_images]
    train = data.train[data.train["image_id"].isin(ids)]
    decoded = dm._decode_images(data.images, train["image_id"])
    rng = np.random.default_rng(0)
    fresh = training_examples(train, rng, caption_reference="sampled")
    n = (steps + WARMUP) * spec.batch_size
    examples = [fresh[i] for i in rng.choice(len(fresh), size=n, replace=False)]
    bucketed = dm._length_bucketed(examples, spec.batch_size, rng)
    as_batches = lambda ex: [ex[i : i + spec.batch_size] for i in range(0, n, spec.batch_size)]  # noqa: E731
    rates, build_s = [], 0.0
    for cached, order in ((False, examples), (True, examples), (True, bucketed)):
        model, processor = dm._build_untrained(spec, data.annotations, "cpu")  # same seed: same weights
        adapter = ModelAdapter.from_model(model, processor)
        if not cached:
            rates.append(_steps_per_second(adapter, spec, as_batches(order), decoded))
            continue
        t0 = time.perf_counter()
        cache = dm.FrozenVisionCache(model, processor, decoded)
        build_s = time.perf_counter() - t0
        with cache.installed():
            rates.append(_steps_per_second(adapter, spec, as_batches(order), decoded))
    return (
        name,
        spec.batch_size,
        rates[0],
        rates[1],
        rates[2],
        rates[1] / rates[0],
        rates[2] / rates[0],
        1000 * build_s / len(decoded),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-llava", "tiny-idefics3"])
    p.add_argument("--benchmark", type=Path, default=REPO / "data" / "benchmark")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.benchmark / "annotations.parquet").is_file():
        print(f"skipped: {args.benchmark}/annotations.parquet not found; build it with `dvc repro benchmark`")
        return 0
    torch.set_num_threads(args.threads)
    params = load_params_file(REPO / "params.yaml")
    rows = [measure(m, params.models[m].spec, args.benchmark, args.steps, args.images) for m in args.models]
    print(f"language steps, {args.steps} timed per run, {args.threads} threads, {args.images} images")
    print(
        table(
            (
                "model",
                "batch",
                "steps/s before",
                "steps/s cached",
                "steps/s cached + bucketed",
                "speed-up cached",
                "speed-up cached + bucketed",
                "cache build (s per 1,000 images)",
            ),
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
