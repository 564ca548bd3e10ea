"""The embedded default VLM: built from transformers configs and trained on the benchmark, on CPU.

Map of this package (``DefaultModelSpec``, the architecture and training schedule, is defined in
``pipeline.model.default_spec``):
- ``build``: ``benchmark_vocabulary`` and ``build_tokenizer`` (a word-level ``tokenizers``
  tokenizer, wrapped as a transformers fast tokenizer with a chat template), ``build_processor``
  / ``build_model`` (the family's processor and a randomly initialised model: ``llava``, CLIP
  vision tower + 2-layer projector + Llama decoder; ``idefics3``, SigLIP-style vision tower +
  pixel-shuffle connector + Qwen2 decoder), ``count_parameters``.
- ``vision``: ``warm_up_vision`` trains the vision tower alone first (``image_word_targets``);
  ``FrozenVisionCache`` computes the frozen tower's outputs once per image for the language phase.
- ``checkpoints``: ``Checkpoints``, the state a killed training resumes from, bitwise.
- ``training``: ``train_default_model`` trains on the benchmark's train split and
  ``save_pretrained``s model + processor into a folder that ``ModelAdapter.load`` reads like any
  hub model. Its steps, in order: ``_read_train_split`` -> ``_build_untrained`` ->
  ``_decode_images`` -> ``warm_up_vision`` (or ``reuse_warm_tower``, a finished training's
  tower) -> ``_language_optimizer`` -> ``_train_language_model``
  (``_refill_pool``, ``_training_step``) -> ``_training_summary`` -> ``_save_trained``.
Imports run one way: ``checkpoints`` <- ``vision`` <- ``training`` -> ``build``. Re-exported here:
the names used outside the package (private ones too: tests and benchmarks drive single steps).
"""

from pipeline.model.default.build import benchmark_vocabulary, build_model, build_processor, build_tokenizer
from pipeline.model.default.checkpoints import CHECKPOINT_FILE
from pipeline.model.default.training import (
    _build_untrained,
    _decode_images,
    _image_size,
    _language_optimizer,
    _length_bucketed,
    _read_train_split,
    _training_step,
    ranking_loss,
    reuse_warm_tower,
    train_default_model,
)
from pipeline.model.default.vision import (
    FrozenVisionCache,
    image_pixels,
    image_word_targets,
    patch_features,
    vision_tower,
    warm_up_vision,
)
from pipeline.model.default_spec import DefaultModelSpec

__all__ = [
    "CHECKPOINT_FILE",
    "DefaultModelSpec",
    "FrozenVisionCache",
    "_build_untrained",
    "_decode_images",
    "_image_size",
    "_language_optimizer",
    "_length_bucketed",
    "_read_train_split",
    "_training_step",
    "benchmark_vocabulary",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "image_pixels",
    "image_word_targets",
    "patch_features",
    "ranking_loss",
    "reuse_warm_tower",
    "train_default_model",
    "vision_tower",
    "warm_up_vision",
]
