"""A stage's life: it stops when whoever started it dies or on SIGTERM, rolling back what it was writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A stage that writes its output atomically, slowly: it is stopped while the output is half-written.
SLOW_STAGE = """
import os, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipeline.io import atomic_directory
from stages._common import entry

@entry
def main():
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    Path({pid_file!r}).write_text(str(os.getpid()))
    with atomic_directory(out) as tmp:
        (tmp / "half").write_text("written")
        for _ in range(600):
            time.sleep(0.1)

main()
"""

# Starts the stage as DVC does (through `$SHELL -c`, DVC_STAGE set), then waits to be killed.
PARENT = """
import os, subprocess, sys, time
env = {{**os.environ, "DVC_STAGE": "slow"}}
with open({log!r}, "w") as log:
    subprocess.Popen(["bash", "-c", {cmd!r} + "; true"], env=env, stdout=log, stderr=log)
    time.sleep(600)
"""


def _wait(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def slow_stage(tmp_path) -> tuple[Path, Path, Path]:
    script, pid_file, out = tmp_path / "slow_stage.py", tmp_path / "stage.pid", tmp_path / "out"
    script.write_text(SLOW_STAGE.format(repo=str(REPO), pid_file=str(pid_file)))
    return script, pid_file, out


@pytest.mark.slow
def test_stage_stops_when_the_process_that_started_it_dies(tmp_path, slow_stage) -> None:
    """Kill DVC (here: a parent that started the stage through a shell, as DVC does): the stage
    notices within seconds, rolls back its half-written output and exits, instead of finishing
    an output nobody will record."""
    script, pid_file, out = slow_stage
    log = tmp_path / "stage.log"
    cmd = f"{sys.executable} {script} --out {out}"
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(log=str(log), cmd=cmd)], cwd=tmp_path)
    try:
        assert _wait(lambda: (Path(f"{out}.tmp") / "half").is_file()), "the stage never started writing"
        stage_pid = int(pid_file.read_text())
        parent.kill()
        parent.wait(timeout=10)
        assert _wait(lambda: not _alive(stage_pid), 15), "the stage outlived the process that started it"
    finally:
        parent.kill()
    text = log.read_text()
    assert f"stopped: the process that started this stage (PID {parent.pid}) is gone" in text, text[-2000:]
    assert not out.exists() and not Path(f"{out}.tmp").exists()


@pytest.mark.slow
def test_sigterm_rolls_back_the_output_being_written(tmp_path, slow_stage) -> None:
    script, pid_file, out = slow_stage
    proc = subprocess.Popen(
        [sys.executable, str(script), "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait(lambda: (Path(f"{out}.tmp") / "half").is_file()), "the stage never started writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped: SIGTERM received; the output being written was rolled back" in err
    assert not out.exists() and not Path(f"{out}.tmp").exists()


@pytest.mark.slow
def test_leftover_tmp_of_a_killed_run_is_removed_at_start(tmp_path, slow_stage) -> None:
    """A kill between the two renames of an atomic write leaves ``<out>.tmp``; the next run of
    the stage on that output removes it before doing anything else."""
    script, pid_file, out = slow_stage
    leftover = Path(f"{out}.tmp")
    (leftover / "from-a-killed-run").mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait(lambda: (leftover / "half").is_file())
        assert not (leftover / "from-a-killed-run").exists()
    finally:
        proc.kill()
        proc.communicate(timeout=15)


# A resumable stage as the dump and the training are: its scratch inside its persist output,
# one piece every 0.2 s, each piece written once; "result" published when all are done.
RESUMABLE_STAGE = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
import yaml
from pipeline.io import publish_scratch, resumable_scratch
from stages._common import entry

@entry
def main():
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    p = yaml.safe_load(Path("params.yaml").read_text())["p"]
    scratch = resumable_scratch(out, f"p{{p}}")
    scratch.mkdir(exist_ok=True)
    for k in range(8):
        piece = scratch / f"piece-{{k}}"
        if not piece.exists():
            with open("pieces.log", "a") as log:
                log.write(f"p{{p}} piece {{k}}\\n")
            time.sleep(0.2)
            piece.write_text(str(k))
    (scratch / "result").write_text(f"p={{p}}")
    publish_scratch(scratch, out)

main()
"""

