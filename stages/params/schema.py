"""The params.yaml schema: one strict pydantic model per section and one for the whole file.

Map of this module:
- one pydantic model per section (``HeadsConfig``, ``DumpConfig``, ...), strict: an unknown
  key, a wrong type or an out-of-range value raises ``ConfigError`` naming the key
  (``heads.top_k: Input should be greater than or equal to 1``);
- ``ParamsFile``: the whole file, validated at every stage start (so a typo anywhere stops the
  stage before any model loads); study lists (``tasks``, ``studied_models``,
  ``trained_models``, ``shipped_models``) are checked against the known tasks and the ``models`` entries.

The library (``pipeline/``) never sees these objects: stages pass plain arguments.

The loading of the file and the view each stage gets of it are ``stages.params.view``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from pipeline.errors import PipelineError
from pipeline.model.default_spec import DEFAULT_MODEL_FIELDS, DefaultModelSpec, architecture_problems
from pipeline.tasks.items import SPLITS, TASKS

Split = Literal["train", "discovery", "dev", "test"]
HeldOutSplit = Literal["discovery", "dev", "test", "ood"]
# ``auto`` picks cuda when torch sees a GPU, else cpu; ``cuda`` on a machine without one is an error.
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+|mps)$"


class ConfigError(PipelineError):
    """A params value is invalid; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections -----------------------------------------------------------------------------------


class SyntheticBenchmarkConfig(_Strict):
    """The embedded synthetic benchmark (``benchmark.synthetic``), sizes in images."""

    seed: int = 0
    image_size: int = Field(64, ge=32, le=512)
    n_images: dict[str, int] = Field(
        default_factory=lambda: {"train": 8000, "discovery": 200, "dev": 100, "test": 200, "ood": 200}
    )
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
    def _hard(self) -> "SyntheticBenchmarkConfig":
        if self.retrieval_hard_negatives > self.retrieval_negatives:
            raise ValueError(
                f"retrieval_hard_negatives ({self.retrieval_hard_negatives}) exceeds "
                f"retrieval_negatives ({self.retrieval_negatives})"
            )
        return self


class CocoImportConfig(_Strict):
    """The paper's COCO data (``benchmark.hones_coco``), sizes in images (paper: 7000 / 2000 / 3000,
    49 negatives). Both paths must lie under ``data/inputs``, the benchmark stage's data dependency,
    so that editing the JSON or an image reruns the import."""

    json_path: str = "data/inputs/hones_coco.json"
    image_root: str = "data/inputs/coco_images"
    seed: int = 0
    n_discovery: int = Field(7000, ge=0)
    n_dev: int = Field(2000, ge=0)
    n_test: int = Field(3000, ge=0)
    n_negatives: int = Field(49, ge=1)
    max_images: int | None = Field(None, ge=1)

    @field_validator("json_path", "image_root")
    @classmethod
    def _under_inputs(cls, v: str) -> str:
        return _under_inputs_dir(v)


def _under_inputs_dir(v: str) -> str:
    if Path(os.path.normpath(v)).parts[:2] != ("data", "inputs"):
        raise ValueError(
            f"{v!r} is not under data/inputs/ (where DVC tracks the data a stage imports); "
            "put the file there or link it from there"
        )
    return v


class OodBenchmarkConfig(_Strict):
    """``ood_benchmarks.<name>``: an out-of-distribution set in a format the authors' steering
    code reads (``pipeline.tasks.ood_import.FORMATS``), its records file and image folder under
    ``data/inputs``. ``max_records``: the first records only; ``skip_bad``: a record that cannot
    be used is counted and reported (``import.json``) instead of stopping the import."""

    format: Literal["textvqa", "gqa", "flickr30k"]
    records: str
    images: str
    max_records: int | None = Field(None, ge=1)
    skip_bad: bool = False

    @field_validator("records", "images")
    @classmethod
    def _under_inputs(cls, v: str) -> str:
        return _under_inputs_dir(v)


