"""Independent jobs over one model, spread over worker processes.

On a CPU, a small model's forward pass uses a second core poorly (the tiny default models'
retrieval rows: 5.2 s with 2 torch threads, 5.8 s with 1), so two processes of one thread each
get more done than one process of two: measured on this project's 2-core machine, 1.36x on
evaluate's jobs (``benchmarks/bench_workers.py``), not 2x, because the two processes slow each
other down. ``map_jobs`` hands jobs (a shard of the conditions of one task, a shard of the
layers whose neurons are ablated, a task to steer) to ``workers`` processes, each of which
loads the model once; with ``workers=1`` the jobs run here, in order, and nothing is
spawned. Jobs must not depend on each other, and a job's result must not depend on which
process ran it: then the results equal the serial ones up to float rounding of the batches
(a job computes the same rows, in batches of a different composition).

Processes are spawned, not forked: a fork copies torch's OpenMP state (or a CUDA context),
which the child cannot use. The parent does not load the model.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from functools import partialmethod
from typing import Any, TypeVar

from pipeline.errors import PipelineError
from pipeline.model import batching

log = logging.getLogger(__name__)

S = TypeVar("S")
J = TypeVar("J")
R = TypeVar("R")

# The state of a worker process: what ``load`` returned there.
_STATE: Any = None


def _init_worker(load: Callable[[], Any], threads: int) -> None:
    global _STATE
    import torch
    import tqdm

    # Workers' own progress bars would interleave with the parent's, which counts jobs.
    # (TQDM_DISABLE is read when tqdm is imported, which unpickling ``load`` may already have done.)
    tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)
    _STATE = load()
    torch.set_num_threads(threads)


def _run_job(work: Callable[[Any, Any], Any], job: Any) -> tuple[Any, int]:
    """(the job's result, the rows ``for_each_batch`` ran for it), for the parent's count."""
    before = batching.rows_completed()
    result = work(_STATE, job)
    return result, batching.rows_completed() - before


def map_jobs(
    work: Callable[[S, J], R],
    jobs: Sequence[J],
    load: Callable[[], S],
    *,
    workers: int = 1,
    threads: int = 1,
    describe: Callable[[J], str] = str,
    what: str = "jobs",
) -> list[R]:
    """[work(state, job) for job in jobs], with state = load() once per process.

    ``workers`` > 1: that many spawned processes (never more than there are jobs), each running
    torch with ``threads`` threads; jobs are handed out in the order given, so put the heaviest
    first. ``work`` and ``load`` must be picklable (module-level functions, or
    ``functools.partial`` of them), as must jobs and results. In a worker, a job that raises
    stops the rest and is re-raised here as a ``PipelineError`` naming it (``describe(job)``),
    with the worker's exception as its cause; with one worker its exception propagates as is.
    The rows the workers' batches ran are added to this process's
    ``batching.rows_completed`` (a stage's timing record counts them).
    """
    from tqdm import tqdm

    if workers < 1 or threads < 1:
        raise PipelineError(f"map_jobs: workers ({workers}) and threads ({threads}) must be at least 1")
    jobs = list(jobs)
    workers = min(workers, len(jobs))
    if workers <= 1:
        state = load()
        out = []
        for job in tqdm(jobs, desc=what, unit="job", disable=len(jobs) < 2):
            out.append(work(state, job))
        return out
    log.info("%s: %d jobs over %d worker processes of %d thread(s)", what, len(jobs), workers, threads)
    results: list[Any] = [None] * len(jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(load, threads)) as pool:
        futures = {pool.submit(_run_job, work, job): k for k, job in enumerate(jobs)}
        pending = set(futures)
        with tqdm(total=len(jobs), desc=what, unit="job") as bar:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    k = futures[f]
                    exc = f.exception()
                    if exc is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
                        if isinstance(exc, PipelineError):
                            raise PipelineError(f"{what}: job {describe(jobs[k])}: {exc}") from exc
                        raise PipelineError(
                            f"{what}: job {describe(jobs[k])} failed in a worker: {type(exc).__name__}: {exc}"
                        ) from exc
                    results[k], rows = f.result()
                    batching.count_rows(rows)
                    bar.update(1)
    return results


def split_threads(threads: int, workers: int) -> int:
    """Torch threads per worker when ``threads`` are shared by ``workers`` processes (at least 1)."""
    return max(1, threads // max(1, workers))
