"""Teacher forcing: the one home of answer-token log-probabilities.

A batch built by ``ModelAdapter.build_inputs(images, prompts, answers)`` holds, per row,
[pad..., prompt..., answer..., eos] with ``answer_mask`` True on the answer tokens and eos.
The logits at position p-1 predict the token at p, so the answer mask is shifted by one.

Map of this module:
- ``answer_logprobs``: log-softmax over the vocabulary at the positions that predict tokens,
  with the target ids and the shifted answer mask (autograd-compatible).
- ``token_logprobs`` / ``mean_answer_logprob``: the targets' log-probabilities [B, K] and their
  mean over each row's answer tokens [B] (nats per token: the teacher-forced utility).
- ``answer_cross_entropy``: minus that mean, per row or over the batch (the training loss).
- ``answer_token_id``: the first token id of a one-word answer ("Yes" / "No" of retrieval).
- ``model_answer_logprobs``: one forward pass of the adapter's model that computes logits only
  at the answer positions (``logits_to_keep`` where the model accepts it), then ``answer_logprobs``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from pipeline.model.adapter import AdapterError, ModelAdapter, ModelInputs

__all__ = [
    "answer_logprobs",
    "token_logprobs",
    "mean_answer_logprob",
    "answer_cross_entropy",
    "model_answer_logprobs",
    "answer_token_id",
]


def answer_token_id(tokenizer, word: str) -> int:
    """The first token id of ``word`` as the model would write it after the prompt."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AdapterError(f"the tokenizer maps {word!r} to no tokens; cannot score retrieval")
    return int(ids[0])


def answer_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor, *, vocab_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities over the vocabulary at the positions that predict the sequence's tokens.

    ``logits`` [B, P, V]: the logits of the LAST P positions of the sequence (P = S for a full
    forward); ``input_ids`` and ``answer_mask`` [B, S]. With K = P - 1, returns
    (logp float32 [B, K, V], target ids [B, K], mask float32 [B, K]): position k of ``logp``
    predicts ``target[:, k]``, and ``mask`` is 1 where that token is an answer token (answer + eos).

    ``vocab_major``: take the log-softmax over a [B, V, K] layout, as ``F.cross_entropy`` does,
    instead of over [B, K, V]. Both are the same function; their float rounding differs in the
    last bit, and the flag keeps each caller bitwise as it was (the default model's training was
    written with cross-entropy; evaluation and steering use the vocabulary-last layout).
    """
    k = logits.shape[1] - 1
    x = logits[:, :-1].float()
    if vocab_major:
        logp = torch.log_softmax(x.transpose(1, 2), dim=1).transpose(1, 2)
    else:
        logp = torch.log_softmax(x, dim=-1)
    start = input_ids.shape[1] - k
    return logp, input_ids[:, start:], answer_mask[:, start:].float()


def token_logprobs(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, K] log-probability of each target token, from ``logp`` [B, K, V] and ``target`` [B, K]."""
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def mean_answer_logprob(logp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean log-probability (nats per token) of each row's answer tokens (``answer_logprobs``' outputs)."""
    return (token_logprobs(logp, target) * mask).sum(1) / mask.sum(1).clamp(min=1)


def answer_cross_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor, per_row: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy (nats) over answer positions: the mean over rows, or per row [batch].

    logits [batch, seq, vocab]; input_ids and answer_mask [batch, seq]. Minus
    ``mean_answer_logprob`` in the vocabulary-major layout of ``F.cross_entropy``.
    """
    rows = -mean_answer_logprob(*answer_logprobs(logits, input_ids, answer_mask, vocab_major=True))
    return rows if per_row else rows.mean()


_KEEP_CACHE: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    cls = type(model)
    if cls not in _KEEP_CACHE:
        try:
            _KEEP_CACHE[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _KEEP_CACHE[cls] = False
    return _KEEP_CACHE[cls]


def model_answer_logprobs(
    adapter: ModelAdapter, inputs: ModelInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``answer_logprobs`` of one forward pass over ``inputs`` (built with answers).

    Rows are left-padded with the answer at the end, so every answer token lies in the last
    K = (longest answer + eos) positions and is predicted from the K positions before it: only
    the last K + 1 positions' logits are computed (``logits_to_keep``) where the model accepts it.
    Returns (logp float32 [B, K, V], target ids [B, K], mask float [B, K]); differentiable.
    """
    keep = int(inputs.answer_mask.sum(1).max()) + 1
    kwargs = dict(inputs.tensors)
    if _accepts_logits_to_keep(adapter.model):
        kwargs["logits_to_keep"] = keep
    logits = adapter.model(**kwargs).logits
    return answer_logprobs(logits[:, -keep:], inputs.input_ids, inputs.answer_mask)
