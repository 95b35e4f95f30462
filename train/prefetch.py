"""Inputs of the next optimizer steps prepared on a worker thread while the current step computes.

Reading target-cache rows (safetensors slices), padding them into micro-batches and, on a GPU, copying them to
page-locked memory is host work that would otherwise sit between two steps. ``Prefetcher`` runs an iterator
on one daemon thread, ``depth`` items ahead (bounded, so memory stays at depth + 1 steps of inputs). The
items and their order are exactly those of the plain iterator, so training is unchanged bit for bit; an error
raised while preparing an item is raised again in the training loop, at the item it belongs to.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_ITEM, _END, _ERROR = range(3)


class Prefetcher(Iterator):
    def __init__(self, items: Iterable, depth: int = 1, name: str = "dspark-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(iter(items),), name=name, daemon=True)
        self._thread.start()

    def _put(self, kind: int, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(_ITEM, item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_ERROR, exc)
            return
        self._put(_END, None)

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._stop.set()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the worker (it finishes the item in hand) and drop what it prepared."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