class BenchmarkConfig(_Strict):
    """``source`` picks which of the two subsections the benchmark stage reads."""

    source: Literal["synthetic", "hones_coco"] = "synthetic"
    synthetic: SyntheticBenchmarkConfig = Field(default_factory=SyntheticBenchmarkConfig)
    hones_coco: CocoImportConfig = Field(default_factory=CocoImportConfig)


class _ModelLoading(_Strict):
    """How a model is loaded for analysis: weights dtype and device."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", pattern=DEVICE_PATTERN)


class TrainedModelConfig(_ModelLoading):
    """A model the pipeline trains (the embedded default). Its architecture and schedule are the
    library's ``DefaultModelSpec`` fields (one definition); ``image_size`` comes from the benchmark."""

    source: Literal["train"] = "train"
    spec: DefaultModelSpec

    @model_validator(mode="before")
    @classmethod
    def _nest_spec(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "spec" in data:
            return data
        own = {"source", "dtype", "device"}
        unknown = sorted(set(data) - own - set(DEFAULT_MODEL_FIELDS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(own | set(DEFAULT_MODEL_FIELDS))}")
        spec = {k: v for k, v in data.items() if k not in own}
        problems = architecture_problems(spec)
        if problems:
            raise ValueError("; ".join(problems))
        return {**{k: v for k, v in data.items() if k in own}, "spec": spec}


class PretrainedModelConfig(_Strict):
    """A model the user brings: ``path``, a local save_pretrained folder (relative to the
    repository root, or absolute), or ``hub_id`` (with an optional ``revision``: a branch, tag
    or commit; default main), never both. Listed in ``pretrained_models``, its
    ``resolve_model`` stage pins the files that the other stages load."""

    source: Literal["pretrained"]
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = Field("auto", pattern=DEVICE_PATTERN)

    @model_validator(mode="after")
    def _one_location(self) -> "PretrainedModelConfig":
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of 'path' (a local folder) and 'hub_id' (a Hugging Face hub id)")
        if self.revision is not None and self.hub_id is None:
            raise ValueError("'revision' needs 'hub_id': a local folder has no revisions")
        return self


def _model_source(entry: Any) -> str:
    source = entry.get("source", "train") if isinstance(entry, dict) else getattr(entry, "source", "train")
    return "pretrained" if source == "pretrained" else "train"


# The schema is picked by ``source`` so that errors name that schema's keys, not both.
ModelConfig = Annotated[
    Annotated[TrainedModelConfig, Tag("train")] | Annotated[PretrainedModelConfig, Tag("pretrained")],
    Discriminator(_model_source),
]


class RuntimeConfig(_Strict):
    """How stages run a model.

    ``checkpoint_every_steps``: optimiser steps between the training checkpoints a killed
    ``train_default_model`` resumes from (0: none).
    ``batch_sequences``: sequences per forward pass, whatever a sequence stands for in the stage
    (an item under one head condition in ``heads`` and ``dump``, an item with one neuron zeroed in
    ``ablation``, an item under one mask in ``evaluate``, an item in ``model_quality``). It bounds
    memory; results do not depend on it.
    ``workers``: processes that share ``threads`` in the stages whose work splits into
    independent jobs (``evaluate``, ``steer``, ``ablation``), for models on the CPU only (a tiny
    model uses a second core poorly from one process). Results equal one process's up to float
    rounding.
    """

    threads: int = Field(2, ge=1)
    workers: int = Field(1, ge=1)
    batch_sequences: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1, le=512)
    checkpoint_every_steps: int = Field(500, ge=0)


class ModelQualityConfig(_Strict):
    split: HeldOutSplit = "test"
    max_items: int | None = Field(None, ge=1)
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)


class LogitLensConfig(_Strict):
    """``logit_lens``: the answer's log-probability decoded from each layer's residual stream,
    attention and FFN output, on the first ``max_items`` items per task of ``split``."""

    split: HeldOutSplit = "discovery"
    max_items: int | None = Field(100, ge=1)


