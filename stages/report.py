"""Stage `report`: gather every model's results into metrics JSON keyed by model, the verdict
table, and one HTML report that opens with it."""

import json
import logging
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_file, write_json
from pipeline.method.attribution import METHOD_DESCRIPTIONS
from pipeline.method.heads import per_item_values
from pipeline.outcomes.head_stability import head_stability
from pipeline.outcomes.suppression import conditions_from_table, replicated_differences, scores_from_table
from pipeline.report.html import Section, build_report
from pipeline.report.markdown import markdown_document
from pipeline.report.plots import plot_training_curves
from pipeline.report.verdict import (
    VERDICT_COLUMNS,
    check_recipe_instances,
    quality_against_targets,
    replicated_rows,
    sensitivity_message,
    verdict_metrics,
    verdict_rows,
    verdict_summary,
)
from stages._common import entry, parser
from stages.params import read_params

log = logging.getLogger(__name__)

READS = ("studied_models", "tasks", "replicates", "heads.top_k", "steer.utility", "statistics.bootstrap_resamples",
         "statistics.seed", "statistics.confidence", "statistics.equivalence_margin")


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def _training_record(model_dir: Path, name: str) -> dict:
    """The ``training.json`` of model ``name`` ({} when it has none): in its training output, or
    for a pinned folder (shipped weights) in that folder, whose record's file hashes include it."""
    from pipeline.model.source import RECORD_NAME, read_source

    if (model_dir / RECORD_NAME).is_file():
        source = read_source(model_dir, name)
        return _json(Path(source.location) / "training.json") if source.kind == "folder" else {}
    return _json(model_dir / "training.json")


def _interval_text(iv: dict) -> str:
    """An interval (or a verdict row) as "value [low, high]"; "-" without a value."""
    if iv.get("value") is None:
        return "-"
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    return f"{iv['value']:.3g} [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else f"{iv['value']:.3g}"


def _intervals(cells: dict) -> pd.DataFrame:
    """{row: {column: interval}} -> a table of "value [low, high]" strings."""
    return pd.DataFrame({r: {c: _interval_text(iv) for c, iv in row.items()} for r, row in cells.items()}).T


