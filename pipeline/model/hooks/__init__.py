"""Interventions on a VLM's language model: context managers around torch forward pre-hooks.

Map of this package:
- ``primitives``: the hooks themselves: captures (``capture_ffn``, ``capture_layer_inputs``,
  ``capture_residual_stream``), head mean substitution (``substitute_heads``), neuron scaling
  and zeroing (``scale_neurons``, ``scale_neurons_per_row``, ``ablate_neurons_per_row``,
  ``condition_scales``) and the differentiable probes (``trace_ffn``, ``trace_head_substitution``).
- ``candidates``: retrieval candidates after the prefix they share, computed once per item and
  intervention (``last_logits_sharing_candidates``).
- ``prefix``: the shared-prefix engine (``forward_sharing_prefix``): rows that repeat a few
  distinct sequences run the vision tower and the layers below the lowest intervened one
  (``lowest_layer``, ``lowest_scaled_layer``) once per distinct sequence.

The names other modules use are re-exported here (``from pipeline.model.hooks import ...``).
"""

from pipeline.model.hooks.prefix import forward_sharing_prefix, lowest_layer, lowest_scaled_layer
from pipeline.model.hooks.primitives import (
    ablate_neurons_per_row,
    capture_ffn,
    capture_layer_inputs,
    capture_residual_stream,
    condition_scales,
    scale_neurons,
    scale_neurons_per_row,
    substitute_heads,
    trace_ffn,
    trace_head_substitution,
)

__all__ = [
    "ablate_neurons_per_row",
    "capture_ffn",
    "capture_layer_inputs",
    "capture_residual_stream",
    "condition_scales",
    "forward_sharing_prefix",
    "lowest_layer",
    "lowest_scaled_layer",
    "scale_neurons",
    "scale_neurons_per_row",
    "substitute_heads",
    "trace_ffn",
    "trace_head_substitution",
]
