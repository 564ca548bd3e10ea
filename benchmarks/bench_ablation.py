"""Single-neuron ablation (the ground truth): shared prefix against every row in full.

    python benchmarks/bench_ablation.py --model data/models/tiny-llava --benchmark data/benchmark \\
        [--task vqa] [--items 2] [--batch-size 64] [--threads 2]

``neuron_ablation_effects`` runs one item per batch, each row zeroing its own neuron; with the
shared prefix (the default) the item's vision tower and the layers below the batch's lowest
ablated layer are computed once per batch, without it every row computes the whole model.
The table gives rows (items x neurons), seconds, rows/s, the speed-up and the largest
difference of the effects (they must agree). Skips politely when the folders are absent.
Not run by CI.
"""

from __future__ import annotations

import sys
import time

from _common import load_model_and_items, model_task_parser, require, table


def main(argv=None) -> int:
    p = model_task_parser(
        __doc__, items=2, threads=2, repeats=2, repeats_help="time each path this many times, keep the fastest"
    )
    args = p.parse_args(argv)
    if not require(args.model, args.benchmark):
        return 0

    import numpy as np
    import torch

    from pipeline.method.ablation import neuron_ablation_effects

    adapter, images, items = load_model_and_items(args)
    neuron_ablation_effects(adapter, items.head(1), images, batch_size=args.batch_size, layers=[0])  # warm-up
    rows = len(items) * adapter.num_layers * adapter.ffn_width
    timings, effects = {}, {}
    for _ in range(args.repeats):
        for name, share in (("shared prefix", True), ("every row in full", False)):
            t0 = time.perf_counter()
            effects[name], _ = neuron_ablation_effects(
                adapter, items, images, batch_size=args.batch_size, share_prefix=share
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - t0)
    full = timings["every row in full"]
    diff = float(np.abs(effects["shared prefix"] - effects["every row in full"]).max())
    print(
        f"{args.model} ({adapter.num_layers} layers x {adapter.ffn_width} neurons), task {args.task}, "
        f"{len(items)} items, batch {args.batch_size}, {args.device}, {args.threads} thread(s), "
        f"fastest of {args.repeats}"
    )
    print(
        table(
            ("path", "rows", "seconds", "rows/s", "speed-up"),
            [(k, rows, t, rows / t, full / t) for k, t in timings.items()],
        )
    )
    print(f"max |effect difference|: {diff:.3g} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
