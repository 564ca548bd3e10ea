"""Task steering with learned per-neuron scales (HONES.md section 6).

The model is frozen; each neuron of a task's steering mask gets a learnable scale
(1 + lambda_i), lambda initialised at 0 and clamped to [-clamp, clamp], trained on the dev
split with answer-token cross-entropy + beta * KL(p_original || p_scaled) on the answer
positions + l2 * ||lambda||^2 (AdamW, cosine schedule, gradient accumulation).

Map of this module:
- ``train_scales``: the learned lambdas of one task's neurons (the model is left unchanged).
- ``steer_task``: one task end to end: learned scales and the baselines over the SAME
  neurons (``fixed_amp``: every scale 2.0; ``grid_search``: one uniform scale from the grid
  picked by the task's utility on dev; ``no_kl``: learned with beta = 0), learned scales on
  the ``random`` method's neurons of the task (``random_learned``, same per-layer budget) and
  ``base`` (no intervention), all evaluated on the test split.
- ``hooks.condition_scales``: per-row scale hooks, so all variants of a task run as conditions of
  the same evaluation batches (each test example is repeated once per variant inside a batch;
  one pass over the test items per task, not one per variant).
- ``steering_table`` / ``steering_summary`` / ``scales_table``: the long results table, its
  {task: {variant: utility}} JSON and the Parquet of learned scales (task, layer, neuron, scale).
- ``apply_steering`` / ``load_scales``: the public one-call loader of the learned scales::

      from pipeline.outcomes.steering import apply_steering
      with apply_steering(model, "data/steer/tiny-llava/scales.parquet", task="vqa"):
          out = model.generate(**inputs)   # the vqa neurons scaled by (1 + lambda)
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.model.adapter import ModelAdapter
from pipeline.tasks.benchmark import ImageTable
from pipeline.errors import PipelineError
from pipeline.model.evaluation import TaskResult, evaluate_task
from pipeline.model.hooks import condition_scales, scale_neurons

log = logging.getLogger(__name__)

__all__ = [
    "VARIANTS",
    "FIXED_AMP_SCALE",
    "STEERING_COLUMNS",
    "SCALES_COLUMNS",
    "training_rows",
    "answer_logprobs",
    "train_scales",
    "TaskSteering",
    "steer_task",
    "steering_table",
    "steering_summary",
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
def training_rows(items: pd.DataFrame, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(image_ids, prompts, answers) of the training examples of ``items``.

    vqa / ocr / caption: the prompt and its first reference. retrieval: two rows per item, the
    positive candidate answered "Yes" and one negative candidate (drawn with ``seed``,
    uniformly among the item's non-positive candidates) answered "No".
    """
    rng = np.random.default_rng(seed)
    image_ids, prompts, answers = [], [], []
    for rec in items.itertuples():
        if rec.task == "retrieval":
            cands = list(rec.candidates)
            pos = int(rec.positive_index)
            negatives = [k for k in range(len(cands)) if k != pos]
            if not negatives:
                raise PipelineError(f"retrieval item {rec.item_id!r} has no negative candidate to train on")
            neg = negatives[int(rng.integers(len(negatives)))]
            for k, ans in ((pos, "Yes"), (neg, "No")):
                image_ids.append(rec.image_id)
                prompts.append(rec.prompt.format(candidate=cands[k]))
                answers.append(ans)
        else:
            if len(rec.references) == 0:
                raise PipelineError(f"item {rec.item_id!r} ({rec.task}) has no reference to train on")
            image_ids.append(rec.image_id)
            prompts.append(rec.prompt)
            answers.append(str(rec.references[0]))
    return image_ids, prompts, answers


def _validate_neurons(adapter: ModelAdapter, neurons: Sequence[Neuron]) -> list[Neuron]:
    out = [(int(l), int(n)) for l, n in neurons]
    if len(set(out)) != len(out):
        raise ValueError("train_scales: repeated (layer, neuron) pairs")
    for l, n in out:
        if not 0 <= l < adapter.num_layers or not 0 <= n < adapter.ffn_width:
            raise ValueError(f"neuron ({l}, {n}) out of range: {adapter.num_layers} layers x {adapter.ffn_width}")
    return out


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


