"""Work items run on a few threads, stopped cleanly when the caller stops.

The local decoding loop and the target-cache pass run target forwards on ``workers`` threads (one core each
with one torch thread: the matrix work releases the GIL); the OpenAI backend keeps ``concurrency`` requests in
flight. All three need the same thing: results as they come (or in order), and, when the caller stops early
(an error, a full disk, Ctrl-C), the items not started yet are dropped and only those already running are
waited for, so an interrupted run stops after at most one item per thread instead of finishing the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_on_threads(fn: Callable[[T], R], items: Iterable[T], workers: int, name: str,
                   ordered: bool = False) -> Iterator[R]:
    """``fn(item)`` for every item on ``workers`` threads, yielded as each finishes (in item order with
    ``ordered``). ``workers`` <= 1 runs in the calling thread. Close the iterator (or let it be collected) to
    stop: items not started are cancelled. Use it as ``with contextlib.closing(run_on_threads(...)) as out``."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        futures = [pool.submit(fn, item) for item in items]
        for future in futures if ordered else as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
