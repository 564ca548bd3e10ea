"""What made an artefact: code version, params hash and model identity, for Zarr attributes and JSON."""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = "hones-pipeline"


PROJECT_PACKAGES = ("pipeline", "stages")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _has_code(path: Path) -> bool:
    """False for an empty file or one holding only a docstring (nothing it runs can matter)."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return bool(body)


def imported_modules(path: Path) -> set[str]:
    """Every project module (``pipeline.*``, ``stages.*``) the file imports, anywhere in it
    (imports inside functions too); ``from a.b import c`` names both ``a.b`` and ``a.b.c``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PROJECT_PACKAGES}


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def source_files(module: str, root: Path = PROJECT_ROOT) -> set[str]:
    """Root-relative paths of the project files that importing ``module`` executes: its import
    closure, read with ``ast`` (never executed). Package ``__init__.py`` files count only where
    they hold code. This is exactly a stage's code dependency list in dvc.yaml."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        for i in range(1, len(parts)):  # parent packages run their __init__ first
            init = root.joinpath(*parts[:i], "__init__.py")
            if init.is_file() and _has_code(init):
                files.add(init.relative_to(root).as_posix())
        path = module_file(root, mod)
        if path is None:
            continue  # a name imported from a module, not a module
        if path.name != "__init__.py" or _has_code(path):
            files.add(path.relative_to(root).as_posix())
        todo.extend(imported_modules(path))
    return files


@functools.lru_cache(maxsize=None)
def code_version(entry: str) -> str:
    """``<package version>+src.<sha256[:12]>`` of the source files ``entry`` (a module name, the
    stage's own: ``stages.dump``) imports, transitively.

    Deterministic and exactly as wide as the stage's code dependencies: the same code gives the
    same string in any process, on any machine, at any git commit, so an output re-made by
    unchanged code is byte-identical and never invalidates what depends on it (a git commit id
    would change with every unrelated commit).
    """
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    h = hashlib.sha256()
    for rel in sorted(source_files(entry)):
        h.update(rel.encode() + b"\0" + (PROJECT_ROOT / rel).read_bytes() + b"\0")
    return f"{version}+src.{h.hexdigest()[:12]}"


def files_hash(*paths: str | Path) -> str:
    """sha256 (first 16 hex) over the names and bytes of ``paths`` (files), in the order given."""
    h = hashlib.sha256()
    for f in map(Path, paths):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def weights_hash(model_dir: str | Path) -> str | None:
    """sha256 (first 16 hex) over a local model folder's weight files; None for hub ids."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
    return files_hash(*files) if files else None


def provenance(model: str | None, params_hash: str | None, revision: str | None = None, *, entry: str) -> dict:
    """The attribute block every output carries; ``entry`` is the module that made it (``stages.dump``).
    ``cpu_kernels``: the instruction set of torch's CPU kernels (``AVX2``, ``AVX512``), which the
    floating-point results follow; None where torch is not loaded."""
    torch = sys.modules.get("torch")
    out = {
        "code_version": code_version(entry),
        "params_hash": params_hash,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability() if torch is not None else None,
    }
    if model is not None:
        out["model"] = str(model)
        out["model_revision"] = revision
        out["model_weights_sha256"] = weights_hash(model)
    return out
