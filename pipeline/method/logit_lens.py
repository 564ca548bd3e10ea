"""The logit lens: how much of the answer each layer's residual stream, attention and FFN
already predict.

Every vector v read from the residual stream at a position that predicts an answer token is
decoded as the model decodes its last residual: final norm, then unembedding (then the
family's final logit soft-capping, where it has one). The answer token's log-probability under
that decoding, averaged over the item's answer tokens (nats per token, the teacher-forced
utility's unit), is the lens value. Components per decoder layer l:

- ``residual``: the residual stream leaving layer l (for the last layer this is exactly what
  the model decodes, so its lens value is the model's own teacher-forced utility);
- ``attention``: what layer l's attention adds to the residual stream;
- ``ffn``: what layer l's FFN adds.

Components are decoded alone, as the published analysis does; the final norm rescales each,
so the components' values do not add up to the residual's.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pipeline.model.batching import for_each_batch
from pipeline.model.hooks import capture_residual_stream
from pipeline.model.scoring import mean_answer_logprob, model_answer_logprobs
from pipeline.tasks.items import ImageTable, item_prompts, teacher_forced_answers

__all__ = ["COMPONENTS", "LENS_COLUMNS", "logit_lens", "lens_summary", "decode_answer_logprob"]

log = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("residual", "attention", "ffn")
# One row per (item, layer, component); answer_logprob in nats per answer token.
LENS_COLUMNS = ["item_id", "task", "layer", "component", "answer_logprob"]


def decode_answer_logprob(adapter, vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of residual-stream vectors decoded as the model decodes its last residual.

    vectors: float32 [N, hidden]; targets: LongTensor [N] token ids. Returns float32 [N], nats.
    """
    norm = adapter.final_norm()
    weight = adapter.unembedding()
    x = vectors.to(device=weight.device, dtype=weight.dtype)
    if norm is not None:
        x = norm(x)
    logits = (x @ weight.T).float()
    cap = getattr(adapter.text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, targets.to(logp.device).reshape(-1, 1)).squeeze(1)


def _row_means(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> np.ndarray:
    """Mean of ``values`` [N] per row index in ``rows`` [N] -> float64 [n_rows]."""
    total = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows.cpu(), values.double().cpu())
    count = torch.bincount(rows.cpu(), minlength=n_rows).double()
    return (total / count).numpy()


@torch.no_grad()
def logit_lens(
    adapter, items: pd.DataFrame, images: ImageTable, *, batch_size: int, progress: bool = True
) -> tuple[pd.DataFrame, np.ndarray]:
    """The logit lens of every item (one task or several) on its ``reference_answer``.

    Returns (table, model_utility): table with ``LENS_COLUMNS``, items x layers x components rows,
    and the model's own teacher-forced utility per item (float64 [items], nats), which the last
    layer's ``residual`` value equals up to float rounding.
    """
    items = items.reset_index(drop=True)
    prompts, answers = item_prompts(items), teacher_forced_answers(items)
    imgs = [images[i] for i in items["image_id"]]
    L = adapter.num_layers
    lens = np.zeros((len(items), L, len(COMPONENTS)), dtype=np.float64)
    model_utility = np.zeros(len(items), dtype=np.float64)

    def run(sl: slice) -> None:
        inputs = adapter.build_inputs(imgs[sl], prompts[sl], answers=answers[sl])
        mask, targets = inputs.answer_targets()
        with capture_residual_stream(adapter, mask) as trace:
            model_utility[sl] = mean_answer_logprob(*model_answer_logprobs(adapter, inputs)).double().cpu().numpy()
        wanted = targets[mask]
        rows = mask.nonzero()[:, 0]
        after = [trace.layer_input[l + 1] for l in range(L - 1)] + [trace.final]
        for l in range(L):
            parts = {
                "residual": after[l],
                "attention": trace.after_attention[l] - trace.layer_input[l],
                "ffn": after[l] - trace.after_attention[l],
            }
            for c, name in enumerate(COMPONENTS):
                lens[sl, l, c] = _row_means(
                    decode_answer_logprob(adapter, parts[name], wanted), rows, inputs.batch_size
                )

    for_each_batch(len(items), batch_size, run, what="logit lens", progress=progress)
    gap = float(np.abs(lens[:, -1, 0] - model_utility).max()) if len(items) else 0.0
    if gap > 1e-3:
        log.warning(
            "logit lens: the last layer's residual decodes to within %.3g nats of the model's own "
            "answer log-probability, not exactly (low-precision weights?)",
            gap,
        )
    n, layers, comps = np.meshgrid(np.arange(len(items)), np.arange(L), np.arange(len(COMPONENTS)), indexing="ij")
    table = pd.DataFrame(
        {
            "item_id": items["item_id"].to_numpy()[n.ravel()],
            "task": items["task"].to_numpy()[n.ravel()],
            "layer": layers.ravel().astype(np.int32),
            "component": np.asarray(COMPONENTS, dtype=object)[comps.ravel()],
            "answer_logprob": lens.ravel(),
        }
    )
    return table, model_utility


def lens_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, layer, component) of a ``logit_lens`` table: the mean answer
    log-probability over items (nats per token), its standard error, the mean probability
    exp(log p) and the item count."""
    g = table.assign(probability=np.exp(table["answer_logprob"])).groupby(["task", "layer", "component"], sort=False)
    out = g.agg(
        mean_logprob=("answer_logprob", "mean"),
        sem_logprob=("answer_logprob", "sem"),
        mean_probability=("probability", "mean"),
        items=("answer_logprob", "size"),
    ).reset_index()
    return out
