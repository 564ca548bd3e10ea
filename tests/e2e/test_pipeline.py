"""End to end: `dvc repro` of the whole default pipeline (both default families) at reduced size,
in a temp copy of the repo that is its own git + DVC repository.

Checks the declared outputs exist and are well-formed; that every stage read exactly the params
it declares; that a second `dvc repro` reruns nothing; and that each kind of change reruns
exactly what depends on it: a code file (the stages that import it), `runtime.max_new_tokens`
(the stages that generate text), one model's training params (that model's stages only), a
retrain with the same params (nothing downstream), `heads.top_k` (dump onwards), and an
experiment `dvc exp run -S masks.rho=...` (masks onwards, applied back with `dvc exp apply`).

The tests share one repository and run in file order; each leaves it as up to date as it found it.
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
sys.path.insert(0, str(ROOT / "tests"))
from test_graph import import_closure  # noqa: E402

pytestmark = pytest.mark.slow
MODELS = ("tiny-llava", "tiny-idefics3")
TASKS = ("vqa", "ocr", "caption", "retrieval")


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _env(repo: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "HONES_PARAMS_AUDIT": str(repo.parent / f"{repo.name}-audit")}


def run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=repo, env=_env(repo), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(repo, str(Path(sys.executable).parent / "dvc"), *args)


def ran_stages(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def changed_stages(repo: Path) -> set[str]:
    """Stages whose own deps or params changed (``dvc status``; nothing is run)."""
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    return {name for name in status if not name.endswith(".dvc")}


def all_stages(repo: Path) -> dict[str, dict]:
    """name -> {"deps": [...], "params": [...]} as recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {"deps": [d["path"] for d in s.get("deps", [])],
                   "params": [k for keys in s.get("params", {}).values() for k in keys]}
            for name, s in lock.items()}


def edit_params(repo: Path, change) -> dict:
    """Apply ``change(params)`` to the repo's params.yaml; returns the previous params."""
    path = repo / "params.yaml"
    before = yaml.safe_load(path.read_text())
    after = yaml.safe_load(path.read_text())
    change(after)
    path.write_text(yaml.safe_dump(after, sort_keys=False))
    return before


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "inputs", repo / "data" / "inputs")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    small = yaml.safe_load((Path(__file__).parent / "params_small.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, small), sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n")
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "e2e@example.invalid")
    run(repo, "git", "config", "user.name", "e2e")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "config", "core.check_update", "false")
    dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "reduced default run")
    return repo


def test_outputs_are_written(repo: Path) -> None:
    for model in MODELS:
        quality = json.loads((repo / f"metrics/model_quality/{model}.json").read_text())
        assert set(quality) == set(TASKS)
        assert all(0.0 <= v <= 1.0 for v in quality.values())
        for task in TASKS:
            assert (repo / f"data/activations/{model}/{task}.zarr/zarr.json").is_file()
            assert (repo / f"data/heads/{model}/{task}/heatmap.png").stat().st_size > 1000
        attribution = json.loads((repo / f"metrics/attribution/{model}.json").read_text())
        assert set(attribution["faithfulness"]) == set(TASKS)
        assert (repo / f"plots/attribution/{model}/overlap.png").is_file()
        training = json.loads((repo / f"data/models/{model}/training.json").read_text())
        assert not {"train_seconds", "seconds", "time", "host"} & set(training), training
    assert not list(repo.glob("data/activations/**/*.partial-*")), "scratch stores left behind"
    suppression = json.loads((repo / "metrics/suppression.json").read_text())
    assert set(suppression) == set(MODELS)
    assert set(suppression["tiny-llava"]["hones"]) == set(TASKS)
    steering = json.loads((repo / "metrics/steering.json").read_text())
    assert "learned" in steering["tiny-idefics3"]["mean"]
    report = (repo / "reports/hones_report.html").read_text()
    assert "data:image/png;base64," in report and "http" not in report.split("<body>")[1]


def test_every_stage_read_exactly_what_it_declares(repo: Path) -> None:
    audit = repo.parent / f"{repo.name}-audit"
    records = {p.stem: json.loads(p.read_text()) for p in audit.glob("*.json")}
    assert len(records) == len(all_stages(repo)), sorted(records)
    for name, rec in records.items():
        assert rec["accessed"] == rec["declared"], f"{name} declares keys it never reads: " \
            f"{sorted(set(rec['declared']) - set(rec['accessed']))}"