class TransferConfig(_Strict):
    """``transfer``: the in-domain headline masks of ``methods`` and the steering scales on the
    first ``max_items`` items per task of ``split``, a held-out split of another distribution
    (the synthetic ``ood``); null when the benchmark has none (the stage then measures nothing)."""

    split: HeldOutSplit | None = "ood"
    max_items: int | None = Field(30, ge=1)
    methods: list[str] = Field(default_factory=lambda: ["hones", "random"], min_length=1)


class SharedNeuronsConfig(_Strict):
    """``shared_neurons``: ``draws`` size-matched random subsets of each task's mask per pair of
    tasks, against which the neurons both masks share are compared."""

    draws: int = Field(2, ge=1)


class ExhaustiveHeadsConfig(_Strict):
    """``heads.exhaustive``: every head substituted on every item (no settings of its own)."""


class GuidedHeadsConfig(_Strict):
    """``heads.guided``: exact scores only for the ``candidates`` heads whose gradient estimate is
    highest (also what the report measures guided localisation with)."""

    candidates: int = Field(8, ge=1)


class ScreenedHeadsConfig(_Strict):
    """``heads.screened``: every head scored exactly on the first ``items`` head-scoring items,
    then the ``candidates`` best of them on every item (also what the report measures the screen
    with)."""

    items: int = Field(50, ge=1)
    candidates: int = Field(8, ge=1)


class HeadsConfig(_Strict):
    """Critical-head localisation. ``top_k`` is read by ``dump`` (selection is cheap; scoring is not).
    ``localisation``: ``exhaustive`` (the paper: every head substituted on every item) or
    ``guided`` or ``screened``; the heads stage reads the section of that name. All three write
    every head's gradient estimate, ``gradient_batch_items`` items per forward and backward pass."""

    split: HeldOutSplit = "discovery"
    max_items: int | None = Field(None, ge=1)
    utility: Literal["generative", "teacher_forced"] = "generative"
    top_k: int = Field(4, ge=1)
    localisation: Literal["exhaustive", "guided", "screened"] = "exhaustive"
    gradient_batch_items: int = Field(16, ge=1)
    exhaustive: ExhaustiveHeadsConfig = Field(default_factory=ExhaustiveHeadsConfig)
    guided: GuidedHeadsConfig = Field(default_factory=GuidedHeadsConfig)
    screened: ScreenedHeadsConfig = Field(default_factory=ScreenedHeadsConfig)

    @model_validator(mode="after")
    def _enough_candidates(self) -> "HeadsConfig":
        for mode in ("guided", "screened"):
            if (candidates := getattr(self, mode).candidates) < self.top_k:
                raise ValueError(
                    f"heads.{mode}.candidates = {candidates} is below heads.top_k = "
                    f"{self.top_k}: {mode} localisation keeps the top_k of its candidates"
                )
        return self


class DumpConfig(_Strict):
    """``store_dtype``: the dtype of the stored activations z (the model runs in ``models.<m>.dtype``).
    ``caption_target``: ``joined`` (the authors' code: first five references joined, every token
    occurrence weighted, first 128 tokens) or ``distinct`` (each distinct token of all references
    once). ``gradient_batch_items``: items per forward and backward pass of the gradient arrays."""

    split: HeldOutSplit = "discovery"
    max_items: int | None = Field(None, ge=1)
    store_dtype: Literal["float16", "float32"] = "float32"
    caption_idf: bool = True
    caption_target: Literal["joined", "distinct"] = "joined"
    gradient_batch_items: int = Field(16, ge=1)
    target_chunk_mib: float = Field(1.0, gt=0, le=1024)


class AblationSampleConfig(_Strict):
    """``ablation.sample``: the sampled ground truth (stage ``sampled_ground_truth@<model>``): every
    evaluated method's top neurons at ``masks.rho`` (the census), ``near`` x as many drawn among
    the neurons some method ranks in its top 4k, ``far`` x as many from the rest, seeded by
    ``seed``."""

    enabled: bool = True
    near: float = Field(1.0, ge=0)
    far: float = Field(0.5, ge=0)
    seed: int = 0


