"""Check cached stores end to end before trusting them: one line per store, exit 1 if any fails.

    python -m pipeline.tools.verify data/activations            # every store under a folder
    python -m pipeline.tools.verify data/activations/tiny-llava/vqa.zarr data/attribution/tiny-llava.zarr

For each activation store (``<task>.zarr``) and attribution array found at or under the given
paths: every array's metadata parses, every chunk file exists and is read with its crc32c
checked, the build is complete (an unfinished build is reported with its done blocks), and the
provenance attributes (code version, params hash, model) are present. ``store.verify`` does the
work; this module only finds the stores and prints the verdicts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.io import PARTIAL_PREFIX
from pipeline.method.store import StoreCheck, verify


def find_stores(path: Path) -> list[Path]:
    """``path`` itself when it is a Zarr group or an unfinished build, else every such folder
    under it (sorted; a group's own arrays are not descended into)."""
    path = Path(path)
    if (path / "zarr.json").is_file() or any(path.glob(f"{PARTIAL_PREFIX}*")):
        return [path]
    if not path.is_dir():
        return [path]  # verify reports it missing
    found: list[Path] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        found.extend(find_stores(child))
    return found


log = logging.getLogger(__name__)


def _verdicts_to_stdout() -> None:
    """The verdict lines are the command's output: this module's records go to stdout as bare
    lines (set afresh at each call, so a second ``main`` in one process does not double them);
    other loggers keep the root's stderr handler."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="stores, or folders holding them")
    p.add_argument("--quiet", action="store_true", help="report only the stores that fail")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _verdicts_to_stdout()
    checks: list[StoreCheck] = []
    for root in args.paths:
        stores = find_stores(root)
        if not stores:
            log.error("%-10s %s: no Zarr store at or under it", "MISSING", root)
            return 1
        for store in stores:
            check = verify(store, progress=sys.stderr.isatty())
            checks.append(check)
            if not (args.quiet and check.ok):
                log.log(logging.INFO if check.ok else logging.ERROR, "%s", check.line())
    bad = [c for c in checks if not c.ok]
    log.info("%d of %d stores verified%s", len(checks) - len(bad), len(checks), f"; {len(bad)} failed" if bad else "")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
