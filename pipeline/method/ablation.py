"""Ground-truth neuron importance: the exact effect of zeroing each FFN neuron alone.

effect[l, i] = U(base) - U(neuron (l, i) zeroed at every position), with U the teacher-forced
utility (mean answer log-probability, nats) over a discovery subset; positive = the neuron
helps the task. Each batch row zeroes its own neuron (``hooks.ablate_neurons_per_row``), so
one forward pass ablates ``batch_size`` neurons; a batch holds one item, whose vision tower and
layers below the batch's lowest ablated layer are computed once (``hooks.forward_sharing_prefix``). Cost: L * I * n_items rows, so it is meant
for models small enough (the embedded default: 2,048 neurons).

- ``neuron_ablation_effects``: effect [layer, neuron] in nats, and its standard error over the
  items (sample standard deviation of the per-item effects / sqrt(n_items)).
- ``ablation_shard_job`` / ``merge_ablation_shards``: the same over shards of the layers
  (jobs of ``pipeline.model.workers.map_jobs``), merged; ``ablation_task_shard_job``: shards of
  several tasks (each its own items and sampled neurons) in one pool, which
  ``ablation_effects_per_task`` runs and merges per task. Prompts and answers are
  ``pipeline.tasks.items.item_prompts`` / ``teacher_forced_answers``, scored by
  ``pipeline.model.evaluation.answer_logprob``: the same utility as the teacher-forced heads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
import torch

from pipeline.model.adapter import ModelInputs
from pipeline.model.batching import for_each_batch
from pipeline.model.evaluation import answer_logprob
from pipeline.model.hooks import ablate_neurons_per_row, forward_sharing_prefix, lowest_layer
from pipeline.model.scoring import answer_logprobs, mean_answer_logprob
from pipeline.model.workers import map_jobs
from pipeline.tasks.items import ImageTable, item_prompts, teacher_forced_answers

log = logging.getLogger(__name__)


@torch.no_grad()
def neuron_ablation_effects(
    adapter,
    items: pd.DataFrame,
    images: ImageTable,
    *,
    batch_size: int,
    layers: list[int] | None = None,
    neurons: list[tuple[int, int]] | None = None,
    share_prefix: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(effect, se), both [layer, neuron] in nats: the mean over items of base utility minus
    utility with that neuron zeroed, and its standard error (NaN with a single item).

    ``layers``: the layers to ablate (default all); ``neurons``: instead, the (layer, neuron)
    pairs to ablate (a sampled ground truth: ``pipeline.outcomes.sampled_faithfulness``). The
    entries not ablated are NaN. ``share_prefix`` False: every row computes the whole model
    (benchmarks).
    """
    from tqdm import tqdm

    items = items.reset_index(drop=True)
    prompts = item_prompts(items)
    answers = teacher_forced_answers(items)
    imgs = [images[i] for i in items["image_id"]]
    L, I = adapter.num_layers, adapter.ffn_width
    if neurons is not None:
        if layers is not None:
            raise ValueError("neuron_ablation_effects: give layers or neurons, not both")
        # Layer-major, so that a batch's shared prefix reaches as high as its rows allow.
        neurons = sorted(adapter.check_neurons(neurons, "neuron_ablation_effects", distinct=True))
    else:
        layers = list(range(L)) if layers is None else adapter.check_layers(layers, "neuron_ablation_effects")
        neurons = [(l, i) for l in layers for i in range(I)]
    base = np.array([answer_logprob(adapter, [imgs[k]], [prompts[k]], [answers[k]])[0] for k in range(len(items))])
    effect, se = np.full((L, I), np.nan), np.full((L, I), np.nan)
    total, total_sq = np.zeros(len(neurons)), np.zeros(len(neurons))
    # Neuron-major rows within an item: one item's inputs are built once per batch size and
    # repeated (the processor's image work is a third of a tiny model's forward).
    for k in tqdm(range(len(items)), desc="ablation items", leave=False):
        unique = adapter.build_inputs([imgs[k]], [prompts[k]], answers=[answers[k]])
        built: dict[int, ModelInputs] = {}

        def run(sl: slice, k: int = k, unique: ModelInputs = unique, built: dict = built) -> None:
            n = sl.stop - sl.start
            if n not in built:
                built[n] = adapter.build_inputs([imgs[k]] * n, [prompts[k]] * n, answers=[answers[k]] * n)
            inputs = built[n]
            hooks = lambda: ablate_neurons_per_row(adapter, neurons[sl])  # noqa: E731
            if share_prefix:
                # One item per batch: its tower and the layers below the batch's lowest neuron run once.
                logits = forward_sharing_prefix(
                    adapter,
                    unique.tensors,
                    inputs.tensors,
                    torch.zeros(n, dtype=torch.long),
                    lowest_layer(neurons[sl]),
                    hooks,
                ).logits
            else:
                with hooks():
                    logits = adapter.model(**inputs.tensors).logits
            lp = mean_answer_logprob(*answer_logprobs(logits, inputs.input_ids, inputs.answer_mask)).cpu().numpy()
            d = base[k] - lp
            total[sl] += d
            total_sq[sl] += d * d

        for_each_batch(len(neurons), batch_size, run, what=f"ablation item {k}", progress=False)
    n = len(items)
    mean = total / n
    var = (total_sq - n * mean**2) / (n - 1) if n > 1 else np.full_like(mean, np.nan)
    for (l, i), v, s in zip(neurons, mean, np.sqrt(np.maximum(var, 0.0) / n)):
        effect[l, i], se[l, i] = v, s
    return effect, se


