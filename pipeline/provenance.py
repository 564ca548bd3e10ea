"""What made an artefact: code version, params hash and model identity, for Zarr attributes and JSON."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE = "hones-pipeline"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+g<git commit>[.dirty]`` when run from a git checkout, else the version."""
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    if not commit:
        return version
    return f"{version}+g{commit}" + (".dirty" if dirty else "")


def weights_hash(model_dir: str | Path) -> str | None:
    """sha256 (first 16 hex) over a local model folder's weight files; None for hub ids."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16] if files else None


def provenance(model: str | None, params_hash: str | None, revision: str | None = None) -> dict:
    """The attribute block every output carries."""
    out = {"code_version": code_version(), "params_hash": params_hash}
    if model is not None:
        out["model"] = str(model)
        out["model_revision"] = revision
        out["model_weights_sha256"] = weights_hash(model)
    return out
