"""The report's layout: which sections, in which order, with which tables and figures.

Map of this module:
- ``interval_text`` / ``intervals_table``: "value [low, high]" cells.
- ``report_sections(results, verdicts, summary, heads, ...)``: every section of the report, the
  verdict first (writes the learning-curve figures of the default models into ``plots``).
- ``markdown_sections(sections, verdicts)``: the sections that hold a table, as (heading, text,
  table) for ``pipeline.report.markdown.markdown_document``, the verdict with its interval in one
  column.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.method.attribution import METHOD_DESCRIPTIONS
from pipeline.outcomes.records import UTILITIES, IntervalRecord, UtilitySteering, UtilitySuppression
from pipeline.report.html import Section
from pipeline.report.plots import plot_training_curves
from pipeline.report.study import StudyResults
from pipeline.report.verdict import VERDICT_COLUMNS, sensitivity_message

_QUALITY_WHAT = {
    "generative": "the paper's metrics, as the authors' evaluation computes them: VQA accuracy, OCR ANLS, caption "
    "BLEU-4, retrieval NDCG@5",
    "generative_standard": "this project's standard variants on the same generations: VQA accuracy with the VQA "
    "normalisation and whole-word match, ANLS against the best reference, unsmoothed BLEU-4 on word and "
    "punctuation tokens",
    "likelihood": "per-token probability of the references; retrieval: the positive's softmax probability over "
    "the candidates' Yes-minus-No margins",
}


def interval_text(iv: IntervalRecord | dict | None) -> str:
    """An interval record, or a dict with its keys (a verdict row, a sampled figure), as
    "value [low, high]"; "-" without one or without a value."""
    if iv is None:
        return "-"
    if isinstance(iv, IntervalRecord):
        value, lo, hi = iv.value, iv.ci_low, iv.ci_high
    else:  # a row this module's callers build, not a stage's document: its keys may be absent
        value, lo, hi = (iv.get(k) for k in ("value", "ci_low", "ci_high"))
    if value is None:
        return "-"
    return f"{value:.3g} [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else f"{value:.3g}"


def intervals_table(cells: dict) -> pd.DataFrame:
    """{row: {column: interval}} (or {row: a record of figures}) -> a table of "value [low, high]" strings."""
    rows = {r: row.intervals() if hasattr(row, "intervals") else row for r, row in cells.items()}
    return pd.DataFrame({r: {c: interval_text(iv) for c, iv in row.items()} for r, row in rows.items()}).T


def _verdict_sections(
    verdicts: list[dict], summary: dict, replicates: dict[str, list[str]], equivalence_margin: float
) -> list[Section]:
    table = pd.DataFrame(verdicts, columns=list(VERDICT_COLUMNS)) if verdicts else None
    replicated_note = (
        f" Rows of a recipe ({', '.join(f'{r}: {len(i)} instances' for r, i in replicates.items())}) decide "
        "the method comparisons across its trained instances: the value is the mean over instances, the interval a "
        "two-stage bootstrap over instances and then test items, so it carries the variance between trainings; "
        "per_instance gives each instance's own value. A claim decided per instance (steering, layer preference, "
        "sensitivity) holds for a recipe when it holds on every instance (the tables below count both kinds)."
        if replicates
        else " Each model is one trained instance: the intervals carry the test items' variance, not the variance "
        "between trainings of the same recipe (list a recipe's instances under replicates to decide the claims "
        "across seeds)."
    )
    sections = [
        Section(
            "Verdict",
            "One row per claim of the method and model: the measured difference (percentage "
            "points of relative drop, or utility for steering), its 95% paired-bootstrap interval over test "
            "items, and the verdict: holds when the interval lies above the threshold, fails when below, "
            f"equivalent when it lies within +-{equivalence_margin:g} percentage points of it (a "
            "difference shown too small to matter), undecided otherwise. Likelihood rows decide; "
            "generative rows are the paper's metric." + replicated_note,
            table=table,
        )
    ]
    counts = pd.DataFrame(summary["counts"]).T.fillna(0).astype(int)
    sections.append(
        Section(
            "How many claims are decided",
            "Likelihood (deciding) rows of each model and recipe, by verdict.",
            table=counts if len(counts) else None,
        )
    )
    if summary["across"]:
        decided_by = (
            {
                c: {"decided by": " / ".join(sorted({d[c] for d in summary["decided_by"].values() if c in d}))}
                for c in summary["across"]
            }
            if replicates
            else {}
        )
        sections.append(
            Section(
                "Each claim across " + ("recipes" if replicates else "models"),
                "The deciding verdict of each claim side by side; the last column holds when every "
                "one agrees, mixed when some hold and others fail."
                + (
                    " Decided by: the bootstrap across a recipe's instances, or its verdict on every instance."
                    if replicates
                    else ""
                ),
                table=pd.DataFrame(
                    {
                        c: {**v["verdicts"], "all": v["verdict"], **decided_by.get(c, {})}
                        for c, v in summary["across"].items()
                    }
                ).T,
            )
        )
    return sections


def _stability_section(heads: dict[str, dict]) -> list[Section]:
    stability = {
        (m, t): {
            "top heads": " ".join(h.get("top_heads", [])),
            "recall (bootstrap mean)": h["recall"]["mean"],
            "recall (2.5%)": h["recall"]["p2.5"],
            "heads with positive score": h["positive_heads"],
            "degenerate": h["degenerate"],
        }
        for m, by_task in heads.items()
        for t, h in by_task.items()
        if h
    }
    if not stability:
        return []
    return [
        Section(
            "Are the critical heads stable?",
            "The top K_h heads of each model and task, and how "
            "many of them a bootstrap resample of the head-scoring items finds again (recall). "
            "Degenerate: no head's substitution lowers the utility, so the top K_h are arbitrary and "
            "HONES reduces to hones_nohead there.",
            table=pd.DataFrame(stability).T,
        )
    ]


def _localisation_section(heads: dict[str, dict]) -> list[Section]:
    rows = {
        (m, t): {
            "spearman (estimate, exact)": g["spearman"],
            "recall": g["recall"],
            "recall, ties counted": g["recall_ties_counted"],
            "recall, estimate alone": g["recall_estimate_only"],
            "exhaustive top heads": " ".join(g["exhaustive_top_heads"]),
            "guided top heads": " ".join(g["guided_top_heads"]),
            **{f"screen of {n} items, ties counted": sc["recall_ties_counted"] for n, sc in g["screened"].items()},
            **{
                f"{name}: HONES mask Jaccard / on-target drop change (pp)": (
                    "same heads" if d["same_heads"] else f"{d['mask_jaccard']:.2f} / {interval_text(d['difference'])}"
                )
                for name, d in g.get("downstream", {}).items()
            },
        }
        for m, by_task in heads.items()
        for t, h in by_task.items()
        if (g := h.get("localisation"))
    }
    if not rows:
        return []
    g = next(h["localisation"] for by_task in heads.values() for h in by_task.values() if "localisation" in h)
    return [
        Section(
            "Would a cheaper head localisation find the same heads?",
            f"Guided localisation (heads.localisation: guided) ranks every head by the gradient estimate of "
            f"its substitution effect on the answer's log-probability and scores only the top "
            f"{g['candidates']} of {g['heads']} exactly. Recall: the share of the exhaustive sweep's top "
            f"{g['top_k']} heads it keeps; where it is 1, the dump, masks and every result after are "
            "unchanged. Ties counted: a kept head whose exact score equals the exhaustive sweep's "
            f"{g['top_k']}th counts as found (which tied heads the sweep keeps is the layer order's "
            "choice). Screened localisation (heads.localisation: screened) instead of the gradient: "
            "every head scored exactly on the first items only, the best heads.screened.candidates "
            "then on every item, computed here from the sweep's per-item values (so its items are among "
            "the sweep's own). Downstream (stage localisation_downstream): where a localisation keeps "
            "other heads, the task is dumped again under them; the HONES mask's Jaccard with the "
            "exhaustive sweep's, and the change in its on-target likelihood drop (percentage points, "
            "paired interval on the evaluate items). Compare with the bootstrap recall of the "
            "exhaustive sweep itself (above).",
            table=pd.DataFrame(rows).T,
        )
    ]


def _sampled_ground_truth_section(sampled: dict[str, dict]) -> list[Section]:
    if not sampled:
        return []
    rows = {}
    for m, checked in sampled.items():
        for task, by_method in checked["by_task"].items():
            size = by_method["sample"]
            zeroed = size["census"] + size["near"] + size["far"]
            for method in ("hones", "atp"):
                if method in by_method:
                    rows[(m, task, method)] = {
                        "neurons zeroed": f"{zeroed} of {size['population']}",
                        **{
                            (f"{f} exhaustive / sampled" if "exhaustive" in v else f"{f} sampled"): (
                                f"{v['exhaustive']:.3g} / {interval_text(v)}" if "exhaustive" in v else interval_text(v)
                            )
                            for f, v in by_method[method].items()
                        },
                    }
    compared = {m: c for m, c in sampled.items() if c["figures"]}
    within = ", ".join(f"{m} {c['within']} of {c['figures']}" for m, c in compared.items()) or "none compared"
    return [
        Section(
            "Would a sampled ground truth do?",
            "The exhaustive ground truth zeroes every neuron. The sampled one (stage sampled_ground_truth, "
            "params ablation.sample) zeroes every evaluated method's top-k neurons, as many of the neurons "
            "some method ranks in its top 4k, and half as many of the rest, and estimates each method's "
            "faithfulness from those effects alone, with a bootstrap interval (docs/methods.md). "
            f"Exhaustive values inside their sampled interval, all methods and figures: {within}. "
            "Rows: HONES and AtP.",
            table=pd.DataFrame(rows).T,
        )
    ]


def _mean_value(cells: dict[str, IntervalRecord]) -> float | None:
    values = [c.value for c in cells.values() if c.value is not None]
    return sum(values) / len(values) if values else None


def _hones_drop(by_utility: UtilitySuppression | None) -> IntervalRecord | None:
    """HONES's headline on-target drop of one utility's suppression statistics (None when that
    utility or HONES was not evaluated)."""
    if by_utility is None or "hones" not in by_utility.summary:
        return None
    return by_utility.summary["hones"].on_target_drop


def _steering_difference(by_utility: UtilitySteering | None, method: str, baseline: str) -> str:
    """The mean-over-tasks difference "<method>-minus-<baseline>" as text; "" when not compared
    (and "-" when compared without a mean)."""
    if by_utility is None or (method, baseline) not in by_utility.differences:
        return ""
    return interval_text(by_utility.mean_difference(method, baseline))


def _transfer_section(results: StudyResults) -> list[Section]:
    rows = {}
    for m, t in results.transfer.items():
        if t.suppression is None:
            continue
        for u in UTILITIES:
            ood = t.suppression.of(u)
            if ood is None:
                continue
            test = results.suppression[m].of(u)
            steer = t.steering.of(u) if t.steering is not None else None
            rows[(m, u)] = {
                "base utility, test (mean of tasks)": _mean_value(test.baseline if test is not None else {}),
                "base utility, ood": _mean_value(ood.baseline),
                "HONES on-target drop (%), test": interval_text(_hones_drop(test)),
                "HONES on-target drop (%), ood": interval_text(_hones_drop(ood)),
                "learned minus base, ood": _steering_difference(steer, "learned", "base"),
                "learned minus Grid-Search, ood": _steering_difference(steer, "learned", "grid_search"),
            }
    if not rows:
        return []
    return [
        Section(
            "Do the masks and steering scales transfer out of distribution?",
            "Masks found on the discovery split and steering scales learned (and the Grid-Search scale chosen) on "
            "dev, applied unchanged to out-of-distribution items (the benchmark's ood split: other rendering and "
            "wording, docs/default.md). Base utility is the unsteered, unmasked model on each split; steering "
            "differences are in utility units, with 95% intervals. Likelihood decides.",
            table=pd.DataFrame(rows).T,
        )
    ]


def _ood_transfer_section(results: StudyResults) -> list[Section]:
    rows = {}
    for m, by_set in results.ood_transfer.items():
        for b, t in by_set.items():
            for u in UTILITIES:
                ood = t.suppression.of(u) if t.suppression is not None else None
                if ood is None:
                    continue
                steer = t.steering.of(u) if t.steering is not None else None
                imported = t.imported
                rows[(m, b, u)] = {
                    "items (per task)": ", ".join(f"{k} {n}" for k, n in imported.items.items()) if imported else "",
                    "records left out": len(imported.skipped) if imported else 0,
                    "base utility (mean of tasks)": _mean_value(ood.baseline),
                    "HONES on-target drop (%)": interval_text(_hones_drop(ood)),
                    "learned minus base": _steering_difference(steer, "learned", "base"),
                    "learned minus Grid-Search": _steering_difference(steer, "learned", "grid_search"),
                }
    if not rows:
        return []
    return [
        Section(
            "Do they transfer to the out-of-distribution sets you brought?",
            "The same in-domain masks and scales on each set of params ood_benchmarks (imported by its "
            "ood_benchmark stage, only the tasks it has). Records left out: those skip_bad let the import "
            "pass over, each named in data/ood/<set>/import.json. Likelihood decides.",
            table=pd.DataFrame(rows).T,
        )
    ]


def _shared_neurons_section(results: StudyResults) -> list[Section]:
    rows = {}
    for m, shared in results.shared_neurons.items():
        for pair, fig in shared.pairs.items():
            rows[(m, pair)] = {
                "shared neurons": fig.shared_neurons,
                "drop on the pair's tasks (%)": interval_text(fig.on_pair["shared"]),
                "drop on the other tasks (%)": interval_text(
                    fig.cross_task["shared"] if fig.cross_task is not None else None
                ),
                "minus as many other mask neurons, pair's tasks": interval_text(fig.shared_minus_subset.on_pair),
            }
    if not rows:
        return []
    size = next(s.mask_size for s in results.shared_neurons.values() if s.pairs)
    return [
        Section(
            "Do the neurons two tasks share matter more?",
            f"For each pair of tasks, the neurons both tasks' HONES masks hold at mask size {size:g}, zeroed alone "
            "on every task's test items (likelihood, relative drop in %, 95% intervals), and the difference from "
            "zeroing as many other neurons of the two masks (docs/methods.md).",
            table=pd.DataFrame(rows).T,
        )
    ]


def _quality_sections(results: StudyResults, targets: dict[str, dict]) -> list[Section]:
    sections = []
    for u in ("generative", "generative_standard", "likelihood"):
        rows = {m: q.of(u) for m, q in results.quality.items() if q.of(u) is not None}
        if not rows and u == "generative_standard":
            continue
        sections.append(
            Section(
                f"Model quality ({u})",
                f"Utility of each model on the held-out test split ({_QUALITY_WHAT[u]}).",
                table=pd.DataFrame(rows).T if rows else None,
            )
        )
    by_type = {
        m: {f"{t}: {k}": v for t, kinds in q.generative_by_question_type.items() for k, v in kinds.items()}
        for m, q in results.quality.items()
        if q.generative_by_question_type
    }
    if by_type:
        sections.append(
            Section(
                "Model quality by question type (generative)",
                "The paper's metric on the same test generations, per question type of the tasks "
                "whose items have several: where a task's utility falls short.",
                table=pd.DataFrame(by_type).T,
            )
        )
    if targets:
        met = {
            m: {
                **{
                    t: f"{c['value']:.3f} {'met' if c['met'] else 'below'} ({c['target']:g})"
                    for t, c in cells.items()
                    if t != "all_met"
                },
                "all met": cells["all_met"],
            }
            for m, cells in targets.items()
        }
        sections.append(
            Section(
                "Do the default models do their tasks?",
                "Each default model's generative test quality "
                "against its target (in brackets): a verdict about suppressing a task's neurons needs a "
                "model that does the task.",
                table=pd.DataFrame(met).T,
            )
        )
    return sections


def _suppression_sections(m: str, results: StudyResults, data: Path) -> list[Section]:
    """Suppression summaries per utility and the deletion curves of model ``m``."""
    sections = []
    suppression = results.suppression[m]
    for u in UTILITIES:
        summ = us.summary if (us := suppression.of(u)) is not None else {}
        if summ:
            sections.append(
                Section(
                    f"{m}: suppression summary ({u})",
                    "Mean relative drop (%) on the masked "
                    "task (diagonal), off it, and selectivity = on-target minus off-target, at the "
                    "headline mask size, with 95% intervals (random: the mean of its draws).",
                    table=intervals_table(summ),
                )
            )
    auc = suppression.likelihood.auc
    if auc:
        sections.append(
            Section(
                f"{m}: deletion curves",
                "On-target and mean off-target relative drop "
                "(likelihood) against mask size, with 95% bands; the table gives each curve's mean "
                "height over log(rho) (area under the curve).",
                table=intervals_table(auc),
                images=[data / "evaluate" / m / "deletion_curves.png"],
            )
        )
    return sections


def _faithfulness_sections(m: str, results: StudyResults) -> list[Section]:
    """Each method's agreement with the ablation ground truth, on all discovery items and on
    the ground truth's own items."""
    sections = []
    faith = results.attribution[m].faithfulness
    if faith:
        rows = {(t, meth): v.figures() for t, d in faith.items() for meth, v in d.methods.items()}
        cols = [
            c
            for c in ("spearman", "spearman_significant", "n_significant", "precision_at_k", "captured_effect")
            if any(c in v for v in rows.values())
        ]
        sections.append(
            Section(
                f"{m}: faithfulness to ablation",
                "Spearman correlation of each method's "
                "importance with the exact single-neuron ablation effect (all neurons, and the "
                "neurons whose effect is more than 1.96 standard errors from zero), precision@k of "
                "its top set against the ablation top set, and the share of the ablation top set's "
                "total effect that its top set captures.",
                table=pd.DataFrame(rows).T[cols],
            )
        )
    matched = results.attribution[m].faithfulness_on_ablation_items
    if matched:
        rows = {(t, meth): v.figures() for t, d in matched.items() for meth, v in d.items()}
        sections.append(
            Section(
                f"{m}: faithfulness on the ground truth's items",
                "The same agreement, each "
                "method computed from only the discovery items the ablation was measured on (the "
                "masks use every discovery item): what the method can recover, without the "
                "difference between the two item samples.",
                table=pd.DataFrame(rows).T[["spearman", "precision_at_k", "captured_effect"]],
            )
        )
    return sections


