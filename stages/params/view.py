"""The typed, declared view each stage gets of params.yaml, and loading the file.

Map of this module:
- ``read_params(path, reads, **names)``: the file as one stage sees it. ``reads`` is the
  stage's declaration (``"heads.split"``, ``"runtime.threads"``, ``"models.{model}"``), the
  same list that ``dvc.yaml`` declares for the stage (``tests/test_graph.py`` keeps both
  equal); reading a key outside it is a bug and raises ``UndeclaredParam``.
- ``load_params_file`` / ``validate_section``: the file (a section) validated against the schema
  (``stages.params.schema``), every bad key named in one ``ConfigError``;
- ``declared_keys``: a declaration with its names filled in, as dvc.yaml resolves them;
- ``write_params_audit``, ``params_hash``: the keys a process read, and a hash of configs.

The library (``pipeline/``) never sees these objects: stages pass plain arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stages.params.schema import ConfigError, ParamsFile


class UndeclaredParam(AttributeError):
    """A stage read a params key its declaration (and so dvc.yaml) does not list: a bug."""


def _error_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if len(loc) >= 3 and loc[0] == "models" and loc[2] in ("train", "pretrained"):
            del loc[2]  # the union's tag
        key = ".".join([prefix, *loc] if prefix else loc)
        key = re.sub(r"^(models\.[^.]+)\.spec\.", r"\1.", key)  # the spec nesting is an implementation detail
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") else ""
        lines.append(f"{key or '<top level>'}: {msg}{got}")
    return lines


def validate_section(model: type[BaseModel], data: Any, section: str) -> BaseModel:
    """Validate ``data`` (the params section ``section``) against ``model``; ConfigError names each bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"params section {section!r} must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid params: " + "; ".join(_error_lines(exc, section))) from None


def load_params_file(path: Path) -> ParamsFile:
    """Parse and validate params.yaml; a YAML syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return ParamsFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid params: " + "; ".join(_error_lines(exc))) from None


# --- what one stage sees ------------------------------------------------------------------------


class StageParams:
    """Read-only view of a validated ``ParamsFile`` restricted to the keys a stage declares.

    >>> p = read_params("params.yaml", ("heads.split", "models.{model}"), model="tiny-llava")
    >>> p.heads.split, p.models["tiny-llava"].dtype
    >>> p.heads.top_k   # UndeclaredParam: not in the declaration

    A declared key covers everything under it (``models.tiny-llava`` covers its ``dtype``).
    Every read is recorded in ``accessed`` (the graph test checks declared == read).
    """

    def __init__(
        self, root: Any, declared: tuple[str, ...], prefix: str = "", accessed: set[str] | None = None
    ) -> None:
        self._root = root
        self._declared = declared
        self._prefix = prefix
        self.accessed = accessed if accessed is not None else set()

    def _covered(self, key: str) -> str | None:
        for d in self._declared:
            if key == d or key.startswith(d + "."):
                return d
        return None

    def _get(self, name: str) -> Any:
        key = f"{self._prefix}.{name}" if self._prefix else name
        value = self._root[name] if isinstance(self._root, dict) else getattr(self._root, name)
        cover = self._covered(key)
        if cover is not None:
            self.accessed.add(cover)
            return value
        if any(d.startswith(key + ".") for d in self._declared):
            return StageParams(value, self._declared, key, self.accessed)
        raise UndeclaredParam(f"params key {key!r} is read but not declared; declared: {list(self._declared)}")

    def as_dict(self) -> dict[str, Any]:
        """Every declared key under this view and its value (JSON-able): for params hashes and
        provenance attributes. Counts as reading all of them."""
        out: dict[str, Any] = {}
        for key in self._declared:
            if self._prefix and not key.startswith(self._prefix + "."):
                continue
            value: Any = self._root
            for part in (key[len(self._prefix) + 1 :] if self._prefix else key).split("."):
                value = value[part] if isinstance(value, dict) else getattr(value, part)
            self.accessed.add(key)
            out[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._get(name)

    def __getitem__(self, name: str) -> Any:
        return self._get(name)


_PLACEHOLDER = re.compile(r"\{([\w.-]+)\}")


def declared_keys(reads: tuple[str, ...], values: Any = None, **names: str) -> tuple[str, ...]:
    """The stage's declaration with its names filled in, as dvc.yaml resolves them:
    ``models.{model}`` -> ``models.m`` (a matrix name), ``benchmark.{benchmark.source}`` ->
    ``benchmark.synthetic`` (a params value, like dvc.yaml's ``${benchmark.source}``)."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name in names:
            return str(names[name])
        value: Any = values
        for part in name.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        return str(value)

    return tuple(_PLACEHOLDER.sub(fill, r) for r in reads)


def read_params(path: Path, reads: tuple[str, ...], **names: str) -> StageParams:
    """Validate the whole params file, then give the stage its declared view of it."""
    full = load_params_file(path)
    if "model" in names and names["model"] not in full.models:
        raise ConfigError(
            f"model {names['model']!r} is not defined under 'models' in {path}; defined: {sorted(full.models)}"
        )
    if "task" in names and names["task"] not in full.tasks:
        raise ConfigError(f"task {names['task']!r} is not in 'tasks' of {path}: {full.tasks}")
    if "ood_benchmark" in names and names["ood_benchmark"] not in full.ood_benchmarks:
        raise ConfigError(
            f"benchmark {names['ood_benchmark']!r} is not under 'ood_benchmarks' in {path}; "
            f"defined: {sorted(full.ood_benchmarks)}"
        )
    view = StageParams(full, declared_keys(reads, full, **names))
    audit = os.environ.get("HONES_PARAMS_AUDIT")
    if audit:
        _AUDITS.append((Path(audit), view))
    return view


_AUDITS: list[tuple[Path, StageParams]] = []


def write_params_audit(stage_id: str) -> None:
    """For the graph test: the keys this process read, as JSON under ``$HONES_PARAMS_AUDIT``."""
    for folder, view in _AUDITS:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"declared": sorted(view._declared), "accessed": sorted(view.accessed)}
        (folder / f"{stage_id}.json").write_text(json.dumps(record, indent=1))


def params_hash(*configs: BaseModel | dict | Any) -> str:
    """Short sha256 of the configs' canonical JSON: identifies what produced an artefact."""

    def dump(c: Any) -> Any:
        if isinstance(c, BaseModel):
            return c.model_dump(mode="json")
        return c

    payload = [dump(c) for c in configs]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
