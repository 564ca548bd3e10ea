"""The command line of ``python -m pipeline.tools.estimate``: the table (``human_count``,
``format_table``), the argument parser (``build_parser``) and the command (``main``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.method.store import human_bytes
from pipeline.tools.estimate.cost import Workload, estimate
from pipeline.tools.estimate.model_arch import DTYPE_BYTES, PRESETS, EstimateError, ModelArch, architecture, load_config

log = logging.getLogger(__name__)


def human_count(n: float) -> str:
    for unit, s in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= s:
            return f"{n / s:.2f}{unit}"
    return f"{n:.0f}"


Rows = list[tuple[str, str | None]]  # (label, value); value None: a section title on its own line


def _model_rows(est: dict, arch: ModelArch) -> Rows:
    t = arch.text
    rows: Rows = [
        ("model", None),
        (
            "language model",
            f"{t.layers} layers, {t.heads} heads ({t.kv_heads} kv), hidden {t.hidden}, FFN {t.ffn}, vocab {t.vocab}",
        ),
        (
            "vision tower",
            f"{arch.vision.kind}: {arch.vision.layers} layers, hidden {arch.vision.hidden}" if arch.vision else "none",
        ),
        (
            "parameters",
            f"{est['params']['total']:,} (text {est['params']['text']:,}, vision "
            f"{est['params']['vision']:,}, projector {est['params']['projector']:,})",
        ),
    ]
    for d in ("float32", "bfloat16", "int8"):
        label = "bfloat16 / float16" if d == "bfloat16" else d
        rows.append((f"weights {label}", human_bytes(est["weights_bytes"][d])))
    return rows


def _memory_rows(est: dict) -> Rows:
    """One forward batch and one batch of the dump's gradient pass."""
    w, bb, gb = est["workload"], est["batch_bytes"], est["gradient_batch_bytes"]
    return [
        (
            f"one batch: {w['batch_size']} rows x {est['seq_len']} tokens ({est['image_tokens']} image), {w['dtype']}",
            None,
        ),
        ("KV cache", human_bytes(bb["kv_cache"])),
        (
            "largest layer transients" + (" (eager attention)" if w["eager_attention"] else ""),
            human_bytes(bb["layer_transients"]),
        ),
        ("logits, all positions", human_bytes(bb["logits"])),
        ("vision tower transients", human_bytes(bb["vision_transients"])),
        ("weights + batch", human_bytes(est["weights_bytes"][w["dtype"]] + bb["total"])),
        (
            f"one batch of the dump's gradient pass: {w['gradient_batch_size']} items x {est['seq_len']} tokens, "
            f"{w['dtype']} (forward + backward)",
            None,
        ),
        ("activations saved for the backward", human_bytes(gb["saved_activations"])),
        ("logits + float32 log-softmax", human_bytes(gb["logits_and_log_softmax"])),
        ("weights + gradient batch", human_bytes(est["weights_bytes"][w["dtype"]] + gb["total"])),
    ]


def _store_rows(est: dict) -> Rows:
    w, st = est["workload"], est["store"]
    return [
        (
            f"activation store per task: {w['items']:,} items x {st['conditions']} conditions "
            f"(top_k {w['top_k']}), z in {w['store_dtype']}",
            None,
        ),
        ("z", human_bytes(st["z_bytes"])),
        ("per-item arrays (dvp, dvp_logprob, atp, gate statistics)", human_bytes(sum(st["item_array_bytes"].values()))),
        (
            "one task / all tasks",
            f"{human_bytes(st['task_bytes'])} / {human_bytes(st['all_tasks_bytes'])} ({w['tasks']} tasks)",
        ),
        ("chunks", f"{st['chunk_items']} item(s) = {human_bytes(st['chunk_bytes'])} per chunk"),
        ("write blocks", f"{st['blocks']:,} {'shards' if st['sharded'] else 'chunks'} of {st['block_items']} items"),
        (
            "files per task",
            f"{st['z_files'] + st['item_array_files']:,} (z {st['z_files']:,}, "
            f"per-item arrays {st['item_array_files']:,})",
        ),
    ]