class AblationConfig(_Strict):
    """Ground-truth single-neuron ablation: ``enabled``, every neuron zeroed alone (only for models
    small enough; off for real VLMs); ``sample``, a stratified sample of them (any model), on the
    same ``split`` and ``max_items`` items per task."""

    enabled: bool = True
    split: HeldOutSplit = "discovery"
    max_items: int = Field(16, ge=1)
    sample: AblationSampleConfig = Field(default_factory=AblationSampleConfig)


class AttributeConfig(_Strict):
    """``engine: dask`` runs the store reductions on dask (a scheduler address, or a LocalCluster).
    ``ape_min_probability``: ``ape_last``'s floor; ``lape_filter_quantile`` / ``lape_bar_quantile``:
    LAPE's filter_rate and activation_bar_ratio (identify.py: 0.95 and 0.95)."""

    engine: Literal["streaming", "dask"] = "streaming"
    dask_scheduler: str | None = None
    dask_workers: int = Field(2, ge=1)
    seed: int = 0
    ape_min_probability: float = Field(0.05, ge=0, le=1)
    lape_filter_quantile: float = Field(0.95, gt=0, le=1)
    lape_bar_quantile: float = Field(0.95, gt=0, le=1)
    items_per_block: int | None = Field(None, ge=1)


class MasksConfig(_Strict):
    """``rho``: the headline mask size (fraction of all FFN neurons); ``rho_grid``: the sizes of the
    deletion curve (``rho`` is always added); ``random_draws``: random masks at the headline size."""

    rho: float = Field(0.01, gt=0, le=1)
    rho_grid: list[float] = Field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05, 0.1], min_length=1)
    random_draws: int = Field(20, ge=1)
    seed: int = 0

    @field_validator("rho_grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not (0 < r <= 1)]
        if bad:
            raise ValueError(f"every rho must be in (0, 1], got {bad}")
        return v


class EvaluateConfig(_Strict):
    """Held-out suppression check: the generative metric on the headline masks and the likelihood
    on every mask, on the first ``max_items`` items of each task."""

    split: HeldOutSplit = "test"
    max_items: int | None = Field(None, ge=1)
    methods: list[str] | None = None  # default: every method in the masks table


class StatisticsConfig(_Strict):
    """Paired bootstrap over test items: resamples, seed and interval level of every reported effect."""

    bootstrap_resamples: int = Field(1000, ge=100)
    seed: int = 0
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # Percentage points of relative drop: a method difference whose whole interval lies within
    # +- this is "equivalent" rather than "undecided" (0: no equivalence verdicts).
    equivalence_margin: float = Field(0.5, ge=0)


class SteerConfig(_Strict):
    """Task steering (docs/method.md section 6): learned per-neuron scales vs. baselines on the
    same neurons."""

    beta: float = Field(0.5, ge=0)  # weight of KL(p_original || p_scaled) on answer positions
    l2: float = Field(1e-4, ge=0)  # weight of ||lambda||^2
    lr: float = Field(5e-4, gt=0, le=1)
    epochs: int = Field(2, ge=1)
    grad_accum: int = Field(4, ge=1)
    train_batch_size: int = Field(4, ge=1)  # sequences per micro-batch while training the scales
    clamp: float = Field(1.5, gt=0)  # lambda in [-clamp, clamp]
    train_split: HeldOutSplit = "dev"
    eval_split: HeldOutSplit = "test"
    max_items: int | None = Field(None, ge=1)  # per task and split
    seed: int = 0
    grid: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0], min_length=1)
    utility: Literal["generative", "teacher_forced"] = "generative"

    @model_validator(mode="after")
    def _splits(self) -> "SteerConfig":
        if self.train_split == self.eval_split:
            raise ValueError(f"train_split and eval_split are both {self.train_split!r}; steering is judged held out")
        if any(not math.isfinite(s) for s in self.grid):
            raise ValueError(f"grid scales must be finite, got {self.grid}")
        return self


def _known_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task in {tasks}")
    return tasks


