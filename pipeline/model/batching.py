"""Rows in batches, halved on a GPU out-of-memory error.

``for_each_batch(n_rows, batch_size, run)`` calls ``run(slice)`` over consecutive slices of at
most ``batch_size`` rows. When ``run`` raises ``torch.OutOfMemoryError`` (CUDA, or any
accelerator torch reports it for), the same slice is retried at half the size, down to one row.
The smaller size is kept for the rest of the process (``largest_fitting_batch``): the next call,
say the next block of a dump, does not fail at the old size again.

``run`` must write its results only after its forward pass returns, so a slice that failed
left nothing behind. Every row is computed exactly once by a forward pass that succeeded, so
the results are those of a run at the sizes actually used; the pipeline's results do not depend
on the batch size beyond float rounding of differently padded batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline.errors import PipelineError

__all__ = ["BatchTooLarge", "for_each_batch", "largest_fitting_batch", "reset_batch_limit", "rows_completed"]

log = logging.getLogger(__name__)

_limit: int | None = None
_rows_completed = 0


def rows_completed() -> int:
    """Rows that ``for_each_batch`` has run to completion in this process (a stage's work, in
    model sequences, for its timing record)."""
    return _rows_completed


def count_rows(n: int) -> None:
    """Add ``n`` rows that ``for_each_batch`` ran in another process (a worker of
    ``pipeline.model.workers``) to this process's ``rows_completed``."""
    global _rows_completed
    _rows_completed += n


class BatchTooLarge(PipelineError):
    """Out of memory at one row per batch: no batch size fits."""


def largest_fitting_batch(requested: int) -> int:
    """``requested``, or less once an out-of-memory error in this process halved it."""
    return requested if _limit is None else min(requested, _limit)


def reset_batch_limit() -> None:
    """Forget the halved size (tests; a process that moves to another model)."""
    global _limit
    _limit = None


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def for_each_batch(
    n_rows: int, batch_size: int, run: Callable[[slice], None], *, what: str, progress: bool = True
) -> None:
    """Call ``run`` on slices of ``range(n_rows)`` of at most ``batch_size`` rows (fewer after an
    out-of-memory error, see the module docstring); ``what`` names the work in logs, errors and
    the progress bar (``progress=False``: none)."""
    global _limit, _rows_completed
    from tqdm import tqdm

    if batch_size < 1:
        raise PipelineError(f"{what}: batch size must be >= 1, got {batch_size}")
    size = largest_fitting_batch(batch_size)
    start = 0
    # disable only when asked: a worker process turns every bar off (pipeline.model.workers).
    quiet = {} if progress else {"disable": True}
    with tqdm(total=n_rows, desc=what, leave=False, unit="row", **quiet) as bar:
        while start < n_rows:
            sl = slice(start, min(start + size, n_rows))
            try:
                run(sl)
            except torch.OutOfMemoryError:
                _free_cached_memory()
                if size == 1:
                    raise BatchTooLarge(
                        f"{what}: out of memory at 1 sequence per batch; use a smaller dtype "
                        "(models.<m>.dtype), a shorter input, or a device with more memory"
                    ) from None
                size = size // 2
                _limit = size
                log.warning(
                    "%s: out of memory at %d sequences per batch; retrying rows %d.. at %d "
                    "(and at most %d for the rest of this run)",
                    what,
                    sl.stop - sl.start,
                    start,
                    size,
                    size,
                )
                continue
            bar.update(sl.stop - sl.start)
            _rows_completed += sl.stop - sl.start
            start = sl.stop
