"""Task steering with learned per-neuron scales (docs/method.md section 6).

The model is frozen; each neuron of a task's steering mask gets a learnable scale
(1 + lambda_i), lambda initialised at 0 and clamped to [-clamp, clamp], trained on the dev
split with answer-token cross-entropy + beta * KL(p_original || p_scaled) on the answer
positions + l2 * ||lambda||^2 (AdamW, cosine schedule, gradient accumulation).

Map of this module:
- ``SteeringSettings``: the hyper-parameters (training, grid, utility) and split names.
- ``train_scales``: the learned lambdas of one task's neurons (the model is left unchanged);
  one ``_ScaleProblem`` (inputs and loss of a micro-batch) trained by ``_train_epoch``. Its
  rows are ``pipeline.tasks.items.training_rows``; its log-probabilities
  ``pipeline.model.scoring.model_answer_logprobs``.
- ``steer_task``: one task end to end: learned scales and the baselines over the SAME
  neurons (``fixed_amp``: every scale 2.0; ``grid_search``: one uniform scale from the grid
  picked by the task's utility on dev; ``no_kl``: learned with beta = 0), learned scales on
  the ``random`` method's neurons of the task (``random_learned``, same per-layer budget) and
  ``base`` (no intervention), all evaluated on the test split.
  All variants of a task run as conditions of the same evaluation batches
  (``pipeline.model.hooks.condition_scales``: each test example is repeated once per variant
  inside a batch; one pass over the test items per task, not one per variant).
- ``steering_table`` / ``steering_summary`` / ``scales_table``: the long results table, its
  {task: {variant: utility}} JSON and the Parquet of learned scales (task, layer, neuron, scale).
- ``apply_steering`` / ``load_scales``: the public one-call loader of the learned scales::

      from pipeline.outcomes.steering import apply_steering
      with apply_steering(model, "data/steer/tiny-llava/scales.parquet", task="vqa"):
          out = model.generate(**inputs)   # the vqa neurons scaled by (1 + lambda)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model.adapter import ModelAdapter
from pipeline.model.evaluation import TaskResult, evaluate_conditions, evaluate_task, result_values
from pipeline.model.hooks import condition_scales, lowest_scaled_layer, scale_neurons
from pipeline.model.scoring import model_answer_logprobs, token_logprobs
from pipeline.outcomes.records import SteeringRecord, as_record
from pipeline.outcomes.statistics import (
    bootstrap_counts,
    interval,
    mean_over,
    task_seed,
    utility_replicates,
    verdict,
)
from pipeline.tasks.items import ImageTable, likelihood_sequences_per_item, training_rows

log = logging.getLogger(__name__)

__all__ = [
    "VARIANTS",
    "FIXED_AMP_SCALE",
    "STEERING_COLUMNS",
    "SCALES_COLUMNS",
    "SteeringSettings",
    "train_scales",
    "TaskSteering",
    "steer_task",
    "steering_table",
    "steering_summary",
    "steering_statistics",
    "scales_table",
    "load_scales",
    "apply_steering",
]

VARIANTS = ("base", "learned", "fixed_amp", "grid_search", "no_kl", "random_learned")
FIXED_AMP_SCALE = 2.0
STEERING_COLUMNS = ("task", "variant", "split", "utility", "metric")
SCALES_COLUMNS = ("task", "layer", "neuron", "scale")

Neuron = tuple[int, int]


# ---------------------------------------------------------------------------------------------
def _layer_groups(neurons: Sequence[Neuron]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (positions in ``neurons``, neuron indices), both LongTensors."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for k, (l, n) in enumerate(neurons):
        pos, idx = groups.setdefault(l, ([], []))
        pos.append(k)
        idx.append(n)
    return {l: (torch.tensor(p), torch.tensor(i)) for l, (p, i) in sorted(groups.items())}


def _scale_map(groups: Mapping[int, tuple[torch.Tensor, torch.Tensor]], scales: torch.Tensor) -> dict:
    """``hooks.scale_neurons`` argument from per-neuron scales (differentiable in ``scales``)."""
    return {l: (idx, scales[pos]) for l, (pos, idx) in groups.items()}


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """requires_grad False on every parameter and eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@dataclass(frozen=True, kw_only=True)
class SteeringSettings:
    """How steering learns and judges scales (docs/method.md section 6); defaults are the paper's.

    ``train_scales`` reads the training fields: ``beta`` (weight of KL(p_original ||
    p_scaled) on the answer positions; 0 drops the term), ``l2`` (weight of ||lambda||^2),
    ``lr`` (AdamW peak learning rate), ``epochs`` (passes over the training rows),
    ``grad_accum`` (micro-batches per optimiser step), ``train_batch_size`` (training rows per
    micro-batch), ``clamp`` (lambda kept in [-clamp, clamp]) and ``seed`` (the rows' retrieval
    negatives and the per-epoch shuffles). ``steer_task`` also reads ``grid`` (the uniform
    scales of the grid-search baseline), ``utility`` ("generative" or "teacher_forced") and
    ``train_split`` / ``eval_split`` (the names of the splits its items come from: labels only).
    """

    beta: float
    l2: float
    train_batch_size: int
    seed: int
    lr: float = 5e-4
    epochs: int = 2
    grad_accum: int = 4
    clamp: float = 1.5
    grid: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    utility: str = "generative"
    train_split: str = "dev"
    eval_split: str = "test"