def _circuit_sections(m: str, results: StudyResults, data: Path, tasks: list[str]) -> list[Section]:
    """The critical heads' heatmaps and the logit lens of model ``m``."""
    sections = []
    sections.append(
        Section(
            f"{m}: critical heads",
            "S_t(l, h) = utility drop when head h of layer l is "
            "mean-substituted, on the discovery split; one heatmap per task.",
            images=[data / "heads" / m / t / "heatmap.png" for t in tasks],
        )
    )
    lens = results.logit_lens[m]
    if not lens:
        raise PipelineError(f"no logit lens of {m} (metrics/logit_lens/{m}.json): run its logit_lens stage")
    rows = {
        (t, c): {f"layer {l}": v for l, v in enumerate(by_task[c])}
        for t, by_task in lens["tasks"].items()
        for c in ("residual", "attention", "ffn")
    }
    sections.append(
        Section(
            f"{m}: logit lens",
            f"The answer's log-probability (nats per token, mean over the "
            f"{lens['split']} items) decoded through the final norm and the unembedding from the "
            "residual stream after each layer, and from what each layer's attention and FFN add to it "
            "(docs/methods.md).",
            table=pd.DataFrame(rows).T,
            images=[data / "logit_lens" / m / "lens.png"],
        )
    )
    return sections


