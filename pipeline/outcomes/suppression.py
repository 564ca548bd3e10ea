"""Held-out causal check (HONES.md section 5): zero a task's mask, evaluate every task.

For each method m, mask size rho and target task t, the neurons of mask (m, rho, t) are
zeroed at every position and every task s is evaluated on the test split: relative drop
100 * (P_s(base) - P_s(masked)) / |P_s(base)|. All masks of one evaluated task run as
conditions of the same batches (``hooks.ablate_neurons_per_row``), so the model sees each
test example once per batch row instead of once per pass.

Two utilities are evaluated (``pipeline.model.evaluation``): the paper's ``generative``
metric on the headline masks (rho = the paper's 1%, one random draw), and the continuous
``likelihood`` on every mask: every size of the deletion curve and every random draw.

Map of this module:
- ``MaskCondition`` / ``mask_conditions``: one zeroed mask (condition 0 is the unmasked base).
- ``suppression_scores``: per-item results of every (utility, evaluated task, condition).
- ``suppression_jobs`` / ``run_suppression_job`` / ``merge_suppression_scores``: the same work
  as jobs (an evaluated task's conditions, in shards) for ``pipeline.model.workers.map_jobs``,
  and their results merged in a fixed order.
- ``scores_table``: those per-item scores as a long table (what the statistics rest on).
- ``suppression_statistics``: paired-bootstrap intervals for the relative-drop matrices, the
  per-method summaries (on-target drop, off-target drop, selectivity = on minus off), the
  random masks' distribution, HONES-minus-baseline differences, the deletion curves and their
  area, and the sensitivity check (does the ground truth's own top set drop its task?).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import TaskResult, evaluate_conditions
from pipeline.model.hooks import ablate_neurons_per_row, lowest_layer
from pipeline.outcomes.statistics import (
    Interval,
    bootstrap_counts,
    distribution,
    interval,
    log_rho_auc,
    mean_over,
    relative_drop_replicates,
    result_values,
    task_seed,
    utility_replicates,
    verdict,
)
from pipeline.tasks.items import ImageTable, likelihood_sequences_per_item

log = logging.getLogger(__name__)

GROUND_TRUTH = "ablation"
RANDOM = "random"
FOCUS = "hones"
# Comparisons beyond "hones minus each method": does the log-probability DVP beat the paper's?
EXTRA_COMPARISONS = (("hones_lp", "hones"),)
SUMMARY_KEYS = ("on_target_drop", "off_target_drop", "selectivity")
SCORE_COLUMNS = ("utility", "condition", "eval_task", "item_id", "score")
CONDITION_COLUMNS = ("condition", "method", "target_task", "rho", "draw", "headline", "n_neurons")


@dataclass(frozen=True)
class MaskCondition:
    """One zeroed mask: ``method``'s top ``rho`` neurons for ``target_task`` (``draw``: which random draw)."""

    method: str
    target_task: str
    rho: float
    draw: int
    headline: bool
    neurons: tuple[tuple[int, int], ...]


def mask_conditions(masks: pd.DataFrame) -> list[MaskCondition]:
    """Every (method, task, rho, draw) mask of a masks table (``pipeline.method.masks.build_masks``),
    headline masks first."""
    out = []
    keys = ["headline", "rho", "method", "draw", "task"]
    for (headline, rho, method, draw, task), g in masks.groupby(keys, sort=False):
        out.append(MaskCondition(str(method), str(task), float(rho), int(draw), bool(headline),
                                 tuple((int(l), int(i)) for l, i in zip(g["layer"], g["neuron"]))))
    return sorted(out, key=lambda c: (not c.headline, c.rho, c.draw))


def generative_conditions(conditions: Sequence[MaskCondition]) -> list[int]:
    """Indices (1-based: 0 is the base) of the conditions the generative metric is run on:
    the headline masks, random draw 0."""
    return [k + 1 for k, c in enumerate(conditions) if c.headline and c.draw == 0]


@dataclass(frozen=True)
class SuppressionJob:
    """The conditions of one evaluated task that one job scores: {utility: condition indices}
    (1-based: 0 is the base), a shard of ``suppression_jobs``."""

    eval_task: str
    conditions: tuple[tuple[str, tuple[int, ...]], ...]
    cost: float

    def __str__(self) -> str:
        n = sum(len(cs) for _, cs in self.conditions)
        return f"{self.eval_task} ({n} condition-utilities)"


