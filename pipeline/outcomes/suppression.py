"""Held-out causal check (docs/method.md section 5): zero a task's mask, evaluate every task.

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
- ``score_suppression``: the same over worker processes; its pieces ``suppression_jobs`` /
  ``run_suppression_job`` / ``merge_suppression_scores`` (an evaluated task's conditions, in
  shards, for ``pipeline.model.workers.map_jobs``; their results merged in a fixed order) are
  public for stages that run suppression beside other jobs.
- ``relative_drops``: every condition's relative drop with paired bootstrap replicates.
- ``scores_table``: those per-item scores as a long table (what the statistics rest on).
- ``suppression_statistics``: paired-bootstrap intervals for the relative-drop matrices, the
  per-method summaries (on-target drop, off-target drop, selectivity = on minus off), the
  random masks' distribution, HONES-minus-baseline differences, the deletion curves and their
  area, and the sensitivity check (does the ground truth's own top set drop its task?).
- ``scores_from_table`` / ``conditions_from_table``: the evaluate stage's Parquet tables back
  into what the statistics take.
- ``replicated_differences``: the differences decided across instances of one recipe (seeds),
  with a two-stage bootstrap over instances and test items.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.evaluation import TaskResult, evaluate_conditions, result_values
from pipeline.model.hooks import ablate_neurons_per_row, lowest_layer
from pipeline.model.workers import map_jobs
from pipeline.outcomes.records import UTILITIES, Comparison, SuppressionRecord, as_record
from pipeline.outcomes.statistics import (
    Interval,
    bootstrap_counts,
    distribution,
    interval,
    log_rho_auc,
    mean_over,
    relative_drop_replicates,
    task_seed,
    utility_replicates,
    verdict,
)
from pipeline.tasks.items import ImageTable, likelihood_sequences_per_item
from pipeline.tasks.metrics import paper_bleu_from_statistics

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
        out.append(
            MaskCondition(
                str(method),
                str(task),
                float(rho),
                int(draw),
                bool(headline),
                tuple((int(l), int(i)) for l, i in zip(g["layer"], g["neuron"])),
            )
        )
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


def suppression_jobs(
    items: pd.DataFrame, conditions: Sequence[MaskCondition], shards_per_task: int = 1, *, generative: bool = True
) -> list[SuppressionJob]:
    """The work of ``suppression_scores`` as jobs, heaviest first: every evaluated task's
    conditions dealt round-robin into ``shards_per_task`` shards (likelihood on every
    condition, generative on ``generative_conditions`` unless ``generative`` is False). A
    condition's items stay together, so each job's results are complete per condition (a
    caption's BLEU is a corpus statistic)."""
    if shards_per_task < 1:
        raise PipelineError(f"suppression_jobs: shards_per_task ({shards_per_task}) must be at least 1")
    wanted: dict[str, Sequence[int]] = {"likelihood": range(len(conditions) + 1)}
    if generative:
        wanted["generative"] = [0, *generative_conditions(conditions)]
    jobs = []
    for task in dict.fromkeys(items["task"]):
        task_items = items[items["task"] == task]
        per_item = likelihood_sequences_per_item(task_items, task)
        for s in range(shards_per_task):
            conds = tuple(
                (u, tuple(c for k, c in enumerate(cs) if k % shards_per_task == s)) for u, cs in wanted.items()
            )
            conds = tuple((u, cs) for u, cs in conds if cs)
            if conds:
                # Generation costs about max_new_tokens cached steps per row: weigh it as 3 rows.
                cost = len(task_items) * sum(len(cs) * (per_item if u == "likelihood" else 3.0) for u, cs in conds)
                jobs.append(SuppressionJob(str(task), conds, cost))
    return sorted(jobs, key=lambda j: -j.cost)


def run_suppression_job(
    state: tuple,
    job: SuppressionJob,
    *,
    items: pd.DataFrame,
    conditions: Sequence[MaskCondition],
    batch_size: int,
    max_new_tokens: int | None,
) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """{(utility, eval_task): {condition: TaskResult}} of one job; ``state`` is (adapter, images).
    ``max_new_tokens`` may be None when the job generates nothing."""
    adapter, images = state
    specs: list[list[tuple[int, int]] | None] = [None, *[list(c.neurons) for c in conditions]]
    res = evaluate_conditions(
        adapter,
        job.eval_task,
        items[items["task"] == job.eval_task],
        images,
        dict(job.conditions),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        condition_hooks=lambda conds: ablate_neurons_per_row(adapter, [specs[c] for c in conds]),
        condition_layers=[lowest_layer([spec]) for spec in specs],
        progress=f"suppression {job.eval_task}",
    )
    return {(utility, job.eval_task): by_cond for utility, by_cond in res.items()}


def merge_suppression_scores(
    parts: Sequence[dict[tuple[str, str], dict[int, TaskResult]]],
    items: pd.DataFrame,
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
    adapter,
    items: pd.DataFrame,
    images: ImageTable,
    conditions: Sequence[MaskCondition],
    *,
    batch_size: int,
    max_new_tokens: int,
) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """{(utility, eval_task): {condition: TaskResult}}; condition 0 is the base, k >= 1 is
    ``conditions[k - 1]``. Likelihood on every condition; generative on ``generative_conditions``.
    In this process; ``score_suppression`` spreads the same work over processes."""
    return score_suppression(
        items, conditions, lambda: (adapter, images), batch_size=batch_size, max_new_tokens=max_new_tokens
    )


def score_suppression(
    items: pd.DataFrame,
    conditions: Sequence[MaskCondition],
    load: Callable[[], tuple],
    *,
    batch_size: int,
    max_new_tokens: int | None,
    workers: int = 1,
    threads: int = 1,
    generative: bool = True,
    what: str = "suppression",
) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """``suppression_scores`` over ``workers`` processes (``workers.map_jobs``), each loading
    its (adapter, images) with ``load``; ``generative=False`` scores the likelihood only, and
    then needs no ``max_new_tokens`` (None). With several workers every task's conditions are
    dealt into two shards per worker, so the pool stays busy while the last jobs finish."""
    if generative and (max_new_tokens is None or max_new_tokens < 1):
        raise PipelineError(f"score_suppression: generative scoring needs max_new_tokens >= 1, got {max_new_tokens}")
    parts = map_jobs(
        partial(
            run_suppression_job,
            items=items,
            conditions=conditions,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        ),
        suppression_jobs(items, conditions, shards_per_task=1 if workers == 1 else 2 * workers, generative=generative),
        load,
        workers=workers,
        threads=threads,
        what=what,
    )
    return merge_suppression_scores(parts, items)


def conditions_table(conditions: Sequence[MaskCondition]) -> pd.DataFrame:
    """The conditions as rows (condition, method, target_task, rho, draw, headline, n_neurons); 0 = base."""
    rows = [(0, "base", "", 0.0, 0, True, 0)]
    rows += [
        (k + 1, c.method, c.target_task, c.rho, c.draw, c.headline, len(c.neurons)) for k, c in enumerate(conditions)
    ]
    return pd.DataFrame(rows, columns=list(CONDITION_COLUMNS))


def scores_table(scores: dict[tuple[str, str], dict[int, TaskResult]], items: pd.DataFrame) -> pd.DataFrame:
    """Per-item scores as rows (utility, condition, eval_task, item_id, score); generated
    captions also carry their BLEU statistics (``bleu_*`` columns, NaN elsewhere)."""
    frames = []
    for (utility, task), by_cond in scores.items():
        ids = items.loc[items["task"] == task, "item_id"].astype(str).tolist()
        for c, r in by_cond.items():
            f = pd.DataFrame(
                {
                    "utility": utility,
                    "condition": np.int32(c),
                    "eval_task": task,
                    "item_id": ids,
                    "score": np.asarray(r.per_item, dtype=np.float64),
                }
            )
            if r.statistics is not None:
                for j in range(r.statistics.shape[1]):
                    f[f"bleu_{j}"] = r.statistics[:, j]
            frames.append(f)
    return pd.concat(frames, ignore_index=True)


@dataclass
class RelativeDrops:
    """Relative drops (%) of one utility: (condition, eval_task) -> (point, replicates [B]),
    and each evaluated task's base utility."""

    cells: dict[tuple[int, str], tuple[float, np.ndarray]]
    baseline: dict[str, Interval]


def relative_drops(by_task: dict[str, dict[int, TaskResult]], n_resamples: int, seed: int) -> RelativeDrops:
    """Every condition's relative drop from the base (condition 0) on every evaluated task of
    ``by_task`` ({eval_task: {condition: TaskResult}}), with paired bootstrap replicates: the
    same resampled items (``task_seed(seed, task)``) for every condition of a task."""
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
    return RelativeDrops(cells, baseline)


def _summary(drops: RelativeDrops, targets: dict[str, int], tasks: list[str]) -> dict[str, tuple[float, np.ndarray]]:
    """On-target, off-target and selectivity (point, replicates) of one mask family ({target: condition})."""
    on = [drops.cells[(c, t)] for t, c in targets.items() if (c, t) in drops.cells]
    off = [drops.cells[(c, s)] for t, c in targets.items() for s in tasks if s != t and (c, s) in drops.cells]
    if not on or (not off and len(tasks) > 1):
        raise PipelineError(
            f"suppression summary: conditions {sorted(targets.values())} were not evaluated on every task of {tasks}"
        )
    on_p, on_r = float(np.mean([p for p, _ in on])), mean_over([r for _, r in on])
    if off:
        off_p, off_r = float(np.mean([p for p, _ in off])), mean_over([r for _, r in off])
    else:  # one task studied: there is no other task, so no off-target drop (an undefined interval)
        off_p, off_r = math.nan, np.full_like(on_r, math.nan)
    return {
        "on_target_drop": (on_p, on_r),
        "off_target_drop": (off_p, off_r),
        "selectivity": (on_p - off_p, on_r - off_r),
    }


def _iv(pair: tuple[float, np.ndarray], confidence: float) -> dict:
    return interval(pair[0], pair[1], confidence).as_dict()


class _Headline:
    """One utility's relative drops grouped into mask families, with the headline summaries:
    ``summary(method, key)`` and ``cell(method, target, evaluated)`` as (point, replicates [B]).
    Random's replicates mix the draws: replicate b uses draw d_b (uniform over the draws, from a
    seeded stream), so its intervals carry both item and draw variability."""

    def __init__(
        self,
        by_task: dict[str, dict[int, TaskResult]],
        conditions: Sequence[MaskCondition],
        n_resamples: int,
        seed: int,
    ):
        self.tasks = list(by_task)
        self.drops = relative_drops(by_task, n_resamples, seed)
        evaluated = {c for (c, _) in self.drops.cells}
        self.families: dict[tuple[str, float, int], dict[str, int]] = {}
        for k, c in enumerate(conditions, start=1):
            if k in evaluated:
                self.families.setdefault((c.method, c.rho, c.draw), {})[c.target_task] = k
        self.rho = next(c.rho for c in conditions if c.headline)
        self.methods = list(dict.fromkeys(m for (m, r, _) in self.families if r == self.rho))
        self.summaries = {key: _summary(self.drops, fam, self.tasks) for key, fam in self.families.items()}
        self.draws = sorted(d for (m, r, d) in self.families if m == RANDOM and r == self.rho)
        self.n_resamples = n_resamples
        mix = np.random.default_rng([seed, 7]).integers
        self._pick = mix(len(self.draws), size=n_resamples) if self.draws else None

    def _mixed(self, per: list[tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
        if len(per) == 1:
            return per[0]
        return float(np.mean([p for p, _ in per])), np.stack([r for _, r in per])[
            self._pick, np.arange(self.n_resamples)
        ]

    def summary(self, method: str, key: str) -> tuple[float, np.ndarray]:
        if method != RANDOM:
            return self.summaries[(method, self.rho, 0)][key]
        return self._mixed([self.summaries[(RANDOM, self.rho, d)][key] for d in self.draws])

    def cell(self, method: str, target: str, evaluated: str) -> tuple[float, np.ndarray]:
        ds = self.draws if method == RANDOM else [0]
        return self._mixed([self.drops.cells[(self.families[(method, self.rho, d)][target], evaluated)] for d in ds])

    def comparisons(self) -> list[tuple[str, str]]:
        """(method, baseline) pairs compared: hones against every other method but the ground
        truth, and the pairs of ``EXTRA_COMPARISONS`` evaluated."""
        pairs = [(FOCUS, m) for m in self.methods if FOCUS in self.methods and m not in (FOCUS, GROUND_TRUTH)]
        return pairs + [(a, b) for a, b in EXTRA_COMPARISONS if a in self.methods and b in self.methods]

    def difference(self, a: str, b: str, key: str) -> tuple[float, np.ndarray]:
        (ap, ar), (bp, br) = self.summary(a, key), self.summary(b, key)
        return ap - bp, ar - br


def _difference_entry(point: float, reps: np.ndarray, confidence: float, margin: float) -> dict:
    iv = interval(point, reps, confidence)
    return {**iv.as_dict(), "verdict": verdict(iv, 0.0, margin)}


def suppression_statistics(
    scores: dict[tuple[str, str], dict[int, TaskResult]],
    conditions: Sequence[MaskCondition],
    *,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
    equivalence_margin: float = 0.0,
) -> SuppressionRecord:
    """Intervals of every reported effect (module docstring), as the record a ``suppression.json`` holds.

    Per utility: ``baseline`` {task: interval}; ``relative_drop`` {method: {target: {eval: interval}}}
    at the headline size (random: the mean over draws); ``summary`` {method: {on_target_drop,
    off_target_drop, selectivity}}; ``random_draws``: the draws' distribution (mean, 2.5/97.5
    percentiles); ``differences`` {"hones-minus-<m>": {on_target_drop, selectivity}} with a
    ``verdict`` (``statistics.verdict`` with ``equivalence_margin`` in percentage points), for
    every other method, and for the pairs of ``EXTRA_COMPARISONS`` evaluated (``_Headline``).
    Likelihood also gets ``curve`` {method: {rho: {on_target_drop, off_target_drop}}} (draw 0)
    and ``auc`` {method: {on_target_drop, off_target_drop}}: the curve's mean height over
    log10(rho) (``statistics.log_rho_auc``).
    """
    tasks = list(dict.fromkeys(t for (_, t) in scores))
    out: dict = {
        "confidence": confidence,
        "resamples": n_resamples,
        "equivalence_margin": equivalence_margin,
        "items_per_task": {
            u: {t: len(next(iter(r.values())).per_item) for (uu, t), r in scores.items() if uu == u}
            for u in dict.fromkeys(u for (u, _) in scores)
        },
    }
    for utility in dict.fromkeys(u for (u, _) in scores):
        h = _Headline({t: scores[(utility, t)] for t in tasks}, conditions, n_resamples, seed)
        u_out: dict = {
            "baseline": {t: iv.as_dict(6) for t, iv in h.drops.baseline.items()},
            "relative_drop": {
                m: {t: {s: _iv(h.cell(m, t, s), confidence) for s in tasks} for t in h.families[(m, h.rho, 0)]}
                for m in h.methods
            },
            "summary": {m: {k: _iv(h.summary(m, k), confidence) for k in SUMMARY_KEYS} for m in h.methods},
        }
        if len(h.draws) > 1:
            u_out["random_draws"] = {
                k: distribution([h.summaries[(RANDOM, h.rho, d)][k][0] for d in h.draws]) for k in SUMMARY_KEYS
            }
        if h.comparisons():
            u_out["differences"] = {
                f"{a}-minus-{b}": {
                    k: _difference_entry(*h.difference(a, b, k), confidence, equivalence_margin)
                    for k in ("on_target_drop", "selectivity")
                }
                for a, b in h.comparisons()
            }
        rhos = sorted({r for (_, r, _) in h.families})
        if len(rhos) > 1:
            curve, auc = {}, {}
            for m in h.methods:
                if not all((m, r, 0) in h.summaries for r in rhos):
                    continue
                curve[m] = {
                    f"{r:g}": {
                        k: _iv(h.summaries[(m, r, 0)][k], confidence) for k in ("on_target_drop", "off_target_drop")
                    }
                    for r in rhos
                }
                auc[m] = {}
                for k in ("on_target_drop", "off_target_drop"):
                    pts = np.array([h.summaries[(m, r, 0)][k][0] for r in rhos])
                    reps = np.stack([h.summaries[(m, r, 0)][k][1] for r in rhos])
                    auc[m][k] = interval(float(log_rho_auc(rhos, pts)), log_rho_auc(rhos, reps), confidence).as_dict()
            u_out["curve"], u_out["auc"] = curve, auc
        if GROUND_TRUTH in h.methods:
            iv = interval(*h.summary(GROUND_TRUTH, "on_target_drop"), confidence)
            u_out["sensitivity"] = {
                "ground_truth_on_target_drop": iv.as_dict(),
                "excludes_zero": bool(iv.ci_low > 0),
                "half_width_within_third": bool(iv.ci_low > 0 and iv.half_width <= iv.value / 3),
                "per_task": {
                    t: _iv(h.cell(GROUND_TRUTH, t, t), confidence) for t in h.families[(GROUND_TRUTH, h.rho, 0)]
                },
            }
        out[utility] = u_out
    return as_record(SuppressionRecord, out, "suppression statistics")


def scores_from_table(table: pd.DataFrame) -> dict[tuple[str, str], dict[int, TaskResult]]:
    """The inverse of ``scores_table``: {(utility, eval_task): {condition: TaskResult}} with the
    per-item scores (and BLEU statistics) the statistics rest on; ``metric`` is not stored, so it
    is empty, and ``utility`` is recomputed (corpus BLEU where statistics are present)."""
    out: dict[tuple[str, str], dict[int, TaskResult]] = {}
    bleu = sorted((c for c in table.columns if c.startswith("bleu_")), key=lambda c: int(c.split("_")[1]))
    for (utility, task, cond), g in table.groupby(["utility", "eval_task", "condition"], sort=False):
        stats = g[bleu].to_numpy(dtype=np.float64) if bleu and g[bleu].notna().all().all() else None
        per_item = g["score"].to_numpy(dtype=np.float64)
        value = float(paper_bleu_from_statistics(stats.sum(axis=0))) if stats is not None else float(per_item.mean())
        out.setdefault((str(utility), str(task)), {})[int(cond)] = TaskResult(
            str(task), "", value, per_item, statistics=stats
        )
    return out


def conditions_from_table(table: pd.DataFrame) -> list[MaskCondition]:
    """The ``MaskCondition``s of a ``conditions_table`` (condition 0, the base, left out), in
    condition order; neurons are not stored there, so they are empty."""
    rows = table[table["condition"] > 0].sort_values("condition")
    return [
        MaskCondition(str(r.method), str(r.target_task), float(r.rho), int(r.draw), bool(r.headline), ())
        for r in rows.itertuples()
    ]


@dataclass(frozen=True)
class ReplicatedFigure:
    """One figure of a comparison decided across a recipe's instances: the point and interval
    (percentage points of relative drop; None where not finite), its verdict, and each instance's
    own point {instance: value}."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: str
    per_instance: dict[str, float | None]


@dataclass(frozen=True)
class ReplicatedDifferences:
    """``replicated_differences``' result: ``differences`` {utility: {comparison: {figure:
    ReplicatedFigure}}} (figures: on_target_drop, selectivity), and how it was decided."""

    instances: list[str]
    confidence: float
    resamples: int
    equivalence_margin: float
    differences: dict[str, dict[Comparison, dict[str, ReplicatedFigure]]]

    def of(self, utility: str) -> dict[Comparison, dict[str, ReplicatedFigure]]:
        """One utility's comparisons; empty when the instances were not evaluated under it."""
        if utility not in UTILITIES:
            raise ValueError(f"unknown utility {utility!r}; known: {', '.join(UTILITIES)}")
        return self.differences.get(utility, {})


