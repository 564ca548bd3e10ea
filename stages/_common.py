"""Shared plumbing of every stage entry point: the error exit, output locks, stopping with the parent.

A stage is thin: it declares the params keys it reads (``READS``, the same list as its
``dvc.yaml`` entry), parses its paths, calls library functions and writes its outputs.
``@entry`` runs it:
- logging set up;
- an exclusive lock on its ``--out`` path (a second run on the same output stops at once with
  one line naming the holder's PID), and a leftover ``<out>.tmp`` of a killed run removed;
- a watch on the process that started it (DVC, through its shell, or whoever ran the command):
  when it dies, the stage stops instead of writing an output nobody will record;
- SIGTERM (and the parent's death) raise ``StageStopped`` in the main thread, so every atomic
  write in progress is rolled back; exit code 143;
- under DVC (``DVC_STAGE`` set) or with ``$HONES_TIMINGS`` set, a timing record of the run in
  ``timings/`` (or ``$HONES_TIMINGS``): wall time, and the work the stage reported through
  ``report_rows``. No stage declares that folder, so timings never invalidate a cached result;
- every mistake a user can make (``PipelineError``) printed as one line with exit code 2;
  anything else is a bug and keeps its traceback. Loading models and benchmark data is in ``stages._load``, imported
only by the stages that do it (so editing it reruns only them).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import remove_path, temporary_sibling
from pipeline.timings import StageTiming, peak_rss_mib, write_timing
from stages.params import write_params_audit

log = logging.getLogger("stages")
PARAMS_FILE = Path("params.yaml")
TIMINGS_FOLDER = Path("timings")


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
    names = [v for v in (_argv_value("--model"), _argv_value("--task"), _argv_value("--name")) if v]
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
            raise OutputLocked(
                f"{path} is being written by another run (PID {holder}); wait for it to "
                "finish or stop it, then run again"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


class StageStopped(BaseException):
    """SIGTERM, or the process that started the stage died. A BaseException, as KeyboardInterrupt
    is, so that no ``except Exception`` on the way swallows it and every atomic write unwinds."""


SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh", "mksh", "csh", "tcsh"})


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(command name, state, parent PID) of ``pid`` from /proc (Linux), None when unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return name, rest[0], int(rest[1])


def watched_parent() -> int:
    """The process whose death stops this stage: the parent, or, when DVC started the stage
    (``DVC_STAGE`` is set) through a shell (``$SHELL -c cmd``), the shell's parent, DVC itself:
    killing DVC leaves the shell waiting on us, so the shell's survival says nothing."""
    pid = os.getppid()
    stat = _proc_stat(pid)
    if "DVC_STAGE" in os.environ and stat is not None and stat[0] in SHELLS and stat[2] > 1:
        return stat[2]
    return pid


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[1] not in ("Z", "X")  # a zombie has exited
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_when_parent_dies(poll_seconds: float = 1.0) -> None:
    """Start a daemon thread that sends SIGTERM to the main thread once the watched parent is
    gone (this process re-parented, or the watched PID dead)."""
    parent, first_ppid = watched_parent(), os.getppid()

    def watch() -> None:
        while os.getppid() == first_ppid and _alive(parent):
            time.sleep(poll_seconds)
        _stop_reason.append(f"the process that started this stage (PID {parent}) is gone")
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_stop_reason: list[str] = []


def _raise_stopped(signum, frame) -> None:
    raise StageStopped(_stop_reason[-1] if _stop_reason else "SIGTERM received")


def _remove_leftover_tmp(out: Path) -> None:
    tmp = temporary_sibling(out)
    if tmp.exists():
        log.info("removing %s left by a killed run", tmp)
        remove_path(tmp)


_work: dict[str, tuple[int, str]] = {}


def report_rows(rows: int, unit: str) -> None:
    """The work this stage run did, for its timing record: ``rows`` units of ``unit`` (model
    sequences forwarded, items, optimiser examples...). A later call replaces an earlier one."""
    _work["rows"] = (int(rows), unit)


def _seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux /proc), so that a stage's time includes the
    interpreter's start-up and its imports (torch alone takes seconds); None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _timings_folder() -> Path | None:
    """Where this run's timing goes: ``$HONES_TIMINGS``, else ``timings/`` when DVC runs the
    stage, else nowhere (a stage run by hand, or by a test, leaves the committed table alone)."""
    if os.environ.get("HONES_TIMINGS"):
        return Path(os.environ["HONES_TIMINGS"])
    return TIMINGS_FOLDER if "DVC_STAGE" in os.environ else None


def _model_rows() -> tuple[int | None, str | None]:
    """The sequences this process ran through a model (``pipeline.model.batching``), when the
    stage reported no other measure of its work."""
    batching = sys.modules.get("pipeline.model.batching")
    done = batching.rows_completed() if batching is not None else 0
    return (done, "sequences") if done else (None, None)


def _record_timing(stage: str, started_utc: str, wall_s: float, load_1m: float) -> None:
    folder = _timings_folder()
    if folder is None:
        return
    rows, unit = _work.get("rows") or _model_rows()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    gpu = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    write_timing(
        folder,
        StageTiming.measured(
            stage,
            started_utc,
            wall_s,
            rows,
            unit,
            threads=threads,
            cpus=os.cpu_count() or 1,
            load_1m=load_1m,
            peak_host_mib=peak_rss_mib(),
            peak_gpu_mib=gpu,
            cpu_kernels=torch.backends.cpu.get_cpu_capability() if torch is not None else None,
        ),
    )


def entry(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage's main: logging, a lock on ``--out``, stopping with its parent, one-line errors
    with exit code 2 (143 when stopped)."""

    @functools.wraps(fn)
    def wrapper() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # zarr reads metadata in asyncio tasks; when a damaged store stops the stage, the tasks
        # still pending are "destroyed" at exit, which asyncio logs as a second ERROR line.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        if os.environ.get("HONES_CPU_SHARED") == "1":
            log.info(
                "other processes were running when this stage started: OpenMP threads spin briefly "
                "(GOMP_SPINCOUNT=%s; stages/__init__.py)",
                os.environ.get("GOMP_SPINCOUNT"),
            )
        if os.environ.get("HONES_CPU_ISA") == "avx2":
            log.debug(
                "CPU kernels pinned to AVX2 (stages/__init__.py; HONES_CPU_ISA=native to let them follow the CPU)"
            )
        signal.signal(signal.SIGTERM, _raise_stopped)
        _stop_when_parent_dies()
        out = _argv_value("--out")
        module = fn.__module__ if fn.__module__ != "__main__" else Path(sys.argv[0]).stem
        age = _seconds_since_process_start() or 0.0
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age))
        load_1m, t0 = os.getloadavg()[0], time.perf_counter() - age
        try:
            if out is None:
                fn()
            else:
                with output_lock(Path(out)):
                    _remove_leftover_tmp(Path(out))
                    fn()
        except PipelineError as exc:
            # One line: the message names the file, key or item; a traceback would bury it.
            msg = " ".join(str(exc).split())
            log.error("%s", msg)
            sys.exit(2)
        except StageStopped as exc:
            log.error(
                "stopped: %s; the output being written was rolled back (a resumable stage keeps its "
                "scratch and resumes on the next run)",
                exc,
            )
            sys.exit(128 + signal.SIGTERM)
        wall_s = time.perf_counter() - t0
        write_params_audit(stage_id(module))
        _record_timing(os.environ.get("DVC_STAGE") or stage_id(module), started, wall_s, load_1m)

    return wrapper
