"""The cost model: ``Workload`` (what one run of the pipeline does) and ``estimate`` /
``shared_prefix_flops`` / ``retrieval_flops`` / ``all_tasks`` (memory, disk, forward passes and
FLOPs of that workload on a ``ModelArch``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.method.store import ITEM_ARRAYS, StoreLayout, item_array_dtype
from pipeline.tools.estimate.model_arch import DTYPE_BYTES, EstimateError, ModelArch


@dataclass(frozen=True)
class Workload:
    items: int = 7000  # discovery items per task (the paper's COCO import: 7000)
    top_k: int = 4  # critical heads -> top_k + 1 conditions
    tasks: int = 4
    dtype: str = "bfloat16"  # model weights and activations
    store_dtype: str = "float32"  # dump.dtype
    batch_size: int = 16
    gradient_batch_size: int = 4  # dump.gradient_batch_items
    prompt_tokens: int = 48  # text tokens of a prompt with its chat template, without the image
    answer_tokens: int = 8
    heads_items: int | None = None  # heads.max_items (default: items)
    localisation: str = "exhaustive"  # heads.localisation: exhaustive | guided | screened
    guided_candidates: int | None = None  # heads.guided/screened.candidates (default: 4 x top_k)
    screen_items: int = 100  # heads.screened.items: items on which screened localisation scores every head
    ablation_items: int = 16  # ablation.max_items
    ablation_neurons: int | None = None  # neurons zeroed per item (a sampled ground truth; default all L x I)
    max_new_tokens: int = 24  # generative head scoring decodes up to this many tokens
    # The retrieval task: each item's positive and negatives scored by their Yes/No margins
    # (hones_coco.n_negatives + 1; 0: no retrieval task among the tasks).
    retrieval_candidates: int = 50
    candidate_tokens: int = 24  # tokens of a candidate's row after the prefix all its candidates share
    target_chunk_mib: float = 1.0
    max_files: int = 2000
    eager_attention: bool = False
    effective_tflops: float = 400.0  # sustained model FLOP/s per GPU (assumed: ~40% of an H100's bf16 peak)


def _batch_bytes(arch: ModelArch, w: Workload, S: int) -> dict[str, int]:
    """Bytes of one forward batch of ``w.batch_size`` rows of ``S`` tokens, by what holds them."""
    t, v, b = arch.text, arch.vision, DTYPE_BYTES[w.dtype]
    B = w.batch_size
    kv = 2 * t.layers * t.kv_heads * t.head_dim * S * B * b
    hidden_states = 4 * B * S * t.hidden * b  # residual stream, normed input, attention output, MLP output
    mlp = (3 if t.gated_mlp else 2) * B * S * t.ffn * b  # gate, up and their product
    scores = 2 * B * t.heads * S * S * b if w.eager_attention else 0
    out = {
        "kv_cache": kv,
        "layer_transients": hidden_states + mlp + scores,
        "logits": B * S * t.vocab * b,
        "vision_transients": (B * v.positions * (4 * v.hidden + 2 * v.ffn) * b) if v else 0,
    }
    out["total"] = sum(out.values())
    return out


def _gradient_batch_bytes(arch: ModelArch, w: Workload, S: int) -> dict[str, int]:
    """Bytes of one batch of the dump's gradient pass (activations kept for the backward)."""
    t, b, Bg = arch.text, DTYPE_BYTES[w.dtype], w.gradient_batch_size
    saved = Bg * S * t.layers * ((12 * t.hidden + 7 * t.ffn) * b // 2 + 2 * t.hidden * 4)
    log_softmax = Bg * S * t.vocab * (b + 4)
    return {"saved_activations": saved, "logits_and_log_softmax": log_softmax, "total": saved + log_softmax}


def _store(arch: ModelArch, w: Workload) -> dict:
    """The activation store of one task: its layout (``StoreLayout.plan``), files and bytes."""
    L, I = arch.text.layers, arch.text.ffn
    C = w.top_k + 1
    layout = StoreLayout.plan(C, w.items, L, I, w.store_dtype, int(w.target_chunk_mib * 2**20), w.max_files)
    z_bytes = C * w.items * L * I * DTYPE_BYTES[w.store_dtype]
    per_item = {
        name: w.items * (L * I if dims else 1) * np.dtype(item_array_dtype(name, w.store_dtype)).itemsize
        for name, (dims, _, _) in ITEM_ARRAYS.items()
    }
    item_bytes = sum(per_item.values())
    n_blocks = layout.n_blocks
    assert layout.nbytes() == z_bytes + item_bytes
    return {
        "conditions": C,
        "chunk_items": layout.chunk_items,
        "block_items": layout.block_items,
        "sharded": layout.sharded,
        "blocks": n_blocks,
        "z_files": C * n_blocks,
        "item_array_files": len(ITEM_ARRAYS) * n_blocks,
        "chunk_bytes": layout.chunk_items * L * I * DTYPE_BYTES[w.store_dtype],
        "z_bytes": z_bytes,
        "item_array_bytes": per_item,
        "dvp_bytes": per_item["dvp"],
        "task_bytes": z_bytes + item_bytes,
        "all_tasks_bytes": w.tasks * (z_bytes + item_bytes),
    }


def _stages(arch: ModelArch, w: Workload, S: int) -> tuple[int, dict[str, dict]]:
    """(FLOPs of one row forward, {stage: rows, model calls, FLOPs, GPU-hours[, shared prefix]})."""
    t, v = arch.text, arch.vision
    L = t.layers
    vision_params = (v.params + v.projector_params) if v else 0
    # FLOPs of one row (one sequence) forward: matmuls 2 x params per token, attention 4*L*S^2*H*d, lm_head.
    flops_text = _text_flops(arch, S, S, S)
    flops_vision = 2 * vision_params * v.positions if v else 0
    row_flops = flops_text + flops_vision
    heads_items = w.heads_items if w.heads_items is not None else w.items
    guided = w.localisation in ("guided", "screened")
    rows = {
        "heads": round(heads_items * (scored_heads(arch, w) + 1)),
        **({"heads_gradients": heads_items} if guided else {}),
        "dump": w.items * (w.top_k + 1),
        "dump_gradients": w.items,
        "ablation": w.ablation_items * ablated_neurons(arch, w),
    }
    gradient_rows = {"dump_gradients", "heads_gradients"}
    # Forward + backward of activations: ~3x the language model's forward, 1x the vision tower's.
    per_row = {name: 3 * flops_text + flops_vision if name in gradient_rows else row_flops for name in rows}
    batch = {name: w.gradient_batch_size if name in gradient_rows else w.batch_size for name in rows}
    shared = shared_prefix_flops(
        arch, w, flops_vision, (flops_text - 2 * t.vocab * t.hidden * S) / L, 2 * t.vocab * t.hidden * S
    )
    stages = {
        name: {
            "rows": n,
            "batches": math.ceil(n / batch[name]),
            "flops": n * per_row[name],
            "all_tasks_flops": w.tasks * n * per_row[name],
            "gpu_hours": n * per_row[name] / (w.effective_tflops * 1e12) / 3600,
        }
        for name, n in rows.items()
    }
    for name, flops in shared.items():
        stages[name]["shared_prefix_flops"] = flops
        stages[name]["shared_prefix_saving"] = stages[name]["flops"] / flops
    if w.retrieval_candidates:
        for name in RETRIEVAL_STAGES:
            stages[name]["retrieval"] = retrieval_flops(arch, w, rows[name], flops_vision)
    return row_flops, stages


# The stages whose retrieval utility scores every candidate of an item (the dump runs the
# positive's row alone, as it does any task's).
RETRIEVAL_STAGES = ("heads", "ablation")


def _text_flops(arch: ModelArch, tokens: int, context: int, logits: int) -> float:
    """FLOPs of the language model on ``tokens`` new tokens that attend to ``context`` keys each
    (every query against every key, as the row formula counts it), with the lm_head on ``logits``
    positions."""
    t = arch.text
    matmul = t.layers * (t.layer_params() - 2 * t.hidden)
    return (
        2 * matmul * tokens + 4 * t.layers * tokens * context * t.heads * t.head_dim + 2 * t.vocab * t.hidden * logits
    )


def retrieval_flops(arch: ModelArch, w: Workload, groups: int, f_vision: float) -> dict[str, float]:
    """The retrieval task of a stage that runs ``groups`` (item, condition) pairs: each is
    ``retrieval_candidates`` rows of the image and the prompt with one candidate (no answer:
    the margin is read at the last prompt token).

    - ``full_flops``: every row in full (the vision tower, every token, logits at every position);
    - ``shared_flops``: as ``pipeline.model.hooks.candidates`` runs them: the rows go to the
      model in calls of whole groups (as many as ``batch_size`` rows hold, or one group whose
      candidates then run in passes of ``batch_size``), so each group runs one prefix pass (the
      vision tower and the P = image + prompt - ``candidate_tokens`` tokens the candidates
      share, logits at its last token only), then every row its ``candidate_tokens`` after the
      group's cache, attending to P + those tokens. The tower is counted once per group (an
      upper bound: a call's groups of one item share it).
    """
    K, c, B = w.retrieval_candidates, w.candidate_tokens, w.batch_size
    S = arch.image_tokens + w.prompt_tokens
    if not 1 <= c < w.prompt_tokens:
        raise EstimateError(f"--candidate-tokens {c} must lie in [1, prompt tokens = {w.prompt_tokens})")
    P = S - c
    rows = groups * K
    full = rows * (_text_flops(arch, S, S, S) + f_vision)
    shared = groups * (_text_flops(arch, P, P, 1) + f_vision) + rows * _text_flops(arch, c, P + c, c)
    return {
        "candidates": K,
        "rows": rows,
        "prefix_passes": groups,
        "suffix_passes": groups * math.ceil(K / B) if K > B else math.ceil(groups / (B // K)),
        "full_flops": full,
        "shared_flops": shared,
        "saving": full / shared,
        "gpu_hours": shared / (w.effective_tflops * 1e12) / 3600,
        "full_gpu_hours": full / (w.effective_tflops * 1e12) / 3600,
    }


def estimate(arch: ModelArch, w: Workload) -> dict:
    """Every number the table prints, as a dict (bytes, counts, FLOPs)."""
    t, v = arch.text, arch.vision
    if w.dtype not in DTYPE_BYTES or w.store_dtype not in ("float16", "float32"):
        raise EstimateError(f"unknown dtype {w.dtype!r} / store dtype {w.store_dtype!r}")
    S = arch.image_tokens + w.prompt_tokens + w.answer_tokens
    row_flops, stages = _stages(arch, w, S)
    if w.tasks < 1 or w.retrieval_candidates < 0:
        raise EstimateError(
            f"--tasks ({w.tasks}) must be >= 1 and --retrieval-candidates ({w.retrieval_candidates}) >= 0"
        )
    return {
        "name": arch.name,
        "notes": list(arch.notes),
        "seq_len": S,
        "image_tokens": arch.image_tokens,
        "params": {
            "text": t.params(),
            "vision": v.params if v else 0,
            "projector": v.projector_params if v else 0,
            "total": arch.params,
        },
        "weights_bytes": {d: arch.params * n for d, n in DTYPE_BYTES.items()},
        "batch_bytes": _batch_bytes(arch, w, S),
        "gradient_batch_bytes": _gradient_batch_bytes(arch, w, S),
        "store": _store(arch, w),
        "row_flops": row_flops,
        "stages": stages,
        "all_tasks": all_tasks(stages, w),
        "workload": asdict(w),
    }


def all_tasks(stages: dict[str, dict], w: Workload) -> dict[str, float]:
    """FLOPs and GPU-hours of every stage over all ``tasks``: one of them retrieval (its
    ``RETRIEVAL_STAGES`` scoring every candidate) when ``retrieval_candidates`` > 0, the others
    one row per item and condition. ``flops``: as the pipeline runs them (the shared prefix, and
    retrieval's candidates after theirs); ``full_flops``: every row in full."""
    flops = full = 0.0
    for name, st in stages.items():
        retrieval = st.get("retrieval")
        one_row = w.tasks - 1 if retrieval else w.tasks
        flops += one_row * st.get("shared_prefix_flops", st["flops"]) + (retrieval["shared_flops"] if retrieval else 0)
        full += one_row * st["flops"] + (retrieval["full_flops"] if retrieval else 0)
    per_hour = w.effective_tflops * 1e12 * 3600
    return {"flops": flops, "full_flops": full, "gpu_hours": flops / per_hour, "full_gpu_hours": full / per_hour}


def scored_heads(arch: ModelArch, w: Workload) -> float:
    """Heads whose substitution the heads stage runs exactly, per item: every one (exhaustive),
    the candidates (guided; default 4 x top_k), or every one on the screen's items and the
    candidates on the others (screened: a mean over the items); EstimateError for an unknown
    localisation, a candidate count outside [top_k, L x H] or a screen of no item."""
    every = arch.text.layers * arch.text.heads
    if w.localisation == "exhaustive":
        return every
    if w.localisation not in ("guided", "screened"):
        raise EstimateError(f"unknown localisation {w.localisation!r}; use exhaustive, guided or screened")
    m = w.guided_candidates if w.guided_candidates is not None else 4 * w.top_k
    if not w.top_k <= m <= every:
        raise EstimateError(f"--candidates {m} must lie in [top_k = {w.top_k}, {every} heads]")
    if w.localisation == "guided":
        return m
    if w.screen_items < 1:
        raise EstimateError(f"--screen-items must be >= 1, got {w.screen_items}")
    items = w.heads_items if w.heads_items is not None else w.items
    screen = min(w.screen_items, items)
    return (screen * every + (items - screen) * m) / items


def ablated_neurons(arch: ModelArch, w: Workload) -> int:
    """Neurons the ground truth zeroes on every ablation item: all L x I, or the sample's size."""
    every = arch.text.layers * arch.text.ffn
    if w.ablation_neurons is None:
        return every
    if not 1 <= w.ablation_neurons <= every:
        raise EstimateError(f"--ablation-neurons {w.ablation_neurons} must lie in [1, {every} neurons]")
    return w.ablation_neurons


def shared_prefix_flops(
    arch: ModelArch, w: Workload, f_vision: float, f_layer: float, f_head: float
) -> dict[str, float]:
    """FLOPs per task of the single-forward stages with the shared prefix
    (``hooks.forward_sharing_prefix``): a row that intervenes from layer l up computes layers
    l..L-1 and the lm_head; each batch's distinct items compute the vision tower and the layers
    below l once (one more image stands in for the batch's tower). Rows run layer by layer,
    item-major, ``batch_size`` per call, so a batch of a layer holds max(1, B / rows per item
    and layer) items.

    - heads: H rows per layer and item (teacher-forced or retrieval-margin utilities; greedy
      generation does not share), plus the base row (all layers shared but the last); guided
      localisation's candidates are assumed spread evenly over the layers;
    - dump: the base row in full, keeping the residual stream entering the head rows' layers;
      then K head rows from there; where the critical heads sit is known only after the heads
      stage, so they are assumed spread evenly over the layers;
    - ablation: I rows per layer and item (a sample's neurons assumed spread evenly over the
      layers), one item per batch.
    """
    t = arch.text
    L, B, K = t.layers, w.batch_size, w.top_k
    heads_items = w.heads_items if w.heads_items is not None else w.items

    def layer_groups(items: int, per_item: float) -> float:
        """FLOPs of ``per_item`` rows per item at every layer l, for ``items`` items."""
        total = 0.0
        for l in range(L):
            rows = items * per_item
            prefix_rows = max(items, math.ceil(rows / B)) if per_item >= 1 else rows
            calls = math.ceil(rows / B)
            total += rows * ((L - l) * f_layer + f_head) + prefix_rows * (f_vision + l * f_layer) + calls * f_vision
        return total

    full_row = f_vision + L * f_layer + f_head
    # The dump's head rows start from the residual stream its base rows left at their layer.
    dump_heads = w.items * K * sum((L - l) * f_layer + f_head for l in range(L)) / L
    return {
        # + the base rows, each a full pass
        "heads": layer_groups(heads_items, scored_heads(arch, w) / L) + heads_items * full_row,
        "dump": w.items * full_row + dump_heads + math.ceil(w.items * K / B) * f_vision,
        "ablation": layer_groups(w.ablation_items, ablated_neurons(arch, w) / L),
    }
