"""An ordered, bounded process map: the one piece of multiprocessing that prepare and tokenize share.

Why not Pool.imap: its feeder thread drains the input iterator as fast as it can, which would pull a
whole corpus into memory ahead of the workers. Here at most `max_pending` chunks are in flight, and
results come back in submission order, so output order never depends on worker timing.

Workers are started with "spawn" (safe with threads, the same on Linux, macOS and Windows); the work
function and the initializer must therefore be top-level functions of an importable module.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

K = TypeVar("K")


def map_ordered(
    fn: Callable[[Any], Any],
    items: Iterable[tuple[K, Any]],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple = (),
    max_pending: int | None = None,
) -> Iterator[tuple[K, Any]]:
    """For each (key, payload) yield (key, fn(payload)) in input order; workers <= 1 runs in-process."""
    if workers <= 1:
        initializer(*initargs)
        for key, payload in items:
            yield key, fn(payload)
        return
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer, initargs=initargs)
    try:
        yield from submit_ordered(ex, fn, items, max_pending or 2 * workers)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def submit_ordered(
    ex: Executor, fn: Callable[[Any], Any], items: Iterable[tuple[K, Any]], max_pending: int
) -> Iterator[tuple[K, Any]]:
    """(key, fn(payload)) in input order from any executor, with at most `max_pending` submitted ahead."""
    pending: deque[tuple[K, Future]] = deque()
    for key, payload in items:
        pending.append((key, ex.submit(fn, payload)))
        if len(pending) >= max_pending:
            k, fut = pending.popleft()
            yield k, fut.result()
    while pending:
        k, fut = pending.popleft()
        yield k, fut.result()
