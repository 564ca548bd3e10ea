"""End to end: `dvc repro` of the whole default pipeline at reduced size, in a temp copy of the repo.

Checks the declared outputs exist and are well-formed, that a second `dvc repro` reruns
nothing and `dvc status` is clean, and that changing one parameter reruns only its dependants.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([str(Path(bindir) / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    small = yaml.safe_load((Path(__file__).parent / "params_small.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, small), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "config", "core.check_update", "false")
    dvc(repo, "repro")
    return repo


def test_outputs_are_written(repo: Path) -> None:
    quality = json.loads((repo / "metrics/model_quality.json").read_text())
    assert set(quality) == {"tiny-llava"}
    assert set(quality["tiny-llava"]) == {"vqa", "ocr", "caption", "retrieval"}
    assert all(0.0 <= v <= 1.0 for v in quality["tiny-llava"].values())
    for task in ("vqa", "ocr", "caption", "retrieval"):
        assert (repo / f"data/activations/tiny-llava/{task}.zarr/zarr.json").is_file()
        assert (repo / f"data/heads/tiny-llava/{task}/heatmap.png").stat().st_size > 1000
    attribution = json.loads((repo / "metrics/attribution.json").read_text())
    assert set(attribution["tiny-llava"]["faithfulness"]) == {"vqa", "ocr", "caption", "retrieval"}
    assert not list(repo.glob("data/activations/**/*.partial-*")), "scratch stores left behind"
    suppression = json.loads((repo / "metrics/suppression.json").read_text())
    assert set(suppression["tiny-llava"]["hones"]) == {"vqa", "ocr", "caption", "retrieval"}
    steering = json.loads((repo / "metrics/steering.json").read_text())
    assert "learned" in steering["tiny-llava"]["mean"]
    report = (repo / "reports/hones_report.html").read_text()
    assert "data:image/png;base64," in report and "http" not in report.split("<body>")[1]


def test_second_repro_reruns_nothing(repo: Path) -> None:
    out = dvc(repo, "repro").stdout
    assert "Running stage" not in out, out
    status = dvc(repo, "status").stdout
    assert "changed" not in status and "modified" not in status, status


def test_top_k_change_reruns_dump_not_training(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["heads"]["top_k"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(repo, "repro").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert "dump@tiny-llava-vqa" in ran
    assert not any(s.startswith(("benchmark", "train_default_model", "heads@")) for s in ran), ran
