"""Dump throughput against a bare batched forward over the same rows.

    python benchmarks/bench_dump.py --model data/models/tiny-llava --benchmark data/benchmark \\
        [--task vqa] [--items 64] [--top-k 4] [--batch-size 64] [--threads 1] [--device cpu]

Rows are (item, condition) pairs: items x (top_k + 1). ``dump`` is ``pipeline.method.dump.dump_activations``
into a temporary store (head substitution hooks, FFN capture that stops after the last layer,
DVP projection, the gradient pass, Zarr writes); ``bare forward`` runs ``model(**inputs)`` on the
same batches without hooks (input building included in both; the fastest of ``--repeats``). The dump's two model parts are
timed apart: ``capture_block`` (z under every condition) and ``item_arrays`` (one forward and
backward per item: atp, the log-probability DVP, act(gate) statistics). The gradient pass's
memory is the bytes autograd saves for the backward in one batch of ``--gradient-batch-size``
items (``torch.autograd.graph.saved_tensors_hooks``, distinct storages), printed beside the
estimate command's formula for the same model and sequence length. Skips politely when the
folders are absent. Not run by CI.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _common import load_model_and_items, model_task_parser, require, table


def main(argv=None) -> int:
    p = model_task_parser(
        __doc__,
        items=64,
        threads=1,
        repeats=3,
        repeats_help="z capture and bare forward: the fastest of this many runs",
    )
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument(
        "--heads-from",
        type=Path,
        default=None,
        help="a heads scores.parquet (data/heads/<model>/<task>/): its top-k heads instead of spread ones",
    )
    p.add_argument("--gradient-batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if not require(args.model, args.benchmark):
        return 0

    import pandas as pd
    import torch

    from pipeline.method.dump import (
        DumpExecution,
        DumpRequest,
        DumpStorage,
        capture_block,
        dump_activations,
        item_arrays,
        item_targets,
    )
    from pipeline.tasks.items import item_prompts, teacher_forced_answers

    adapter, images, items = load_model_and_items(args)
    L, H = adapter.num_layers, adapter.num_heads
    heads = [(l, h) for l in range(L) for h in range(H)][:: max(1, (L * H) // args.top_k)][: args.top_k]
    if args.heads_from is not None:
        from pipeline.method.heads import top_heads

        top = top_heads(pd.read_parquet(args.heads_from), args.top_k)
        heads = [(int(l), int(h)) for l, h in zip(top["layer"], top["head"])]
    heads_df = pd.DataFrame({"layer": [l for l, _ in heads], "head": [h for _, h in heads], "score": 1.0})
    C = len(heads) + 1
    rows = len(items) * C

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_dump_") as tmp:
        # Warm-up (allocator, kernels) on a few items.
        dump_activations(
            adapter,
            DumpRequest(items.head(2), images, heads_df, caption_idf=True),
            Path(tmp) / "warm.zarr",
            DumpStorage(dtype="float32", params_hash="w", attrs={}),
            DumpExecution(args.batch_size),
        )
        sync()
        t0 = time.perf_counter()
        dump_activations(
            adapter,
            DumpRequest(items, images, heads_df, caption_idf=True),
            Path(tmp) / "bench.zarr",
            DumpStorage(dtype="float32", params_hash="b", attrs={}),
            DumpExecution(args.batch_size, args.gradient_batch_size),
        )
        sync()
        t_dump = time.perf_counter() - t0

    imgs = [images[i] for i in items["image_id"]]
    prompts = item_prompts(items)
    answers = teacher_forced_answers(items)
    ids, weights = item_targets(adapter.tokenizer, items)
    row_heads = [None] + [tuple(h) for h in heads]
    pairs = [(i, c) for i in range(len(items)) for c in range(C)]

    def bare_forward():
        with torch.no_grad():
            for s in range(0, len(pairs), args.batch_size):
                batch = pairs[s : s + args.batch_size]
                inputs = adapter.build_inputs([imgs[i] for i, _ in batch], [prompts[i] for i, _ in batch])
                adapter.model(**inputs.tensors)

    def fastest(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    t_capture = fastest(lambda: capture_block(adapter, imgs, prompts, row_heads, args.batch_size))
    t_capture_full = fastest(
        lambda: capture_block(adapter, imgs, prompts, row_heads, args.batch_size, share_prefix=False)
    )
    t_bare = fastest(bare_forward)
    t0 = time.perf_counter()
    item_arrays(adapter, imgs, prompts, answers, ids, weights, args.gradient_batch_size)
    sync()
    t_arrays = time.perf_counter() - t0

    saved: dict[tuple, int] = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:  # tensors without storage (e.g. sparse or wrapper subclasses)
            pass
        return t

    g = args.gradient_batch_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        item_arrays(adapter, imgs[:g], prompts[:g], answers[:g], ids[:g], weights[:g], g)
    seq = adapter.build_inputs(imgs[:g], prompts[:g], answers=answers[:g]).input_ids.shape[1]
    t = adapter.text_config
    b = adapter.model.dtype.itemsize
    formula = g * seq * L * ((12 * t.hidden_size + 7 * adapter.ffn_width) * b // 2 + 2 * t.hidden_size * 4)
    formula += g * seq * t.vocab_size * (b + 4)

    results.append(("dump (dump_activations)", rows, t_dump, rows / t_dump, len(items) / t_dump))
    results.append(
        ("  z under every condition (capture_block)", rows, t_capture, rows / t_capture, len(items) / t_capture)
    )
    results.append(
        (
            "  the same, no shared prefix (share_prefix=False)",
            rows,
            t_capture_full,
            rows / t_capture_full,
            len(items) / t_capture_full,
        )
    )
    results.append(
        ("  gradient pass (item_arrays)", len(items), t_arrays, len(items) / t_arrays, len(items) / t_arrays)
    )
    results.append(("bare batched forward", rows, t_bare, rows / t_bare, len(items) / t_bare))
    print(
        f"{args.model} ({L} layers x {adapter.ffn_width} neurons), task {args.task}, {len(items)} items x {C} "
        f"conditions (heads {heads}), batch {args.batch_size}, {args.device} {args.dtype}, {args.threads} thread(s)"
    )
    print(table(("path", "rows", "seconds", "rows/s", "items/s"), results))
    print(
        f"dump / bare time: {t_dump / t_bare:.2f}x; gradient pass / z capture time: {t_arrays / t_capture:.2f}x; "
        f"z capture rows/s over the bare forward's: {t_bare / t_capture:.2f}x (no shared prefix: "
        f"{t_bare / t_capture_full:.2f}x)"
    )
    print(
        f"gradient pass, one batch of {g} items x {seq} tokens: autograd saved {sum(saved.values()) / 2**20:.2f} MiB; "
        f"the estimate command's formula gives {formula / 2**20:.2f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
