"""Atomic writes: every output appears complete under its final name, or not at all.

Map of this module:
- ``atomic_directory(path)``: a context manager yielding a fresh temporary sibling directory
  (``<path>.tmp``) to write into; on success it replaces ``path`` with it, on any error it
  removes it (``path`` is then left as it was).
- ``replace_directory(src, dst)``: rename a finished directory ``src`` onto ``dst``, removing
  an older ``dst`` first (used by ``atomic_directory`` and by the activation store's finalize).
- ``atomic_file(path)``: the same for one file (``<path>.tmp``, then ``os.replace``).
- ``write_parquet`` / ``write_json``: the small outputs (Parquet tables, JSON metrics), atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

TMP_SUFFIX = ".tmp"


def temporary_sibling(path: Path) -> Path:
    """``<path>.tmp``: where ``path`` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def replace_directory(src: Path, dst: Path) -> None:
    """Rename the finished directory ``src`` to ``dst``, removing an existing ``dst`` first."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Write a directory atomically: ``with atomic_directory(out) as tmp: <write into tmp>``.

    Yields ``<path>.tmp``, created empty (a leftover from a crashed run is removed first). When
    the body completes, ``path`` is replaced by it; when the body raises (anything, including
    KeyboardInterrupt), the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Write one file atomically: yields ``<path>.tmp`` (parent directories created); on success
    it is renamed onto ``path`` (``os.replace``), on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` (its columns and dtypes as they are, no index) to ``path``, atomically."""
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON (keys in their order, trailing newline) to ``path``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