def _mask_figure_sections(m: str, data: Path, plots: Path) -> list[Section]:
    """The masks' layers and overlap, and the suppression matrices, as figures."""
    sections = []
    sections.append(
        Section(
            f"{m}: layers of the selected neurons",
            "How many of each method's top-rho neurons fall in each layer, per task.",
            images=[plots / "attribution" / m / "layer_distribution.png"],
        )
    )
    sections.append(
        Section(
            f"{m}: overlap of HONES masks",
            "Jaccard overlap of the tasks' HONES neuron sets.",
            images=[plots / "attribution" / m / "overlap.png"],
        )
    )
    sections.append(
        Section(
            f"{m}: suppression matrices",
            "Relative drop (%) of each evaluated task (column) when "
            "the row task's mask is zeroed, test split, per utility and method.",
            images=sorted((data / "evaluate" / m).glob("suppression_*.png")),
        )
    )
    return sections


def _steering_sections(m: str, results: StudyResults, steer_utility: str) -> list[Section]:
    """Steering's test utilities per variant and how far the learned scales moved."""
    sections = []
    steer = results.steering[m]
    for u in (steer_utility, "likelihood"):
        util = st.utility if (st := steer.of(u)) is not None else None
        if util:
            sections.append(
                Section(
                    f"{m}: steering ({u})",
                    "Test utility per task under each steering variant "
                    "(learned HONES scales vs base, fixed amplification, grid search, no-KL, learned "
                    "scales on random neurons), with 95% intervals.",
                    table=intervals_table(util),
                )
            )
    if steer.scale_movement:
        sections.append(
            Section(
                f"{m}: how far the learned scales moved",
                "Mean and largest |scale - 1| of the learned HONES scales per task.",
                table=pd.DataFrame({t: s.document() for t, s in steer.scale_movement.items()}).T,
            )
        )
    return sections