def suppression_jobs(items: pd.DataFrame, conditions: Sequence[MaskCondition], shards_per_task: int = 1) -> list[SuppressionJob]:
    """The work of ``suppression_scores`` as jobs, heaviest first: every evaluated task's
    conditions dealt round-robin into ``shards_per_task`` shards (likelihood on every
    condition, generative on ``generative_conditions``). A condition's items stay together, so
    each job's results are complete per condition (a caption's BLEU is a corpus statistic)."""
    if shards_per_task < 1:
        raise PipelineError(f"suppression_jobs: shards_per_task ({shards_per_task}) must be at least 1")
    wanted = {"likelihood": range(len(conditions) + 1), "generative": [0, *generative_conditions(conditions)]}
    jobs = []
    for task in dict.fromkeys(items["task"]):
        task_items = items[items["task"] == task]
        per_item = likelihood_sequences_per_item(task_items, task)
        for s in range(shards_per_task):
            conds = tuple((u, tuple(c for k, c in enumerate(cs) if k % shards_per_task == s)) for u, cs in wanted.items())
            conds = tuple((u, cs) for u, cs in conds if cs)
            if conds:
                # Generation costs about max_new_tokens cached steps per row: weigh it as 3 rows.
                cost = len(task_items) * sum(len(cs) * (per_item if u == "likelihood" else 3.0) for u, cs in conds)
                jobs.append(SuppressionJob(str(task), conds, cost))
    return sorted(jobs, key=lambda j: -j.cost)


def run_suppression_job(
    state: tuple, job: SuppressionJob, *, items: pd.DataFrame, conditions: Sequence[MaskCondition],
    batch_size: int, max_new_tokens: int,
) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """{(utility, eval_task): {condition: TaskResult}} of one job; ``state`` is (adapter, images)."""
    adapter, images = state
    specs: list[list[tuple[int, int]] | None] = [None, *[list(c.neurons) for c in conditions]]
    res = evaluate_conditions(
        adapter, job.eval_task, items[items["task"] == job.eval_task], images, dict(job.conditions),
        batch_size=batch_size, max_new_tokens=max_new_tokens,
        condition_hooks=lambda conds: ablate_neurons_per_row(adapter, [specs[c] for c in conds]),
        condition_layers=[lowest_layer([spec]) for spec in specs],
        progress=f"suppression {job.eval_task}",
    )
    return {(utility, job.eval_task): by_cond for utility, by_cond in res.items()}


def merge_suppression_scores(
    parts: Sequence[dict[tuple[str, str], dict[int, TaskResult]]], items: pd.DataFrame,
) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """The jobs' results as one {(utility, eval_task): {condition: TaskResult}}, in a fixed order
    (evaluated tasks as in ``items``, likelihood then generative, conditions ascending) whatever
    order the jobs ran in."""
    merged: dict[tuple[str, str], dict[int, TaskResult]] = {}
    for part in parts:
        for key, by_cond in part.items():
            overlap = set(merged.get(key, {})) & set(by_cond)
            if overlap:
                raise PipelineError(f"suppression: conditions {sorted(overlap)} of {key} were scored by two jobs")
            merged.setdefault(key, {}).update(by_cond)
    task_order = list(dict.fromkeys(items["task"]))
    keys = sorted(merged, key=lambda k: (task_order.index(k[1]), ("likelihood", "generative").index(k[0])))
    out = {k: dict(sorted(merged[k].items())) for k in keys}
    for (utility, task), by_cond in out.items():
        log.info("%s %s baseline %.4f; %d masked conditions", task, utility, by_cond[0].utility, len(by_cond) - 1)
    return out


def suppression_scores(
    adapter, items: pd.DataFrame, images: ImageTable, conditions: Sequence[MaskCondition],
    *, batch_size: int, max_new_tokens: int,
) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """{(utility, eval_task): {condition: TaskResult}}; condition 0 is the base, k >= 1 is
    ``conditions[k - 1]``. Likelihood on every condition; generative on ``generative_conditions``.
    In this process; ``suppression_jobs`` + ``workers.map_jobs`` + ``merge_suppression_scores``
    spread the same work over processes."""
    parts = [run_suppression_job((adapter, images), job, items=items, conditions=conditions, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens)
             for job in suppression_jobs(items, conditions)]
    return merge_suppression_scores(parts, items)


def conditions_table(conditions: Sequence[MaskCondition]) -> pd.DataFrame:
    """The conditions as rows (condition, method, target_task, rho, draw, headline, n_neurons); 0 = base."""
    rows = [(0, "base", "", 0.0, 0, True, 0)]
    rows += [(k + 1, c.method, c.target_task, c.rho, c.draw, c.headline, len(c.neurons)) for k, c in enumerate(conditions)]
    return pd.DataFrame(rows, columns=list(CONDITION_COLUMNS))