def _compute_rows(est: dict) -> Rows:
    """Forward rows, model calls, FLOP and GPU-hours of each stage, with the shared prefix's saving."""
    w = est["workload"]
    rows: Rows = [
        (
            f"forward passes per task (rows; model calls at batch {w['batch_size']}); "
            f"{human_count(est['row_flops'])}FLOP per row; GPU-h at {w['effective_tflops']:g} TFLOP/s",
            None,
        )
    ]
    formulas = {
        "heads": {
            "guided": "items x (M + 1), M guided candidates",
            "screened": f"{w['screen_items']} screened items x (L*H + 1) + the others x (M + 1), M candidates",
        }.get(w["localisation"], "items x (L*H + 1)"),
        "dump": "items x (K + 1)",
        "dump_gradients": "items, forward + backward",
        "heads_gradients": "items, forward + backward (the gradient estimate)",
        "ablation": "items x sampled neurons" if w["ablation_neurons"] else "items x L x I",
    }
    heads_items = w["heads_items"] if w["heads_items"] is not None else w["items"]
    n_items = {
        "heads": heads_items,
        "heads_gradients": heads_items,
        "dump": w["items"],
        "dump_gradients": w["items"],
        "ablation": w["ablation_items"],
    }
    for name, s in est["stages"].items():
        rows.append(
            (
                f"{name}: {formulas[name]}, items={n_items[name]:,}",
                f"{s['rows']:,} rows, {s['batches']:,} calls, {human_count(s['flops'])}FLOP, "
                f"{s['gpu_hours']:,.1f} GPU-h"
                + (
                    f" (+ up to {w['max_new_tokens']} decode steps per row, generative utility)"
                    if name == "heads"
                    else ""
                ),
            )
        )
        if "shared_prefix_flops" in s:
            rows.append(
                (
                    f"  {name} with the shared prefix",
                    f"{human_count(s['shared_prefix_flops'])}FLOP, {s['shared_prefix_saving']:.2f}x fewer"
                    + (" (single-forward utilities)" if name == "heads" else "")
                    + (" (heads assumed spread evenly over the layers)" if name == "dump" else ""),
                )
            )
        if "retrieval" in s:
            r = s["retrieval"]
            rows.append(
                (
                    f"  {name}, retrieval: {r['candidates']} candidates per item and condition",
                    f"{r['rows']:,} rows, {human_count(r['full_flops'])}FLOP in full ({r['full_gpu_hours']:,.1f} GPU-h); "
                    f"after each group's shared prefix {human_count(r['shared_flops'])}FLOP "
                    f"({r['gpu_hours']:,.1f} GPU-h, {r['saving']:.1f}x fewer)",
                )
            )
    t = est["all_tasks"]
    retrieval = f", one of them retrieval ({w['retrieval_candidates']} candidates)" if w["retrieval_candidates"] else ""
    rows += [
        (f"all {w['tasks']} tasks{retrieval}: the stages above", None),
        ("as the pipeline runs them", f"{human_count(t['flops'])}FLOP, {t['gpu_hours']:,.1f} GPU-h"),
        ("every row in full", f"{human_count(t['full_flops'])}FLOP, {t['full_gpu_hours']:,.1f} GPU-h"),
    ]
    return rows


