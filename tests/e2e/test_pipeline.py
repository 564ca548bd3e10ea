"""End to end: `dvc repro` of the whole default pipeline at reduced size, in a temp copy of the
repo that is its own git + DVC repository. Both default families are trained; the analysis
studies tiny-llava and a model the pipeline did not train (a random tiny VLM of another family,
saved with ``save_pretrained`` outside the repo and listed as ``source: pretrained``;
``HONES_E2E_FAMILY`` picks its family, a ``tests/tiny_models.FACTORIES`` key, default
qwen2_5_vl, the paper's second model). The other default family's analysis stages run on a
random tiny Idefics3 in ``test_families.py``, as a lab brings one: studying it here as well would
add a third to this file's time.

A set brought in GQA's format (``ood_benchmarks``) is imported and measured by every model.

Checks the declared outputs exist and are well-formed; that every stage read exactly the params
it declares; that a second `dvc repro` reruns nothing; and that each kind of change marks
exactly what depends on it: a code file (the stages that import it), `runtime.max_new_tokens`
(the stages that generate text), one model's training params and a brought model's new weights
(the stages that load that model, and nothing of another), a retrain with the same params
(nothing), `heads.top_k` (the dumps and localisation_downstream); an experiment `dvc exp run -S
shared_neurons.draws=...` runs those stages and the report and is applied back with `dvc exp
apply`. Where a change's stages are marked but not all run (`dvc status`), the one stage that
shows the change is run, and the change is undone.

The tests share one repository and run in file order; each leaves it as up to date as it found it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from e2e_support import (
    ROOT,
    _env,
    benchmark_words,
    brought_entry,
    dvc,
    new_repo,
    ran_stages,
    run,
    save_model,
)
from test_graph import import_closure
from tiny_models import FACTORIES, add_words

from stages.profile import merged

pytestmark = pytest.mark.slow
TRAINED = ("tiny-llava", "tiny-idefics3")
FAMILY = os.environ.get("HONES_E2E_FAMILY", "qwen2_5_vl")
BROUGHT = f"random-{FAMILY}"
MODELS = ("tiny-llava", BROUGHT)  # the studied models
TASKS = ("vqa", "ocr", "caption", "retrieval")
# Runs the report's decision across instances (replicated_differences) on what the run has: a
# trained and a brought model pooled as if they were two seeds of one recipe (the mechanism, not a
# claim; the brought model has no training record for the recipe check to compare).
POOLED = "pooled"
POOLED_INSTANCES = ("tiny-llava", BROUGHT)
# The one stage DVC always runs: it looks at the brought model's files, outside the repo.
ALWAYS_RUNS = {f"resolve_model@{BROUGHT}"}


def save_brought_model(folder: Path, seed: int, words: list[str]) -> None:
    save_model(folder, FAMILY, seed, words)


def brought_model_params(folder: Path) -> dict:
    """params_pretrained.yaml (the README's snippet) with the model renamed and its folder filled
    in; float32 on this CPU."""
    return {
        "pretrained_models": [BROUGHT],
        "studied_models": list(MODELS),
        "models": {BROUGHT: brought_entry(folder, "float32")},
        "replicates": {POOLED: list(POOLED_INSTANCES)},
    }


# An out-of-distribution set brought in GQA's format (params ood_benchmarks): imported by its own
# stage, and every studied model's masks and scales measured on it by a transfer_ood stage.
OOD_SET = "gqa_small"


OOD_ENTRY = {
    "format": "gqa",
    "records": f"data/inputs/{OOD_SET}/questions.json",
    "images": f"data/inputs/{OOD_SET}/images",
}


def write_ood_set(repo: Path, words: list[str]) -> None:
    """The set of ``OOD_ENTRY``: a hand-made GQA question file of the benchmark's words and its
    JPEG images under ``repo/data/inputs``."""
    from PIL import Image

    folder = repo / "data" / "inputs" / OOD_SET
    (folder / "images").mkdir(parents=True)
    questions = {}
    for k in range(4):
        Image.new("RGB", (40, 30), (60 * k, 200 - 40 * k, 90)).save(folder / "images" / f"g{k % 2}.jpg")
        questions[str(100 + k)] = {"question": " ".join(words[k : k + 3]), "answer": words[k], "imageId": f"g{k % 2}"}
    (folder / "questions.json").write_text(json.dumps(questions))


def changed_stages(repo: Path) -> set[str]:
    """Stages whose own deps or params changed (``dvc status``; nothing is run); the resolve
    stage, which DVC reports as "always changed", only when something else of it changed."""
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    return {name for name, what in status.items() if not name.endswith(".dvc") and what != ["always changed"]}


def all_stages(repo: Path) -> dict[str, dict]:
    """name -> {"deps": [...], "params": [...]} as recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {
        name: {
            "deps": [d["path"] for d in s.get("deps", [])],
            "params": [k for keys in s.get("params", {}).values() for k in keys],
        }
        for name, s in lock.items()
    }


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
    params = merged(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((Path(__file__).parent / "params_small.yaml").read_text()),
    )
    brought = tmp_path_factory.mktemp("brought") / BROUGHT
    words = benchmark_words(params["benchmark"]["synthetic"], tmp_path_factory.mktemp("words") / "bench")
    save_brought_model(brought, seed=0, words=words)
    ood = {"ood_benchmarks": {OOD_SET: OOD_ENTRY}}
    repo = new_repo(tmp_path_factory.mktemp("repo"), merged(merged(params, brought_model_params(brought)), ood))
    write_ood_set(repo, words)
    (repo.parent / f"{repo.name}-words.json").write_text(json.dumps(words))
    dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "reduced default run")
    return repo


