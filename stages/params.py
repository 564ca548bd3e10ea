"""Typed, validated configuration of every stage.

Each stage's section of params.yaml is validated against one of these models before any
data or model is touched: an unknown key, a wrong type or an out-of-range value raises
``ConfigError`` naming the key (``heads.top_k: Input should be greater than 0``).
The library never reads params.yaml itself; ``stages/`` loads the file and calls
``validate_section``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.tasks.benchmark import SPLITS, TASKS
from pipeline.errors import PipelineError


class ConfigError(PipelineError):
    """A params section is invalid; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchmarkConfig(_Strict):
    """The benchmark: the synthetic default, or the HONES COCO format (section ``coco_import``)."""

    source: Literal["synthetic", "hones_coco"] = "synthetic"
    seed: int = 0
    image_size: int = Field(64, ge=32, le=512)
    n_images: dict[str, int] = Field(default_factory=lambda: {"train": 8000, "discovery": 200, "dev": 100, "test": 200})
    vqa_per_image: dict[str, int] = Field(default_factory=lambda: {"train": 3})
    retrieval_negatives: int = Field(9, ge=1, le=99)
    retrieval_hard_negatives: int = Field(5, ge=0)

    @field_validator("n_images", "vqa_per_image")
    @classmethod
    def _splits(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(set(v) - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split(s) {bad}; allowed: {list(SPLITS)}")
        neg = [k for k, n in v.items() if n < 0]
        if neg:
            raise ValueError(f"negative count for split(s) {neg}")
        return v

    @model_validator(mode="after")
    def _hard(self) -> "BenchmarkConfig":
        if self.retrieval_hard_negatives > self.retrieval_negatives:
            raise ValueError(
                f"retrieval_hard_negatives ({self.retrieval_hard_negatives}) exceeds "
                f"retrieval_negatives ({self.retrieval_negatives})"
            )
        return self


class TrainedModelConfig(_Strict):
    """A model that the pipeline trains itself on the benchmark (the embedded default)."""

    source: Literal["train"] = "train"
    family: Literal["llava", "idefics3"] = "llava"
    patch_size: int = Field(16, ge=1)
    vision_hidden: int = Field(128, ge=8)
    vision_layers: int = Field(3, ge=1)
    vision_heads: int = Field(4, ge=1)
    vision_ffn: int = Field(256, ge=8)
    text_hidden: int = Field(128, ge=8)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)
    text_kv_heads: int = Field(4, ge=1)
    text_ffn: int = Field(512, ge=8)
    vision_warmup_steps: int = Field(600, ge=0)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    task_weights: dict[str, float] = Field(default_factory=lambda: {t: 1.0 for t in TASKS})
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> "TrainedModelConfig":
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden ({self.text_hidden}) must be divisible by text_heads ({self.text_heads})")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"text_heads ({self.text_heads}) must be divisible by text_kv_heads ({self.text_kv_heads})")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"vision_hidden ({self.vision_hidden}) must be divisible by vision_heads ({self.vision_heads})"
            )
        return self


class PretrainedModelConfig(_Strict):
    """A model the user brings: a local folder or a Hugging Face hub id."""

    source: Literal["pretrained"]
    path: str
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = "cuda"


class RuntimeConfig(_Strict):
    """How a stage runs models: threads on CPU, batch size, decoding length."""

    threads: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1, le=512)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


class ModelQualityConfig(_Strict):
    models: list[str] | None = None  # default: every entry of trained_models
    split: Literal["discovery", "dev", "test"] = "test"
    max_items: int | None = Field(None, ge=1)
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))


def validate_section(model: type[BaseModel], data: Any, section: str) -> BaseModel:
    """Validate ``data`` (the params.yaml section ``section``) against ``model``.

    Raises ConfigError listing each bad key as ``section.key: message``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"params section {section!r} must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            key = f"{section}.{loc}" if loc else section
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid params in section {section!r}:\n" + "\n".join(lines)) from None


def params_hash(*configs: BaseModel | dict) -> str:
    """Short sha256 of the configs' canonical JSON: identifies what produced an artefact."""
    payload = [c.model_dump(mode="json") if isinstance(c, BaseModel) else c for c in configs]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class HeadsConfig(_Strict):
    """Critical-head localisation. ``top_k`` is read by ``dump`` (selection is cheap; scoring is not)."""

    split: Literal["discovery", "dev", "test"] = "discovery"
    max_items: int | None = Field(None, ge=1)
    utility: Literal["generative", "teacher_forced"] = "generative"
    top_k: int = Field(4, ge=1)


class DumpConfig(_Strict):
    split: Literal["discovery", "dev", "test"] = "discovery"
    max_items: int | None = Field(None, ge=1)
    dtype: Literal["float16", "float32"] = "float32"
    caption_idf: bool = True
    target_chunk_mib: float = Field(1.0, gt=0, le=1024)


class AblationConfig(_Strict):
    """Ground-truth single-neuron ablation (only for models small enough; off for real VLMs)."""

    enabled: bool = True
    split: Literal["discovery", "dev", "test"] = "discovery"
    max_items: int = Field(16, ge=1)


class AttributeConfig(_Strict):
    """``engine: dask`` runs the store reductions on dask (a scheduler address, or a LocalCluster)."""

    engine: Literal["streaming", "dask"] = "streaming"
    dask_scheduler: str | None = None
    dask_workers: int = Field(2, ge=1)
    seed: int = 0
    ape_min_probability: float = Field(0.05, ge=0, le=1)
    items_per_block: int | None = Field(None, ge=1)


class MasksConfig(_Strict):
    rho: float = Field(0.01, gt=0, le=1)


class EvaluateConfig(_Strict):
    """Held-out suppression check."""

    split: Literal["discovery", "dev", "test"] = "test"
    max_items: int | None = Field(None, ge=1)
    methods: list[str] | None = None  # default: every method in the masks table
    utility: Literal["generative", "teacher_forced"] = "generative"


class SteerConfig(_Strict):
    """Task steering (HONES.md section 6): learned per-neuron scales vs. baselines on the same neurons."""

    beta: float = Field(0.5, ge=0)  # weight of KL(p_original || p_scaled) on answer positions
    l2: float = Field(1e-4, ge=0)  # weight of ||lambda||^2
    lr: float = Field(5e-4, gt=0, le=1)
    epochs: int = Field(2, ge=1)
    grad_accum: int = Field(4, ge=1)
    train_batch_size: int = Field(4, ge=1)  # rows per micro-batch while training (runtime.batch_size evaluates)
    clamp: float = Field(1.5, gt=0)  # lambda in [-clamp, clamp]
    train_split: Literal["discovery", "dev", "test"] = "dev"
    eval_split: Literal["discovery", "dev", "test"] = "test"
    max_items: int | None = Field(None, ge=1)  # per task and split
    seed: int = 0
    grid: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0], min_length=1)
    utility: Literal["generative", "teacher_forced"] = "generative"

    @model_validator(mode="after")
    def _splits(self) -> "SteerConfig":
        if self.train_split == self.eval_split:
            raise ValueError(f"train_split and eval_split are both {self.train_split!r}; steering is judged held out")
        import math

        if any(not math.isfinite(s) for s in self.grid):
            raise ValueError(f"grid scales must be finite, got {self.grid}")
        return self
