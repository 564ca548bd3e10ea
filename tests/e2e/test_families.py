"""Every supported family through `dvc repro`, as a lab brings it: a random tiny model of the
real transformers class with its real processor class, ``save_pretrained`` to a folder outside
the repository, studied as ``source: pretrained``.

One repository and one `dvc repro` for all of them, on one task (VQA) at the reduced size of
``params_small.yaml``: each family runs resolve_model, heads, dump, ablation, attribute, masks
and evaluate. The paper's second model, Qwen2.5-VL, runs the whole graph on all four tasks in
``test_pipeline.py``; here it runs again in bfloat16 through every stage of its model
(model_quality and steer too), checked finite and ranked like its float32 twin.

The first test prints a table of each family's processor class, stages and wall time (``-s``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from e2e_support import ROOT, benchmark_words, brought_entry, dvc, new_repo, ran_stages, save_model
from tiny_models import FACTORIES

from stages.profile import merged

pytestmark = pytest.mark.slow
TASK = "vqa"
FAMILIES = tuple(FACTORIES)
BF16 = "random-qwen2_5_vl-bf16"
F32 = "random-qwen2_5_vl"
MODELS = {f"random-{family}": family for family in FAMILIES}
# The logit lens of every family is checked by tests/test_logit_lens.py, in one process.
MODEL_STAGES = ("resolve_model", "heads", "dump", "ablation", "attribute", "masks", "evaluate")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    params = merged(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((Path(__file__).parent / "params_small.yaml").read_text()),
    )
    words = benchmark_words(params["benchmark"]["synthetic"], tmp_path_factory.mktemp("words") / "bench")
    folders = tmp_path_factory.mktemp("brought")
    entries = {}
    for name, family in MODELS.items():
        save_model(folders / name, family, seed=0, words=words)
        entries[name] = brought_entry(folders / name, "float32")
    entries[BF16] = brought_entry(folders / F32, "bfloat16")
    names = [*MODELS, BF16]
    # One ablation item: the families are the point (params_small.yaml runs one process per stage).
    params = merged(
        params,
        {
            "trained_models": [],
            "pretrained_models": names,
            "studied_models": names,
            "tasks": [TASK],
            "models": entries,
            "ablation": {"max_items": 1},
        },
    )
    params["replicates"] = {}  # no recipe is replicated here
    for name in list(params["models"]):
        if name not in names:
            del params["models"][name]
    repo = new_repo(tmp_path_factory.mktemp("families"), params)
    targets = [f"evaluate@{name}" for name in names] + [
        f"steer@{BF16}",
        f"model_quality@{BF16}",
        f"logit_lens@{BF16}",
    ]
    proc = dvc(repo, "repro", *targets)
    (repo.parent / "ran.json").write_text(json.dumps(sorted(ran_stages(proc))))
    return repo


def _timings(repo: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in (repo / "timings").glob("*@*.json"):
        record = json.loads(path.read_text())
        out[record["stage"]] = record["wall_s"]
    return out


def test_every_family_runs_its_stages_through_dvc(repo: Path) -> None:
    ran = set(json.loads((repo.parent / "ran.json").read_text()))
    timings = _timings(repo)
    rows = []
    for name, family in MODELS.items():
        expected = {
            f"{stage}@{name}-{TASK}" if stage in ("heads", "dump") else f"{stage}@{name}" for stage in MODEL_STAGES
        }
        assert expected <= ran, sorted(expected - ran)
        source = json.loads((repo / f"data/models/{name}/source.json").read_text())
        assert source["model_type"] == family and source["processor"] == type(FACTORIES[family]()[1]).__name__
        scores = __import__("pandas").read_parquet(repo / f"data/heads/{name}/{TASK}/scores.parquet")
        assert len(scores) == source["layout"]["layers"] * source["layout"]["heads"]
        assert np.isfinite(scores["score"]).all(), name
        assert (repo / f"data/activations/{name}/{TASK}.zarr/z/zarr.json").is_file()
        from pipeline.method.store import read_importance

        methods, tasks, importance, _ = read_importance(repo / f"data/attribution/{name}.zarr")
        assert tasks == [TASK] and "hones" in methods
        assert np.isfinite(importance[methods.index("hones")]).all(), name
        assert any((repo / f"data/evaluate/{name}").iterdir())
        wall = sum(s for stage, s in timings.items() if stage.split("@")[1] in (name, f"{name}-{TASK}"))
        rows.append(f"| {family} | {source['processor']} | {len(expected)} | {wall:.1f} |")
    print("\n| family | processor | stages through DVC | wall s |\n|---|---|---|---|\n" + "\n".join(rows))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def test_bfloat16_runs_the_whole_graph_and_ranks_like_float32(repo: Path) -> None:
    from pipeline.method.store import read_importance

    ran = set(json.loads((repo.parent / "ran.json").read_text()))
    assert {f"steer@{BF16}", f"model_quality@{BF16}", f"logit_lens@{BF16}", f"evaluate@{BF16}"} <= ran
    quality = json.loads((repo / f"metrics/model_quality/{BF16}.json").read_text())
    by_type = quality.pop("generative_by_question_type")
    values = [v for by_task in quality.values() for v in by_task.values()]
    values += [v for kinds in by_type.values() for v in kinds.values()]
    assert by_type and all(np.isfinite(v) for v in values), quality
    methods, _, low, _ = read_importance(repo / f"data/attribution/{BF16}.zarr")
    methods32, _, full, _ = read_importance(repo / f"data/attribution/{F32}.zarr")
    assert methods == methods32
    correlations = {}
    for method in ("hones", "hones_nohead", "hones_lp", "atp", "ma"):
        k = methods.index(method)
        assert np.isfinite(low[k]).all(), method
        correlations[method] = _spearman(low[k], full[k])
    print(f"\nbfloat16 vs float32 Spearman on {TASK}: " + ", ".join(f"{m} {r:.3f}" for m, r in correlations.items()))
    assert min(correlations.values()) > 0.9, correlations