def format_table(est: dict, arch: ModelArch) -> str:
    """``estimate``'s result as the text table the command prints: one section per group."""
    rows = [*_model_rows(est, arch), *_memory_rows(est), *_store_rows(est), *_compute_rows(est)]
    width = max(len(k) for k, v in rows if v is not None)
    lines = [f"{arch.name}: estimate"]
    for k, v in rows:
        lines += [f"\n== {k}"] if v is None else [f"  {k:<{width}} | {v}"]
    lines += [f"note: {n}" for n in est["notes"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Workload()
    # The description: the first paragraph of the package's docstring (pipeline/tools/estimate/__init__.py).
    p = argparse.ArgumentParser(
        prog="python -m pipeline.tools.estimate", description=sys.modules[__package__].__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model-config",
        required=True,
        help=f"a preset ({', '.join(PRESETS)}), a model folder, a config.json path or a JSON string",
    )
    p.add_argument("--items", type=int, default=d.items, help="discovery items per task (dump)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=int, default=None, help=f"critical heads K (heads.top_k; default {d.top_k})")
    g.add_argument(
        "--conditions", type=int, default=None, help="conditions of the store, K + 1 (alternative to --top-k)"
    )
    p.add_argument("--tasks", type=int, default=d.tasks)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=d.dtype, help="model dtype")
    p.add_argument("--store-dtype", choices=("float16", "float32"), default=d.store_dtype, help="dump.dtype")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--gradient-batch-size",
        type=int,
        default=d.gradient_batch_size,
        help="dump.gradient_batch_items: items per forward + backward of the gradient pass",
    )
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens)
    p.add_argument("--image-tokens", type=int, default=None, help="override the image's token count")
    p.add_argument("--heads-items", type=int, default=None, help="heads.max_items (default: --items)")
    p.add_argument(
        "--localisation",
        choices=("exhaustive", "guided", "screened"),
        default=d.localisation,
        help="heads.localisation: substitute every head, only the gradient estimate's top candidates, "
        "or every head on the first --screen-items items and the screen's top candidates on the others",
    )
    p.add_argument(
        "--candidates",
        "--guided-candidates",
        dest="guided_candidates",
        type=int,
        default=None,
        help="heads.guided.candidates / heads.screened.candidates, the heads scored exactly on every "
        "item (default 4 x top_k)",
    )
    p.add_argument(
        "--screen-items",
        type=int,
        default=d.screen_items,
        help="heads.screened.items: the items on which screened localisation substitutes every head",
    )
    p.add_argument(
        "--retrieval-candidates",
        type=int,
        default=d.retrieval_candidates,
        help="candidates per retrieval item, the positive and its negatives (hones_coco.n_negatives + 1; "
        "0: no retrieval task)",
    )
    p.add_argument(
        "--candidate-tokens",
        type=int,
        default=d.candidate_tokens,
        help="tokens of a retrieval row after the prefix its item's candidates share (the candidate and the "
        "template after it)",
    )
    p.add_argument("--ablation-items", type=int, default=d.ablation_items)
    p.add_argument(
        "--ablation-neurons",
        type=int,
        default=None,
        help="neurons the ground truth zeroes per item: a sampled ground truth (default every one)",
    )
    p.add_argument("--target-chunk-mib", type=float, default=d.target_chunk_mib)
    p.add_argument("--eager-attention", action="store_true", help="count S x S attention scores")
    p.add_argument(
        "--effective-tflops",
        type=float,
        default=d.effective_tflops,
        help="sustained TFLOP/s per GPU for the GPU-hour column (an assumption; measure yours)",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    return p


def _report_errors_on_stderr() -> None:
    """The command's errors go to the stderr of the moment as "error: ..." lines (pytest's
    capture included); the library itself only logs."""
    for handler in [h for h in log.handlers if getattr(h, "_hones_cli", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("error: %(message)s"))
    handler._hones_cli = True
    log.addHandler(handler)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """The command: the estimate as a table (or JSON) on stdout, exit 0; a bad model config as
    one "error: ..." line on stderr, exit 2."""
    _report_errors_on_stderr()
    args = build_parser().parse_args(argv)
    try:
        name, config = load_config(args.model_config)
        arch = architecture(config, name, args.image_tokens)
        top_k = args.top_k if args.top_k is not None else (args.conditions - 1 if args.conditions else Workload.top_k)
        if top_k < 0 or args.items < 1:
            raise EstimateError("--items must be >= 1 and --conditions >= 1")
        w = Workload(
            items=args.items,
            top_k=top_k,
            tasks=args.tasks,
            dtype=args.dtype,
            store_dtype=args.store_dtype,
            batch_size=args.batch_size,
            gradient_batch_size=args.gradient_batch_size,
            prompt_tokens=args.prompt_tokens,
            answer_tokens=args.answer_tokens,
            heads_items=args.heads_items,
            localisation=args.localisation,
            guided_candidates=args.guided_candidates,
            screen_items=args.screen_items,
            retrieval_candidates=args.retrieval_candidates,
            candidate_tokens=args.candidate_tokens,
            ablation_items=args.ablation_items,
            ablation_neurons=args.ablation_neurons,
            target_chunk_mib=args.target_chunk_mib,
            eager_attention=args.eager_attention,
            effective_tflops=args.effective_tflops,
        )
        est = estimate(arch, w)
    except (EstimateError, json.JSONDecodeError) as exc:
        log.error("%s", exc)
        return 2
    sys.stdout.write((json.dumps(est, indent=1) if args.json else format_table(est, arch)) + "\n")
    return 0
