"""What the model stages load: the model a params entry names, and benchmark items and images.

Apart from ``stages._common`` so that stages that load no model (attribute, masks, report) do
not depend on this code or on the adapter it imports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stages._device import model_device
from stages.params import ConfigError, PretrainedModelConfig, StageParams

log = logging.getLogger("stages")
MODELS_DIR = Path("data/models")
# The weights the repository ships for a training recipe (``shipped_models``), one folder each.
SHIPPED_DIR = Path("data/shipped")


def file_hashes():
    """The sha256 memory of model files, shared by every clone on this machine
    (``$XDG_CACHE_HOME/hones/file-hashes.json``, default ``~/.cache``)."""
    from pipeline.model.source import FileHashes

    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return FileHashes(cache_home / "hones" / "file-hashes.json")


def _pinned(params: StageParams, name: str) -> bool:
    """Whether data/models/<name> is a record of pinned files (a pretrained model's, or shipped
    weights') rather than the training output itself. The training stage empties its folder
    first, so a record there is never stale."""
    from pipeline.model.source import RECORD_NAME

    return isinstance(params.models[name], PretrainedModelConfig) or (MODELS_DIR / name / RECORD_NAME).is_file()


def _model_folder(params: StageParams, name: str) -> Path:
    """Where model ``name`` is loaded from: its training output, or the folder (or hub snapshot)
    its ``resolve_model`` / ``ship_model`` record pins, checked unchanged."""
    from pipeline.model.source import read_source

    if _pinned(params, name):
        return read_source(MODELS_DIR / name, name).folder(file_hashes(), name)
    return MODELS_DIR / name


def load_model(params: StageParams, name: str, device: str | None = None):
    """The adapter of model ``name`` as params say (``models.<name>``: dtype, device unless
    given; the files from ``_model_folder``), with torch's CPU threads from ``runtime.threads``
    (shared by local ranks). The device is checked before anything is read."""
    import torch

    from pipeline.model.adapter import ModelAdapter

    cfg = params.models[name]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, params.runtime.threads // local_ranks))
    device = device or model_device(params, name)
    return ModelAdapter.load(str(_model_folder(params, name)), dtype=cfg.dtype, device=device)


def model_identity(params: StageParams, name: str) -> tuple[str, str | None]:
    """(model, revision) of model ``name`` for provenance: the training output folder, or the
    pinned model's hub id and commit / folder and sha256 of its files."""
    from pipeline.model.source import read_source

    if _pinned(params, name):
        return read_source(MODELS_DIR / name, name).identity
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
        sizes = items.groupby(["task", "split"], sort=False).size()
        for (task, split), n in sizes[sizes < max_items].items():
            # An upper bound, not a request: say so when it does not bind.
            log.info("max_items = %d, but split %r has %d %r items: using all %d", max_items, split, n, task, n)
        items = items.groupby(["task", "split"], sort=False).head(max_items).reset_index(drop=True)
    return items


def load_images(benchmark: Path):
    from pipeline.tasks.items import ImageTable

    return ImageTable(Path(benchmark) / "images.parquet")


def load_model_and_images(params: StageParams, name: str, benchmark: Path):
    """(adapter, images): the state a worker of ``pipeline.model.workers.map_jobs`` loads once."""
    return load_model(params, name), load_images(benchmark)


def worker_plan(params: StageParams, name: str) -> tuple[int, int]:
    """(worker processes, torch threads each) for model ``name``: ``runtime.workers`` sharing
    ``runtime.threads`` on the CPU; a model on an accelerator runs in one process (a second
    would hold a second copy of it in the device's memory)."""
    from pipeline.model.workers import split_threads

    workers = params.runtime.workers
    if workers > 1:
        device = model_device(params, name)
        if device != "cpu":
            log.info(
                "runtime.workers = %d applies to models on the CPU; %s runs on %s in one process", workers, name, device
            )
            return 1, params.runtime.threads
    return workers, split_threads(params.runtime.threads, workers)