def replicated_differences(
    instances: dict[str, tuple[dict[tuple[str, str], dict[int, TaskResult]], Sequence[MaskCondition]]],
    *,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
    equivalence_margin: float = 0.0,
) -> ReplicatedDifferences:
    """The ``differences`` of ``suppression_statistics`` decided across model instances of one
    recipe (the same architecture and schedule trained with other seeds).

    ``instances``: {name: (scores, conditions)} as ``suppression_scores`` / ``mask_conditions``
    give them. Point: the mean over instances of each instance's difference. Interval: a
    two-stage bootstrap; replicate b draws as many instances as there are, with replacement, and
    resamples test items within them. The instances are scored on the same test items, so
    replicate b resamples the same items in every instance (the crossed design: an item's
    difficulty is shared by all instances, and resampling it independently per instance would
    average that variance away). Returns ``ReplicatedDifferences``: per utility, per comparison
    (a, b), the on-target drop and selectivity differences as ``ReplicatedFigure``s.
    """
    names = list(instances)
    if not names:
        raise PipelineError("replicated_differences: no instances")
    items = {n: {k: len(next(iter(v.values())).per_item) for k, v in sc.items()} for n, (sc, _) in instances.items()}
    if any(items[n] != items[names[0]] for n in names):
        raise PipelineError(
            f"replicated instances {names} were not evaluated on the same items per task and utility: "
            + "; ".join(f"{n}: {items[n]}" for n in names)
        )
    pick = np.random.default_rng([seed, 13]).integers(len(names), size=(n_resamples, len(names)))
    decided: dict[str, dict[Comparison, dict[str, ReplicatedFigure]]] = {}
    utilities = list(dict.fromkeys(u for sc, _ in instances.values() for (u, _) in sc))
    for utility in utilities:
        heads = {}
        for n, (sc, conds) in instances.items():
            tasks = list(dict.fromkeys(t for (u, t) in sc if u == utility))
            heads[n] = _Headline({t: sc[(utility, t)] for t in tasks}, conds, n_resamples, seed)
        pairs = [p for p in heads[names[0]].comparisons() if all(p in h.comparisons() for h in heads.values())]
        diffs: dict[Comparison, dict[str, ReplicatedFigure]] = {}
        for a, b in pairs:
            entry = {}
            for k in ("on_target_drop", "selectivity"):
                per = [heads[n].difference(a, b, k) for n in names]
                reps = np.stack([r for _, r in per])  # [instances, B]
                with np.errstate(invalid="ignore"):
                    replicates = np.nanmean(reps[pick.T, np.arange(n_resamples)], axis=0)
                point = float(np.mean([p for p, _ in per]))
                entry[k] = ReplicatedFigure(
                    **_difference_entry(point, replicates, confidence, equivalence_margin),
                    per_instance={n: (round(p, 4) if math.isfinite(p) else None) for n, (p, _) in zip(names, per)},
                )
            diffs[Comparison(a, b)] = entry
        decided[utility] = diffs
    return ReplicatedDifferences(
        instances=names,
        confidence=confidence,
        resamples=n_resamples,
        equivalence_margin=equivalence_margin,
        differences=decided,
    )
