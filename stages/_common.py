"""Shared plumbing of the stage entry points: params loading, model resolution, error exit.

Stages are thin: parse paths, validate their params section, call one pipeline function.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from stages.params import ConfigError, PretrainedModelConfig, RuntimeConfig, TrainedModelConfig, validate_section

log = logging.getLogger("stages")
PARAMS_FILE = Path("params.yaml")
MODELS_DIR = Path("data/models")


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"params file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def section(params: dict, name: str, model: type):
    return validate_section(model, params.get(name), name)


def study_tasks(params: dict) -> list[str]:
    tasks = params.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"params 'tasks' must be a non-empty list of task names, got {tasks!r}")
    return tasks


def studied_models(params: dict) -> list[str]:
    models = params.get("studied_models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"params 'studied_models' must be a non-empty list of model names, got {models!r}")
    for name in models:
        model_config(params, name)
    return models


def runtime(params: dict) -> RuntimeConfig:
    return section(params, "runtime", RuntimeConfig)


def model_config(params: dict, name: str) -> TrainedModelConfig | PretrainedModelConfig:
    models = params.get("models") or {}
    if name not in models:
        raise ConfigError(f"model {name!r} is not defined under 'models' in params.yaml; defined: {sorted(models)}")
    entry = models[name] or {}
    cls = PretrainedModelConfig if entry.get("source") == "pretrained" else TrainedModelConfig
    return validate_section(cls, entry, f"models.{name}")


def model_location(params: dict, name: str) -> tuple[str, str | None, str, str]:
    """(path or hub id, revision, dtype, device) to load model ``name`` from."""
    cfg = model_config(params, name)
    rt = runtime(params)
    if isinstance(cfg, PretrainedModelConfig):
        return cfg.path, cfg.revision, cfg.dtype, cfg.device
    return str(MODELS_DIR / name), None, rt.dtype, rt.device


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    return p


def entry(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage's main with logging set up; known errors exit 2 with their message, no traceback."""

    @functools.wraps(fn)
    def wrapper() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            fn()
        except PipelineError as exc:
            log.error("%s", exc)
            sys.exit(2)

    return wrapper


def load_model(params: dict, name: str, device: str | None = None):
    """The adapter of model ``name``, loaded as params say (path, revision, dtype, device unless
    given), with torch's CPU threads set from ``runtime.threads`` (shared by local ranks)."""
    import os

    import torch

    from pipeline.model.adapter import ModelAdapter

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, runtime(params).threads // local_ranks))
    path, revision, dtype, default_device = model_location(params, name)
    return ModelAdapter.load(path, dtype=dtype, device=device or default_device, revision=revision)


def load_items(benchmark: Path, splits: tuple[str, ...], tasks: tuple[str, ...], max_items: int | None = None):
    """The benchmark rows of ``splits`` x ``tasks`` (the first ``max_items`` per task)."""
    from pipeline.tasks.benchmark import read_annotations

    items = read_annotations(Path(benchmark) / "annotations.parquet", splits=splits, tasks=tasks)
    if max_items is not None:
        items = items.groupby(["task", "split"], sort=False).head(max_items).reset_index(drop=True)
    return items


def load_images(benchmark: Path):
    from pipeline.tasks.benchmark import ImageTable

    return ImageTable(Path(benchmark) / "images.parquet")
