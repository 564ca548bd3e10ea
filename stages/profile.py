"""A params profile as the ``dvc exp run -S`` arguments that apply it (not a DVC stage).

``python -m stages.profile full`` prints one ``--set-param=<dotted.key>=<value>`` per line
for ``profiles/full.yaml``; ``./run.sh profile full`` passes them to ``dvc exp run``, which rewrites
those keys of params.yaml in place (comments kept) and runs what they invalidate. Before
printing, the profile is checked: every key it sets must exist in params.yaml (a typo would
otherwise add a key no stage reads) and the merged params must pass the schema, so a bad
profile fails here, naming the key, not an hour into the run.

Two sections take new entries: ``models`` (a model the profile adds; ``same_as: <model>`` copies
that model's entry, as the profile leaves it, under the keys given beside it: another training
seed of the same recipe) and ``replicates``. DVC adds them with ``+key=value``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stages.params import ConfigError, ParamsFile, _error_lines

PROFILES = Path("profiles")
# Sections whose entries a profile may add (a new model, a new recipe), not only change.
EXTENDABLE = ("models", "replicates")
_DELETE = object()  # the value of a ``~key`` override (DVC deletes the key)


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in: mappings key by key, any other value replaced; an empty
    mapping for an ``EXTENDABLE`` section empties it (``replicates: {}``)."""
    out = dict(base)
    for key, value in over.items():
        emptied = value == {} and key in EXTENDABLE
        out[key] = (
            merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict) and not emptied
            else value
        )
    return out


def _new_leaves(value: Any, dotted: str) -> list[tuple[str, Any]]:
    """The leaves of a new entry, each to be added (``+`` prefix); mappings are walked down."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _new_leaves(v, f"{dotted}.{k}")]
    return [(f"+{dotted}", value)]


def _leaves(over: dict, base: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of each value ``over`` sets; ConfigError for a key ``base`` lacks,
    except a new entry of an ``EXTENDABLE`` section (its leaves' keys start with ``+``)."""
    out: list[tuple[str, Any]] = []
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if not isinstance(base, dict) or key not in base:
            if prefix.rstrip(".") in EXTENDABLE:
                out.extend(_new_leaves(value, dotted))
                continue
            raise ConfigError(f"profile key {dotted!r} is not in params.yaml")
        if value == {} and dotted in EXTENDABLE:
            if base[key]:
                # DVC (Hydra) merges a mapping into a mapping: delete the section, then add it empty.
                out.extend([(f"~{dotted}", _DELETE), (f"+{dotted}", {})])
        elif isinstance(value, dict) and isinstance(base[key], dict):
            out.extend(_leaves(value, base[key], dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _expand_same_as(over: dict, base: dict) -> dict:
    """``over`` with each new model's ``same_as: <model>`` replaced by that model's entry as the
    profile leaves it (``base`` merged with the rest of ``over``), the keys given beside it on top."""
    models = over.get("models")
    if not isinstance(models, dict) or not any(isinstance(m, dict) and "same_as" in m for m in models.values()):
        return over
    plain = {**over, "models": {k: v for k, v in models.items() if not (isinstance(v, dict) and "same_as" in v)}}
    resolved = merged(base, plain).get("models", {})
    out_models = dict(plain["models"])
    for name, entry in models.items():
        if isinstance(entry, dict) and "same_as" in entry:
            source = entry["same_as"]
            if source not in resolved:
                raise ConfigError(f"models.{name}.same_as: {source!r} is not a model; defined: {sorted(resolved)}")
            out_models[name] = merged(resolved[source], {k: v for k, v in entry.items() if k != "same_as"})
    return {**over, "models": out_models}


def set_param_arguments(profile: Path, params: Path = Path("params.yaml")) -> list[str]:
    """The ``--set-param`` arguments that turn ``params`` into ``params`` merged with ``profile``.

    Values are written as compact JSON (a subset of the YAML DVC parses them with), so lists and
    nulls survive and no argument holds a space. Raises ConfigError naming the file and key.
    """
    if not profile.is_file():
        raise ConfigError(f"profile not found: {profile}")
    base = yaml.safe_load(params.read_text())
    over = yaml.safe_load(profile.read_text()) or {}
    if not isinstance(over, dict):
        raise ConfigError(f"{profile}: the top level must be a mapping of sections")
    try:
        over = _expand_same_as(over, base)
        leaves = _leaves(over, base)
    except ConfigError as exc:
        raise ConfigError(f"{profile}: {exc}") from None
    if not leaves:
        # run.sh would pass dvc exp run one empty argument: refuse instead.
        raise ConfigError(f"{profile}: the profile sets no key")
    try:
        ParamsFile.model_validate(merged(base, over))
    except ValidationError as exc:
        raise ConfigError(f"{profile}: invalid params once merged: " + "; ".join(_error_lines(exc))) from None
    return [f"--set-param={key}" if value is _DELETE else f"--set-param={key}={_value(value)}" for key, value in leaves]


def _value(value: Any) -> str:
    """``value`` as DVC's override grammar (Hydra's) reads it: compact JSON, but a list of plain
    words unquoted (Hydra takes ``[a-b,c]`` as strings) and a mapping as ``{key:value}``."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if (
        isinstance(value, str)
        and value
        and all(c.isalnum() or c in "-_." for c in value)
        and not value.replace(".", "").replace("-", "").isdigit()
    ):
        return value
    return json.dumps(value, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="profile name: profiles/<name>.yaml (full: the full study)")
    args = parser.parse_args(argv)
    try:
        lines = set_param_arguments(PROFILES / f"{args.name}.yaml")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
