"""A params profile as the ``dvc exp run -S`` arguments that apply it (not a DVC stage).

``python -m stages.profile full`` prints one ``--set-param=<dotted.key>=<value>`` per line
for ``profiles/full.yaml``; ``./run.sh profile full`` passes them to ``dvc exp run``, which rewrites
those keys of params.yaml in place (comments kept) and runs what they invalidate. Before
printing, the profile is checked: every key it sets must exist in params.yaml (a typo would
otherwise add a key no stage reads) and the merged params must pass the schema, so a bad
profile fails here, naming the key, not an hour into the run.
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


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in: mappings key by key, any other value replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _leaves(over: dict, base: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of each value ``over`` sets; ConfigError for a key ``base`` lacks."""
    out: list[tuple[str, Any]] = []
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if not isinstance(base, dict) or key not in base:
            raise ConfigError(f"profile key {dotted!r} is not in params.yaml")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out.extend(_leaves(value, base[key], dotted + "."))
        else:
            out.append((dotted, value))
    return out


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
    return [f"--set-param={key}={json.dumps(value, separators=(',', ':'))}" for key, value in leaves]


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
