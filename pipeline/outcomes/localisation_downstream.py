"""What a cheaper head localisation changes downstream: the HONES mask and its on-target drop.

Guided and screened localisation (``pipeline.method.heads``) are measured against the exhaustive
sweep by the heads they keep (``pipeline.outcomes.head_stability``). Where they keep other heads,
HONES weighs other head conditions, so its mask and everything after it change. This module
measures that on a model whose sweep was exhaustive, one task at a time:

- ``alternative_heads``: the top K_h heads each localisation would keep, from the exhaustive
  sweep's own scores and per-item values (no model run);
- ``hones_mask_under``: the task's activations dumped again under given heads (the dump's own
  code and settings, into a scratch folder) and the HONES mask at ``rho`` ranked from them as the
  attribute and masks stages rank it;
- ``localisation_downstream``: per localisation, the mask's Jaccard with the exhaustive HONES mask
  and both masks' on-target relative drop of the likelihood on held-out items (paired bootstrap:
  the same resampled items for both), with their difference. Where the heads are the same, so is
  every result after them, and nothing runs.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.method.attribution import hones_importance, task_statistics
from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations
from pipeline.method.heads import top_heads
from pipeline.method.masks import mask_topk
from pipeline.outcomes.head_stability import guided_localisation, head_labels, screened_localisation
from pipeline.outcomes.statistics import interval
from pipeline.outcomes.suppression import MaskCondition, relative_drops, score_suppression
from pipeline.tasks.items import ImageTable

log = logging.getLogger(__name__)

LOCALISATIONS = ("guided", "screened")


@dataclass(frozen=True)
class DumpSettings:
    """The dump stage's settings a re-dump must share: ``caption_idf``, ``caption_target``, the
    store ``dtype``, ``target_chunk_bytes``, rows per forward pass and items per gradient pass."""

    caption_idf: bool
    caption_target: str
    dtype: str
    target_chunk_bytes: int
    batch_size: int
    gradient_batch_size: int


def alternative_heads(
    scores: pd.DataFrame,
    values: np.ndarray,
    kind: str,
    k: int,
    *,
    guided_candidates: int,
    screen: tuple[int, int],
) -> dict[str, pd.DataFrame]:
    """{"exhaustive", "guided", "screened": the top ``k`` heads (layer, head, score: the exact
    score over every item) that localisation keeps}, from an exhaustive heads table (with the
    ``estimate`` column) and its per-item ``values`` / ``kind``; ``screen`` = (items,
    candidates). A screen of every item is the sweep itself."""
    exhaustive = top_heads(scores, k, name="heads.top_k")
    guided = guided_localisation(scores, k, guided_candidates)["guided_top_heads"]
    items, candidates = screen
    measured = screened_localisation(scores, values, kind, k, candidates, (items,))
    screened = measured[str(items)]["screened_top_heads"] if str(items) in measured else head_labels(exhaustive)
    labels = head_labels(scores)
    kept = {"exhaustive": head_labels(exhaustive), "guided": guided, "screened": screened}
    return {
        name: top_heads(scores[[label in chosen for label in labels]], k, name="heads.top_k")
        for name, chosen in kept.items()
    }


def hones_mask_under(
    adapter,
    items: pd.DataFrame,
    images: ImageTable,
    heads: pd.DataFrame,
    settings: DumpSettings,
    rho: float,
    scratch: Path,
) -> tuple[tuple[int, int], ...]:
    """The (layer, neuron) pairs of the HONES mask at ``rho`` of ``items`` dumped under ``heads``
    (layer, head, score) into ``scratch`` (removed after), sorted."""
    scratch = Path(scratch)
    try:
        store = dump_activations(
            adapter,
            DumpRequest(items, images, heads, settings.caption_idf, settings.caption_target),
            scratch / "store.zarr",
            DumpStorage(settings.dtype, "localisation-downstream", {}, settings.target_chunk_bytes),
            DumpExecution(settings.batch_size, settings.gradient_batch_size),
        )
        stats = task_statistics(store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # float32, as the attribute stage stores the importance the masks stage ranks.
    importance = hones_importance(stats.mean_contribution, stats.head_scores).astype(np.float32)
    mask = mask_topk(importance, rho)
    return tuple(sorted((int(l), int(i)) for l, i in zip(mask["layer"], mask["neuron"])))


def localisation_downstream(
    adapter,
    task: str,
    heads: dict[str, pd.DataFrame],
    exhaustive_mask: tuple[tuple[int, int], ...],
    *,
    discovery: pd.DataFrame,
    held_out: pd.DataFrame,
    images: ImageTable,
    settings: DumpSettings,
    rho: float,
    n_resamples: int,
    seed: int,
    confidence: float,
    scratch: Path,
) -> dict[str, dict]:
    """Per localisation of ``heads`` (``alternative_heads``) but the exhaustive one: JSON-ready
    {"top_heads", "same_heads", "mask_jaccard"} and, where the heads differ, the HONES mask
    recomputed under them (``hones_mask_under`` on the ``discovery`` items, the dump's) and
    "on_target_drop", "exhaustive_on_target_drop" and "difference" (percent, relative drop of the
    likelihood on the ``held_out`` items of ``task``, paired bootstrap intervals at
    ``confidence``). ``exhaustive_mask``: the HONES mask the masks stage made from the exhaustive
    heads."""
    if "exhaustive" not in heads:
        raise PipelineError(f"{task}: localisation_downstream needs the exhaustive heads")
    if not exhaustive_mask:
        raise PipelineError(f"{task}: no HONES headline mask to compare with (masks stage, method hones)")
    exhaustive_labels = set(head_labels(heads["exhaustive"]))
    masks, out = {}, {}
    for name in [n for n in heads if n != "exhaustive"]:
        same = set(head_labels(heads[name])) == exhaustive_labels
        if not same:
            log.info("%s: %s localisation keeps %s; dumping again", task, name, " ".join(head_labels(heads[name])))
            masks[name] = hones_mask_under(adapter, discovery, images, heads[name], settings, rho, scratch / name)
        a, b = set(exhaustive_mask), set(masks.get(name, exhaustive_mask))
        out[name] = {
            "top_heads": head_labels(heads[name]),
            "same_heads": same,
            "mask_jaccard": len(a & b) / len(a | b),
        }
    if masks:
        names = ["exhaustive", *masks]
        conditions = [
            MaskCondition("hones", task, rho, 0, True, {"exhaustive": exhaustive_mask, **masks}[n]) for n in names
        ]
        scored = score_suppression(
            held_out,
            conditions,
            lambda: (adapter, images),
            batch_size=settings.batch_size,
            max_new_tokens=None,
            generative=False,
            what=f"{task} under other heads",
        )
        cells = relative_drops({task: scored[("likelihood", task)]}, n_resamples, seed).cells
        base_point, base_reps = cells[(1, task)]
        for j, name in enumerate(names[1:], start=2):
            point, reps = cells[(j, task)]
            out[name] |= {
                "on_target_drop": interval(point, reps, confidence).as_dict(),
                "exhaustive_on_target_drop": interval(base_point, base_reps, confidence).as_dict(),
                "difference": interval(point - base_point, reps - base_reps, confidence).as_dict(),
            }
    return out
