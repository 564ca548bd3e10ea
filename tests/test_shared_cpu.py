"""How the stages' OpenMP threads wait (``stages/__init__.py``): briefly when other processes
are running at start, OpenMP's default otherwise, a user's own setting always kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import os, stages; print(os.environ.get('HONES_CPU_SHARED'), os.environ.get('GOMP_SPINCOUNT'))"
KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "HONES_CPU_SHARED")


def probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.fixture
def busy_cores():
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@pytest.mark.slow
def test_other_running_processes_shorten_the_spin(busy_cores):
    assert probe() == ["1", "1000"]


@pytest.mark.slow
def test_a_users_setting_and_a_parents_choice_are_kept(busy_cores):
    assert probe(GOMP_SPINCOUNT="5") == ["None", "5"]
    assert probe(OMP_WAIT_POLICY="PASSIVE") == ["None", "None"]
    assert probe(HONES_CPU_SHARED="0") == ["0", "None"]  # a worker of a stage that started alone


def test_runnable_count_excludes_this_process(monkeypatch, tmp_path):
    import stages

    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 1\nprocs_blocked 0\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path, *a, **k)
    )
    assert stages._others_running(samples=3, interval_s=0) == 0
    stat.write_text("procs_running 4\n")
    assert stages._others_running(samples=3, interval_s=0) == 3