def scores_table(scores: dict[tuple[str, str], dict[int, TaskResult]], items: pd.DataFrame) -> pd.DataFrame:
    """Per-item scores as rows (utility, condition, eval_task, item_id, score); generated
    captions also carry their BLEU statistics (``bleu_*`` columns, NaN elsewhere)."""
    frames = []
    for (utility, task), by_cond in scores.items():
        ids = items.loc[items["task"] == task, "item_id"].astype(str).tolist()
        for c, r in by_cond.items():
            f = pd.DataFrame({"utility": utility, "condition": np.int32(c), "eval_task": task, "item_id": ids,
                              "score": np.asarray(r.per_item, dtype=np.float64)})
            if r.statistics is not None:
                for j in range(r.statistics.shape[1]):
                    f[f"bleu_{j}"] = r.statistics[:, j]
            frames.append(f)
    return pd.concat(frames, ignore_index=True)


@dataclass
class _Drops:
    """Relative drops (%) of one utility: (condition, eval_task) -> (point, replicates [B])."""

    cells: dict[tuple[int, str], tuple[float, np.ndarray]]
    baseline: dict[str, Interval]


def _drops(by_task: dict[str, dict[int, TaskResult]], n_resamples: int, seed: int) -> _Drops:
    cells, baseline = {}, {}
    for task, by_cond in by_task.items():
        ids = list(by_cond)
        values, kind = result_values([by_cond[c] for c in ids])
        counts = bootstrap_counts(values.shape[1], n_resamples, task_seed(seed, task))
        point, reps = utility_replicates(values, counts, kind)
        base = ids.index(0)
        baseline[task] = interval(float(point[base]), reps[base])
        dp, dr = relative_drop_replicates(point, reps, base_index=base)
        for k, c in enumerate(ids):
            cells[(c, task)] = (float(dp[k]), dr[k])
    return _Drops(cells, baseline)


def _summary(drops: _Drops, targets: dict[str, int], tasks: list[str]) -> dict[str, tuple[float, np.ndarray]]:
    """On-target, off-target and selectivity (point, replicates) of one mask family ({target: condition})."""
    on = [drops.cells[(c, t)] for t, c in targets.items() if (c, t) in drops.cells]
    off = [drops.cells[(c, s)] for t, c in targets.items() for s in tasks if s != t and (c, s) in drops.cells]
    if not on or (not off and len(tasks) > 1):
        raise PipelineError(f"suppression summary: conditions {sorted(targets.values())} were not evaluated on "
                            f"every task of {tasks}")
    on_p, on_r = float(np.mean([p for p, _ in on])), mean_over([r for _, r in on])
    if off:
        off_p, off_r = float(np.mean([p for p, _ in off])), mean_over([r for _, r in off])
    else:  # one task studied: there is no other task, so no off-target drop (an undefined interval)
        off_p, off_r = math.nan, np.full_like(on_r, math.nan)
    return {"on_target_drop": (on_p, on_r), "off_target_drop": (off_p, off_r), "selectivity": (on_p - off_p, on_r - off_r)}


def _iv(pair: tuple[float, np.ndarray], confidence: float) -> dict:
    return interval(pair[0], pair[1], confidence).as_dict()


