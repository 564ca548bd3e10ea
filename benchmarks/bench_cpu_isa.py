"""What pinning the CPU kernels to AVX2 costs (``stages/__init__.py``), and what it changes.

    python benchmarks/bench_cpu_isa.py [--model tiny-llava] [--repeats 2] [--steps 120]

Runs, alternating, in fresh processes under the pin (the stages' default) and with
``HONES_CPU_ISA=native``: the real ``model_quality`` stage on a trained model (every task's
generative and likelihood pass over the held-out split: the forward passes the analysis stages
run) and a short training of the untrained default model (``--steps`` language steps after half
as many vision warm-up steps). Prints seconds per run, the ratio native / pinned, and whether the
two settings give the same metrics and weights (on an AVX2-only CPU both settings run the same
kernels). Needs ``data/benchmark`` and ``data/models/<model>`` (``dvc repro``). Not run by CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, require, table

_TRAIN = r"""
import hashlib, json, sys, time
sys.path.insert(0, {repo!r})
import stages  # noqa: F401  (the stages' environment)
import torch
torch.set_num_threads({threads})
from pathlib import Path
from stages.params import load_params_file
from dataclasses import replace
from pipeline.model.default import train_default_model
spec = load_params_file(Path({repo!r}) / "params.yaml").models[{model!r}].spec
spec = replace(spec, vision_warmup_steps={steps} // 2, steps={steps})
t = time.perf_counter()
train_default_model(spec, Path({benchmark!r}), Path({out!r}), name="bench")
print(json.dumps({{"s": time.perf_counter() - t, "kernels": torch.backends.cpu.get_cpu_capability(),
                  "weights": hashlib.sha256((Path({out!r}) / "model.safetensors").read_bytes()).hexdigest()[:16]}}))
"""


def _env(setting: str, timings: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "NPY_DISABLE_CPU_FEATURES"}
    }
    return {**env, "HONES_CPU_ISA": setting, "HONES_TIMINGS": str(timings)}


def quality_run(setting: str, model: str, benchmark: Path, work: Path) -> tuple[float, str, str]:
    """(seconds, torch's capability, sha of the metrics JSON) of one model_quality stage run."""
    out = work / f"quality-{setting}.json"
    timings = work / f"timings-{setting}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.model_quality",
            "--model",
            model,
            "--benchmark",
            str(benchmark),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**_env(setting, timings), "DVC_STAGE": "bench"},
        check=True,
        capture_output=True,
    )
    record = json.loads(next(timings.glob("*.json")).read_text())
    return record["wall_s"], record["cpu_kernels"], hashlib.sha256(out.read_bytes()).hexdigest()[:16]


def train_run(setting: str, model: str, benchmark: Path, work: Path, steps: int, threads: int) -> dict:
    script = _TRAIN.format(
        repo=str(REPO),
        threads=threads,
        model=model,
        steps=steps,
        benchmark=str(benchmark),
        out=str(work / f"train-{setting}-{time.time_ns()}"),
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=_env(setting, work / "t"),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava", help="a trained model under data/models")
    p.add_argument("--benchmark", type=Path, default=REPO / "data/benchmark")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not require(REPO / "data/models" / args.model, args.benchmark):
        return
    rows, outcomes = [], {"avx2": {}, "native": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        secs = {(k, s): [] for k in ("model_quality", "training") for s in ("avx2", "native")}
        for r in range(args.repeats):
            for setting in ("avx2", "native") if r % 2 == 0 else ("native", "avx2"):
                (work / f"timings-{setting}").mkdir(exist_ok=True)
                for f in (work / f"timings-{setting}").glob("*"):
                    f.unlink()
                wall, kernels, metrics = quality_run(setting, args.model, args.benchmark, work)
                secs["model_quality", setting].append(wall)
                trained = train_run(setting, args.model, args.benchmark, work, args.steps, args.threads)
                secs["training", setting].append(trained["s"])
                outcomes[setting] = {"kernels": kernels, "metrics": metrics, "weights": trained["weights"]}
                print(f"repeat {r} {setting}: model_quality {wall:.1f} s, training {trained['s']:.1f} s", flush=True)
        for what in ("model_quality", "training"):
            pinned, native = statistics.median(secs[what, "avx2"]), statistics.median(secs[what, "native"])
            rows.append((what, f"{pinned:.1f}", f"{native:.1f}", f"{pinned / native:.2f}"))
    print(table(("run", "pinned AVX2 (s, median)", "native (s, median)", "pinned / native"), rows))
    for key in ("kernels", "metrics", "weights"):
        print(f"{key}: pinned {outcomes['avx2'][key]}, native {outcomes['native'][key]}")


if __name__ == "__main__":
    main()