_KEEP_CACHE: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    cls = type(model)
    if cls not in _KEEP_CACHE:
        try:
            _KEEP_CACHE[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _KEEP_CACHE[cls] = False
    return _KEEP_CACHE[cls]


def _answer_logits(adapter: ModelAdapter, tensors: dict, keep: int) -> torch.Tensor:
    """float32 logits [B, keep-1, V] of the last ``keep`` positions but the final one.

    Rows are left-padded with the answer at the end, so the answer tokens of every row lie in
    the last ``keep - 1`` positions and are predicted from the ``keep - 1`` positions before them.
    """
    kwargs = dict(tensors)
    if _accepts_logits_to_keep(adapter.model):
        kwargs["logits_to_keep"] = keep
    logits = adapter.model(**kwargs).logits
    return logits[:, -keep:-1].float()


def answer_logprobs(adapter: ModelAdapter, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities over the vocabulary at the answer positions of ``inputs`` (with answers).

    Returns (logp float32 [B, K, V], target ids [B, K], mask float [B, K]): position k predicts
    token target[:, k]; mask is 1 where that token is an answer token (answer + eos). K is the
    longest answer of the batch (rows are left-padded, so every answer ends at the last position).
    """
    keep = int(inputs.answer_mask.sum(1).max()) + 1
    logp = torch.log_softmax(_answer_logits(adapter, inputs.tensors, keep), dim=-1)
    return logp, inputs.input_ids[:, -keep + 1 :], inputs.answer_mask[:, -keep + 1 :].float()


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


def train_scales(
    adapter: ModelAdapter,
    items: pd.DataFrame,
    images: ImageTable,
    neurons: Sequence[Neuron],
    *,
    beta: float,
    l2: float,
    lr: float = 5e-4,
    epochs: int = 2,
    grad_accum: int = 4,
    batch_size: int,
    clamp: float = 1.5,
    seed: int,
    progress: str | bool | None = None,
) -> np.ndarray:
    """Learned lambda [len(neurons)] (float64) of the scales (1 + lambda) of ``neurons``.

    The model is frozen (``requires_grad`` False on all its parameters and eval mode, both
    restored on exit, also on error); its weights are never modified. Lambda starts at 0 and
    is clamped to [-clamp, clamp] after every optimizer step. Loss per micro-batch of
    ``batch_size`` training rows (``training_rows``): mean cross-entropy over the answer tokens
    (answer + eos) + beta * mean over those positions of KL(p_original || p_scaled), p_original
    from a no-grad forward of the unscaled model on the same batch (skipped when beta = 0),
    + l2 * ||lambda||^2. AdamW (weight_decay 0: the L2 term is the only regulariser), cosine
    decay from ``lr`` to 0 over all optimizer steps, no warmup; ``epochs`` passes over the rows,
    reshuffled each epoch with ``seed``; one optimizer step per ``grad_accum`` micro-batches
    (and one for the remainder at the end of an epoch), the micro-batch losses averaged.
    """
    from tqdm import tqdm

    neurons = _validate_neurons(adapter, neurons)
    if not neurons:
        return np.zeros(0)
    if epochs < 1 or grad_accum < 1 or batch_size < 1:
        raise ValueError("train_scales: epochs, grad_accum and batch_size must be >= 1")
    items = items.reset_index(drop=True)
    image_ids, prompts, answers = training_rows(items, seed)
    if not prompts:
        raise ValueError("train_scales: no training items")
    n_rows = len(prompts)
    n_micro = math.ceil(n_rows / batch_size)
    steps_per_epoch = math.ceil(n_micro / grad_accum)
    total_steps = epochs * steps_per_epoch
    groups = _layer_groups(neurons)
    rng = np.random.default_rng(seed)

    device = adapter.device
    lam = nn.Parameter(torch.zeros(len(neurons), dtype=torch.float32, device=device))
    opt = torch.optim.AdamW([lam], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )

    with _frozen(adapter.model):
        bar = tqdm(total=epochs * n_micro, desc=progress or f"steer ({len(neurons)} neurons, beta={beta:g})",
                   leave=False, disable=progress is False)
        for epoch in range(epochs):
            order = rng.permutation(n_rows)
            micro = [order[s : s + batch_size] for s in range(0, n_rows, batch_size)]
            sums = {"ce": 0.0, "kl": 0.0}
            for g in range(0, len(micro), grad_accum):
                group = micro[g : g + grad_accum]
                opt.zero_grad(set_to_none=True)
                for rows in group:
                    inputs = adapter.build_inputs([images[image_ids[r]] for r in rows], [prompts[r] for r in rows],
                                                  [answers[r] for r in rows])
                    if beta > 0:
                        with torch.no_grad():
                            logp_orig, _, _ = answer_logprobs(adapter, inputs)
                    with scale_neurons(adapter, _scale_map(groups, 1.0 + lam)):
                        logp, target, mask = answer_logprobs(adapter, inputs)
                    n_tok = mask.sum().clamp(min=1)
                    ce = -(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum() / n_tok
                    loss = ce
                    if beta > 0:
                        kl_tok = (logp_orig.exp() * (logp_orig - logp)).sum(-1)
                        kl = (kl_tok * mask).sum() / n_tok
                        loss = loss + beta * kl
                        sums["kl"] += kl.item()
                    loss = loss + l2 * lam.pow(2).sum()
                    (loss / len(group)).backward()
                    sums["ce"] += ce.item()
                    bar.update(1)
                opt.step()
                sched.step()
                with torch.no_grad():
                    lam.clamp_(-clamp, clamp)
                bar.set_postfix(ce=f"{ce.item():.3f}", lam=f"{lam.detach().abs().max().item():.4f}")
            log.info("steer epoch %d/%d: %d steps, mean ce %.4f, mean kl %.3g, |lambda| mean %.5f max %.5f",
                     epoch + 1, epochs, steps_per_epoch, sums["ce"] / len(micro), sums["kl"] / len(micro),
                     lam.detach().abs().mean().item(), lam.detach().abs().max().item())
        bar.close()
    return lam.detach().cpu().double().numpy()


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskSteering:
    """Everything ``steer_task`` learned and measured for one task.

    ``scales``: variant -> {(layer, neuron): scale} (``base``: empty); ``results``: variant ->
    TaskResult on the evaluation split; ``grid``: scale -> TaskResult on the training split
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


def _pick_grid(results: Mapping[float, TaskResult]) -> float:
    """Highest utility; ties go to the scale closest to 1 (the smallest intervention), then the smaller."""
    return min(results, key=lambda s: (-results[s].utility, abs(s - 1.0), s))


def steer_task(
    adapter: ModelAdapter,
    task: str,
    train_items: pd.DataFrame,
    eval_items: pd.DataFrame,
    images: ImageTable,
    neurons: Sequence[Neuron],
    random_neurons: Sequence[Neuron] | None,
    cfg,
    *,
    batch_size: int,
    train_batch_size: int,
    max_new_tokens: int,
) -> TaskSteering:
    """Learned steering of ``task`` and its baselines (module docstring), evaluated on ``eval_items``.

    ``cfg``: a ``stages.params.SteerConfig`` (beta, l2, lr, epochs, grad_accum, clamp, seed,
    grid, utility, train_split, eval_split). ``random_neurons`` None or empty: no
    ``random_learned`` variant. The grid search evaluates every grid scale as a condition of
    the same batches on ``train_items``; the final evaluation runs all variants as conditions of
    the same batches on ``eval_items``.
    """
    neurons = _validate_neurons(adapter, neurons)
    if not neurons:
        raise PipelineError(f"steering {task!r}: the mask has no neurons")
    common = dict(lr=cfg.lr, epochs=cfg.epochs, grad_accum=cfg.grad_accum, batch_size=train_batch_size,
                  clamp=cfg.clamp, seed=cfg.seed)
    scales: dict[str, dict[Neuron, float]] = {"base": {}}

    lam = train_scales(adapter, train_items, images, neurons, beta=cfg.beta, l2=cfg.l2,
                       progress=f"steer {task} learned", **common)
    scales["learned"] = {nr: 1.0 + float(v) for nr, v in zip(neurons, lam)}
    scales["fixed_amp"] = {nr: FIXED_AMP_SCALE for nr in neurons}

    grid = [float(s) for s in cfg.grid]
    dev = evaluate_task(adapter, task, train_items, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        utility=cfg.utility, n_conditions=len(grid),
                        condition_hooks=condition_scales(adapter, [{nr: s for nr in neurons} for s in grid]),
                        progress=f"steer {task} grid")
    grid_results = dict(zip(grid, dev))
    grid_scale = _pick_grid(grid_results)
    scales["grid_search"] = {nr: grid_scale for nr in neurons}
    log.info("%s grid search on %s: %s -> %g", task, cfg.train_split,
             ", ".join(f"{s:g}: {r.utility:.4f}" for s, r in grid_results.items()), grid_scale)

    lam0 = train_scales(adapter, train_items, images, neurons, beta=0.0, l2=cfg.l2,
                        progress=f"steer {task} no_kl", **common)
    scales["no_kl"] = {nr: 1.0 + float(v) for nr, v in zip(neurons, lam0)}

    if random_neurons:
        rnd = _validate_neurons(adapter, random_neurons)
        lam_r = train_scales(adapter, train_items, images, rnd, beta=cfg.beta, l2=cfg.l2,
                             progress=f"steer {task} random_learned", **common)
        scales["random_learned"] = {nr: 1.0 + float(v) for nr, v in zip(rnd, lam_r)}
    else:
        log.warning("%s: no random-method neurons; the random_learned variant is skipped", task)

    variants = [v for v in VARIANTS if v in scales]
    res = evaluate_task(adapter, task, eval_items, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        utility=cfg.utility, n_conditions=len(variants),
                        condition_hooks=condition_scales(adapter, [scales[v] for v in variants]),
                        progress=f"steer {task} eval")
    results = dict(zip(variants, res))
    log.info("%s on %s: %s", task, cfg.eval_split, ", ".join(f"{v} {r.utility:.4f}" for v, r in results.items()))
    return TaskSteering(task, cfg.train_split, cfg.eval_split, neurons, scales, results, grid_results, grid_scale)


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
    adapter = (adapter_or_model if isinstance(adapter_or_model, ModelAdapter)
               else ModelAdapter.from_model(adapter_or_model))
    table = scales if isinstance(scales, pd.DataFrame) else load_scales(scales)
    sel = table[table["task"] == task]
    if sel.empty:
        raise PipelineError(f"no steering scales for task {task!r}; tasks present: {sorted(set(table['task']))}")
    spec = {
        int(layer): (torch.tensor(g["neuron"].to_numpy(np.int64)),
                     torch.tensor(g["scale"].to_numpy(np.float32)))
        for layer, g in sel.groupby("layer", sort=True)
    }
    with scale_neurons(adapter, spec):
        yield