def test_outputs_are_written(repo: Path) -> None:
    for model in MODELS:
        quality = json.loads((repo / f"metrics/model_quality/{model}.json").read_text())
        by_type = quality.pop("generative_by_question_type")
        assert set(quality) == {"generative", "generative_standard", "likelihood"}
        assert all(0.0 <= v <= 1.0 for q in quality.values() for v in q.values()), quality
        # The synthetic benchmark's VQA asks four kinds of question; the other tasks one each.
        assert set(by_type) == {"vqa"} and len(by_type["vqa"]) > 1, by_type
        assert all(0.0 <= v <= 1.0 for v in by_type["vqa"].values()), by_type
        assert set(quality["generative"]) == set(quality["likelihood"]) == set(TASKS)
        # The standard variants exist for generated answers; retrieval ranks.
        assert set(quality["generative_standard"]) == set(TASKS) - {"retrieval"}
        for task in TASKS:
            assert (repo / f"data/activations/{model}/{task}.zarr/zarr.json").is_file()
            assert (repo / f"data/heads/{model}/{task}/heatmap.png").stat().st_size > 1000
        for array in ("z", "dvp", "dvp_logprob", "atp", "gate_sum", "gate_positive", "prompt_tokens"):
            assert (repo / f"data/activations/{model}/vqa.zarr/{array}/zarr.json").is_file(), array
        attribution = json.loads((repo / f"metrics/attribution/{model}.json").read_text())
        assert set(attribution["faithfulness"]) == set(TASKS)
        assert {
            "hones",
            "hones_lp",
            "hones_lp_nohead",
            "atp",
            "ma",
            "ap",
            "lape",
            "ma_last",
            "ap_last",
            "ape_last",
        } <= set(attribution["faithfulness"]["vqa"])
        assert set(attribution["faithfulness_on_ablation_items"]) == set(TASKS)
        assert "atp" in attribution["faithfulness_on_ablation_items"]["vqa"]
        assert (repo / f"plots/attribution/{model}/overlap.png").is_file()
        lens = json.loads((repo / f"metrics/logit_lens/{model}.json").read_text())
        assert set(lens["tasks"]) == set(TASKS)
        for task, by_component in lens["tasks"].items():
            # The last layer's residual is what the model decodes: its lens value is the model's own.
            assert by_component["residual"][-1] == pytest.approx(by_component["model_logprob"], abs=1e-4), task
            assert len(by_component["attention"]) == len(by_component["ffn"]) == len(by_component["residual"])
        assert (repo / f"data/logit_lens/{model}/lens.png").stat().st_size > 1000
    for model in TRAINED:
        training = json.loads((repo / f"data/models/{model}/training.json").read_text())
        assert not {"train_seconds", "seconds", "time", "host"} & set(training), training
    source = json.loads((repo / f"data/models/{BROUGHT}/source.json").read_text())
    assert source["kind"] == "folder" and source["model_type"] == FAMILY
    assert "model.safetensors" in source["files"] and "config.json" in source["files"]
    assert sorted(p.name for p in (repo / f"data/models/{BROUGHT}").iterdir()) == ["source.json"]
    assert not list(repo.glob("data/**/.partial-*")) and not list(repo.glob("data/**/*.tmp")), "scratch left behind"
    suppression = json.loads((repo / "metrics/suppression.json").read_text())
    assert set(suppression) == set(MODELS)
    for model in MODELS:
        for utility in ("likelihood", "generative"):
            assert set(suppression[model][utility]["hones"]) == set(TASKS)
            assert set(suppression[model][utility]["hones"]["vqa"]["vqa"]) == {"value", "ci_low", "ci_high"}
        # The likelihood is never 0 at baseline, so its drops are always defined (a 20-step model's
        # generative VQA accuracy can be 0, which leaves that relative drop undefined: null).
        cell = suppression[model]["likelihood"]["hones"]["vqa"]["vqa"]
        assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]
    summary = json.loads((repo / "metrics/suppression_summary.json").read_text())
    for model in MODELS:
        likelihood = summary[model]["likelihood"]
        assert {"summary", "random_draws", "differences", "auc", "sensitivity"} <= set(likelihood)
        assert likelihood["random_draws"]["on_target_drop"]["n"] == 3
        # Every evaluated method (params.yaml's evaluate.methods) is compared with HONES, and hones_lp with hones.
        assert {
            "hones-minus-atp",
            "hones-minus-lape",
            "hones-minus-ma",
            "hones-minus-ap",
            "hones-minus-hones_lp",
            "hones_lp-minus-hones",
        } <= set(likelihood["differences"])
    for model in MODELS:
        # The in-domain masks and scales, applied on the out-of-distribution split.
        transfer = json.loads((repo / f"data/transfer/{model}/suppression.json").read_text())
        assert set(transfer["likelihood"]["summary"]) == {"hones", "random"}
        assert set(transfer["likelihood"]["baseline"]) == set(TASKS)
        shared = json.loads((repo / f"data/shared_neurons/{model}/shared.json").read_text())
        assert shared["mask_size"] == 0.1 and shared["utility"] == "likelihood"
        for pair, figures in shared["pairs"].items():
            assert figures["shared_neurons"] > 0 and "shared" in figures["on_pair"], pair
        moved = json.loads((repo / f"data/transfer/{model}/steering_intervals.json").read_text())
        assert {"learned-minus-base", "learned-minus-grid_search"} <= set(moved["likelihood"]["differences"])
        # The brought set has VQA only: that task's masks and scales, measured on it.
        brought_set = json.loads((repo / f"data/transfer_ood/{model}-{OOD_SET}/suppression.json").read_text())
        assert set(brought_set["likelihood"]["baseline"]) == {"vqa"}
        assert set(brought_set["likelihood"]["summary"]) == {"hones", "random"}
    brought_transfer = json.loads((repo / "metrics/transfer_ood.json").read_text())
    assert set(brought_transfer) == set(MODELS)
    assert brought_transfer[BROUGHT][OOD_SET]["import"]["items"] == {"vqa": 4}
    steering = json.loads((repo / "metrics/steering.json").read_text())
    for model in MODELS:
        assert "learned" in steering[model]["generative"]["utility"]["mean"]
        assert "learned-minus-grid_search" in steering[model]["likelihood"]["differences"]
    verdict = json.loads((repo / "metrics/verdict.json").read_text())
    assert set(verdict) == {*MODELS, POOLED}
    for model in MODELS:
        claims = verdict[model]
        assert "HONES on-target drop exceeds random's" in claims and any(c.startswith("sensitivity") for c in claims)
        rows = [row for by_utility in claims.values() for row in by_utility.values()]
        assert all(r["verdict"] in ("holds", "fails", "equivalent", "undecided") and r["instances"] == 1 for r in rows)
        assert set(claims["HONES on-target drop exceeds random's"]) == {"likelihood", "generative"}
        assert f"out of distribution ({OOD_SET}): HONES masks drop their task (on-target drop)" in claims
    pooled = verdict[POOLED]["HONES on-target drop exceeds random's"]["likelihood"]
    assert pooled["instances"] == 2 and set(pooled["per_instance"]) == set(POOLED_INSTANCES)
    assert pooled["value"] == pytest.approx(
        sum(verdict[m]["HONES on-target drop exceeds random's"]["likelihood"]["value"] for m in POOLED_INSTANCES) / 2,
        abs=2e-4,
    )
    decided = json.loads((repo / "metrics/verdict_summary.json").read_text())
    assert set(decided["counts"]) == {*MODELS, POOLED}
    assert set(decided["across"]["HONES on-target drop exceeds random's"]["verdicts"]) == {POOLED}
    # The studied trained models' quality against the default's targets (20 steps: far below them).
    assert set(decided["quality_targets"]) == {"tiny-llava"} and not decided["quality_targets"]["tiny-llava"]["all_met"]
    summary_md = (repo / "reports/summary.md").read_text()
    assert summary_md.startswith("# HONES summary") and "## Verdict" in summary_md and f"| {POOLED} | 2 |" in summary_md
    stability = json.loads((repo / "metrics/head_stability.json").read_text())
    for model in MODELS:
        for task in TASKS:
            heads = stability[model][task]
            assert len(heads["top_heads"]) == 2 and 0 <= heads["recall"]["mean"] <= 1
            assert heads["degenerate"] == (heads["positive_heads"] == 0)
    # Every heads stage also wrote the gradient estimate; the report compares guided localisation.
    localisation = json.loads((repo / "metrics/head_localisation.json").read_text())
    for model in MODELS:
        for task in TASKS:
            guided = localisation[model][task]
            assert guided["top_k"] == 2 and guided["heads"] == 8 and 0 <= guided["recall"] <= 1
            assert guided["exhaustive_top_heads"] == stability[model][task]["top_heads"]
            # Downstream of each cheaper localisation: the same heads give the same mask.
            for name, d in guided["downstream"].items():
                assert d["same_heads"] == (set(d["top_heads"]) == set(guided["exhaustive_top_heads"]))
                assert d["mask_jaccard"] == 1.0 if d["same_heads"] else "difference" in d, (model, task, name)
    # Every model's sampled ground truth was measured and, beside its exhaustive one, agrees with
    # it neuron by neuron (the same zeroing, run by two stages).
    sampled = json.loads((repo / "metrics/sampled_ground_truth.json").read_text())
    assert set(sampled) == set(MODELS)
    for model, checked in sampled.items():
        assert set(checked["by_task"]) == set(TASKS) and 0 < checked["within"] <= checked["figures"]
        for task in TASKS:
            assert checked["by_task"][task]["effect_max_abs_difference"] < 1e-4, (model, task)
        hones = checked["by_task"][TASKS[0]]["hones"]["spearman"]
        assert hones["ci_low"] <= hones["ci_high"] and isinstance(hones["within"], bool)
        table = pd.read_parquet(repo / f"data/sampled_ground_truth/{model}.parquet")
        assert set(table["task"]) == set(TASKS) and table["sampled"].any() and not table["sampled"].all()
    assert (repo / f"data/evaluate/{BROUGHT}/deletion_curves.png").stat().st_size > 1000
    report = (repo / "reports/hones_report.html").read_text()
    assert "data:image/png;base64," in report and "http" not in report.split("<body>")[1]
    assert report.index("<h2>Verdict</h2>") < report.index("<h2>Model quality")
    assert "<h2>Model quality by question type (generative)</h2>" in report
    assert BROUGHT in report and f"{BROUGHT}: logit lens" in report
    assert "Do they transfer to the out-of-distribution sets you brought?" in report


