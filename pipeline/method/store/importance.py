"""The attribution array: importance [method, task, layer, neuron] (float32) with its coordinates.

- ``write_importance`` (atomically, checksummed) / ``read_importance`` (an ``ImportanceArray``) /
  ``read_importance_on_ablation_items``: the attribution array, and the same computed on the
  ground truth's items only.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr

from pipeline.io import atomic_directory
from pipeline.method.store.io import StoreError, create_checked_array, open_finished_group, read_checked
from pipeline.method.store.layout import FORMAT_VERSION

IMPORTANCE_DIMS = ("method", "task", "layer", "neuron")


ON_ABLATION_ITEMS = "importance_on_ablation_items"


def write_importance(
    path: Path,
    methods: list[str],
    tasks: list[str],
    importance: np.ndarray,
    attrs: dict,
    on_ablation_items: np.ndarray | None = None,
) -> None:
    """Write ``importance`` [method, task, layer, neuron] (float32) with its coordinates, atomically;
    and ``on_ablation_items`` (same shape, NaN for tasks without ground truth: the methods
    computed from only the items the ground truth was measured on), when given."""
    path = Path(path)
    if importance.shape[:2] != (len(methods), len(tasks)):
        raise StoreError(f"importance has shape {importance.shape}, expected ({len(methods)}, {len(tasks)}, L, I)")
    if on_ablation_items is not None and on_ablation_items.shape != importance.shape:
        raise StoreError(
            f"importance on the ablation items has shape {on_ablation_items.shape}, expected {importance.shape}"
        )
    with atomic_directory(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        M, T, L, I = importance.shape
        arrays = {"importance": (importance, "method-specific; higher = more important to the task")}
        if on_ablation_items is not None:
            arrays[ON_ABLATION_ITEMS] = (on_ablation_items, "as importance, from the ground truth's items only")
        for name, (values, units) in arrays.items():
            arr = create_checked_array(
                group,
                name,
                shape=values.shape,
                chunks=(1, 1, L, I),
                dtype="float32",
                dims=IMPORTANCE_DIMS,
                fill_value=np.nan,
                attributes={"units": units},
            )
            arr[...] = values.astype(np.float32)
        for name, values in (("method", methods), ("task", tasks)):
            coord = create_checked_array(
                group, name, shape=(len(values),), chunks=(len(values),), dtype=str, dims=(name,), fill_value=None
            )
            coord[...] = np.array(values, dtype=object)
        group.attrs.update({**attrs, "format_version": FORMAT_VERSION, "dimensions": list(IMPORTANCE_DIMS)})


class ImportanceArray(NamedTuple):
    """The attribution array read back: ``importance`` [method, task, layer, neuron] (float32),
    its coordinates ``methods`` and ``tasks``, and its group ``attrs``. Unpacks as
    ``methods, tasks, importance, attrs = ...``."""

    methods: list[str]
    tasks: list[str]
    importance: np.ndarray
    attrs: dict


IMPORTANCE_KIND = "attribution array"


def _open_importance(path: Path) -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"no attribution array at {path}; run the attribute stage")
    return open_finished_group(path, IMPORTANCE_KIND, "attribute", ("importance", "method", "task"))


def read_importance(path: Path) -> ImportanceArray:
    """(methods, tasks, importance [method, task, layer, neuron], attrs)."""
    group = _open_importance(path)

    def read(name: str) -> np.ndarray:
        return read_checked(group, name, slice(None), Path(path), IMPORTANCE_KIND, "attribute")

    return ImportanceArray(
        [str(s) for s in read("method")], [str(s) for s in read("task")], read("importance"), dict(group.attrs)
    )


def read_importance_on_ablation_items(path: Path) -> np.ndarray | None:
    """The importance computed on the ground truth's items only [method, task, layer, neuron]
    (same coordinates as ``read_importance``), or None when the array was not written."""
    group = _open_importance(path)
    if ON_ABLATION_ITEMS not in group:
        return None
    return read_checked(group, ON_ABLATION_ITEMS, slice(None), Path(path), IMPORTANCE_KIND, "attribute")
