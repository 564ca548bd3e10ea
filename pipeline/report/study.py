"""What the report reads and the metrics it writes: every studied model's results, gathered from
the stages' output folders, and the verdict table built from them.

Map of this module:
- ``StudyResults``: per model, the results the stages wrote (model quality, attribution,
  suppression, steering, transfer, shared neurons: typed records of ``pipeline.outcomes.records``,
  so a missing field stops the report naming its file) and the default models' training records;
  ``read_study_results(data, metrics, models)`` gathers them.
- ``training_record(model_dir, name)``: a model's ``training.json`` ({} for a brought model).
- ``head_stability_of(folder, top_k, ...)``: the stability of one task's critical heads.
- ``study_verdicts(results, replicates, data, ...)``: the verdict rows of every model, then of
  every recipe across its instances (after checking the instances share their recipe).
- ``sampled_ground_truth_of(data, model, methods, mask_size, ...)``: each method's faithfulness
  from one model's measured sampled ground truth, beside the exhaustive one where it has it.
- ``report_metrics(results, verdicts, heads, replicates, sampled_ground_truth)``: the metrics files'
  contents, by name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.method.heads import per_item_values
from pipeline.method.store import read_importance
from pipeline.outcomes.head_stability import guided_localisation, head_stability, screened_localisation
from pipeline.outcomes.records import (
    UTILITIES,
    AttributionRecord,
    QualityRecord,
    SharedNeuronsRecord,
    SteeringRecord,
    SuppressionRecord,
    TransferRecord,
    load_record,
    load_transfer,
)
from pipeline.outcomes.sampled_faithfulness import census_methods, sample_from_table, sampled_ground_truth
from pipeline.outcomes.suppression import conditions_from_table, replicated_differences, scores_from_table
from pipeline.report.verdict import (
    check_recipe_instances,
    quality_against_targets,
    replicated_rows,
    shared_neuron_rows,
    transfer_rows,
    verdict_metrics,
    verdict_rows,
    verdict_summary,
)

# The parts of a model's suppression.json that metrics/suppression_summary.json carries.
_SUMMARY_KEYS = ("baseline", "summary", "random_draws", "differences", "auc", "sensitivity")


log = logging.getLogger(__name__)


def _json(path: Path) -> dict:
    """A JSON document, or {} when the file is absent (a stage that wrote nothing for a model)."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def training_record(model_dir: Path, name: str) -> dict:
    """The ``training.json`` of model ``name`` ({} when it has none): in its training output, or
    for a pinned folder (shipped weights) in that folder, whose record's file hashes include it."""
    from pipeline.model.source import RECORD_NAME, read_source

    model_dir = Path(model_dir)
    if (model_dir / RECORD_NAME).is_file():
        source = read_source(model_dir, name)
        return _json(Path(source.location) / "training.json") if source.kind == "folder" else {}
    return _json(model_dir / "training.json")


@dataclass(frozen=True)
class StudyResults:
    """Every studied model's results, keyed by model name (records of the documents the stages wrote).

    quality: ``metrics/model_quality/<m>.json``; attribution: ``metrics/attribution/<m>.json``;
    suppression: ``<data>/evaluate/<m>/suppression.json``; steering:
    ``<data>/steer/<m>/steering_intervals.json``; training: the default models' training records
    ({} for a brought model); logit_lens: ``metrics/logit_lens/<m>.json`` (the document); transfer:
    ``<data>/transfer/<m>/suppression.json`` and ``steering_intervals.json`` (each None when the
    transfer stage measured nothing); shared_neurons: ``<data>/shared_neurons/<m>/shared.json``;
    ood_transfer: {model: {set: record}} of the sets you brought, ``<data>/transfer_ood/<m>-<set>/``.
    """

    models: list[str]
    quality: dict[str, QualityRecord]
    attribution: dict[str, AttributionRecord]
    suppression: dict[str, SuppressionRecord]
    steering: dict[str, SteeringRecord]
    training: dict[str, dict]
    logit_lens: dict[str, dict]
    transfer: dict[str, TransferRecord]
    shared_neurons: dict[str, SharedNeuronsRecord]
    ood_transfer: dict[str, dict[str, TransferRecord]]


def read_study_results(
    data: Path, metrics: Path, models: list[str], ood_benchmarks: list[str] | tuple[str, ...] = ()
) -> StudyResults:
    """Gather the results of ``models`` (and, on each of the ``ood_benchmarks`` sets you brought,
    their transfer) from the stages' output folders ``data`` and ``metrics``;
    ``pipeline.outcomes.records.RecordError`` names a file that is absent or lacks a field."""
    data, metrics = Path(data), Path(metrics)
    return StudyResults(
        models=list(models),
        quality={m: load_record(QualityRecord, metrics / "model_quality" / f"{m}.json") for m in models},
        attribution={m: load_record(AttributionRecord, metrics / "attribution" / f"{m}.json") for m in models},
        suppression={m: load_record(SuppressionRecord, data / "evaluate" / m / "suppression.json") for m in models},
        steering={m: load_record(SteeringRecord, data / "steer" / m / "steering_intervals.json") for m in models},
        training={m: training_record(data / "models" / m, m) for m in models},
        logit_lens={m: _json(metrics / "logit_lens" / f"{m}.json") for m in models},
        transfer={m: load_transfer(data / "transfer" / m) for m in models},
        shared_neurons={
            m: load_record(SharedNeuronsRecord, data / "shared_neurons" / m / "shared.json") for m in models
        },
        ood_transfer={
            m: {b: load_transfer(data / "transfer_ood" / f"{m}-{b}", imported=True) for b in ood_benchmarks}
            for m in models
        },
    )