@dataclass(frozen=True, eq=False)
class _ScaleProblem:
    """What one ``train_scales`` run optimises: ``lam`` [neuron] (float32, scales 1 + lam of the
    neurons that ``groups`` places, see ``_layer_groups``) on the rows (image_ids, prompts,
    answers) of ``training_rows``, under ``settings``."""

    adapter: ModelAdapter
    images: ImageTable
    rows: tuple[list[str], list[str], list[str]]
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]]
    lam: nn.Parameter
    settings: SteeringSettings

    def inputs(self, picked: np.ndarray):
        """Model inputs (prompt + answer + eos) of the training rows at positions ``picked``."""
        image_ids, prompts, answers = self.rows
        return self.adapter.build_inputs(
            [self.images[image_ids[r]] for r in picked], [prompts[r] for r in picked], [answers[r] for r in picked]
        )

    def loss(self, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss, ce, kl) of one micro-batch, scalars: ce is the mean cross-entropy (nats) over
        the answer tokens with the neurons scaled, kl the mean over the same positions of
        KL(p_original || p_scaled) (None when beta = 0: no unscaled forward), and
        loss = ce + beta * kl + l2 * ||lam||^2."""
        beta, adapter = self.settings.beta, self.adapter
        if beta > 0:
            with torch.no_grad():
                logp_orig, _, _ = model_answer_logprobs(adapter, inputs)
        with scale_neurons(adapter, _scale_map(self.groups, 1.0 + self.lam)):
            logp, target, mask = model_answer_logprobs(adapter, inputs)
        n_tok = mask.sum().clamp(min=1)
        ce = -(token_logprobs(logp, target) * mask).sum() / n_tok
        loss = ce
        kl = None
        if beta > 0:
            kl_tok = (logp_orig.exp() * (logp_orig - logp)).sum(-1)
            kl = (kl_tok * mask).sum() / n_tok
            loss = loss + beta * kl
        loss = loss + self.settings.l2 * self.lam.pow(2).sum()
        return loss, ce, kl


def _cosine_adamw(lam: nn.Parameter, lr: float, total_steps: int):
    """(AdamW on ``lam`` without weight decay, its schedule): cosine decay from ``lr`` to 0 over
    ``total_steps`` optimiser steps, no warm-up."""
    opt = torch.optim.AdamW([lam], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )
    return opt, sched


def _train_epoch(problem: _ScaleProblem, opt: torch.optim.Optimizer, sched, order: np.ndarray, bar) -> dict[str, float]:
    """One pass over the training rows in ``order`` (a permutation of their positions).

    Micro-batches of ``train_batch_size`` rows; one optimiser and schedule step per
    ``grad_accum`` micro-batches (and one for the remainder), their losses averaged; lambda
    clamped after every step. Returns {"ce": sum, "kl": sum} over the micro-batches (nats).
    """
    s, lam = problem.settings, problem.lam
    micro = [order[i : i + s.train_batch_size] for i in range(0, len(order), s.train_batch_size)]
    sums = {"ce": 0.0, "kl": 0.0}
    for g in range(0, len(micro), s.grad_accum):
        group = micro[g : g + s.grad_accum]
        opt.zero_grad(set_to_none=True)
        for picked in group:
            loss, ce, kl = problem.loss(problem.inputs(picked))
            if kl is not None:
                sums["kl"] += kl.item()
            (loss / len(group)).backward()
            sums["ce"] += ce.item()
            bar.update(1)
        opt.step()
        sched.step()
        with torch.no_grad():
            lam.clamp_(-s.clamp, s.clamp)
        bar.set_postfix(ce=f"{ce.item():.3f}", lam=f"{lam.detach().abs().max().item():.4f}")
    return sums


def train_scales(
    adapter: ModelAdapter,
    items: pd.DataFrame,
    images: ImageTable,
    neurons: Sequence[Neuron],
    settings: SteeringSettings,
    *,
    progress: str | bool | None = None,
) -> np.ndarray:
    """Learned lambda [len(neurons)] (float64) of the scales (1 + lambda) of ``neurons``.

    The model is frozen (``requires_grad`` False on all its parameters and eval mode, both
    restored on exit, also on error); its weights are never modified. Lambda starts at 0 and
    is clamped to [-clamp, clamp] after every optimizer step. Loss per micro-batch of
    ``train_batch_size`` training rows (``training_rows``): mean cross-entropy over the answer
    tokens (answer + eos) + beta * mean over those positions of KL(p_original || p_scaled),
    p_original from a no-grad forward of the unscaled model on the same batch (skipped when
    beta = 0), + l2 * ||lambda||^2. AdamW (weight_decay 0: the L2 term is the only
    regulariser), cosine decay from ``lr`` to 0 over all optimizer steps, no warmup; ``epochs``
    passes over the rows, reshuffled each epoch with ``seed``; one optimizer step per
    ``grad_accum`` micro-batches (and one for the remainder at the end of an epoch), the
    micro-batch losses averaged. All of these come from ``settings``.
    """
    from tqdm import tqdm

    neurons = adapter.check_neurons(neurons, "steering", distinct=True)
    if not neurons:
        return np.zeros(0)
    s = settings
    if s.epochs < 1 or s.grad_accum < 1 or s.train_batch_size < 1:
        raise PipelineError(
            f"train_scales: epochs, grad_accum and train_batch_size must be >= 1, got "
            f"{s.epochs}, {s.grad_accum}, {s.train_batch_size}"
        )
    items = items.reset_index(drop=True)
    image_ids, prompts, answers = training_rows(items, s.seed)
    if not prompts:
        raise PipelineError("train_scales: no training items")
    n_rows = len(prompts)
    n_micro = math.ceil(n_rows / s.train_batch_size)
    steps_per_epoch = math.ceil(n_micro / s.grad_accum)
    lam = nn.Parameter(torch.zeros(len(neurons), dtype=torch.float32, device=adapter.device))
    problem = _ScaleProblem(adapter, images, (image_ids, prompts, answers), _layer_groups(neurons), lam, s)
    rng = np.random.default_rng(s.seed)
    opt, sched = _cosine_adamw(lam, s.lr, s.epochs * steps_per_epoch)

    with _frozen(adapter.model):
        bar = tqdm(
            total=s.epochs * n_micro,
            desc=progress or f"steer ({len(neurons)} neurons, beta={s.beta:g})",
            leave=False,
            **({"disable": True} if progress is False else {}),
        )
        for epoch in range(s.epochs):
            sums = _train_epoch(problem, opt, sched, rng.permutation(n_rows), bar)
            log.info(
                "steer epoch %d/%d: %d steps, mean ce %.4f, mean kl %.3g, |lambda| mean %.5f max %.5f",
                epoch + 1,
                s.epochs,
                steps_per_epoch,
                sums["ce"] / n_micro,
                sums["kl"] / n_micro,
                lam.detach().abs().mean().item(),
                lam.detach().abs().max().item(),
            )
        bar.close()
    return lam.detach().cpu().double().numpy()


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskSteering:
    """Everything ``steer_task`` learned and measured for one task.

    ``scales``: variant -> {(layer, neuron): scale} (``base``: empty); ``results``: variant ->
    TaskResult on the evaluation split (the settings' utility); ``likelihood``: the same variants
    under the likelihood utility (``pipeline.model.evaluation``), the one their intervals decide on;
    ``grid``: scale -> TaskResult on the training split
    (the grid search); ``grid_scale``: the uniform scale it picked.
    """

    task: str
    train_split: str
    eval_split: str
    neurons: list[Neuron]
    scales: dict[str, dict[Neuron, float]]
    results: dict[str, TaskResult]
    grid: dict[float, TaskResult] = field(default_factory=dict)
    grid_scale: float = 1.0
    likelihood: dict[str, TaskResult] = field(default_factory=dict)


def _pick_grid(results: Mapping[float, TaskResult]) -> float:
    """Highest utility; ties go to the scale closest to 1 (the smallest intervention), then the smaller."""
    return min(results, key=lambda s: (-results[s].utility, abs(s - 1.0), s))


@dataclass(frozen=True, eq=False)
class _TaskEvaluation:
    """``evaluate_task``'s fixed arguments while steering one task: each call evaluates a list
    of scale sets ({(layer, neuron): scale}) as conditions of the same batches."""

    adapter: ModelAdapter
    task: str
    images: ImageTable
    batch_size: int
    max_new_tokens: int
    utility: str

    def run(self, items: pd.DataFrame, conditions: list[dict[Neuron, float]], progress: str) -> list[TaskResult]:
        """One ``TaskResult`` per scale set, in order, on ``items``."""
        return evaluate_task(
            self.adapter,
            self.task,
            items,
            self.images,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            utility=self.utility,
            n_conditions=len(conditions),
            condition_hooks=condition_scales(self.adapter, conditions),
            condition_layers=[lowest_scaled_layer(c) for c in conditions],
            progress=progress,
        )

    def run_with_likelihood(
        self, items: pd.DataFrame, conditions: list[dict[Neuron, float]], progress: str
    ) -> tuple[list[TaskResult], list[TaskResult]]:
        """``run``'s results and the same scale sets under the likelihood utility (one pass for
        retrieval, whose two utilities share the candidates' margins)."""
        idx = range(len(conditions))
        out = evaluate_conditions(
            self.adapter,
            self.task,
            items,
            self.images,
            {self.utility: idx, "likelihood": idx},
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            condition_hooks=condition_scales(self.adapter, conditions),
            condition_layers=[lowest_scaled_layer(c) for c in conditions],
            progress=progress,
        )
        return [out[self.utility][c] for c in idx], [out["likelihood"][c] for c in idx]


def _learned_scales(
    adapter: ModelAdapter,
    items: pd.DataFrame,
    images: ImageTable,
    neurons: list[Neuron],
    settings: SteeringSettings,
    progress: str,
) -> dict[Neuron, float]:
    """{neuron: 1 + lambda} with lambda from ``train_scales`` on ``items``."""
    lam = train_scales(adapter, items, images, neurons, settings, progress=progress)
    return {nr: 1.0 + float(v) for nr, v in zip(neurons, lam)}


def _grid_search(
    evaluation: _TaskEvaluation, items: pd.DataFrame, neurons: list[Neuron], grid: Sequence[float]
) -> dict[float, TaskResult]:
    """{scale: TaskResult on ``items``} with every neuron of ``neurons`` at that one scale."""
    grid = [float(s) for s in grid]
    results = evaluation.run(items, [{nr: s for nr in neurons} for s in grid], f"steer {evaluation.task} grid")
    return dict(zip(grid, results))


def steer_task(
    adapter: ModelAdapter,
    task: str,
    train_items: pd.DataFrame,
    eval_items: pd.DataFrame,
    images: ImageTable,
    neurons: Sequence[Neuron],
    random_neurons: Sequence[Neuron] | None,
    settings: SteeringSettings,
    *,
    batch_size: int,
    max_new_tokens: int,
) -> TaskSteering:
    """Learned steering of ``task`` and its baselines (module docstring), evaluated on ``eval_items``.

    ``settings``: training (``train_scales``), the grid, the utility and the split names.
    ``random_neurons`` None or empty: no ``random_learned`` variant. The grid search evaluates
    every grid scale as a condition of the same batches on ``train_items``; the final
    evaluation runs all variants as conditions of the same batches on ``eval_items``
    (``batch_size`` rows per batch, ``max_new_tokens`` generated tokens).
    """
    neurons = adapter.check_neurons(neurons, "steering", distinct=True)
    if not neurons:
        raise PipelineError(f"steering {task!r}: the mask has no neurons")
    evaluation = _TaskEvaluation(adapter, task, images, batch_size, max_new_tokens, settings.utility)
    scales: dict[str, dict[Neuron, float]] = {"base": {}}
    scales["learned"] = _learned_scales(adapter, train_items, images, neurons, settings, f"steer {task} learned")
    scales["fixed_amp"] = {nr: FIXED_AMP_SCALE for nr in neurons}

    grid_results = _grid_search(evaluation, train_items, neurons, settings.grid)
    grid_scale = _pick_grid(grid_results)
    scales["grid_search"] = {nr: grid_scale for nr in neurons}
    log.info(
        "%s grid search on %s: %s -> %g",
        task,
        settings.train_split,
        ", ".join(f"{s:g}: {r.utility:.4f}" for s, r in grid_results.items()),
        grid_scale,
    )

    scales["no_kl"] = _learned_scales(
        adapter, train_items, images, neurons, replace(settings, beta=0.0), f"steer {task} no_kl"
    )
    if random_neurons:
        rnd = adapter.check_neurons(random_neurons, "steering (random neurons)", distinct=True)
        scales["random_learned"] = _learned_scales(
            adapter, train_items, images, rnd, settings, f"steer {task} random_learned"
        )
    else:
        log.warning("%s: no random-method neurons; the random_learned variant is skipped", task)

    variants = [v for v in VARIANTS if v in scales]
    chosen, likely = evaluation.run_with_likelihood(eval_items, [scales[v] for v in variants], f"steer {task} eval")
    results = dict(zip(variants, chosen))
    log.info("%s on %s: %s", task, settings.eval_split, ", ".join(f"{v} {r.utility:.4f}" for v, r in results.items()))
    return TaskSteering(
        task,
        settings.train_split,
        settings.eval_split,
        neurons,
        scales,
        results,
        grid_results,
        grid_scale,
        dict(zip(variants, likely)),
    )


@dataclass(frozen=True)
class SteeringJob:
    """The arguments of one ``steer_task`` call but the model and images: a job for
    ``pipeline.model.workers.map_jobs`` (``run_steering_job``)."""

    task: str
    train_items: pd.DataFrame
    eval_items: pd.DataFrame
    neurons: tuple[Neuron, ...]
    random_neurons: tuple[Neuron, ...] | None
    settings: SteeringSettings
    batch_size: int
    max_new_tokens: int

    def __str__(self) -> str:
        return f"steer {self.task}"

    @property
    def cost(self) -> float:
        """Sequences per pass over its items (train and eval), to hand out the heaviest job first."""
        per_item = likelihood_sequences_per_item(self.eval_items, self.task)
        return per_item * (len(self.train_items) + len(self.eval_items))


def run_steering_job(state: tuple, job: SteeringJob) -> TaskSteering:
    """``steer_task`` of ``job``; ``state`` is (adapter, images)."""
    adapter, images = state
    return steer_task(
        adapter,
        job.task,
        job.train_items,
        job.eval_items,
        images,
        job.neurons,
        job.random_neurons,
        job.settings,
        batch_size=job.batch_size,
        max_new_tokens=job.max_new_tokens,
    )


def steering_table(runs: Sequence[TaskSteering]) -> pd.DataFrame:
    """Long table (task, variant, split, utility, metric): every variant on the evaluation split,
    plus the grid-search candidates on the training split as variants ``grid@<scale>``."""
    rows = []
    for run in runs:
        for variant, r in run.results.items():
            rows.append((run.task, variant, run.eval_split, float(r.utility), r.metric))
        for s, r in run.grid.items():
            rows.append((run.task, f"grid@{s:g}", run.train_split, float(r.utility), r.metric))
    return pd.DataFrame(rows, columns=list(STEERING_COLUMNS))


def steering_summary(table: pd.DataFrame, digits: int = 6) -> dict:
    """{task: {variant: utility}} on the evaluation split, plus {"mean": {variant: mean over tasks}}
    (only variants present for every task are averaged)."""
    ev = table[~table["variant"].str.startswith("grid@")]
    out: dict = {}
    for task, g in ev.groupby("task", sort=False):
        out[task] = {v: round(float(u), digits) for v, u in zip(g["variant"], g["utility"])}
    variants = list(dict.fromkeys(ev["variant"]))
    out["mean"] = {
        v: round(float(np.mean([out[t][v] for t in out if t != "mean"])), digits)
        for v in variants
        if all(v in out[t] for t in out if t != "mean")
    }
    return out


def scales_table(runs: Sequence[TaskSteering], variant: str = "learned") -> pd.DataFrame:
    """Parquet-ready (task, layer, neuron, scale) of one variant (default the learned scales,
    scale = 1 + lambda); layer/neuron int32, scale float64."""
    rows = [(run.task, l, n, s) for run in runs for (l, n), s in run.scales.get(variant, {}).items()]
    df = pd.DataFrame(rows, columns=list(SCALES_COLUMNS))
    return df.astype({"task": str, "layer": np.int32, "neuron": np.int32, "scale": np.float64})


# ---------------------------------------------------------------------------------------------
def load_scales(path: str | Path) -> pd.DataFrame:
    """The scales Parquet written by the steer stage, validated: columns task, layer, neuron, scale."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"steering scales not found: {path}")
    df = pd.read_parquet(path)
    missing = [c for c in SCALES_COLUMNS if c not in df.columns]
    if missing:
        raise PipelineError(f"{path}: not a steering scales table (missing columns {missing})")
    dup = df.duplicated(["task", "layer", "neuron"])
    if dup.any():
        raise PipelineError(f"{path}: repeated (task, layer, neuron) rows, e.g. {df[dup].iloc[0].to_dict()}")
    return df


@contextmanager
def apply_steering(
    adapter_or_model: ModelAdapter | nn.Module, scales: pd.DataFrame | str | Path, task: str
) -> Iterator[None]:
    """Scale the FFN neurons of ``task`` by their learned scales, inside a ``with`` block.

    ``adapter_or_model``: a ``ModelAdapter`` or any copy of the model itself (a Hugging Face
    VLM/LM; its decoder layers are found as ``ModelAdapter`` does). ``scales``: the steer
    stage's ``scales.parquet`` (a path) or that table. Wraps ``hooks.scale_neurons``: every
    row and position, full forwards and ``generate``; the hooks are removed on exit.

        with apply_steering(model, "data/steer/tiny-llava/scales.parquet", "vqa"):
            logits = model(**inputs).logits
    """
    adapter = (
        adapter_or_model if isinstance(adapter_or_model, ModelAdapter) else ModelAdapter.from_model(adapter_or_model)
    )
    table = scales if isinstance(scales, pd.DataFrame) else load_scales(scales)
    sel = table[table["task"] == task]
    if sel.empty:
        raise PipelineError(f"no steering scales for task {task!r}; tasks present: {sorted(set(table['task']))}")
    spec = {
        int(layer): (torch.tensor(g["neuron"].to_numpy(np.int64)), torch.tensor(g["scale"].to_numpy(np.float32)))
        for layer, g in sel.groupby("layer", sort=True)
    }
    with scale_neurons(adapter, spec):
        yield


def steering_statistics(
    runs: Sequence[TaskSteering], utility: str, *, n_resamples: int, seed: int, confidence: float = 0.95
) -> SteeringRecord:
    """Paired-bootstrap intervals of the steering results (the record a ``steering_intervals.json``
    holds), per utility.

    For ``utility`` (the settings' utility, of ``TaskSteering.results``) and the likelihood: ``utility`` {task | "mean": {variant: interval}}
    (``mean``: the mean over tasks, each task resampled over its own items), and ``differences``
    {"learned-minus-<v>": {task | "mean": interval + verdict}}. ``scale_movement`` {task: mean and
    max |scale - 1| of the learned scales}: how far training moved them from the identity.
    """
    out: dict = {"confidence": confidence, "resamples": n_resamples}
    for name in dict.fromkeys((utility, "likelihood")):
        per_task: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
        for run in runs:
            results = run.results if name == utility else run.likelihood
            if not results:
                continue
            variants = list(results)
            values, kind = result_values([results[v] for v in variants])
            counts = bootstrap_counts(values.shape[1], n_resamples, task_seed(seed, run.task))
            point, reps = utility_replicates(values, counts, kind)
            per_task[run.task] = {v: (float(point[k]), reps[k]) for k, v in enumerate(variants)}
        if not per_task:
            continue
        shared = [v for v in VARIANTS if all(v in d for d in per_task.values())]
        per_task["mean"] = {
            v: (float(np.mean([d[v][0] for d in per_task.values()])), mean_over([d[v][1] for d in per_task.values()]))
            for v in shared
        }
        util = {t: {v: interval(p, r, confidence).as_dict(6) for v, (p, r) in d.items()} for t, d in per_task.items()}
        diffs = {}
        for other in [v for v in shared if v != "learned"]:
            entry = {}
            for t, d in per_task.items():
                if "learned" in d and other in d:
                    iv = interval(d["learned"][0] - d[other][0], d["learned"][1] - d[other][1], confidence)
                    entry[t] = {**iv.as_dict(6), "verdict": verdict(iv)}
            diffs[f"learned-minus-{other}"] = entry
        out[name] = {"utility": util, "differences": diffs}
    out["scale_movement"] = {
        run.task: {
            "mean_abs_change": float(np.mean([abs(s - 1.0) for s in run.scales["learned"].values()])),
            "max_abs_change": float(np.max([abs(s - 1.0) for s in run.scales["learned"].values()])),
        }
        for run in runs
        if run.scales.get("learned")
    }
    return as_record(SteeringRecord, out, "steering statistics")