def suppression_statistics(
    scores: dict[tuple[str, str], dict[int, TaskResult]],
    conditions: Sequence[MaskCondition],
    *,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> dict:
    """Intervals of every reported effect (module docstring), as a JSON-ready dict.

    Per utility: ``baseline`` {task: interval}; ``relative_drop`` {method: {target: {eval: interval}}}
    at the headline size (random: the mean over draws); ``summary`` {method: {on_target_drop,
    off_target_drop, selectivity}}; ``random_draws``: the draws' distribution (mean, 2.5/97.5
    percentiles); ``differences`` {"hones-minus-<m>": {on_target_drop, selectivity}} with a
    ``verdict``, for every other method, and for the pairs of ``EXTRA_COMPARISONS`` evaluated. Random's replicates mix the draws: replicate b uses draw d_b (uniform), so its
    intervals carry both item and draw variability. Likelihood also gets ``curve`` {method: {rho:
    {on_target_drop, off_target_drop}}} (draw 0) and ``auc`` {method: {on_target_drop,
    off_target_drop}}: the curve's mean height over log10(rho) (``statistics.log_rho_auc``).
    """
    tasks = list(dict.fromkeys(t for (_, t) in scores))
    out: dict = {"confidence": confidence, "resamples": n_resamples,
                 "items_per_task": {u: {t: len(next(iter(r.values())).per_item) for (uu, t), r in scores.items() if uu == u}
                                    for u in dict.fromkeys(u for (u, _) in scores)}}
    mix = np.random.default_rng([seed, 7]).integers
    for utility in dict.fromkeys(u for (u, _) in scores):
        drops = _drops({t: scores[(utility, t)] for t in tasks}, n_resamples, seed)
        evaluated = {c for (c, _) in drops.cells}
        families: dict[tuple[str, float, int], dict[str, int]] = {}
        for k, c in enumerate(conditions, start=1):
            if k in evaluated:
                families.setdefault((c.method, c.rho, c.draw), {})[c.target_task] = k
        headline_rho = next(c.rho for c in conditions if c.headline)
        methods = list(dict.fromkeys(m for (m, r, _) in families if r == headline_rho))
        summaries = {key: _summary(drops, fam, tasks) for key, fam in families.items()}
        draws = sorted(d for (m, r, d) in families if m == RANDOM and r == headline_rho)
        pick = mix(len(draws), size=n_resamples) if draws else None

        def headline(method: str, key: str) -> tuple[float, np.ndarray]:
            if method != RANDOM or len(draws) == 1:
                return summaries[(method, headline_rho, 0)][key]
            per = [summaries[(RANDOM, headline_rho, d)][key] for d in draws]
            reps = np.stack([r for _, r in per])[pick, np.arange(n_resamples)]
            return float(np.mean([p for p, _ in per])), reps

        def cell(method: str, target: str, s: str) -> tuple[float, np.ndarray]:
            ds = draws if method == RANDOM else [0]
            per = [drops.cells[(families[(method, headline_rho, d)][target], s)] for d in ds]
            if len(per) == 1:
                return per[0]
            return float(np.mean([p for p, _ in per])), np.stack([r for _, r in per])[pick, np.arange(n_resamples)]

        u_out: dict = {
            "baseline": {t: iv.as_dict(6) for t, iv in drops.baseline.items()},
            "relative_drop": {m: {t: {s: _iv(cell(m, t, s), confidence) for s in tasks}
                                  for t in families[(m, headline_rho, 0)]} for m in methods},
            "summary": {m: {k: _iv(headline(m, k), confidence) for k in SUMMARY_KEYS} for m in methods},
        }
        if len(draws) > 1:
            u_out["random_draws"] = {k: distribution([summaries[(RANDOM, headline_rho, d)][k][0] for d in draws])
                                     for k in SUMMARY_KEYS}
        pairs = [(FOCUS, m) for m in methods if FOCUS in methods and m not in (FOCUS, GROUND_TRUTH)]
        pairs += [(a, b) for a, b in EXTRA_COMPARISONS if a in methods and b in methods]
        if pairs:
            diffs = {}
            for a, b in pairs:
                entry = {}
                for k in ("on_target_drop", "selectivity"):
                    (fp, fr), (mp, mr) = headline(a, k), headline(b, k)
                    iv = interval(fp - mp, fr - mr, confidence)
                    entry[k] = {**iv.as_dict(), "verdict": verdict(iv)}
                diffs[f"{a}-minus-{b}"] = entry
            u_out["differences"] = diffs
        rhos = sorted({r for (_, r, _) in families})
        if len(rhos) > 1:
            curve, auc = {}, {}
            for m in methods:
                if not all((m, r, 0) in summaries for r in rhos):
                    continue
                curve[m] = {f"{r:g}": {k: _iv(summaries[(m, r, 0)][k], confidence)
                                       for k in ("on_target_drop", "off_target_drop")} for r in rhos}
                auc[m] = {}
                for k in ("on_target_drop", "off_target_drop"):
                    pts = np.array([summaries[(m, r, 0)][k][0] for r in rhos])
                    reps = np.stack([summaries[(m, r, 0)][k][1] for r in rhos])
                    auc[m][k] = interval(float(log_rho_auc(rhos, pts)), log_rho_auc(rhos, reps), confidence).as_dict()
            u_out["curve"], u_out["auc"] = curve, auc
        if GROUND_TRUTH in methods:
            iv = interval(*headline(GROUND_TRUTH, "on_target_drop"), confidence)
            u_out["sensitivity"] = {
                "ground_truth_on_target_drop": iv.as_dict(),
                "excludes_zero": bool(iv.ci_low > 0),
                "half_width_within_third": bool(iv.ci_low > 0 and iv.half_width <= iv.value / 3),
                "per_task": {t: _iv(drops.cells[(families[(GROUND_TRUTH, headline_rho, 0)][t], t)], confidence)
                             for t in families[(GROUND_TRUTH, headline_rho, 0)]},
            }
        out[utility] = u_out
    return out
