"""Cost of the training checkpoints a killed ``train_default_model`` resumes from.

    python benchmarks/bench_checkpoint.py [--model tiny-llava] [--steps 120] [--every 20] [--threads 2]

Trains the default model ``--model`` as params.yaml specifies it, shortened to ``--steps``
language steps (and a tenth of that in vision warm-up steps), twice: without checkpoints and
with a checkpoint every ``--every`` steps. Prints both wall times, the time of one save, the
checkpoint's size, and the overhead that one save per ``runtime.checkpoint_every_steps``
steps adds to training (the save's time over that many steps' time). Needs ``data/benchmark``
(``dvc repro benchmark``). Not run by CI.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch  # noqa: E402
from _common import REPO, table

from pipeline.model.default import CHECKPOINT_FILE, train_default_model  # noqa: E402
from stages.params import load_params_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--benchmark", type=Path, default=REPO / "data" / "benchmark")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.benchmark / "annotations.parquet").is_file():
        print(f"skipped: {args.benchmark} not found; build it with `dvc repro benchmark`")
        return 0
    params = load_params_file(REPO / "params.yaml")
    torch.set_num_threads(args.threads)
    cfg = params.models[args.model]
    spec = replace(
        cfg.spec, steps=args.steps, vision_warmup_steps=max(1, args.steps // 10), warmup_steps=max(1, args.steps // 10)
    )
    default_every = params.runtime.checkpoint_every_steps
    walls: dict[int, list[float]] = {0: [], args.every: []}
    saves: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        # Alternated, twice each: the first run of a process pays one-off start-up costs.
        for every in (0, args.every, 0, args.every):
            out = Path(tmp) / f"every{every}"
            stamps: list[float] = []
            t0 = time.perf_counter()
            train_default_model(
                spec,
                args.benchmark,
                out,
                name=args.model,
                resume_key="bench",
                checkpoint_every=every,
                on_checkpoint=lambda phase, step: stamps.append(time.perf_counter()),
            )
            walls[every].append(time.perf_counter() - t0)
            saves[every] = len(stamps)
        rows = [
            (
                f"checkpoint every {e} steps" if e else "no checkpoints",
                min(w),
                saves[e],
                ", ".join(f"{x:.1f}" for x in w),
            )
            for e, w in walls.items()
        ]
        # The per-save time: a save of the finished model's state, timed alone (the same tensors).
        from pipeline.model.adapter import ModelAdapter

        model = ModelAdapter.load(str(Path(tmp) / "every0")).model
        opt = torch.optim.AdamW(model.parameters())
        for q in model.parameters():
            opt.state[q] = {
                "step": torch.tensor(1.0),
                "exp_avg": torch.zeros_like(q),
                "exp_avg_sq": torch.zeros_like(q),
            }
        state = {
            "model": model.state_dict(),
            "gradients": {n: torch.zeros_like(q) for n, q in model.named_parameters()},
            "optimizer": opt.state_dict(),
        }
        path = Path(tmp) / CHECKPOINT_FILE
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.save(state, path)
            times.append(time.perf_counter() - t0)
        save_s, size = sorted(times)[2], path.stat().st_size
    steps_total = args.steps + spec.vision_warmup_steps
    step_s = rows[0][1] / steps_total
    print(
        f"{args.model}: {steps_total} steps ({spec.vision_warmup_steps} warm-up + {args.steps} language), "
        f"{args.threads} threads"
    )
    print(table(("run", "wall s (min)", "saves", "each run"), rows))
    print(
        f"one save: {save_s:.3f} s (median of 5), {size / 2**20:.1f} MiB; training step {step_s:.3f} s "
        f"(wall / steps, including start-up)"
    )
    print(
        f"measured overhead with a save every {args.every} steps: "
        f"{(rows[1][1] - rows[0][1]) / rows[0][1] * 100:+.1f}% of wall time"
    )
    print(
        f"at runtime.checkpoint_every_steps = {default_every}: {save_s / (default_every * step_s) * 100:.2f}% "
        "(one save's time over that many steps' time)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