def test_every_stage_read_exactly_what_it_declares(repo: Path) -> None:
    audit = repo.parent / f"{repo.name}-audit"
    records = {p.stem: json.loads(p.read_text()) for p in audit.glob("*.json")}
    assert len(records) == len(all_stages(repo)), sorted(records)
    for name, rec in records.items():
        assert rec["accessed"] == rec["declared"], (
            f"{name} declares keys it never reads: {sorted(set(rec['declared']) - set(rec['accessed']))}"
        )


def test_every_stage_run_left_its_timing_and_timings_invalidate_nothing(repo: Path) -> None:
    from pipeline.timings import TABLE_FILE, read_timings

    records = {r.stage: r for r in read_timings(repo / "timings")}
    assert set(records) == set(all_stages(repo))
    for name, rec in records.items():
        assert rec.wall_s > 0, name
    # Every stage that runs a model counts its sequences; the others their own unit.
    assert records["heads@tiny-llava-vqa"].unit == "sequences" and records["heads@tiny-llava-vqa"].rows > 0
    assert records["train_default_model@tiny-llava"].unit == "training examples"
    assert records["masks@tiny-llava"].unit == "masks"
    table = (repo / "timings" / TABLE_FILE).read_text()
    assert all(f"| {name} |" in table for name in records) and "**total**" in table
    (repo / "timings" / TABLE_FILE).write_text("edited\n")
    (repo / "timings" / "heads@tiny-llava-vqa.json").unlink()
    assert changed_stages(repo) == set()
    run(repo, "git", "checkout", "--", "timings")


