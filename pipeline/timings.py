"""Stage timings as data: one JSON record per stage run and a Markdown table over all of them.

The records live in a folder that no stage reads or declares (``timings/`` by default), so a
new timing never invalidates a cached result; a stage that DVC skips keeps its last record,
whose ``started_utc`` says when it was measured.

- ``StageTiming``: one run of one stage: wall time (s), the work it did (``rows`` of ``unit``),
  rows/s, its peak host memory (and GPU memory, where it used a GPU), and what the machine
  was like (torch threads and the instruction set of torch's CPU kernels, None when the stage
  loads no torch; CPUs; 1-minute load average at the start: on a shared machine the same stage
  can take twice as long under load).
- ``peak_rss_mib()``: this process's peak resident memory.
- ``write_timing(folder, record)``: ``<folder>/<stage>.json``, then the table is rewritten.
- ``read_timings(folder)``: every record, in the order the stages started.
- ``timings_markdown(records)``: the table the README shows, with a total.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.io import atomic_file

log = logging.getLogger(__name__)

TABLE_FILE = "timings.md"


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB: VmHWM on Linux (its own, where getrusage's
    maxrss also counts what the parent had before exec), else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class StageTiming:
    """One run of one stage. ``wall_s``: seconds from the stage process's start (interpreter
    start-up and imports included, where the OS tells) to its outputs written; ``rows``: units of work done
    (``None`` when the stage reports none); ``rows_per_s``: rows / wall_s; ``peak_host_mib``:
    the process's peak resident memory; ``peak_gpu_mib``: torch's peak GPU allocation (None
    when the stage used no GPU); ``cpu_kernels``: torch's CPU capability (``AVX2``, ``AVX512``)."""

    stage: str
    started_utc: str
    wall_s: float
    rows: int | None
    unit: str | None
    rows_per_s: float | None
    threads: int | None
    cpus: int
    load_1m: float
    peak_host_mib: float | None = None
    peak_gpu_mib: float | None = None
    cpu_kernels: str | None = None

    @classmethod
    def measured(
        cls,
        stage: str,
        started_utc: str,
        wall_s: float,
        rows: int | None,
        unit: str | None,
        *,
        threads: int | None,
        cpus: int,
        load_1m: float,
        peak_host_mib: float | None = None,
        peak_gpu_mib: float | None = None,
        cpu_kernels: str | None = None,
    ) -> StageTiming:
        rate = round(rows / wall_s, 2) if rows is not None and wall_s > 0 else None
        return cls(
            stage,
            started_utc,
            round(wall_s, 2),
            rows,
            unit,
            rate,
            threads,
            cpus,
            round(load_1m, 2),
            None if peak_host_mib is None else round(peak_host_mib, 1),
            None if peak_gpu_mib is None else round(peak_gpu_mib, 1),
            cpu_kernels,
        )


def _record_path(folder: Path, stage: str) -> Path:
    # Matrix stages are named like dump@tiny-llava-vqa: safe as a file name as it is.
    return Path(folder) / f"{stage}.json"


def write_timing(folder: Path, record: StageTiming) -> None:
    """Write ``record`` to ``<folder>/<stage>.json`` and rewrite ``<folder>/timings.md``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(_record_path(folder, record.stage)) as tmp:
        tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    with atomic_file(folder / TABLE_FILE) as tmp:
        tmp.write_text(timings_markdown(read_timings(folder)))
    log.info(
        "%s: %.1f s%s",
        record.stage,
        record.wall_s,
        f", {record.rows:,} {record.unit} ({record.rows_per_s:,.1f}/s)" if record.rows is not None else "",
    )


def read_timings(folder: Path) -> list[StageTiming]:
    """Every record in ``folder``, ordered by start time. A file that is not a record (a
    hand-edited one, say) is an error naming it."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            records.append(StageTiming(**json.loads(path.read_text())))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is not a stage timing record ({exc})") from None
    return sorted(records, key=lambda r: (r.started_utc, r.stage))


def timings_markdown(records: list[StageTiming]) -> str:
    """A Markdown table of ``records`` (one row each, in the given order) and a total row."""
    lines = [
        "| stage | wall (s) | rows | unit | rows/s | started (UTC) | threads | kernels | load (1 min) "
        "| peak MiB (host / GPU) |",
        "| --- | ---: | ---: | --- | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for r in records:
        rows = f"{r.rows:,}" if r.rows is not None else ""
        rate = f"{r.rows_per_s:,.1f}" if r.rows_per_s is not None else ""
        peak = "" if r.peak_host_mib is None else f"{r.peak_host_mib:,.0f}"
        if r.peak_gpu_mib is not None:
            peak += f" / {r.peak_gpu_mib:,.0f}"
        lines.append(
            f"| {r.stage} | {r.wall_s:,.1f} | {rows} | {r.unit or ''} | {rate} | {r.started_utc} "
            f"| {r.threads if r.threads is not None else ''} | {r.cpu_kernels or ''} | {r.load_1m:.2f} | {peak} |"
        )
    total = sum(r.wall_s for r in records)
    lines.append(f"| **total** | **{total:,.1f}** ({total / 60:.1f} min) | | | | | | | | |")
    return "\n".join(lines) + "\n"