# --- the whole file -----------------------------------------------------------------------------


class ParamsFile(_Strict):
    """Every key of params.yaml. Sections left out take their defaults."""

    trained_models: list[str] = Field(default_factory=list)
    # Trained models whose weights the repository ships (data/shipped/<model>/, what the recipe
    # trained): their ship_model stage pins those files instead of training.
    shipped_models: list[str] = Field(default_factory=list)
    pretrained_models: list[str] = Field(default_factory=list)
    studied_models: list[str] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    # {recipe: [studied models]}: instances of one recipe (other training seeds) whose claims
    # the report also decides together (suppression.replicated_differences).
    replicates: dict[str, list[str]] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    model_quality: ModelQualityConfig = Field(default_factory=ModelQualityConfig)
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    logit_lens: LogitLensConfig = Field(default_factory=LogitLensConfig)
    dump: DumpConfig = Field(default_factory=DumpConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)
    attribute: AttributeConfig = Field(default_factory=AttributeConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    steer: SteerConfig = Field(default_factory=SteerConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    shared_neurons: SharedNeuronsConfig = Field(default_factory=SharedNeuronsConfig)
    # {name: set}: out-of-distribution sets imported (stage ood_benchmark@<name>) and measured
    # by each studied model's transfer_ood stage; the name is a folder and stage-name part.
    ood_benchmarks: dict[str, OodBenchmarkConfig] = Field(default_factory=dict)

    @field_validator("ood_benchmarks")
    @classmethod
    def _ood_names(cls, v: dict[str, OodBenchmarkConfig]) -> dict[str, OodBenchmarkConfig]:
        bad = [name for name in v if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name)]
        if bad:
            raise ValueError(f"{bad}: a benchmark name is lower-case letters, digits and '_' (it names a folder)")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)

    @model_validator(mode="after")
    def _models_defined(self) -> "ParamsFile":
        for key in ("trained_models", "shipped_models", "pretrained_models", "studied_models"):
            missing = [m for m in getattr(self, key) if m not in self.models]
            if missing:
                raise ValueError(f"{key}: {missing} not defined under 'models'; defined: {sorted(self.models)}")
        pretrained = [m for m in self.trained_models if isinstance(self.models[m], PretrainedModelConfig)]
        if pretrained:
            raise ValueError(
                f"trained_models: {pretrained} have source 'pretrained': there is nothing to train; "
                "list them in pretrained_models"
            )
        trained = [m for m in self.pretrained_models if not isinstance(self.models[m], PretrainedModelConfig)]
        if trained:
            raise ValueError(f"pretrained_models: {trained} have source 'train'; list them in trained_models")
        not_trained = [m for m in self.shipped_models if isinstance(self.models[m], PretrainedModelConfig)]
        if not_trained:
            raise ValueError(
                f"shipped_models: {not_trained} have source 'pretrained'; shipped weights are a "
                "training recipe's (source 'train'): list them in pretrained_models"
            )
        both = [m for m in self.shipped_models if m in self.trained_models]
        if both:
            raise ValueError(
                f"{both} are in both trained_models and shipped_models: a model is either trained "
                "here or loaded from the weights the repository ships, not both"
            )
        # data/models/<m> must have a producer: the training, ship or resolve stage.
        producers = self.trained_models + self.shipped_models + self.pretrained_models
        orphans = [m for m in self.studied_models if m not in producers]
        if orphans:
            raise ValueError(
                f"studied_models: {orphans} are in none of trained_models, shipped_models and "
                "pretrained_models, so no stage provides them"
            )
        for recipe, instances in self.replicates.items():
            if recipe in self.models:
                raise ValueError(f"replicates.{recipe}: a recipe needs a name of its own, not a model's")
            unstudied = [m for m in instances if m not in self.studied_models]
            if unstudied or len(set(instances)) != len(instances) or not instances:
                raise ValueError(
                    f"replicates.{recipe}: {instances} must be distinct studied models (not studied: {unstudied})"
                )
        return self
