"""What the model stages load: the model a params entry names, and benchmark items and images.

Apart from ``stages._common`` so that stages that load no model (attribute, masks, report) do
not depend on this code or on the adapter it imports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stages.params import ConfigError, PretrainedModelConfig, StageParams

log = logging.getLogger("stages")
MODELS_DIR = Path("data/models")


def resolve_device(device: str, key: str) -> str:
    """``auto`` -> cuda when present (logged), else cpu; ``cuda[:N]`` without CUDA is a ConfigError
    naming ``key``."""
    import torch

    if device == "auto":
        picked = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("%s: auto -> %s", key, picked)
        return picked
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {device!r} but torch sees no CUDA device on this machine; "
                              "use 'cpu' or 'auto'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: 'mps' but torch sees no MPS device on this machine; use 'cpu' or 'auto'")
    return device


def model_device(params: StageParams, name: str) -> str:
    """The device model ``name`` runs on, resolved (``models.<name>.device``)."""
    return resolve_device(params.models[name].device, f"models.{name}.device")


def load_model(params: StageParams, name: str, device: str | None = None):
    """The adapter of model ``name`` as params say (``models.<name>``: path, revision, dtype,
    device unless given), with torch's CPU threads from ``runtime.threads`` (shared by local ranks)."""
    import torch

    from pipeline.model.adapter import ModelAdapter

    cfg = params.models[name]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, params.runtime.threads // local_ranks))
    device = device or model_device(params, name)
    if isinstance(cfg, PretrainedModelConfig):
        return ModelAdapter.load(cfg.path, dtype=cfg.dtype, device=device, revision=cfg.revision)
    return ModelAdapter.load(str(MODELS_DIR / name), dtype=cfg.dtype, device=device)


def model_path(params: StageParams, name: str) -> tuple[str, str | None]:
    """(path or hub id, revision) that model ``name`` is loaded from."""
    cfg = params.models[name]
    if isinstance(cfg, PretrainedModelConfig):
        return cfg.path, cfg.revision
    return str(MODELS_DIR / name), None


def load_items(benchmark: Path, splits: tuple[str, ...], tasks: tuple[str, ...], max_items: int | None = None):
    """The benchmark rows of ``splits`` x ``tasks`` (the first ``max_items`` per task and split).

    An empty (task, split) is an error naming it: a stage never runs on nothing.
    """
    from pipeline.tasks.items import read_annotations

    table = Path(benchmark) / "annotations.parquet"
    items = read_annotations(table, splits=splits, tasks=tasks)
    for split in splits:
        for task in tasks:
            if not ((items["split"] == split) & (items["task"] == task)).any():
                raise ConfigError(f"{table} has no {task!r} items in split {split!r}")
    if max_items is not None:
        items = items.groupby(["task", "split"], sort=False).head(max_items).reset_index(drop=True)
    return items


def load_images(benchmark: Path):
    from pipeline.tasks.items import ImageTable

    return ImageTable(Path(benchmark) / "images.parquet")
