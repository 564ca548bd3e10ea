"""Atomic writes: every output appears complete under its final name, or not at all.

Map of this module:
- ``atomic_directory(path)``: a context manager yielding a fresh temporary sibling directory
  (``<path>.tmp``) to write into; on success it replaces ``path`` with it, on any error it
  removes it (``path`` is then left as it was).
- ``replace_directory(src, dst)``: rename a finished directory ``src`` onto ``dst``, removing
  an older ``dst`` first (used by ``atomic_directory`` and by the activation store's finalize).
- ``atomic_file(path)``: the same for one file (``<path>.tmp``, then ``os.replace``).
- ``resumable_scratch(out, key)`` / ``publish_scratch(scratch, out)``: the scratch directory of a
  resumable output (the activation store, the default model's training) lives *inside* the
  output, as ``<out>/.partial-<key>/``, and replaces it when finished. Inside, because DVC
  deletes a stage's outputs before running it and a run-cache restore runs no stage code: only a
  scratch within a ``persist: true`` output both survives to be resumed and can never outlive
  the output it was for (see README, "Killed runs").
- ``write_parquet`` / ``write_json``: the small outputs (Parquet tables, JSON metrics), atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
PARTIAL_PREFIX = ".partial-"


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


def remove_path(path: Path) -> None:
    """Remove ``path`` whether it is a directory, a file or a link; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def resumable_scratch(out: Path, key: str) -> Path:
    """Prepare ``out`` for a resumable build keyed by ``key`` (a params hash) and return its
    scratch directory ``<out>/.partial-<key>`` (not created here).

    Everything else under ``out`` is stale and removed: a finished output of an earlier run (the
    stage is running, so it is being replaced), scratch of other keys (other params or code).
    So is a leftover ``<out>.tmp`` (a kill between ``publish_scratch``'s renames). A scratch of
    the same key is kept: it holds a killed run's work to resume. Call it while holding the
    output's lock.
    """
    out = Path(out)
    scratch = out / f"{PARTIAL_PREFIX}{key}"
    remove_path(temporary_sibling(out))
    if out.exists() and not out.is_dir():
        remove_path(out)
    if out.is_dir():
        for child in out.iterdir():
            if child != scratch:
                log.info("removing stale %s", child)
                remove_path(child)
    out.mkdir(parents=True, exist_ok=True)
    return scratch


def publish_scratch(scratch: Path, out: Path) -> None:
    """Make the finished ``scratch`` (inside ``out``, see ``resumable_scratch``) the output ``out``:
    renamed out of ``out`` to ``<out>.tmp``, ``out`` removed, ``<out>.tmp`` renamed to ``out``."""
    scratch, out = Path(scratch), Path(out)
    tmp = temporary_sibling(out)
    remove_path(tmp)
    scratch.rename(tmp)
    replace_directory(tmp, out)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` (its columns and dtypes as they are, no index) to ``path``, atomically."""
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON (keys in their order, trailing newline) to ``path``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