def _head_stability(folder: Path, top_k: int, st) -> dict:
    scores = pd.read_parquet(folder / "scores.parquet")
    values, kind = per_item_values(pd.read_parquet(folder / "per_item.parquet"))
    return head_stability(scores, values, kind, top_k, n_resamples=st.bootstrap_resamples, seed=st.seed)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--plots", type=Path, default=Path("plots"))
    p.add_argument("--out", type=Path, required=True, help="the HTML report")
    p.add_argument("--summary", type=Path, required=True, help="the report's tables as Markdown")
    args = p.parse_args()
    params = read_params(args.params, READS)
    models, tasks = params.studied_models, params.tasks
    quality = {m: _json(args.metrics / "model_quality" / f"{m}.json") for m in models}
    attribution = {m: _json(args.metrics / "attribution" / f"{m}.json") for m in models}
    suppression = {m: _json(args.data / "evaluate" / m / "suppression.json") for m in models}
    steering = {m: _json(args.data / "steer" / m / "steering_intervals.json") for m in models}
    verdicts = [r for m in models for r in verdict_rows(m, suppression[m], steering[m], attribution[m],
                                                         params.steer.utility)]
    st = params.statistics
    for recipe, instances in params.replicates.items():
        check_recipe_instances(recipe, {m: _training_record(args.data / "models" / m, m).get("spec")
                                        for m in instances})
        evaluated = {m: (scores_from_table(pd.read_parquet(args.data / "evaluate" / m / "scores.parquet")),
                         conditions_from_table(pd.read_parquet(args.data / "evaluate" / m / "conditions.parquet")))
                     for m in instances}
        verdicts += replicated_rows(recipe, replicated_differences(
            evaluated, n_resamples=st.bootstrap_resamples, seed=st.seed, confidence=st.confidence,
            equivalence_margin=st.equivalence_margin))
    heads = {m: {t: _head_stability(args.data / "heads" / m / t, params.heads.top_k, st) for t in tasks}
             for m in models}
    write_json(heads, args.metrics / "head_stability.json")
    for m, t in [(m, t) for m, by_task in heads.items() for t, h in by_task.items() if h["degenerate"]]:
        log.warning("%s %s: no head's substitution lowers the utility; its top %d heads are arbitrary and HONES "
                    "reduces to hones_nohead", m, t, params.heads.top_k)
    utilities = ("likelihood", "generative")
    write_json({m: {u: s.get(u, {}).get("relative_drop", {}) for u in utilities} for m, s in suppression.items()},
               args.metrics / "suppression.json")
    write_json({m: {u: {k: s.get(u, {}).get(k, {}) for k in ("baseline", "summary", "random_draws", "differences",
                                                             "auc", "sensitivity") if k in s.get(u, {})}
                    for u in utilities} for m, s in suppression.items()},
               args.metrics / "suppression_summary.json")
    write_json(steering, args.metrics / "steering.json")
    write_json(verdict_metrics(verdicts), args.metrics / "verdict.json")
    across = list(params.replicates) or models
    summary = verdict_summary(verdicts, across, params.replicates)
    targets = quality_against_targets({m: q for m, q in quality.items() if _training_record(args.data / "models" / m, m)})
    if targets:
        summary["quality_targets"] = targets
    write_json(summary, args.metrics / "verdict_summary.json")

    table = pd.DataFrame(verdicts, columns=list(VERDICT_COLUMNS)) if verdicts else None
    replicated_note = (
        f" Rows of a recipe ({', '.join(f'{r}: {len(i)} instances' for r, i in params.replicates.items())}) decide "
        "the method comparisons across its trained instances: the value is the mean over instances, the interval a "
        "two-stage bootstrap over instances and then test items, so it carries the variance between trainings; "
        "per_instance gives each instance's own value. A claim decided per instance (steering, layer preference, "
        "sensitivity) holds for a recipe when it holds on every instance (the tables below count both kinds)."
        if params.replicates else
        " Each model is one trained instance: the intervals carry the test items' variance, not the variance "
        "between trainings of the same recipe (list a recipe's instances under replicates to decide the claims "
        "across seeds).")
    sections = [Section("Verdict", "One row per claim of the method and model: the measured difference (percentage "
                        "points of relative drop, or utility for steering), its 95% paired-bootstrap interval over test "
                        "items, and the verdict: holds when the interval lies above the threshold, fails when below, "
                        f"equivalent when it lies within +-{st.equivalence_margin:g} percentage points of it (a "
                        "difference shown too small to matter), undecided otherwise. Likelihood rows decide; "
                        "generative rows are the paper's metric." + replicated_note, table=table)]
    counts = pd.DataFrame(summary["counts"]).T.fillna(0).astype(int)
    sections.append(Section("How many claims are decided", "Likelihood (deciding) rows of each model and recipe, "
                            "by verdict.", table=counts if len(counts) else None))
    if summary["across"]:
        sections.append(Section("Each claim across " + ("recipes" if params.replicates else "models"),
                                "The deciding verdict of each claim side by side; the last column holds when every "
                                "one agrees, mixed when some hold and others fail."
                                + (" Decided by: the bootstrap across a recipe's instances, or its verdict on every "
                                   "instance." if params.replicates else ""),
                                table=pd.DataFrame({c: {**v["verdicts"], "all": v["verdict"],
                                                        **({"decided by": " / ".join(sorted({
                                                            d[c] for d in summary["decided_by"].values() if c in d}))}
                                                           if params.replicates else {})}
                                                    for c, v in summary["across"].items()}).T))
    stability = {(m, t): {"top heads": " ".join(h.get("top_heads", [])), "recall (bootstrap mean)": h["recall"]["mean"],
                          "recall (2.5%)": h["recall"]["p2.5"], "heads with positive score": h["positive_heads"],
                          "degenerate": h["degenerate"]}
                 for m, by_task in heads.items() for t, h in by_task.items() if h}
    if stability:
        sections.append(Section("Are the critical heads stable?", "The top K_h heads of each model and task, and how "
                                "many of them a bootstrap resample of the head-scoring items finds again (recall). "
                                "Degenerate: no head's substitution lowers the utility, so the top K_h are arbitrary and "
                                "HONES reduces to hones_nohead there.", table=pd.DataFrame(stability).T))
    sections.append(Section("Methods compared", "What each method scores and where its formula comes from. The "
                            "paper's methods compute exactly what the authors' code computes; the published baselines "
                            "follow their authors' code; the others carry their own names.",
                            table=pd.DataFrame({"what it scores": {k: v[0] for k, v in METHOD_DESCRIPTIONS.items()},
                                                "source": {k: v[1] for k, v in METHOD_DESCRIPTIONS.items()}})))
    for m in models:
        sens = suppression[m].get("likelihood", {}).get("sensitivity")
        if sens:
            sections.append(Section(f"{m}: can the evaluation see an effect?", sensitivity_message(sens),
                                    table=_intervals({"on-target drop (%)": {"all tasks": sens["ground_truth_on_target_drop"],
                                                                             **sens["per_task"]}})))
    for u, what in (("generative", "VQA accuracy, OCR ANLS, caption BLEU-4, retrieval NDCG@5"),
                    ("likelihood", "per-token probability of the references; retrieval: the positive's softmax "
                                   "probability over the candidates' Yes-minus-No margins")):
        rows = {m: q[u] for m, q in quality.items() if u in q}
        sections.append(Section(f"Model quality ({u})", f"Utility of each model on the held-out test split ({what}).",
                                table=pd.DataFrame(rows).T if rows else None))
    if targets:
        met = {m: {**{t: f"{c['value']:.3f} {'met' if c['met'] else 'below'} ({c['target']:g})"
                      for t, c in cells.items() if t != "all_met"}, "all met": cells["all_met"]}
               for m, cells in targets.items()}
        sections.append(Section("Do the default models do their tasks?", "Each default model's generative test quality "
                                "against its target (in brackets): a verdict about suppressing a task's neurons needs a "
                                "model that does the task.", table=pd.DataFrame(met).T))
    (args.plots / "training").mkdir(parents=True, exist_ok=True)
    for m in models:
        record = _training_record(args.data / "models" / m, m)
        if record:  # a default model the pipeline trained or ships (a brought model has no record)
            figure = args.plots / "training" / f"{m}.png"
            plot_training_curves(record, figure, f"{m}: learning curves")
            sections.append(Section(f"{m}: learning curves", "The vision tower's warm-up loss, then each task's "
                                    "answer cross-entropy on the training rows while the language model learns "
                                    "(means over windows of 50 steps); held-out quality is in the tables above.",
                                    images=[figure]))
    for m in models:
        for u in utilities:
            summ = suppression[m].get(u, {}).get("summary", {})
            if summ:
                sections.append(Section(f"{m}: suppression summary ({u})", "Mean relative drop (%) on the masked "
                                        "task (diagonal), off it, and selectivity = on-target minus off-target, at the "
                                        "headline mask size, with 95% intervals (random: the mean of its draws).",
                                        table=_intervals(summ)))
        auc = suppression[m].get("likelihood", {}).get("auc")
        if auc:
            sections.append(Section(f"{m}: deletion curves", "On-target and mean off-target relative drop "
                                    "(likelihood) against mask size, with 95% bands; the table gives each curve's mean "
                                    "height over log(rho) (area under the curve).", table=_intervals(auc),
                                    images=[args.data / "evaluate" / m / "deletion_curves.png"]))
        faith = attribution.get(m, {}).get("faithfulness", {})
        if faith:
            rows = {(t, meth): v for t, d in faith.items() for meth, v in d.items() if meth != "ground_truth_se"}
            cols = [c for c in ("spearman", "spearman_significant", "n_significant", "precision_at_k", "captured_effect")
                    if any(c in v for v in rows.values())]
            sections.append(Section(f"{m}: faithfulness to ablation", "Spearman correlation of each method's "
                                    "importance with the exact single-neuron ablation effect (all neurons, and the "
                                    "neurons whose effect is more than 1.96 standard errors from zero), precision@k of "
                                    "its top set against the ablation top set, and the share of the ablation top set's "
                                    "total effect that its top set captures.", table=pd.DataFrame(rows).T[cols]))
        matched = attribution.get(m, {}).get("faithfulness_on_ablation_items", {})
        if matched:
            rows = {(t, meth): v for t, d in matched.items() for meth, v in d.items()}
            sections.append(Section(f"{m}: faithfulness on the ground truth's items", "The same agreement, each "
                                    "method computed from only the discovery items the ablation was measured on (the "
                                    "masks use every discovery item): what the method can recover, without the "
                                    "difference between the two item samples.",
                                    table=pd.DataFrame(rows).T[["spearman", "precision_at_k", "captured_effect"]]))
        sections.append(Section(f"{m}: critical heads", "S_t(l, h) = utility drop when head h of layer l is "
                                "mean-substituted, on the discovery split; one heatmap per task.",
                                images=[args.data / "heads" / m / t / "heatmap.png" for t in tasks]))
        sections.append(Section(f"{m}: layers of the selected neurons", "How many of each method's top-rho "
                                "neurons fall in each layer, per task.",
                                images=[args.plots / "attribution" / m / "layer_distribution.png"]))
        sections.append(Section(f"{m}: overlap of HONES masks", "Jaccard overlap of the tasks' HONES neuron sets.",
                                images=[args.plots / "attribution" / m / "overlap.png"]))
        sections.append(Section(f"{m}: suppression matrices", "Relative drop (%) of each evaluated task (column) when "
                                "the row task's mask is zeroed, test split, per utility and method.",
                                images=sorted((args.data / "evaluate" / m).glob("suppression_*.png"))))
        steer = steering[m]
        for u in (params.steer.utility, "likelihood"):
            util = steer.get(u, {}).get("utility")
            if util:
                sections.append(Section(f"{m}: steering ({u})", "Test utility per task under each steering variant "
                                        "(learned HONES scales vs base, fixed amplification, grid search, no-KL, learned "
                                        "scales on random neurons), with 95% intervals.", table=_intervals(util)))
        if steer.get("scale_movement"):
            sections.append(Section(f"{m}: how far the learned scales moved", "Mean and largest |scale - 1| of the "
                                    "learned HONES scales per task.", table=pd.DataFrame(steer["scale_movement"]).T))
    intro = f"Models: {', '.join(models)}; tasks: {', '.join(tasks)}."
    build_report("HONES report", intro, sections, args.out)
    # The tables again as Markdown; the verdict with its interval in one column.
    verdict_md = None
    if table is not None:
        verdict_md = table.assign(**{"value [95% interval]": [_interval_text(r) for r in verdicts]})[
            ["model", "instances", "claim", "utility", "value [95% interval]", "verdict"]].set_index("model")
    tables = [(sec.title, sec.what, verdict_md if sec.title == "Verdict" else sec.table) for sec in sections
              if sec.table is not None]
    with atomic_file(args.summary) as tmp:
        tmp.write_text(markdown_document("HONES summary", intro + " Figures: the HTML report.", tables))


if __name__ == "__main__":
    main()
