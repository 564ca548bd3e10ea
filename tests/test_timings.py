"""Stage timings as data: records, the table, and what a stage writes (and where it does not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.timings import TABLE_FILE, StageTiming, read_timings, timings_markdown, write_timing

REPO = Path(__file__).resolve().parent.parent

# A stage that forwards 96 rows through for_each_batch, or reports its own measure of work.
STAGE = """
import sys, time
sys.path.insert(0, {repo!r})
from pipeline.model.batching import for_each_batch
from stages._common import entry, report_rows

@entry
def main():
    time.sleep(0.2)
    for_each_batch(96, 32, lambda sl: None, what="rows", progress=False)
    if "--own" in sys.argv:
        report_rows(7, "masks")

main()
"""


def _record(stage: str, started: str, wall: float, rows: int | None = 10) -> StageTiming:
    return StageTiming.measured(
        stage, started, wall, rows, "sequences" if rows is not None else None, threads=2, cpus=2, load_1m=0.5
    )


def test_records_round_trip_in_start_order_and_the_table_totals_them(tmp_path) -> None:
    write_timing(tmp_path, _record("b", "2026-01-01T00:00:05Z", 3.0))
    write_timing(tmp_path, _record("a", "2026-01-01T00:00:09Z", 4.5, rows=None))
    write_timing(tmp_path, _record("c", "2026-01-01T00:00:01Z", 2.0, rows=30))
    records = read_timings(tmp_path)
    assert [r.stage for r in records] == ["c", "b", "a"]
    assert records[0].rows_per_s == 15.0 and records[2].rows_per_s is None
    table = (tmp_path / TABLE_FILE).read_text()
    assert table == timings_markdown(records)
    lines = table.splitlines()
    assert lines[2].startswith("| c | 2.0 | 30 | sequences | 15.0 |")
    assert lines[4].startswith("| a | 4.5 |  |  |  |")
    assert "| **total** | **9.5** (0.2 min) |" in lines[-1]


def test_a_rerun_replaces_the_stages_record(tmp_path) -> None:
    write_timing(tmp_path, _record("a", "2026-01-01T00:00:00Z", 3.0))
    write_timing(tmp_path, _record("a", "2026-01-02T00:00:00Z", 1.0))
    assert [(r.stage, r.wall_s) for r in read_timings(tmp_path)] == [("a", 1.0)]


def test_a_file_that_is_not_a_record_is_named(tmp_path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"stage": "x"}))
    with pytest.raises(ValueError, match="x.json is not a stage timing record"):
        read_timings(tmp_path)


def _run_stage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "stage.py"
    script.write_text(STAGE.format(repo=str(REPO)))
    environ = {k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", "HONES_TIMINGS")}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize("own", [False, True])
def test_a_stage_run_by_dvc_records_its_time_and_rows(tmp_path, own) -> None:
    proc = _run_stage(tmp_path, *(["--own"] if own else []), DVC_STAGE="dump@m-vqa")
    assert proc.returncode == 0, proc.stderr
    (record,) = read_timings(tmp_path / "timings")
    assert record.stage == "dump@m-vqa"
    # The process's start (interpreter and imports) to its end: at least the stage's own sleep.
    assert 0.2 <= record.wall_s < 60
    assert (record.rows, record.unit) == ((7, "masks") if own else (96, "sequences"))
    assert record.rows_per_s == pytest.approx(record.rows / record.wall_s, rel=0.01)
    assert record.cpus == os.cpu_count() and record.threads is not None  # the stage loaded torch
    assert "dump@m-vqa" in (tmp_path / "timings" / TABLE_FILE).read_text()


@pytest.mark.slow
def test_a_stage_run_by_hand_writes_no_timing_unless_asked(tmp_path) -> None:
    assert _run_stage(tmp_path).returncode == 0
    assert not (tmp_path / "timings").exists()
    assert _run_stage(tmp_path, HONES_TIMINGS=str(tmp_path / "elsewhere")).returncode == 0
    assert [r.stage for r in read_timings(tmp_path / "elsewhere")] == ["stage"]


def test_no_stage_reads_or_writes_the_timings_folder_through_dvc() -> None:
    """A timing never invalidates a result: the folder is neither a dependency nor an output."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        paths = list(stage.get("deps") or [])
        for key in ("outs", "metrics", "plots"):
            paths += [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(key) or []]
        assert not [p for p in paths if str(p).split("/")[0] == "timings"], name
