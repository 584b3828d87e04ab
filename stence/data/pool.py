"""A process pool for per-file decode jobs that survives a worker dying.

A decode worker can die without raising: the kernel's OOM killer, a segfault in a native decoder, a
SIGKILL. `multiprocessing.Pool` then waits forever for the lost result. Here jobs run on a
`ProcessPoolExecutor` with a bounded number in flight; when the pool breaks, the jobs in flight are the
suspects: each is re-run alone in a fresh one-worker pool, and the one whose worker dies again is
reported with `on_death(job)` (a quarantine row) while every other job still completes.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

_CTX = mp.get_context("spawn")  # no fork of a process that may hold threads (torch, Ray)


def _isolated(fn: Callable[[Any], dict], job: Any, on_death: Callable[[Any], dict]) -> dict:
    """Run one suspect job alone: its result, or `on_death(job)` if its worker dies again."""
    with ProcessPoolExecutor(1, mp_context=_CTX) as ex:
        try:
            return ex.submit(fn, job).result()
        except BrokenProcessPool:
            return on_death(job)


def run_jobs(
    fn: Callable[[Any], dict], jobs: Sequence[Any], processes: int, desc: str, on_death: Callable[[Any], dict],
    progress: bool = True,
) -> list[dict]:
    """`[fn(j) for j in jobs]` in `processes` worker processes, in job order; a job whose worker dies
    (twice: once in the pool, once alone) yields `on_death(job)` instead of hanging the batch."""
    bar = tqdm(total=len(jobs), desc=desc, unit="file", mininterval=0.5, disable=not progress or not jobs)
    try:  # the bar ends its line even when a job raises (a full disk), so the error starts on its own
        return _run(fn, jobs, processes, on_death, bar)
    finally:
        bar.close()


def _run(fn: Callable[[Any], dict], jobs: Sequence[Any], processes: int, on_death: Callable[[Any], dict],
         bar: tqdm) -> list[dict]:
    results: list[dict | None] = [None] * len(jobs)
    if processes <= 1:
        for i, j in enumerate(jobs):  # in-process: nothing to survive, a crash here is the caller's
            results[i] = fn(j)
            bar.update()
        return results  # type: ignore[return-value]
    todo = list(range(len(jobs)))
    while todo:
        suspects: list[int] = []
        with ProcessPoolExecutor(processes, mp_context=_CTX) as ex:
            in_flight: dict[Future, int] = {}
            pos = 0
            broken = False
            while (pos < len(todo) or in_flight) and not broken:
                while pos < len(todo) and len(in_flight) < 2 * processes:
                    try:
                        fut = ex.submit(fn, jobs[todo[pos]])
                    except BrokenProcessPool:  # a worker died since the last wait: its future fails next
                        broken = True
                        break
                    in_flight[fut] = todo[pos]
                    pos += 1
                if broken:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = in_flight.pop(fut)
                    try:
                        results[i] = fut.result()
                        bar.update()
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(i)
            if broken:
                suspects += list(in_flight.values())
                rest = todo[pos:]
        if not broken:
            break
        for i in sorted(suspects):
            results[i] = _isolated(fn, jobs[i], on_death)
            bar.update()
        todo = rest
    return results  # type: ignore[return-value]
