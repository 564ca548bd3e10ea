"""The GPU path end to end: the pretrained graph through `dvc repro` on CUDA in bfloat16, then
each model stage's throughput against a bare batched forward of the same rows.

    python benchmarks/gpu_check.py                                   # random tiny Qwen2.5-VL, cuda, bfloat16
    python benchmarks/gpu_check.py --model /models/llava-1.5-7b-hf   # a real checkpoint folder
    python benchmarks/gpu_check.py --device cpu                      # the same on the CPU (a dry run)

Steps, all in a temporary copy of the project (its own git + DVC repository):
1. the model: ``--model`` (a ``save_pretrained`` folder), or a random tiny model of ``--family``
   with its real processor, saved as ``tests/e2e`` saves it;
2. `dvc repro` of the whole graph for that model alone (``tests/e2e/params_small.yaml`` sizes,
   ``--items`` per task and split), ``device: --device``, ``dtype: --dtype``;
3. from the stages' timing records: rows/s and peak GPU memory of heads, dump, ablation and
   evaluate (wall time from process start: imports and model loading included);
4. a bare batched forward of the same kind of rows (``runtime.batch_sequences`` a batch, the
   benchmark's discovery VQA items, no hooks) in the same process as nothing else: rows/s and
   peak GPU memory. The ratio says how much of the GPU the stages' own work leaves unused.

Prints one Markdown table. Needs no network; tests never run it. Exit code 1 when a stage fails
(its output is printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, table

sys.path.insert(0, str(REPO / "tests" / "e2e"))

STAGES = ("heads", "dump", "ablation", "evaluate")
NAME = "checked"


def _params(folder: Path, args) -> dict:
    import yaml

    from stages.profile import merged

    params = merged(
        yaml.safe_load((REPO / "params.yaml").read_text()),
        yaml.safe_load((REPO / "tests/e2e/params_small.yaml").read_text()),
    )
    n = args.items
    return merged(
        params,
        {
            "trained_models": [],
            "pretrained_models": [NAME],
            "studied_models": [NAME],
            "models": {NAME: {"source": "pretrained", "path": str(folder), "dtype": args.dtype, "device": args.device}},
            "runtime": {"batch_sequences": args.batch_sequences, "workers": 1},
            "benchmark": {"synthetic": {"n_images": {"train": 16, "discovery": n, "dev": n, "test": n}}},
            "heads": {"max_items": n},
            "dump": {"max_items": n},
            "evaluate": {"max_items": n},
            "steer": {"max_items": n},
        },
    )


def _drop_other_models(params: dict) -> dict:
    params["models"] = {NAME: params["models"][NAME]}
    return params


def bare_forward(folder: Path, args) -> tuple[float, float | None, int]:
    """(rows/s, peak GPU MiB, rows) of plain batched forwards over VQA prompts of the benchmark."""
    import torch

    from pipeline.model.adapter import ModelAdapter
    from pipeline.tasks.items import ImageTable, read_annotations

    bench = args.repo / "data" / "benchmark"
    items = read_annotations(bench / "annotations.parquet", splits=("discovery",), tasks=("vqa",))
    images = ImageTable(bench / "images.parquet")
    adapter = ModelAdapter.load(str(folder), dtype=args.dtype, device=args.device)
    rows = [(images[r.image_id], r.prompt) for r in items.itertuples()]
    reps = max(1, args.batch_sequences // max(1, len(rows)))
    batch = (rows * reps)[: args.batch_sequences]
    inputs = adapter.build_inputs([im for im, _ in batch], [p for _, p in batch])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        adapter.model(**inputs.tensors)  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            adapter.model(**inputs.tensors)
        sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return len(batch) * args.repeats / seconds, peak, len(batch) * args.repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a save_pretrained folder (default: a random tiny one)")
    p.add_argument("--family", default="qwen2_5_vl", help="tests/tiny_models.FACTORIES key, without --model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--items", type=int, default=16, help="items per task and split")
    p.add_argument("--batch-sequences", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed bare forwards")
    p.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    args = p.parse_args()

    from e2e_support import benchmark_words, dvc, new_repo, save_model

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder = args.model
        params = _params(folder or work / "model", args)
        if folder is None:
            folder = work / "model"
            save_model(
                folder, args.family, seed=0, words=benchmark_words(params["benchmark"]["synthetic"], work / "words")
            )
        args.repo = new_repo(work / "repo", _drop_other_models(params))
        t0 = time.perf_counter()
        try:
            dvc(args.repo, "repro")
        except AssertionError as exc:
            print(exc)
            sys.exit(1)
        total = time.perf_counter() - t0
        records = {}
        for path in (args.repo / "timings").glob("*.json"):
            r = json.loads(path.read_text())
            kind = r["stage"].split("@")[0]
            if kind in STAGES:
                acc = records.setdefault(kind, [0.0, 0, 0.0])
                acc[0] += r["wall_s"]
                acc[1] += r["rows"] or 0
                acc[2] = max(acc[2], r.get("peak_gpu_mib") or 0.0)
        bare_rate, bare_peak, bare_rows = bare_forward(folder, args)
    rows = [
        (kind, wall, n, n / wall if wall else 0.0, n / wall / bare_rate if wall else 0.0, peak or "")
        for kind, (wall, n, peak) in sorted(records.items())
    ]
    rows.append(("bare forward", bare_rows / bare_rate, bare_rows, bare_rate, 1.0, bare_peak or ""))
    print(f"{folder} ({args.dtype} on {args.device}); dvc repro of the whole graph: {total:.0f} s")
    print(table(("stage", "wall s", "rows", "rows/s", "of bare forward", "peak GPU MiB"), rows))
    if args.device.startswith("cuda"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"], check=False)


if __name__ == "__main__":
    main()
