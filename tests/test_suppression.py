"""Held-out suppression: batched mask conditions vs separate runs, the likelihood utility,
intervals, deletion curves on a planted neuron, and the verdict table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.method.masks import build_masks
from pipeline.model.evaluation import TaskResult, answer_logprob, evaluate_conditions, evaluate_task, yes_no_margin
from pipeline.model.hooks import scale_neurons
from pipeline.outcomes.records import (
    AttributionRecord,
    Comparison,
    QualityRecord,
    Sensitivity,
    SteeringRecord,
    SuppressionRecord,
)
from pipeline.outcomes.suppression import (
    MaskCondition,
    generative_conditions,
    mask_conditions,
    scores_table,
    suppression_scores,
    suppression_statistics,
)
from pipeline.report.html import Section, build_report
from pipeline.report.verdict import sensitivity_message, verdict_rows
from pipeline.tasks.items import candidate_prompt


def _masks(rows: list[tuple[str, str, int, int]], rho: float = 0.01, headline: bool = True) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": [r[0] for r in rows],
            "task": [r[1] for r in rows],
            "rho": rho,
            "draw": 0,
            "headline": headline,
            "rank": 1,
            "layer": [r[2] for r in rows],
            "neuron": [r[3] for r in rows],
            "score": 1.0,
        }
    )


def test_batched_masks_equal_separate_runs(tiny_adapter, annotations, images) -> None:
    items = annotations[(annotations["split"] == "discovery") & annotations["task"].isin(["vqa", "retrieval"])]
    items = items.groupby("task").head(3)
    masks = pd.concat(
        [
            _masks(
                [
                    ("m1", "vqa", 0, 3),
                    ("m1", "vqa", 1, 7),
                    ("m2", "vqa", 1, 7),
                    ("m1", "retrieval", 0, 1),
                    ("m2", "retrieval", 1, 2),
                ]
            ),
            _masks([("m1", "vqa", 0, 5)], rho=0.02, headline=False),
        ]
    )
    conditions = mask_conditions(masks)
    assert [c.headline for c in conditions] == [True] * 4 + [False]
    assert generative_conditions(conditions) == [1, 2, 3, 4]
    scores = suppression_scores(tiny_adapter, items, images, conditions, batch_size=8, max_new_tokens=4)
    assert set(scores) == {(u, t) for u in ("likelihood", "generative") for t in ("vqa", "retrieval")}
    assert sorted(scores[("likelihood", "vqa")]) == [0, 1, 2, 3, 4, 5]
    assert sorted(scores[("generative", "vqa")]) == [0, 1, 2, 3, 4]  # the curve-only mask: likelihood only
    for k, cond in enumerate(conditions, start=1):
        by_layer: dict[int, list[int]] = {}
        for l, n in cond.neurons:
            by_layer.setdefault(l, []).append(n)
        for eval_task in ("vqa", "retrieval"):
            sub = items[items["task"] == eval_task]
            with scale_neurons(tiny_adapter, {l: (n, 0.0) for l, n in by_layer.items()}):
                want = evaluate_task(
                    tiny_adapter, eval_task, sub, images, batch_size=8, utility="likelihood", progress=False
                )[0]
            got = scores[("likelihood", eval_task)][k]
            np.testing.assert_allclose(got.per_item, want.per_item, atol=1e-5)
    table = scores_table(scores, items)
    assert set(table.columns) >= {"utility", "condition", "eval_task", "item_id", "score"}
    assert len(table) == (6 + 5) * 3 * 2


def test_likelihood_is_reference_probability_and_positive_softmax(tiny_adapter, annotations, images) -> None:
    items = annotations[annotations["split"] == "discovery"]
    cap = items[items["task"] == "caption"].head(2).reset_index(drop=True)
    got = evaluate_task(tiny_adapter, "caption", cap, images, batch_size=3, utility="likelihood", progress=False)[0]
    for i, row in cap.iterrows():
        refs = list(row.references)
        lp = answer_logprob(tiny_adapter, [images[row.image_id]] * len(refs), [row.prompt] * len(refs), refs)
        assert got.per_item[i] == pytest.approx(float(np.exp(lp).mean()), abs=1e-6)
    ret = items[items["task"] == "retrieval"].head(2).reset_index(drop=True)
    both = evaluate_conditions(
        tiny_adapter, "retrieval", ret, images, {"generative": [0], "likelihood": [0]}, batch_size=5, progress=False
    )
    for i, row in ret.iterrows():
        m = yes_no_margin(
            tiny_adapter,
            [images[row.image_id]] * len(row.candidates),
            [candidate_prompt(row.prompt, c) for c in row.candidates],
        )
        p = np.exp(m - m.max()) / np.exp(m - m.max()).sum()
        assert both["likelihood"][0].per_item[i] == pytest.approx(float(p[row.positive_index]), abs=1e-6)
    assert both["generative"][0].metric == "ndcg@5" and both["likelihood"][0].metric == "positive_probability"
    # Nothing is generated for the likelihood or for retrieval, so no generation length is needed;
    # asking for generated answers without one is an error naming the task.
    kw = dict(batch_size=5, max_new_tokens=None, progress=False)
    assert evaluate_conditions(tiny_adapter, "retrieval", ret, images, {"generative": [0]}, **kw)["generative"]
    assert evaluate_conditions(tiny_adapter, "caption", cap, images, {"likelihood": [0]}, **kw)["likelihood"]
    with pytest.raises(PipelineError, match=r"caption: generating answers needs max_new_tokens >= 1, got None"):
        evaluate_conditions(tiny_adapter, "caption", cap, images, {"generative": [0]}, **kw)


PLANTED = (1, 5)  # the one neuron that carries vqa in the fake model
TASKS = ["vqa", "ocr"]


def _fake_model_scores(conditions: list[MaskCondition], n: int = 60) -> dict:
    """A fake model: every item scores ~0.9 (item noise), vqa items score 0.1 when PLANTED is
    zeroed, and any other zeroed neuron costs nothing. Same items under every condition."""
    noise = np.random.default_rng(0).uniform(-0.05, 0.05, (len(TASKS), n))
    specs = [(), *[c.neurons for c in conditions]]
    out = {}
    for j, task in enumerate(TASKS):
        by_cond = {}
        for k, neurons in enumerate(specs):
            per = 0.9 + noise[j]
            if task == "vqa" and PLANTED in neurons:
                per = 0.1 + noise[j]
            by_cond[k] = TaskResult(task, "fake", float(per.mean()), per)
        out[("likelihood", task)] = by_cond
    return out


def test_deletion_curve_finds_the_planted_neuron() -> None:
    L, I = 2, 50
    methods = ["hones", "ma", "random", "ablation"]
    scores = np.random.default_rng(1).random((4, 2, L, I))
    scores[0, 0][PLANTED] = 10.0  # hones ranks the planted neuron first for vqa
    scores[3, 0][PLANTED] = 10.0  # so does the ground truth
    order = np.argsort(-scores[1, 0].ravel())
    scores[1, 0][PLANTED] = scores[1, 0].ravel()[order[8]] - 1e-9  # ma: 10th, so it enters at rho = 0.1
    for m in range(4):
        scores[m, 1][PLANTED] = -1.0  # no method puts it in the ocr mask
    rhos = [0.01, 0.05, 0.1, 0.2]
    masks = build_masks(methods, TASKS, scores, rhos, 0.05, random_draws=5, seed=0)
    conditions = mask_conditions(masks)
    record = suppression_statistics(_fake_model_scores(conditions), conditions, n_resamples=300, seed=0)
    stats = record.likelihood
    drop = 100 * 0.8 / 0.9 / 2  # vqa loses 0.8 of 0.9; on-target averages the vqa and ocr masks
    hones = stats.curve["hones"]
    assert all(hones[f"{r:g}"].on_target_drop.value == pytest.approx(drop, rel=0.05) for r in rhos)
    ma = stats.curve["ma"]
    assert [ma[f"{r:g}"].on_target_drop.value > 1 for r in rhos] == [False, False, True, True]
    # The planted neuron never enters an ocr mask, so nothing is lost off target.
    assert all(abs(p.off_target_drop.value) < 1e-9 for p in hones.values())
    assert stats.auc["hones"].on_target_drop.value > stats.auc["ma"].on_target_drop.value + 10
    # At the headline size (5%), hones beats ma and random on target, decisively.
    assert stats.difference("hones", "ma").on_target_drop.verdict == "holds"
    assert stats.difference("hones", "random").on_target_drop.verdict == "holds"
    assert stats.random_draws.on_target_drop.n == 5
    sens = stats.sensitivity
    assert sens.excludes_zero and sens.half_width_within_third
    assert "can see effects" in sensitivity_message(record.likelihood.sensitivity)
    rows = verdict_rows("fake", record, _NO_STEERING, _NO_ATTRIBUTION)
    assert {r["verdict"] for r in rows if "on-target" in r["claim"]} == {"holds"}
    assert rows[-1]["claim"].startswith("sensitivity") and rows[-1]["verdict"] == "holds"


# Records of a model whose steer and masks stages gave no verdict row (no steering differences,
# no layer preference), and a suppression document around one utility's statistics.
_NO_STEERING = SteeringRecord.model_validate({"confidence": 0.95, "resamples": 10, "scale_movement": {}})
_NO_ATTRIBUTION = AttributionRecord.model_validate(
    {"mask_size": 1, "faithfulness": {}, "faithfulness_on_ablation_items": {}, "overlap_jaccard_hones": {}}
)


def _suppression(likelihood: dict) -> SuppressionRecord:
    return SuppressionRecord.model_validate(
        {"confidence": 0.95, "resamples": 10, "equivalence_margin": 0.0, "items_per_task": {}, "likelihood": likelihood}
    )


def test_sensitivity_says_plainly_when_the_effect_is_invisible() -> None:
    sens = {
        "ground_truth_on_target_drop": {"value": 0.5, "ci_low": -0.4, "ci_high": 1.4},
        "excludes_zero": False,
        "half_width_within_third": False,
        "per_task": {},
    }
    assert "cannot see effects of this size: raise rho or the number of test items" in sensitivity_message(
        Sensitivity.model_validate(sens)
    )
    only_sensitivity = {"baseline": {}, "relative_drop": {}, "summary": {}, "sensitivity": sens}
    rows = verdict_rows("m", _suppression(only_sensitivity), _NO_STEERING, _NO_ATTRIBUTION)
    assert rows[-1]["verdict"] == "undecided"


@pytest.mark.slow
def test_report_is_self_contained(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png")
    build_report(
        "R",
        "intro",
        [
            Section(
                "t",
                "what it shows",
                table=pd.DataFrame({"a": [1.0]}),
                images=[tmp_path / "f.png", tmp_path / "missing.png"],
            )
        ],
        tmp_path / "r.html",
    )
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html and "what it shows" in html and "missing figure" in html
    assert 'src="http' not in html and "<script" not in html


def _planted_study(vqa_masked: float = 0.1, noise_seed: int = 0) -> tuple[dict, list[MaskCondition]]:
    """The planted-neuron study of ``test_deletion_curve_finds_the_planted_neuron`` at one size,
    with the masked vqa score and the item noise as arguments (another "seed" of the model)."""
    L, I = 2, 50
    scores = np.random.default_rng(1).random((3, 2, L, I))
    scores[0, 0][PLANTED] = 10.0
    masks = build_masks(["hones", "ma", "ablation"], TASKS, scores, [0.05], 0.05, random_draws=1, seed=0)
    conditions = mask_conditions(masks)
    noise = np.random.default_rng(noise_seed).uniform(-0.05, 0.05, (len(TASKS), 40))
    out = {}
    for j, task in enumerate(TASKS):
        by_cond = {}
        for k, neurons in enumerate([(), *[c.neurons for c in conditions]]):
            per = (vqa_masked if task == "vqa" and PLANTED in neurons else 0.9) + noise[j]
            by_cond[k] = TaskResult(task, "fake", float(per.mean()), per)
        out[("likelihood", task)] = by_cond
    return out, conditions


def test_evaluate_tables_read_back_to_the_same_statistics() -> None:
    from pipeline.outcomes.suppression import conditions_from_table, conditions_table, scores_from_table

    scores, conditions = _planted_study()
    items = pd.DataFrame({"task": np.repeat(TASKS, 40), "item_id": [f"{t}-{i}" for t in TASKS for i in range(40)]})
    back = scores_from_table(scores_table(scores, items))
    conds = conditions_from_table(conditions_table(conditions))
    assert [(c.method, c.target_task, c.rho, c.draw, c.headline) for c in conds] == [
        (c.method, c.target_task, c.rho, c.draw, c.headline) for c in conditions
    ]
    a = suppression_statistics(scores, conditions, n_resamples=200, seed=0)
    b = suppression_statistics(back, conds, n_resamples=200, seed=0)
    assert a == b


def test_replicated_differences_carry_the_instances_variance() -> None:
    from pipeline.outcomes.suppression import replicated_differences

    one = _planted_study()
    alone = suppression_statistics(*one, n_resamples=300, seed=0).document()["likelihood"]["differences"]
    # Three copies of one instance: the same point and interval as the instance alone.
    same = replicated_differences({"s0": one, "s1": one, "s2": one}, n_resamples=300, seed=0)
    assert same.instances == ["s0", "s1", "s2"] and same.of("generative") == {}
    for k in ("on_target_drop", "selectivity"):
        got, want = same.of("likelihood")[Comparison("hones", "ma")][k], alone["hones-minus-ma"][k]
        assert [got.value, got.ci_low, got.ci_high, got.verdict] == [
            want[x] for x in ("value", "ci_low", "ci_high", "verdict")
        ]
    # Seeds that disagree (the planted neuron matters in one instance, barely in the others):
    # the point is their mean, and the interval is wider than any instance's item interval.
    studies = {"s0": _planted_study(0.1, 0), "s1": _planted_study(0.85, 1), "s2": _planted_study(0.88, 2)}
    rep = replicated_differences(studies, n_resamples=300, seed=0).of("likelihood")[Comparison("hones", "ma")]
    per = rep["on_target_drop"].per_instance
    assert rep["on_target_drop"].value == pytest.approx(np.mean(list(per.values())), abs=1e-3)
    widths = [
        np.subtract(
            *[
                suppression_statistics(*s, n_resamples=300, seed=0)
                .likelihood.difference("hones", "ma")
                .on_target_drop.model_dump()[x]
                for x in ("ci_high", "ci_low")
            ]
        )
        for s in studies.values()
    ]
    assert rep["on_target_drop"].ci_high - rep["on_target_drop"].ci_low > 3 * max(widths)
    with pytest.raises(Exception, match="same items"):
        short = _planted_study()
        short[0][("likelihood", "vqa")] = {
            k: TaskResult("vqa", "fake", r.utility, r.per_item[:10]) for k, r in short[0][("likelihood", "vqa")].items()
        }
        replicated_differences({"s0": one, "s1": short}, n_resamples=100, seed=0)


def test_equivalence_needs_the_whole_interval_inside_the_margin() -> None:
    from pipeline.outcomes.statistics import Interval, verdict

    assert verdict(Interval(0.1, -0.3, 0.4), 0.0, 0.5) == "equivalent"
    assert verdict(Interval(0.1, -0.3, 0.6), 0.0, 0.5) == "undecided"
    assert verdict(Interval(0.1, -0.3, 0.4), 0.0, 0.0) == "undecided"
    assert verdict(Interval(0.3, 0.1, 0.4), 0.0, 0.5) == "holds"  # significant, however small
    assert verdict(Interval(-0.3, -0.4, -0.1), 0.0, 0.5) == "fails"


def test_markdown_summary_tables() -> None:
    from pipeline.report.markdown import markdown_document, markdown_table

    frame = pd.DataFrame(
        {"value": [1.23456, float("nan")], "verdict": ["holds", "a|b"]}, index=pd.Index(["x", "y"], name="model")
    )
    assert markdown_table(frame).splitlines() == [
        "| model | value | verdict |",
        "|---|---|---|",
        "| x | 1.23 | holds |",
        "| y |  | a\\|b |",
    ]
    doc = markdown_document("T", "intro", [("Verdict", "text", frame), ("Empty", "only text", None)])
    assert doc.startswith("# T\n\nintro\n\n## Verdict\n\ntext\n\n| model |") and "## Empty\n\nonly text\n" in doc


def test_a_recipe_refuses_instances_trained_with_another_recipe() -> None:
    from pipeline.errors import PipelineError
    from pipeline.report.verdict import check_recipe_instances

    spec = {"family": "llava", "steps": 3000, "retrieval_negatives": 4, "seed": 0}
    check_recipe_instances("r", {"a": spec, "b": {**spec, "seed": 1}, "brought": None})  # only the seed differs
    check_recipe_instances("r", {"x": None, "y": None})  # brought models: nothing recorded to compare
    with pytest.raises(
        PipelineError,
        match=r"replicates.r: b was trained with another recipe than a "
        r"\(differing: steps 2000 vs 3000\)",
    ):
        check_recipe_instances("r", {"a": spec, "b": {**spec, "steps": 2000, "seed": 1}})
    with pytest.raises(PipelineError, match="retrieval_negatives None vs 4"):
        check_recipe_instances("r", {"a": spec, "c": {k: v for k, v in spec.items() if k != "retrieval_negatives"}})


def test_quality_against_targets_names_the_task_below_its_target() -> None:
    from pipeline.report.verdict import QUALITY_TARGETS, quality_against_targets

    good = {t: target for t, target in QUALITY_TARGETS.items()}  # exactly at the target: met
    got = quality_against_targets(
        {
            m: QualityRecord.model_validate(q)
            for m, q in {
                "m": {"generative": good},
                "n": {"generative": {**good, "retrieval": 0.706}},
                "brought": {"likelihood": {"vqa": 0.9}},
            }.items()
        }
    )
    assert got["m"]["all_met"] and all(got["m"][t]["met"] for t in QUALITY_TARGETS)
    assert not got["n"]["all_met"] and not got["n"]["retrieval"]["met"] and got["n"]["vqa"]["met"]
    assert got["n"]["retrieval"] == {"value": 0.706, "target": 0.80, "met": False}
    assert "brought" not in got


def test_a_recipe_decides_per_instance_claims_on_every_instance() -> None:
    from pipeline.report.verdict import verdict_summary

    def row(model: str, claim: str, verdict: str, utility: str = "likelihood") -> dict:
        return {"model": model, "claim": claim, "utility": utility, "verdict": verdict}

    rows = [
        row("r", "HONES on-target drop exceeds random's", "holds"),  # the bootstrap across seeds
        row("r", "HONES on-target drop exceeds random's", "fails", "generative"),  # not deciding
        *[row(m, "HONES on-target drop exceeds random's", "undecided") for m in ("a", "b")],
        row("a", "steering", "holds"),
        row("b", "steering", "holds"),
        row("a", "layers", "holds", "-"),
        row("b", "layers", "fails", "-"),
        row("a", "sensitivity", "holds"),
        row("b", "sensitivity", "undecided"),
        row("a", "only a", "holds"),
    ]
    got = verdict_summary(rows, ["r"], {"r": ["a", "b"]})
    assert {c: v["verdicts"]["r"] for c, v in got["across"].items()} == {
        "HONES on-target drop exceeds random's": "holds",
        "steering": "holds",
        "layers": "mixed",
        "sensitivity": "undecided",
    }  # "only a": not every instance has it
    assert got["decided_by"]["r"] == {
        "HONES on-target drop exceeds random's": "bootstrap across instances",
        "layers": "every instance",
        "sensitivity": "every instance",
        "steering": "every instance",
    }
    assert got["counts"]["r"] == {"holds": 2, "fails": 0, "equivalent": 0, "undecided": 1, "mixed": 1}
    assert got["counts"]["a"] == {"holds": 4, "fails": 0, "equivalent": 0, "undecided": 1}
    assert "decided_by" not in verdict_summary(rows, ["a", "b"])


def test_study_verdicts_refuse_a_recipe_before_reading_its_instances(tmp_path: Path) -> None:
    """The report's verdicts check a recipe's instances' training records first: the error names
    the recipe and what differs, and no evaluation file is read (``tmp_path`` holds none)."""
    from types import SimpleNamespace

    from pipeline.report.study import study_verdicts

    spec = {"family": "llava", "steps": 3000, "seed": 0}
    results = SimpleNamespace(
        models=[], training={"a": {"spec": spec}, "b": {"spec": {**spec, "family": "idefics3", "seed": 1}}}
    )
    with pytest.raises(
        PipelineError, match=r"replicates.seeds: b was trained with another recipe than a \(differing: family"
    ):
        study_verdicts(
            results,
            {"seeds": ["a", "b"]},
            tmp_path,
            steer_utility="likelihood",
            n_resamples=10,
            seed=0,
            confidence=0.95,
            equivalence_margin=0.5,
        )
