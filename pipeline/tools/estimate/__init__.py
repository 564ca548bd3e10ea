"""Back-of-the-envelope cost of running the pipeline on a model, before downloading it.

    python -m pipeline.tools.estimate --model-config llava-1.5-7b --items 7000 --top-k 4 --dtype bfloat16
    python -m pipeline.tools.estimate --model-config data/models/tiny-llava          # a folder's config.json
    python -m pipeline.tools.estimate --model-config '{"text_config": {...}, ...}'    # inline JSON

From a transformers config (``config.json`` of a local folder, a JSON file or string, or one of
``PRESETS``: ``llava-1.5-7b``, ``qwen2.5-vl-7b``) it prints:

- parameters (language model, vision tower, projector) and weight memory per dtype;
- memory of one batch: KV cache, the largest per-layer transients, all-position logits;
- disk of one task's activation store (``z``: conditions x items x layers x ffn_width x bytes,
  plus the per-item arrays ``dvp``, ``dvp_logprob``, ``atp``, ``gate_sum``, ``gate_positive``
  of 4 bytes each) and the number of chunk / shard files ``StoreLayout.plan`` chooses;
- memory of one batch of the dump's gradient pass (atp and the log-probability DVP: one
  forward and backward per item with its answer): the activations autograd saves for the
  backward, per token and layer (6 x hidden + 3.5 x ffn_width) x dtype bytes + 2 float32 norm
  inputs, plus the float32 log-softmax over the vocabulary at every position (calibrated on
  the default models with ``benchmarks/bench_dump.py``, which measures the saved bytes: the
  formula is 10% above them);
- forward passes (rows; ``ceil(rows / batch)`` model calls) and FLOPs of each model stage:
  heads ``items * (L*H + 1)``, dump ``items * (K + 1)``, the dump's gradient pass ``items``
  rows of forward + backward (~3x a forward of the language model: the backward computes
  gradients of activations, not of weights, ~2x), ablation ``items * L * I``; and the FLOPs of
  heads, dump and ablation with the shared prefix (``shared_prefix_flops``: rows computed only
  from their intervention's layer up, the vision tower once per distinct item);
- the retrieval task of heads and ablation (``retrieval_flops``): every item's
  ``--retrieval-candidates`` rows (the positive and its negatives, 50 in the paper's COCO
  setup), in full and as ``pipeline.model.hooks.candidates`` runs them (the prefix the candidates
  share once per group and batch, then ``--candidate-tokens`` per row); and the whole study over
  all tasks (``all_tasks``), one of them retrieval.

Parameter counts are exact for Llama/Qwen2-style decoders, CLIP vision towers with the LLaVA
projector, and the Qwen2-VL / Qwen2.5-VL vision towers (checked in the tests against the
instantiated transformers models); other vision towers are approximated from their layer
sizes and flagged. FLOPs are 2 x (non-embedding parameters) per token + attention + lm_head;
activation memory assumes SDPA/flash attention (no S x S scores) unless ``--eager-attention``.

Map of this package:

- ``model_arch.py``: a model's architecture from its config: ``load_config`` (preset, folder,
  file or JSON string), ``architecture`` (the ``ModelArch`` of ``TextArch`` and ``VisionArch``,
  with the per-family vision-tower counts), ``PRESETS``, ``DTYPE_BYTES``, ``EstimateError``;
- ``cost.py``: the cost model: ``Workload`` and ``estimate`` (every number the table prints),
  ``shared_prefix_flops``;
- ``cli.py``: the command: ``format_table``, ``build_parser`` and ``main`` (``__main__.py`` runs it).

The names above are importable from ``pipeline.tools.estimate`` itself.
"""

from pipeline.tools.estimate.cli import build_parser, format_table, human_count, main
from pipeline.tools.estimate.cost import Workload, all_tasks, estimate, retrieval_flops, shared_prefix_flops
from pipeline.tools.estimate.model_arch import (
    DTYPE_BYTES,
    DYNAMIC_RESOLUTION_TOKENS,
    PRESETS,
    EstimateError,
    ModelArch,
    TextArch,
    VisionArch,
    architecture,
    load_config,
)

__all__ = [
    "DTYPE_BYTES",
    "DYNAMIC_RESOLUTION_TOKENS",
    "PRESETS",
    "EstimateError",
    "ModelArch",
    "TextArch",
    "VisionArch",
    "Workload",
    "all_tasks",
    "architecture",
    "build_parser",
    "estimate",
    "format_table",
    "human_count",
    "load_config",
    "main",
    "retrieval_flops",
    "shared_prefix_flops",
]
