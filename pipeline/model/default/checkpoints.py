"""Training checkpoints of the default models: ``Checkpoints`` saves everything a bitwise resume
needs (weights, gradients, optimiser and RNG states), and the helpers restore it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.io import atomic_file

log = logging.getLogger(__name__)


CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoints:
    """Where and how often training saves everything a bitwise resume needs.

    ``directory``: the scratch directory (inside the output, ``pipeline.io.resumable_scratch``);
    one file, ``checkpoint.pt``, replaced atomically at each save. ``every``: optimiser steps
    between saves, counted separately in each phase ("warmup" and "language"); 0 never saves.
    ``on_save(phase, step)`` runs after each save (progress reporting; the tests kill there).
    """

    directory: Path
    every: int
    on_save: Callable[[str, int], None] | None = None

    def due(self, done: int, total: int) -> bool:
        """True after ``done`` of ``total`` steps when a save is due (never after the last step:
        the finished model is saved instead)."""
        return self.every > 0 and done % self.every == 0 and done < total

    def save(self, state: dict) -> None:
        """Write ``state`` (with "phase" and "step") with torch's and CUDA's RNG states added."""
        state = {
            **state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.directory / CHECKPOINT_FILE) as tmp:
            torch.save(state, tmp)
        log.info("checkpoint: %s step %d", state["phase"], state["step"])
        if self.on_save is not None:
            self.on_save(state["phase"], state["step"])

    def load(self) -> dict | None:
        """The last saved state, or None when there is none (a file that cannot be read, as a
        kill inside ``torch.save`` cannot leave one, is reported and ignored)."""
        path = self.directory / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, in our own scratch
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            log.warning("ignoring unreadable checkpoint %s (%s); training starts afresh", path, exc)
            return None
        log.info("resuming training from %s: %s step %d", path, state["phase"], state["step"])
        return state


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's ``.grad`` that is set. Part of the training state: the frozen tower keeps
    its last warm-up gradient, and ``clip_grad_norm_`` over all parameters counts it."""
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _restore_model(model: torch.nn.Module, state: dict) -> None:
    """Weights and gradients of ``model`` as saved in a checkpoint ``state``."""
    model.load_state_dict(state["model"])
    for name, param in model.named_parameters():
        grad = state["gradients"].get(name)
        param.grad = None if grad is None else grad.to(param.device)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