def ablation_shard_job(
    state: tuple,
    shard: tuple[int, int],
    *,
    items: pd.DataFrame,
    batch_size: int,
    neurons: list[tuple[int, int]] | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(layers, effect, se) of ``neuron_ablation_effects`` on the layers s, s + n, s + 2n, ...
    of ``shard`` = (s, n) (none when s >= the model's layers; other rows NaN): every neuron of
    those layers, or only the (layer, neuron) pairs of ``neurons`` in them (a sampled ground
    truth; the others NaN). ``state`` is (adapter, images). Shards are independent: each
    computes the items' base utility itself."""
    adapter, images = state
    start, step = shard
    layers = list(range(start, adapter.num_layers, step))
    in_shard = set(layers)
    mine = None if neurons is None else [(l, i) for l, i in neurons if l in in_shard]
    if not layers or mine == []:
        empty = np.full((adapter.num_layers, adapter.ffn_width), np.nan)
        return layers, empty, empty.copy()
    if mine is not None:
        return (layers, *neuron_ablation_effects(adapter, items, images, batch_size=batch_size, neurons=mine))
    return (layers, *neuron_ablation_effects(adapter, items, images, batch_size=batch_size, layers=layers))


def ablation_task_shard_job(
    state: tuple,
    job: tuple[str, tuple[int, int]],
    *,
    items: dict[str, pd.DataFrame],
    neurons: dict[str, list[tuple[int, int]]] | None,
    batch_size: int,
) -> tuple[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """(task, ``ablation_shard_job``'s result) of ``job`` = (task, shard), on that task's
    ``items`` and ``neurons`` (None: every neuron): the shards of several tasks in one pool of
    workers."""
    task, shard = job
    mine = None if neurons is None else neurons[task]
    return task, ablation_shard_job(state, shard, items=items[task], batch_size=batch_size, neurons=mine)


def merge_ablation_shards(parts: list[tuple[list[int], np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One (effect, se) from ``ablation_shard_job``'s results, each layer from the shard that has it."""
    effect, se = np.full_like(parts[0][1], np.nan), np.full_like(parts[0][2], np.nan)
    for layers, e, s in parts:
        effect[layers], se[layers] = e[layers], s[layers]
    return effect, se


def ablation_effects_per_task(
    items: dict[str, pd.DataFrame],
    neurons: dict[str, list[tuple[int, int]]] | None,
    *,
    load: Callable[[], tuple],
    batch_size: int,
    workers: int,
    threads: int,
    what: str = "ablation",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{task: (effect, se)} [layer, neuron], nats, of zeroing each neuron of ``neurons[task]``
    (None: every neuron) alone on ``items[task]``; unablated neurons NaN.

    Every task's layer shards run in one pool of ``workers`` processes (``load``: the picklable
    (adapter, images) loader each runs once). Shard k of n holds layers k, k + n, ...; a layer's
    rows compute every layer from it up, so the lowest shards are the heaviest and go first. One
    worker: one shard of every layer per task."""
    n = 1 if workers == 1 else 2 * workers
    parts = map_jobs(
        partial(ablation_task_shard_job, items=items, neurons=neurons, batch_size=batch_size),
        [(task, (s, n)) for s in range(n) for task in items],
        load,
        workers=workers,
        threads=threads,
        describe=lambda job: f"{job[0]} layers {job[1][0]}::{job[1][1]}",
        what=what,
    )
    return {task: merge_ablation_shards([part for t, part in parts if t == task]) for task in items}
