"""Training and evaluation speed on a shared CPU: alone, and beside busy processes.

    python benchmarks/bench_shared_cpu.py [--busy 2] [--steps 30] [--threads 2] [--model tiny-llava]

Each measurement runs in a fresh process (the OpenMP runtime reads its settings when torch is
imported), with ``--busy`` pure-Python busy loops started beside it or not, under each of
``--settings``: OpenMP's own default (threads spin before they sleep) or the given
``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` (torch is imported before ``stages``, so the choice
``stages/__init__.py`` makes does not apply here). Measured: language-phase training steps/s of the untrained
default model (``bench_train``'s cached + bucketed path) and likelihood rows/s of
``evaluate_task`` over test items. The ratio "alone / loaded" is the slowdown; with ``--busy``
processes on ``nproc`` cores, a fair share of the CPU predicts about (busy + threads) / nproc.
Needs ``data/benchmark`` (``dvc repro benchmark``). Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import REPO, table

_CHILD = r"""
import json, logging, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
logging.basicConfig(level=logging.WARNING)
import numpy as np, torch
from dataclasses import replace
from pathlib import Path
import bench_train
from pipeline.model import default as dm
from pipeline.model.adapter import ModelAdapter
from pipeline.model.evaluation import evaluate_task
from pipeline.tasks.items import read_annotations, training_examples, ImageTable
from stages.params import load_params_file

torch.set_num_threads({threads})
bench = Path({benchmark!r})
spec = load_params_file(Path({repo!r}) / "params.yaml").models[{model!r}].spec
data = dm._read_train_split(bench)
spec = replace(spec, image_size=dm._image_size(data))
ids = sorted(data.train["image_id"].unique())[:300]
train = data.train[data.train["image_id"].isin(ids)]
decoded = dm._decode_images(data.images, train["image_id"])
rng = np.random.default_rng(0)
fresh = training_examples(train, rng, caption_reference="sampled")
n = ({steps} + bench_train.WARMUP) * spec.batch_size
examples = dm._length_bucketed([fresh[i] for i in rng.choice(len(fresh), size=n, replace=False)], spec.batch_size, rng)
model, processor = dm._build_untrained(spec, data.annotations, "cpu")
adapter = ModelAdapter.from_model(model, processor)
with dm.FrozenVisionCache(model, processor, decoded).installed():
    train_rate = bench_train._steps_per_second(adapter, spec, [examples[i:i + spec.batch_size] for i in range(0, n, spec.batch_size)], decoded)
model.eval()
items = read_annotations(bench / "annotations.parquet", splits=("test",), tasks=("vqa",)).head({items})
images = ImageTable(bench / "images.parquet")
evaluate_task(adapter, "vqa", items.head(8), images, batch_size=64, utility="likelihood")
t0 = time.perf_counter()
evaluate_task(adapter, "vqa", items, images, batch_size=64, utility="likelihood")
print(json.dumps({{"train_steps_per_s": train_rate, "eval_items_per_s": len(items) / (time.perf_counter() - t0)}}))
"""


OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def measure(args, setting: str, busy: int) -> dict:
    """``setting``: "default" (OpenMP's own), or ``NAME=VALUE[,NAME=VALUE]`` of ``OMP_KEYS``."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    if setting != "default":
        env.update(pair.split("=", 1) for pair in setting.split(","))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        code = _CHILD.format(
            repo=str(REPO),
            bench=str(REPO / "benchmarks"),
            threads=args.threads,
            benchmark=str(args.benchmark),
            model=args.model,
            steps=args.steps,
            items=args.items,
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default=str(REPO / "data" / "benchmark"))
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--busy", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--settings",
        nargs="+",
        default=["default", "OMP_WAIT_POLICY=PASSIVE"],
        help='"default" or NAME=VALUE[,NAME=VALUE] of OMP_WAIT_POLICY, GOMP_SPINCOUNT',
    )
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.benchmark, "annotations.parquet")):
        print(f"skipped: {args.benchmark}/annotations.parquet not found; build it with `dvc repro benchmark`")
        return 0
    rows = []
    for setting in args.settings:
        alone = measure(args, setting, 0)
        loaded = measure(args, setting, args.busy)
        rows.append(
            (
                setting,
                alone["train_steps_per_s"],
                loaded["train_steps_per_s"],
                alone["train_steps_per_s"] / loaded["train_steps_per_s"],
                alone["eval_items_per_s"],
                loaded["eval_items_per_s"],
                alone["eval_items_per_s"] / loaded["eval_items_per_s"],
            )
        )
    print(
        f"{args.model}, {args.threads} torch threads, {os.cpu_count()} CPUs, {args.busy} busy processes beside "
        f"it when loaded; fair-share slowdown about {(args.busy + args.threads) / (os.cpu_count() or 1):.1f}x"
    )
    print(
        table(
            ("OpenMP setting", "train steps/s alone", "loaded", "slowdown", "eval items/s alone", "loaded", "slowdown"),
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