DVC_YAML = """
stages:
  s:
    cmd: {python} resumable.py --out out
    deps: [resumable.py]
    params: [p]
    outs:
      - out:
          persist: {persist}
"""


def _dvc(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=repo, capture_output=True, text=True, timeout=120, **kw)


def _kill_dvc_mid_run(repo: Path, p: int) -> None:
    """Start ``dvc repro`` with params p, SIGKILL DVC alone once the stage has written a piece,
    and wait for the orphaned stage to stop by itself."""
    (repo / "params.yaml").write_text(f"p: {p}\n")
    dvc = subprocess.Popen(
        [str(Path(sys.executable).with_name("dvc")), "repro"],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait(lambda: (repo / "out" / f".partial-p{p}" / "piece-0").is_file()), "the stage never started"
        dvc.kill()
        dvc.wait(timeout=10)
    finally:
        dvc.kill()
    stage = subprocess.run(["pgrep", "-f", "resumable.py --out out"], capture_output=True, text=True)
    pids = [int(x) for x in stage.stdout.split()]
    assert _wait(lambda: not any(_alive(pid) for pid in pids), 15), "the stage outlived DVC"
    assert not (repo / "out" / f".partial-p{p}" / "result").exists()


@pytest.mark.slow
@pytest.mark.parametrize("persist", [True, False])
def test_dvc_repro_after_a_killed_run_resumes_or_cleans_and_leaves_no_scratch(tmp_path, persist) -> None:
    """The issue's sequence: finish a run (p=1), change params (p=2), kill DVC mid-run, go back to
    p=1 and ``dvc repro``. With ``persist: true`` (how dvc.yaml declares the dump's and the
    training's outputs) the stage runs, removes p=2's scratch and leaves nothing behind; and a
    killed p=2 run resumes where it stopped. Without it, DVC's run-cache restores p=1 without
    running anything and p=2's scratch is gone only because DVC deleted the output it was in,
    which also means a killed run could never be resumed: both halves of why dvc.yaml persists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "resumable.py").write_text(RESUMABLE_STAGE.format(repo=str(REPO)))
    (repo / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable, persist=str(persist).lower()))
    (repo / "params.yaml").write_text("p: 1\n")
    assert _dvc(repo, "init", "--no-scm").returncode == 0
    first = _dvc(repo, "repro")
    assert first.returncode == 0, first.stderr
    assert (repo / "out" / "result").read_text() == "p=1"

    _kill_dvc_mid_run(repo, 2)
    assert (repo / "out" / ".partial-p2").is_dir()  # what the killed run had done, inside its output

    (repo / "params.yaml").write_text("p: 1\n")
    back = _dvc(repo, "repro")
    assert back.returncode == 0, back.stderr
    assert (repo / "out" / "result").read_text() == "p=1"
    assert not list((repo / "out").glob(".partial-*")) and not (repo / "out.tmp").exists()
    ran = "is cached - skipping run" not in back.stdout + back.stderr
    assert ran == persist, back.stdout + back.stderr

    if persist:  # a killed run resumes: the pieces written before the kill are not written again
        _kill_dvc_mid_run(repo, 2)
        before = (repo / "pieces.log").read_text().count("p2 piece")
        resumed = _dvc(repo, "repro")
        assert resumed.returncode == 0, resumed.stderr
        assert (repo / "out" / "result").read_text() == "p=2"
        assert (repo / "pieces.log").read_text().count("p2 piece") < before + 8
        assert _dvc(repo, "status").stdout.strip().endswith("up to date.")
