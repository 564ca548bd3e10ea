"""Verification: ``verify`` reads a store (activation store, attribution array or any Zarr
group) end to end, every chunk checksummed, and returns a ``StoreCheck``
(``python -m pipeline.tools.verify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr

from pipeline.io import PARTIAL_PREFIX
from pipeline.method.store.activations import STORE_KIND, StoreIndex
from pipeline.method.store.importance import IMPORTANCE_DIMS, IMPORTANCE_KIND
from pipeline.method.store.io import (
    StoreError,
    _checksummed,
    _one_line,
    _read_chunk,
    _restore_hint,
    _storage_chunks,
    open_finished_group,
)
from pipeline.method.store.layout import DONE_DIR, ITEM_ARRAYS, StoreLayout, human_bytes

PROVENANCE_KEYS = ("code_version", "params_hash")


@dataclass(frozen=True)
class StoreCheck:
    """The verdict of ``verify`` on one path: ``status`` is "ok", "incomplete" (an unfinished
    build: ``detail`` says how many blocks are done), "damaged", "unchecked" (readable, but
    written without checksums, before they existed) or "missing"; ``kind`` what the
    group is; ``arrays`` / ``chunks`` / ``nbytes`` what was read and checksummed."""

    path: Path
    status: str
    kind: str
    detail: str
    arrays: int = 0
    chunks: int = 0
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        """One line for a person: ``OK       data/activations/m/vqa.zarr: ...``."""
        return f"{self.status.upper():<10} {self.path}: {self.detail}"


def _scratch_progress(path: Path) -> str:
    """``"3 of 5 blocks done"`` for each unfinished build under ``path`` (``; ``-joined)."""
    parts = []
    for scratch in sorted(path.glob(f"{PARTIAL_PREFIX}*")):
        try:
            layout = StoreLayout(**zarr.open_group(str(scratch), mode="r").attrs["layout"])
            done = len(list((scratch / DONE_DIR).glob("*.done")))
            parts.append(f"{scratch.name}: {done} of {layout.n_blocks} blocks done")
        except (ValueError, KeyError, TypeError, OSError):
            parts.append(f"{scratch.name}: unreadable (it will be rebuilt)")
    return "; ".join(parts)


def verify(path: Path, progress: bool = False) -> StoreCheck:
    """Check the store at ``path`` end to end: every array's metadata and every chunk file
    present, every chunk read and its checksum verified, the build complete (no done markers
    left, ``complete`` set) and the provenance attributes (``PROVENANCE_KEYS``, and ``model`` for
    an activation store) present. Never raises for damage: the result says what is wrong."""
    from tqdm import tqdm

    path = Path(path)
    if not (path / "zarr.json").is_file():
        if path.is_dir() and any(path.glob(f"{PARTIAL_PREFIX}*")):
            return StoreCheck(
                path,
                "incomplete",
                STORE_KIND,
                f"unfinished build ({_scratch_progress(path)}); re-run its stage to finish it",
            )
        return StoreCheck(path, "missing", "?", "no Zarr group here (no zarr.json)")
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return StoreCheck(
            path,
            "damaged",
            "?",
            f"unreadable group metadata ({_one_line(exc)}); restore it with `dvc checkout --force {path}`",
        )
    if "layout" in attrs:
        kind, stage, required = STORE_KIND, "dump", ("z", *ITEM_ARRAYS, *StoreIndex.ARRAYS)
    elif attrs.get("dimensions") == list(IMPORTANCE_DIMS):
        kind, stage, required = IMPORTANCE_KIND, "attribute", ("importance", "method", "task")
    else:
        kind, stage, required = "zarr group", "its", ()
    try:
        group = open_finished_group(path, kind, stage, required)
        chunks = nbytes = 0
        arrays = sorted(group.array_keys())
        todo = [(name, key, region) for name in arrays for key, region in _storage_chunks(group[name])]
        for name, key, region in tqdm(todo, desc=f"verify {path.name}", disable=not progress, leave=False):
            nbytes += _read_chunk(group[name], name, key, region, path, kind, stage).nbytes
            chunks += 1
    except StoreError as exc:
        return StoreCheck(path, "damaged", kind, " ".join(str(exc).split()))
    missing = [k for k in PROVENANCE_KEYS + (("model",) if kind == STORE_KIND else ()) if not attrs.get(k)]
    unchecked = [name for name in arrays if not _checksummed(group[name])]
    if kind == STORE_KIND and (not attrs.get("complete") or (path / DONE_DIR).exists()):
        return StoreCheck(
            path, "incomplete", kind, "not marked complete; re-run the dump stage", len(arrays), chunks, nbytes
        )
    if missing:
        return StoreCheck(
            path,
            "damaged",
            kind,
            f"provenance attributes {missing} are missing; {_restore_hint(path, stage)}",
            len(arrays),
            chunks,
            nbytes,
        )
    if unchecked:
        which = (
            f"arrays {unchecked} carry" if len(unchecked) < len(arrays) else f"none of its {len(arrays)} arrays carries"
        )
        return StoreCheck(
            path,
            "unchecked",
            kind,
            f"readable, but {which} a checksum (written before checksums "
            f"existed); re-run the {stage} stage to rewrite it",
            len(arrays),
            chunks,
            nbytes,
        )
    what = f"model {attrs['model']}, " if "model" in attrs else ""
    return StoreCheck(
        path,
        "ok",
        kind,
        f"{kind}, {len(arrays)} arrays, {chunks} chunks read and checksummed "
        f"({human_bytes(nbytes)}); {what}params {attrs['params_hash']}, code {attrs['code_version']}",
        len(arrays),
        chunks,
        nbytes,
    )