def _model_sections(
    m: str, results: StudyResults, data: Path, plots: Path, tasks: list[str], steer_utility: str
) -> list[Section]:
    """The sections of one model, after the study-wide ones."""
    return [
        *_suppression_sections(m, results, data),
        *_faithfulness_sections(m, results),
        *_circuit_sections(m, results, data, tasks),
        *_mask_figure_sections(m, data, plots),
        *_steering_sections(m, results, steer_utility),
    ]


def report_sections(
    results: StudyResults,
    verdicts: list[dict],
    summary: dict,
    heads: dict[str, dict],
    sampled_ground_truth: dict[str, dict],
    *,
    tasks: list[str],
    replicates: dict[str, list[str]],
    equivalence_margin: float,
    steer_utility: str,
    data: Path,
    plots: Path,
) -> list[Section]:
    """Every section of the report, in order: the verdict and its counts, head stability, the
    methods, sensitivity, model quality (and the default models' targets), learning curves, then
    each model's suppression, faithfulness, figures and steering.

    ``summary`` is metrics/verdict_summary.json's document; ``heads`` metrics/head_stability.json's
    (with each task's guided ``localisation``); ``sampled_ground_truth``
    metrics/sampled_ground_truth.json's.
    Figures are read from ``data`` and ``plots``; the learning curves of the default models are
    written into ``plots/training/<model>.png``.
    """
    data, plots = Path(data), Path(plots)
    sections = _verdict_sections(verdicts, summary, replicates, equivalence_margin)
    sections += _stability_section(heads)
    sections += _localisation_section(heads)
    sections.append(
        Section(
            "Methods compared",
            "What each method scores and where its formula comes from. The "
            "paper's methods compute exactly what the authors' code computes; the published baselines "
            "follow their authors' code; the others carry their own names.",
            table=pd.DataFrame(
                {
                    "what it scores": {k: v[0] for k, v in METHOD_DESCRIPTIONS.items()},
                    "source": {k: v[1] for k, v in METHOD_DESCRIPTIONS.items()},
                }
            ),
        )
    )
    for m in results.models:
        sens = results.suppression[m].likelihood.sensitivity
        if sens is not None:
            sections.append(
                Section(
                    f"{m}: can the evaluation see an effect?",
                    sensitivity_message(sens),
                    table=intervals_table(
                        {"on-target drop (%)": {"all tasks": sens.ground_truth_on_target_drop, **sens.per_task}}
                    ),
                )
            )
    sections += _sampled_ground_truth_section(sampled_ground_truth)
    sections += _transfer_section(results)
    sections += _ood_transfer_section(results)
    sections += _shared_neurons_section(results)
    sections += _quality_sections(results, summary.get("quality_targets", {}))
    (plots / "training").mkdir(parents=True, exist_ok=True)
    for m in results.models:
        record = results.training[m]
        if record:  # a default model the pipeline trained or ships (a brought model has no record)
            figure = plots / "training" / f"{m}.png"
            plot_training_curves(record, figure, f"{m}: learning curves")
            sections.append(
                Section(
                    f"{m}: learning curves",
                    "The vision tower's warm-up loss, then each task's "
                    "answer cross-entropy on the training rows while the language model learns "
                    "(means over windows of 50 steps); held-out quality is in the tables above.",
                    images=[figure],
                )
            )
    for m in results.models:
        sections += _model_sections(m, results, data, plots, tasks, steer_utility)
    return sections


def markdown_sections(sections: list[Section], verdicts: list[dict]) -> list[tuple[str, str, pd.DataFrame]]:
    """The sections that hold a table, as (heading, text, table); the verdict table shows each
    row's value and interval in one "value [95% interval]" column."""
    verdict_md = None
    if verdicts:
        table = pd.DataFrame(verdicts, columns=list(VERDICT_COLUMNS))
        verdict_md = table.assign(**{"value [95% interval]": [interval_text(r) for r in verdicts]})[
            ["model", "instances", "claim", "utility", "value [95% interval]", "verdict"]
        ].set_index("model")
    return [
        (sec.title, sec.what, verdict_md if sec.title == "Verdict" else sec.table)
        for sec in sections
        if sec.table is not None
    ]