def head_stability_of(
    folder: Path, top_k: int, *, n_resamples: int, seed: int, candidates: int, screen: tuple[int, int]
) -> dict:
    """The stability of the top ``top_k`` heads stored in one heads-stage folder (``scores.parquet``,
    ``per_item.parquet``): see ``pipeline.outcomes.head_stability.head_stability``; where the
    sweep was exhaustive, ``localisation`` holds ``guided_localisation`` with ``candidates``, and
    under ``screened`` the ``screened_localisation`` of ``screen`` = (items, candidates) and of
    half as many items."""
    scores = pd.read_parquet(Path(folder) / "scores.parquet")
    values, kind = per_item_values(pd.read_parquet(Path(folder) / "per_item.parquet"))
    out = head_stability(scores, values, kind, top_k, n_resamples=n_resamples, seed=seed)
    if "estimate" in scores.columns and scores["score"].notna().all():
        out["localisation"] = guided_localisation(scores, top_k, candidates)
        items, screen_candidates = screen
        out["localisation"]["screened"] = screened_localisation(
            scores, values, kind, top_k, screen_candidates, (items // 2, items)
        )
    return out


def sampled_ground_truth_of(
    data: Path, model: str, evaluated: list[str], mask_size: int, *, n_resamples: int, seed: int
) -> dict | None:
    """One model's sampled ground truth (``<data>/sampled_ground_truth/<m>.parquet``) and importance
    (``<data>/attribution/<m>.zarr``) at the masks' size: see
    ``pipeline.outcomes.sampled_faithfulness.sampled_ground_truth``, for the census methods of
    ``evaluated`` (``evaluate.methods``); None when the sample was off (an empty table)."""
    path = data / "sampled_ground_truth" / f"{model}.parquet"
    table = pd.read_parquet(path)
    if table.empty:
        return None
    stored, tasks, importance, _ = read_importance(data / "attribution" / f"{model}.zarr")
    methods = census_methods(evaluated, stored)
    unknown = sorted(set(table["task"]) - set(tasks))
    if unknown:
        raise PipelineError(f"{path}: tasks {unknown} are not in the attribution's {tasks}")
    measured = {t: sample_from_table(g, f"{path} ({t})") for t, g in table.groupby("task", sort=False)}
    scores = {t: {m: importance[stored.index(m), tasks.index(t)] for m in methods} for t in measured}
    exhaustive = (
        {t: importance[stored.index("ablation"), tasks.index(t)] for t in measured} if "ablation" in stored else None
    )
    return sampled_ground_truth(scores, measured, mask_size, exhaustive=exhaustive, n_resamples=n_resamples, seed=seed)


def head_stabilities(
    data: Path,
    models: list[str],
    tasks: list[str],
    top_k: int,
    *,
    n_resamples: int,
    seed: int,
    candidates: int,
    screen: tuple[int, int],
) -> dict[str, dict[str, dict]]:
    """{model: {task: ``head_stability_of``}} of every studied model and task, each task's
    ``localisation`` with what the localisation_downstream stage measured downstream of the other
    localisations' heads (``<data>/localisation_downstream/<m>.json``); a task whose head scores
    are all zero (no substitution lowers its utility) is logged, since its top heads are arbitrary
    and HONES then ranks as hones_nohead."""
    heads = {
        m: {
            t: head_stability_of(
                data / "heads" / m / t,
                top_k,
                n_resamples=n_resamples,
                seed=seed,
                candidates=candidates,
                screen=screen,
            )
            for t in tasks
        }
        for m in models
    }
    for m, by_task in heads.items():
        downstream = json.loads((data / "localisation_downstream" / f"{m}.json").read_text())["by_task"]
        for t, h in by_task.items():
            if "localisation" in h and t in downstream:
                h["localisation"]["downstream"] = downstream[t]
            if h["degenerate"]:
                log.warning(
                    "%s %s: no head's substitution lowers the utility; its top %d heads are arbitrary and HONES "
                    "reduces to hones_nohead",
                    m,
                    t,
                    top_k,
                )
    return heads


def sampled_ground_truths(
    data: Path, results: StudyResults, models: list[str], evaluated: list[str], *, n_resamples: int, seed: int
) -> dict[str, dict]:
    """{model: ``sampled_ground_truth_of``} for the models whose sampled ground truth was measured."""
    out = {}
    for m in models:
        checked = sampled_ground_truth_of(
            data, m, evaluated, results.attribution[m].mask_size, n_resamples=n_resamples, seed=seed
        )
        if checked:
            out[m] = checked
    return out


def study_verdicts(
    results: StudyResults,
    replicates: dict[str, list[str]],
    data: Path,
    *,
    steer_utility: str,
    n_resamples: int,
    seed: int,
    confidence: float,
    equivalence_margin: float,
) -> list[dict]:
    """The verdict rows of every model, then of every recipe across its instances.

    A recipe's rows come from a bootstrap over its instances and then test items
    (``replicated_differences`` on each instance's per-item evaluation in ``<data>/evaluate/<m>/``);
    its instances (studied models, so in ``results``) must have been trained with the same recipe
    (``check_recipe_instances`` on their training records).
    """
    rows = [
        r
        for m in results.models
        for r in verdict_rows(m, results.suppression[m], results.steering[m], results.attribution[m], steer_utility)
        + transfer_rows(
            m, results.transfer[m].suppression, results.transfer[m].steering, steer_utility, equivalence_margin
        )
        + [
            r
            for b, t in results.ood_transfer[m].items()
            for r in transfer_rows(m, t.suppression, t.steering, steer_utility, equivalence_margin, ood_set=b)
        ]
        + shared_neuron_rows(m, results.shared_neurons[m])
    ]
    for recipe, instances in replicates.items():
        check_recipe_instances(recipe, {m: results.training[m].get("spec") for m in instances})
        evaluated = {
            m: (
                scores_from_table(pd.read_parquet(Path(data) / "evaluate" / m / "scores.parquet")),
                conditions_from_table(pd.read_parquet(Path(data) / "evaluate" / m / "conditions.parquet")),
            )
            for m in instances
        }
        rows += replicated_rows(
            recipe,
            replicated_differences(
                evaluated,
                n_resamples=n_resamples,
                seed=seed,
                confidence=confidence,
                equivalence_margin=equivalence_margin,
            ),
        )
    return rows


def _utility_documents(record: SuppressionRecord | None) -> dict[str, dict]:
    """{utility: its statistics as written} of a suppression record ({} for a utility not evaluated)."""
    if record is None:
        return {}
    return {u: us.document() for u in UTILITIES if (us := record.of(u)) is not None}


def _transfer_document(transfer: TransferRecord, in_distribution: dict[str, dict]) -> dict:
    """One transfer folder's part of metrics/transfer*.json: suppression (baseline, summary,
    differences per utility), the in-distribution baseline beside it, steering, and for a set
    you brought its import summary."""
    docs = _utility_documents(transfer.suppression)
    out = {
        "suppression": {
            u: {k: docs[u][k] for k in ("baseline", "summary", "differences") if k in docs[u]}
            for u in UTILITIES
            if u in docs
        },
        "in_distribution_baseline": {
            u: in_distribution[u]["baseline"] if u in in_distribution else {} for u in UTILITIES
        },
        "steering": transfer.steering.document() if transfer.steering is not None else {},
    }
    if transfer.imported is not None:
        out["import"] = transfer.imported.document()
    return out


def report_metrics(
    results: StudyResults,
    verdicts: list[dict],
    heads: dict[str, dict],
    replicates: dict[str, list[str]],
    sampled_ground_truth: dict[str, dict],
) -> dict[str, dict]:
    """The report's metrics files, {file name under metrics/: document}.

    verdict_summary.json counts the deciding verdicts per model (or, with ``replicates``, per
    recipe) and, for the default models, their test quality against the targets.
    """
    in_distribution = {m: _utility_documents(s) for m, s in results.suppression.items()}
    summary = verdict_summary(verdicts, list(replicates) or results.models, replicates)
    targets = quality_against_targets({m: q for m, q in results.quality.items() if results.training[m]})
    if targets:
        summary["quality_targets"] = targets
    return {
        "head_stability.json": {
            m: {t: {k: v for k, v in h.items() if k != "localisation"} for t, h in by_task.items()}
            for m, by_task in heads.items()
        },
        "sampled_ground_truth.json": sampled_ground_truth,
        "head_localisation.json": {
            m: {t: h["localisation"] for t, h in by_task.items() if "localisation" in h} for m, by_task in heads.items()
        },
        "suppression.json": {
            m: {u: docs[u]["relative_drop"] if u in docs else {} for u in UTILITIES}
            for m, docs in in_distribution.items()
        },
        "suppression_summary.json": {
            m: {u: {k: docs[u][k] for k in _SUMMARY_KEYS if k in docs[u]} if u in docs else {} for u in UTILITIES}
            for m, docs in in_distribution.items()
        },
        "steering.json": {m: s.document() for m, s in results.steering.items()},
        "transfer.json": {
            m: _transfer_document(t, in_distribution[m])
            for m, t in results.transfer.items()
            if t.suppression is not None
        },
        "transfer_ood.json": {
            m: {b: _transfer_document(t, in_distribution[m]) for b, t in by_set.items()}
            for m, by_set in results.ood_transfer.items()
            if by_set
        },
        "shared_neurons.json": {m: s.document() for m, s in results.shared_neurons.items()},
        "verdict.json": verdict_metrics(verdicts),
        "verdict_summary.json": summary,
    }
