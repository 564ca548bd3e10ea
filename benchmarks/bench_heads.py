"""Head localisation: all heads batched (``score_heads``), with and without the shared prefix, against one pass per head (``score_heads_naive``).

    python benchmarks/bench_heads.py --model data/models/tiny-llava --benchmark data/benchmark \\
        [--task vqa] [--items 16] [--utility teacher_forced] [--batch-size 64] [--max-heads N]

All compute S_t(l, h) on the same subset; the table gives the time of each, the speed-up over
the naive loop (the same batch size) and the largest score difference from it (they must agree).
"shared prefix" computes the vision tower and the layers below each batch's lowest head once
per item (single-forward utilities: teacher_forced, and retrieval's margins whatever the
utility); "no shared prefix" is every row in full. Skips politely when the folders are absent.
Not run by CI.
"""

from __future__ import annotations

import sys
import time

from _common import load_model_and_items, model_task_parser, require, table


def main(argv=None) -> int:
    p = model_task_parser(
        __doc__, items=16, threads=1, repeats=3, repeats_help="time each path this many times, keep the fastest"
    )
    p.add_argument("--utility", choices=("generative", "teacher_forced"), default="teacher_forced")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-heads", type=int, default=None, help="score only the first N heads (all paths)")
    args = p.parse_args(argv)
    if not require(args.model, args.benchmark):
        return 0

    import torch

    from pipeline.method.heads import all_heads, score_heads, score_heads_naive

    adapter, images, items = load_model_and_items(args)
    heads = all_heads(adapter.num_layers, adapter.num_heads)[: args.max_heads]
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, utility=args.utility, heads=heads)
    score_heads(adapter, args.task, items.head(1), images, **{**kw, "heads": heads[:1]})  # warm-up
    timings = {}
    scores = {}
    paths = (
        ("batched, shared prefix", lambda *a, **k: score_heads(*a, **k)),
        ("batched, no shared prefix", lambda *a, **k: score_heads(*a, **k, share_prefix=False)),
        ("naive (score_heads_naive)", score_heads_naive),
    )
    for _ in range(args.repeats):  # interleaved, so that a busy spell on a shared machine hits every path
        for name, fn in paths:
            t0 = time.perf_counter()
            scores[name] = fn(adapter, args.task, items, images, **kw)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - t0)
    naive_name = "naive (score_heads_naive)"
    naive = timings[naive_name]
    ref = scores[naive_name]["score"].to_numpy()
    rows = [
        (k, len(items), len(heads), t, naive / t, float(abs(scores[k]["score"].to_numpy() - ref).max()))
        for k, t in timings.items()
    ]
    print(
        f"{args.model}, task {args.task}, {len(items)} items, {len(heads)} heads, utility {args.utility}, "
        f"batch {args.batch_size}, {args.device}, {args.threads} thread(s), fastest of {args.repeats}"
    )
    print(table(("path", "items", "heads", "seconds", "speed-up vs naive", "max |score - naive|"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