def test_second_repro_reruns_nothing(repo: Path) -> None:
    out = dvc(repo, "repro").stdout
    assert "Running stage" not in out, out
    assert changed_stages(repo) == set()


@pytest.mark.parametrize("path", ["stages/_common.py", "stages/_load.py", "stages/params.py", "pipeline/model/hooks.py",
                                  "pipeline/method/store.py"])
def test_code_edit_marks_exactly_its_importers(repo: Path, path: str) -> None:
    lock = all_stages(repo)
    expected = {name for name, s in lock.items() if path in s["deps"]}
    # The lock's deps are the graph's: the importers by the import closure of each stage module.
    assert expected, f"no stage depends on {path}"
    file = repo / path
    original = file.read_text()
    try:
        file.write_text(original + "\n# an edit\n")
        assert changed_stages(repo) == expected
    finally:
        file.write_text(original)
    assert changed_stages(repo) == set()


def test_closure_of_stage_modules_in_the_copy_matches_lock(repo: Path) -> None:
    lock = all_stages(repo)
    for name, s in lock.items():
        module = "stages." + {"train_default_model": "train_model"}.get(name.split("@")[0], name.split("@")[0])
        code = {d for d in s["deps"] if d.endswith(".py")}
        assert code == import_closure(repo, module), name


def test_max_new_tokens_marks_only_generating_stages(repo: Path) -> None:
    before = edit_params(repo, lambda p: p["runtime"].__setitem__("max_new_tokens", 7))
    try:
        changed = changed_stages(repo)
    finally:
        (repo / "params.yaml").write_text(yaml.safe_dump(before, sort_keys=False))
    kinds = {name.split("@")[0] for name in changed}
    assert kinds == {"model_quality", "heads", "evaluate", "steer"}, changed
    assert len(changed) == 2 * (1 + len(TASKS) + 1 + 1)


def test_retrain_with_same_params_reruns_nothing_downstream(repo: Path) -> None:
    before = {p: p.read_bytes() for p in (repo / "data/models/tiny-llava").iterdir()}
    proc = dvc(repo, "repro", "-f", "-s", "train_default_model@tiny-llava")
    assert ran_stages(proc) == {"train_default_model@tiny-llava"}, proc.stdout
    after = {p: p.read_bytes() for p in (repo / "data/models/tiny-llava").iterdir()}
    assert after == before, "retraining with the same params changed the model folder"
    assert changed_stages(repo) == set()
    assert "Running stage" not in dvc(repo, "repro").stdout


def test_one_models_training_params_rerun_its_stages_only(repo: Path) -> None:
    edit_params(repo, lambda p: p["models"]["tiny-llava"].__setitem__("steps", 21))
    ran = ran_stages(dvc(repo, "repro"))
    assert "train_default_model@tiny-llava" in ran and "dump@tiny-llava-vqa" in ran
    assert not any("tiny-idefics3" in s for s in ran), ran
    assert ran - {"report"} == {s for s in all_stages(repo) if "tiny-llava" in s}, ran
    assert changed_stages(repo) == set()


def test_top_k_change_reruns_dump_not_training(repo: Path) -> None:
    edit_params(repo, lambda p: p["heads"].__setitem__("top_k", 3))
    ran = ran_stages(dvc(repo, "repro"))
    assert "dump@tiny-llava-vqa" in ran and "dump@tiny-idefics3-ocr" in ran
    assert not any(s.startswith(("benchmark", "train_default_model", "heads@", "ablation@", "model_quality"))
                   for s in ran), ran


def test_experiment_runs_masks_onwards_and_applies_back(repo: Path) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "after the parameter changes")
    proc = dvc(repo, "exp", "run", "-n", "rho10", "-S", "masks.rho=0.1")
    ran = ran_stages(proc)
    assert {"masks@tiny-llava", "masks@tiny-idefics3"} <= ran
    assert {s.split("@")[0] for s in ran} <= {"masks", "evaluate", "steer", "report"}, ran
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "rho10" in text and "metrics/model_quality/tiny-llava.json" in text and "suppression_summary" in text
    run(repo, "git", "checkout", "-q", "--", ".")
    dvc(repo, "checkout", "-q")
    assert yaml.safe_load((repo / "params.yaml").read_text())["masks"]["rho"] == 0.05
    dvc(repo, "exp", "apply", "rho10")
    assert yaml.safe_load((repo / "params.yaml").read_text())["masks"]["rho"] == 0.1
    assert changed_stages(repo) == set()
