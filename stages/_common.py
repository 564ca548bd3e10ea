"""Shared plumbing of every stage entry point: the error exit and output locks.

A stage is thin: it declares the params keys it reads (``READS``, the same list as its
``dvc.yaml`` entry), parses its paths, calls library functions and writes its outputs.
``@entry`` runs it: logging set up, an exclusive lock on its ``--out`` path, and every mistake a
user can make (``PipelineError``) printed as one line with exit code 2; anything else is a bug
and keeps its traceback. Loading models and benchmark data is in ``stages._load``, imported
only by the stages that do it (so editing it reruns only them).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from stages.params import write_params_audit

log = logging.getLogger("stages")
PARAMS_FILE = Path("params.yaml")


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    return p


def _argv_value(flag: str) -> str | None:
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def stage_id(module: str) -> str:
    """``heads@tiny-llava-vqa``: the stage module's short name and its matrix arguments."""
    short = module.rsplit(".", 1)[-1]
    names = [v for v in (_argv_value("--model"), _argv_value("--task")) if v]
    return f"{short}@{'-'.join(names)}" if names else short


class OutputLocked(PipelineError):
    """Another process is writing the same output."""


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` for this process's lifetime (released by the OS if it dies).

    The lock file lives in the temp directory, keyed by the absolute path, so it never appears
    among the outputs DVC hashes.
    """
    # Under torchrun every rank of one job writes its own blocks: each rank takes the lock of
    # its rank number, so a second job collides rank by rank and is refused.
    rank = f"#rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    key = hashlib.sha256((str(Path(path).resolve()) + rank).encode()).hexdigest()[:24]
    lock_dir = Path(tempfile.gettempdir()) / "hones-locks"
    lock_dir.mkdir(exist_ok=True)
    fh = open(lock_dir / f"{key}.lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise OutputLocked(f"{path} is being written by another run (PID {holder}); wait for it to "
                               "finish or stop it, then run again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def entry(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage's main: logging, a lock on ``--out``, one-line errors with exit code 2."""

    @functools.wraps(fn)
    def wrapper() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        out = _argv_value("--out")
        try:
            if out is None:
                fn()
            else:
                with output_lock(Path(out)):
                    fn()
        except PipelineError as exc:
            # One line: the message names the file, key or item; a traceback would bury it.
            msg = " ".join(str(exc).split())
            log.error("%s", msg)
            sys.exit(2)
        module = fn.__module__ if fn.__module__ != "__main__" else Path(sys.argv[0]).stem
        write_params_audit(stage_id(module))

    return wrapper
