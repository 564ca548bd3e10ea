"""HONES neuron attribution for vision-language models: the library behind the DVC stages.

Packages, each importing only from those before it (``tools`` may import ``method``), never
from ``stages``:

- foundations: ``errors`` (``PipelineError``), ``io`` (atomic writes), ``provenance``.
- ``tasks``: what an item is (``items``), the synthetic benchmark, the COCO import, the metrics.
- ``model``: the model adapter, hooks, answer scoring, task evaluation, the default model.
- ``method``: head localisation, activation dump and store, attribution, ablation, masks, scale-out.
- ``outcomes``: suppression and steering with the masks.
- ``report``: figures and the HTML report.
- ``tools``: the cost estimate.
"""
