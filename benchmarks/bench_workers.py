"""Worker processes against one process: the evaluate and ablation stages' work, both ways.

    python benchmarks/bench_workers.py [--model data/models/tiny-llava] [--masks data/masks/tiny-llava.parquet]
        [--items 6] [--ablation-items 2] [--threads 2] [--workers 2]

Runs, in one process of ``--threads`` torch threads and then over ``--workers`` spawned
processes sharing them (``pipeline.model.workers.map_jobs``), the same jobs the stages run:
- evaluate: every mask of ``--masks`` on the first ``--items`` test items of each task
  (``suppression_jobs``, 2 x workers shards per task when parallel);
- ablation: every single-neuron ablation on the first ``--ablation-items`` discovery VQA items
  (layers in 2 x workers shards when parallel).
Prints wall seconds (loading the model included, and the workers' start), rows/s and the
speed-up, and the largest difference between the two ways' results. Needs a trained model and
its masks (``dvc repro masks``). Not run by CI.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _common import REPO, load_model_and_images, require, table


def main() -> None:
    from pipeline.method.ablation import ablation_shard_job, merge_ablation_shards
    from pipeline.model.workers import map_jobs, split_threads
    from pipeline.outcomes.suppression import (
        mask_conditions,
        merge_suppression_scores,
        run_suppression_job,
        suppression_jobs,
    )
    from pipeline.tasks.items import read_annotations

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "data" / "models" / "tiny-llava")
    p.add_argument("--masks", type=Path, default=REPO / "data" / "masks" / "tiny-llava.parquet")
    p.add_argument("--benchmark", type=Path, default=REPO / "data" / "benchmark")
    p.add_argument("--items", type=int, default=6)
    p.add_argument("--ablation-items", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    if not require(args.model, args.benchmark) or not args.masks.is_file():
        return
    conditions = mask_conditions(pd.read_parquet(args.masks))
    notes = read_annotations(args.benchmark / "annotations.parquet")
    test = notes[notes["split"] == "test"].groupby("task", sort=False).head(args.items).reset_index(drop=True)
    discovery = notes[(notes["split"] == "discovery") & (notes["task"] == "vqa")].head(args.ablation_items)
    discovery = discovery.reset_index(drop=True)

    rows = []
    for what in ("evaluate", "ablation"):
        out = {}
        for workers in (1, args.workers):
            threads = args.threads if workers == 1 else split_threads(args.threads, workers)
            load = partial(load_model_and_images, args.model, args.benchmark, threads)
            start = time.perf_counter()
            if what == "evaluate":
                jobs = suppression_jobs(test, conditions, shards_per_task=1 if workers == 1 else 2 * workers)
                parts = map_jobs(
                    partial(
                        run_suppression_job,
                        items=test,
                        conditions=conditions,
                        batch_size=args.batch_size,
                        max_new_tokens=24,
                    ),
                    jobs,
                    load,
                    workers=workers,
                    threads=threads,
                    what=what,
                )
                scores = merge_suppression_scores(parts, test)
                values = np.concatenate(
                    [np.asarray(r.per_item, dtype=float) for by in scores.values() for r in by.values()]
                )
                n_rows = sum(len(cs) * (len(test[test["task"] == j.eval_task])) for j in jobs for _, cs in j.conditions)
            else:
                n = 1 if workers == 1 else 2 * workers
                parts = map_jobs(
                    partial(ablation_shard_job, items=discovery, batch_size=args.batch_size),
                    [(k, n) for k in range(n)],
                    load,
                    workers=workers,
                    threads=threads,
                    what=what,
                )
                effect, _ = merge_ablation_shards(parts)
                values = effect.ravel()
                n_rows = effect.size * len(discovery)
            out[workers] = (time.perf_counter() - start, values, n_rows)
        (t1, v1, n1), (tw, vw, _) = out[1], out[args.workers]
        rows.append((what, n1, f"{t1:.1f}", f"{tw:.1f}", f"{t1 / tw:.2f}x", f"{np.max(np.abs(v1 - vw)):.1e}"))
    print(
        f"1 process of {args.threads} threads vs {args.workers} workers; {args.items} test items per task, "
        f"{len(conditions)} masks; {args.ablation_items} ablation items"
    )
    print(
        table(
            ("work", "condition-items", "1 process (s)", f"{args.workers} workers (s)", "speed-up", "max |difference|"),
            rows,
        )
    )


if __name__ == "__main__":
    main()