def test_second_repro_reruns_nothing(repo: Path) -> None:
    proc = dvc(repo, "repro")
    # The resolve stage looks at the brought model's files again (its hashes are remembered) and
    # writes the same record, so nothing that depends on it reruns.
    assert ran_stages(proc) == ALWAYS_RUNS, proc.stdout
    assert changed_stages(repo) == set()
    assert json.loads(dvc(repo, "status", "--json").stdout) == {s: ["always changed"] for s in ALWAYS_RUNS}


def _flip_first_chunk(array: Path) -> Path:
    chunk = next(p for p in sorted((array / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[16:24] = bytes(b ^ 0xFF for b in data[16:24])
    chunk.write_bytes(bytes(data))
    return chunk


@pytest.mark.parametrize(
    "damaged, stage",
    [
        ("data/activations/tiny-llava/vqa.zarr/z", "attribute@tiny-llava"),
        ("data/attribution/tiny-llava.zarr/importance", "masks@tiny-llava"),
    ],
)
def test_the_restore_hint_of_a_damaged_chunk_restores_it(repo: Path, damaged: str, stage: str) -> None:
    """A flipped chunk stops the stage that reads it with one line whose hint is a command; run
    as printed, it restores the output from the DVC cache and the repo is up to date again."""
    import re

    chunk = _flip_first_chunk(repo / damaged)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", stage],
        cwd=repo,
        env=_env(repo),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    hint = re.search(r"restore it with `(dvc checkout --force [^`]+)`", proc.stdout + proc.stderr)
    assert hint, (proc.stdout + proc.stderr)[-3000:]
    assert str(Path(damaged).parent) in hint.group(1)
    dvc(repo, *hint.group(1).split()[1:])
    run(repo, sys.executable, "-m", "pipeline.tools.verify", str(Path(damaged).parent))  # exit 1 if damaged
    assert chunk.is_file()
    # DVC removed the failed stage's own outputs before running it: from the cache, and its
    # uncached metrics and plots from git.
    assert stage in changed_stages(repo)
    dvc(repo, "checkout")
    run(repo, "git", "checkout", "--", "metrics", "plots")
    assert changed_stages(repo) == set()


@pytest.mark.parametrize(
    "path",
    [
        "stages/_common.py",
        "stages/_load.py",
        "stages/params/view.py",
        "pipeline/model/hooks/prefix.py",
        "pipeline/method/store/io.py",
    ],
)
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
    closures: dict[str, set[str]] = {}
    for name, s in lock.items():
        module = "stages." + {"train_default_model": "train_model"}.get(name.split("@")[0], name.split("@")[0])
        if module not in closures:
            closures[module] = import_closure(repo, module)
        code = {d for d in s["deps"] if d.endswith(".py")}
        assert code == closures[module], name


def test_max_new_tokens_marks_only_generating_stages(repo: Path) -> None:
    before = edit_params(repo, lambda p: p["runtime"].__setitem__("max_new_tokens", 7))
    try:
        changed = changed_stages(repo)
    finally:
        (repo / "params.yaml").write_text(yaml.safe_dump(before, sort_keys=False))
    kinds = {name.split("@")[0] for name in changed}
    # transfer generates out of distribution; shared_neurons scores the likelihood alone.
    assert kinds == {"model_quality", "heads", "evaluate", "steer", "transfer", "transfer_ood"}, changed
    assert len(changed) == len(MODELS) * (1 + len(TASKS) + 1 + 1 + 1 + 1)


def dependents(repo: Path, path: str) -> set[str]:
    """Stages of dvc.lock with a dep that is ``path`` or a folder holding it: those DVC marks
    changed when ``path`` changes (what depends on their outputs follows through the graph)."""
    return {
        name
        for name, s in all_stages(repo).items()
        if any(path == d or path.startswith(d.rstrip("/") + "/") for d in s["deps"])
    }


def test_retrain_with_same_params_reruns_nothing_downstream(repo: Path) -> None:
    before = {p: p.read_bytes() for p in (repo / "data/models/tiny-llava").iterdir()}
    proc = dvc(repo, "repro", "-f", "-s", "train_default_model@tiny-llava")
    assert ran_stages(proc) == {"train_default_model@tiny-llava"}, proc.stdout
    after = {p: p.read_bytes() for p in (repo / "data/models/tiny-llava").iterdir()}
    assert after == before, "retraining with the same params changed the model folder"
    assert changed_stages(repo) == set()
    assert ran_stages(dvc(repo, "repro")) == ALWAYS_RUNS


def test_one_models_training_params_mark_its_stages_only(repo: Path) -> None:
    """Another step count in one model's entry marks every stage that reads the entry and nothing
    of another model; the new weights then mark what loads them, and the report. Running them all
    again is the first repro's work, so only the training runs here."""
    train = "train_default_model@tiny-llava"
    own = {name for name, s in all_stages(repo).items() if "models.tiny-llava" in s["params"]}
    assert {train, "dump@tiny-llava-vqa", f"transfer_ood@tiny-llava-{OOD_SET}"} <= own
    before = edit_params(repo, lambda p: p["models"]["tiny-llava"].__setitem__("steps", 21))
    try:
        assert changed_stages(repo) == own
        assert ran_stages(dvc(repo, "repro", "--single-item", train)) == {train}
        marked = (own | dependents(repo, "data/models/tiny-llava")) - {train}
        assert "report" in marked and all("tiny-llava" in s for s in marked - {"report"}), marked
        assert changed_stages(repo) == marked
    finally:
        (repo / "params.yaml").write_text(yaml.safe_dump(before, sort_keys=False))
    # Trained back with the recipe's own steps: the same bytes as before, so nothing is stale.
    dvc(repo, "repro", "--single-item", train)
    assert changed_stages(repo) == set()


def test_new_weights_of_the_brought_model_mark_its_stages_only(repo: Path, tmp_path: Path) -> None:
    folder = Path(yaml.safe_load((repo / "params.yaml").read_text())["models"][BROUGHT]["path"])
    before = (repo / f"data/models/{BROUGHT}/source.json").read_text()
    words = json.loads((repo.parent / f"{repo.name}-words.json").read_text())
    shutil.copytree(folder, tmp_path / "original")
    model, processor = FACTORIES[FAMILY](seed=1)
    add_words(model, processor, words)
    resolve = f"resolve_model@{BROUGHT}"
    try:
        model.save_pretrained(folder)  # overwrites model.safetensors in place: same path, same params
        assert changed_stages(repo) == set(), "DVC cannot see the folder; only the resolve stage looks at it"
        assert ran_stages(dvc(repo, "repro", "--single-item", resolve)) == {resolve}
        after = json.loads((repo / f"data/models/{BROUGHT}/source.json").read_text())
        assert after["files"]["model.safetensors"] != json.loads(before)["files"]["model.safetensors"]
        assert after["files"]["config.json"] == json.loads(before)["files"]["config.json"]
        loaders = dependents(repo, f"data/models/{BROUGHT}") - {resolve}
        assert f"evaluate@{BROUGHT}" in loaders and all(BROUGHT in s for s in loaders - {"report"}), loaders
        assert changed_stages(repo) == loaders
    finally:
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "original", folder)
    dvc(repo, "repro", "--single-item", resolve)
    assert (repo / f"data/models/{BROUGHT}/source.json").read_text() == before
    assert changed_stages(repo) == set()


def test_the_same_model_by_hub_id_from_an_offline_cache(repo: Path, tmp_path: Path) -> None:
    """The brought model published as a hub id, found in a local Hugging Face cache with
    HF_HUB_OFFLINE=1: resolved to the cache's commit, and loaded from the snapshot by a model stage.
    Runs in a copy of the repo, which it leaves as it found it."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    folder = Path(params["models"][BROUGHT]["path"])
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf-cache"
    repo_dir = cache / f"models--hones-test--{BROUGHT}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "v1").write_text(commit)
    entry = params["models"][BROUGHT]
    del entry["path"]
    entry.update(hub_id=f"hones-test/{BROUGHT}", revision="v1")
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**_env(copy), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "dvc"),
            "repro",
            "--single-item",
            f"resolve_model@{BROUGHT}",
            f"model_quality@{BROUGHT}",
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ran_stages(proc) == {f"resolve_model@{BROUGHT}", f"model_quality@{BROUGHT}"}, proc.stdout
    source = json.loads((copy / f"data/models/{BROUGHT}/source.json").read_text())
    assert (source["kind"], source["location"], source["revision"], source["commit"]) == (
        "hub",
        f"hones-test/{BROUGHT}",
        "v1",
        commit,
    )
    folder_source = json.loads((repo / f"data/models/{BROUGHT}/source.json").read_text())
    assert source["files"] == folder_source["files"]
    quality = json.loads((copy / f"metrics/model_quality/{BROUGHT}.json").read_text())
    assert quality == json.loads((repo / f"metrics/model_quality/{BROUGHT}.json").read_text())


def test_top_k_change_marks_the_dump_onwards_not_training(repo: Path) -> None:
    """heads.top_k is read by the dump (which heads it substitutes), by localisation_downstream
    (the heads the cheaper localisations keep) and the report: those are marked, nothing
    upstream; one dump run shows the new K in the store."""
    before = edit_params(repo, lambda p: p["heads"].__setitem__("top_k", 3))
    dump = "dump@tiny-llava-vqa"
    try:
        changed = changed_stages(repo)
        assert {s.split("@")[0] for s in changed} == {"dump", "localisation_downstream", "report"}, changed
        assert len(changed) == len(MODELS) * len(TASKS) + len(MODELS) + 1
        assert ran_stages(dvc(repo, "repro", "--single-item", dump)) == {dump}
        heads = pd.read_parquet(repo / "data/activations/tiny-llava/vqa.heads.parquet")
        assert len(heads) == 3, heads
    finally:
        (repo / "params.yaml").write_text(yaml.safe_dump(before, sort_keys=False))
    dvc(repo, "repro", "--single-item", dump)
    assert changed_stages(repo) == set()


def test_two_worker_processes_score_as_one(repo: Path) -> None:
    """evaluate over runtime.workers: 2 (each worker process loads its own interpreter and model;
    the reduced run uses one) scores every item as one process does."""
    stage, scores = "evaluate@tiny-llava", repo / "data/evaluate/tiny-llava/scores.parquet"
    one = pd.read_parquet(scores)
    before = edit_params(repo, lambda p: p["runtime"].__setitem__("workers", 2))
    try:
        assert ran_stages(dvc(repo, "repro", "--single-item", stage)) == {stage}
        two = pd.read_parquet(scores)
    finally:
        (repo / "params.yaml").write_text(yaml.safe_dump(before, sort_keys=False))
    keys = ["utility", "eval_task", "condition", "item_id"]
    pd.testing.assert_frame_equal(
        two.sort_values(keys).reset_index(drop=True), one.sort_values(keys).reset_index(drop=True), atol=1e-5
    )
    dvc(repo, "repro", "--single-item", stage)
    assert changed_stages(repo) == set()


def test_experiment_runs_what_its_parameter_reaches_and_applies_back(repo: Path) -> None:
    """`dvc exp run -S` of a parameter one stage kind reads (shared_neurons.draws) runs those
    stages and the report, which reads their outputs, and nothing else; `dvc exp apply` brings
    the experiment's parameter and outputs back into the workspace."""
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "--allow-empty", "-m", "after the parameter changes")
    draws = yaml.safe_load((repo / "params.yaml").read_text())["shared_neurons"]["draws"]
    proc = dvc(repo, "exp", "run", "-n", "more-draws", "-S", f"shared_neurons.draws={draws + 1}")
    assert ran_stages(proc) == {f"shared_neurons@{m}" for m in MODELS} | {"report"} | ALWAYS_RUNS, proc.stdout
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "more-draws" in text and "metrics/model_quality/tiny-llava.json" in text and "suppression_summary" in text
    run(repo, "git", "checkout", "-q", "--", ".")
    dvc(repo, "checkout", "-q")
    assert yaml.safe_load((repo / "params.yaml").read_text())["shared_neurons"]["draws"] == draws
    dvc(repo, "exp", "apply", "more-draws")
    assert yaml.safe_load((repo / "params.yaml").read_text())["shared_neurons"]["draws"] == draws + 1
    assert changed_stages(repo) == set()
