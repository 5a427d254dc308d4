"""Run tasks in worker processes (or threads) with one progress bar fed by all of them.

``fn(task, report)`` runs in a worker (or in this process when ``num_workers <= 1``); ``report(n)`` advances the bar
by ``n`` cells. Results come back in task order. An exception in a task cancels the rest and is re-raised here with
its own type and message.

:func:`run_threads` runs the tasks in threads of this process instead, for work whose heavy parts release the GIL
(compiled kernels, HDF5 reads, Arrow writes): nothing to start, import or copy, and the memory is that of one
process.

Workers are forked on Linux when this process runs no other Python thread (they start in milliseconds with
everything imported; no HDF5 file is open at that point), and spawned otherwise (a clean interpreter that imports
the tokenizer, about two seconds). ``EXPRESS_MP_START=spawn|fork|forkserver`` overrides the choice.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

_progress_queue = None


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread: a thread would make forking workers unsafe


def block_size(total: int, num_workers: int, chunk_size: int) -> int:
    """Rows per work unit: enough units to balance the workers, whole chunks, at most 65,536 rows."""
    per = -(-total // max(1, 4 * num_workers))
    per = max(chunk_size, min(65_536, per))
    return -(-per // chunk_size) * chunk_size


def start_method() -> str:
    """How worker processes are started (see the module docstring)."""
    chosen = os.environ.get("EXPRESS_MP_START")
    if chosen:
        return chosen
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _report_to_queue(n: int) -> None:
    _progress_queue.put(n)


def _call(fn, task):
    return fn(task, _report_to_queue)


def run_tasks(fn: Callable[[Any, Callable[[int], None]], Any], tasks: Sequence, *, num_workers: int = 1,
              total: int | None = None, desc: str = "", progress: bool = True,
              warmup: Callable[[], None] | None = None, after_start: Callable[[], None] | None = None) -> list:
    """Run ``fn(task, report)`` for every task; return the results in task order.

    ``warmup`` runs in this process before forking workers (e.g. a tiny task), so that compiled kernels are loaded
    once and inherited instead of loaded by every worker. ``after_start`` runs once the workers exist (forking with
    a second thread alive is unsafe), e.g. to start background work while they run.
    """
    method = start_method()
    if warmup is not None and num_workers > 1 and len(tasks) > 1 and method == "fork":
        warmup()
    bar = _Bar(total=total, desc=desc, unit="cells", disable=not progress, unit_scale=True, dynamic_ncols=True)
    try:
        if num_workers <= 1 or len(tasks) <= 1:
            if after_start is not None:
                after_start()
            return [fn(task, bar.update) for task in tasks]
        ctx = mp.get_context(method)
        progress_queue = ctx.Queue()
        results: list = [None] * len(tasks)
        with ProcessPoolExecutor(max_workers=min(num_workers, len(tasks)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(progress_queue,)) as pool:
            futures = {pool.submit(_call, fn, task): i for i, task in enumerate(tasks)}  # starts the workers
            if after_start is not None:
                after_start()
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(progress_queue, bar)
                    for future in done:
                        results[futures[future]] = future.result()
            except BrokenProcessPool:
                raise RuntimeError(
                    "a worker process died: out of memory (try fewer workers or a smaller chunk_size), or the "
                    "calling script starts work at import time (put it under `if __name__ == '__main__':`, which "
                    "worker processes need)"
                ) from None
            except BaseException:
                for future in pending:
                    future.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            _drain(progress_queue, bar)
        return results
    finally:
        bar.close()


class _Cancelled(Exception):
    """Raised by a thread's ``report`` once another task has failed, so that running tasks stop early."""


def run_threads(fn: Callable[[Any, Callable[[int], None]], Any], tasks: Sequence, *, num_workers: int = 1,
                total: int | None = None, desc: str = "", progress: bool = True) -> list:
    """:func:`run_tasks` with ``num_workers`` threads of this process (``fn`` must be thread-safe, and should spend
    its time in code that releases the GIL). When a task fails (or on Ctrl-C), tasks not yet started are cancelled
    and running ones stop at their next ``report``; the first error is re-raised."""
    bar = _Bar(total=total, desc=desc, unit="cells", disable=not progress, unit_scale=True, dynamic_ncols=True)
    lock = threading.Lock()
    failed = threading.Event()

    def report(n: int) -> None:
        if failed.is_set():
            raise _Cancelled
        with lock:
            bar.update(n)

    try:
        if num_workers <= 1 or len(tasks) <= 1:
            return [fn(task, bar.update) for task in tasks]
        with ThreadPoolExecutor(max_workers=min(num_workers, len(tasks)), thread_name_prefix="express-work") as pool:
            futures = [pool.submit(fn, task, report) for task in tasks]

            def stop() -> None:
                failed.set()
                for future in futures:
                    future.cancel()
                wait(futures)

            try:
                _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C while waiting
                stop()
                raise
            if pending:  # a task failed
                stop()
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
            first = next((e for e in errors if not isinstance(e, _Cancelled)), None)
            if first is not None:
                raise first
            return [future.result() for future in futures]
    finally:
        bar.close()


def _drain(progress_queue, bar) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return
