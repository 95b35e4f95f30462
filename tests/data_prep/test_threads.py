"""run_on_threads: every result once (in order when asked), and a caller that stops early cancels the rest."""

from __future__ import annotations

import threading
from contextlib import closing

import pytest

from data_prep import threads
from data_prep.threads import run_on_threads


@pytest.mark.parametrize("workers", [1, 3])
def test_every_result_once_and_in_order_when_asked(workers):
    items = list(range(20))
    assert list(run_on_threads(lambda x: x * x, items, workers, "t", ordered=True)) == [x * x for x in items]
    assert sorted(run_on_threads(lambda x: x * x, items, workers, "t")) == [x * x for x in items]


def test_stopping_early_cancels_the_items_not_started(monkeypatch):
    """Item 0 returns at once, every other item waits at a gate that opens only once the pool has cancelled
    what was not started: whatever the timing, only items 1 and 2 (one more per thread) ever start.

    (This test used to let items sleep 0.2 s and count the items started within that wall time; a busy CPU
    could delay the caller's cancel long enough for more to start.)"""
    started, gate = [], threading.Event()

    class GatedPool(threads.ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)  # cancel first, then let items finish
            gate.set()
            super().shutdown(wait=wait)

    def work(x):
        started.append(x)
        if x:
            assert gate.wait(timeout=60), "the pool was never shut down"
        return x

    monkeypatch.setattr(threads, "ThreadPoolExecutor", GatedPool)
    with pytest.raises(KeyboardInterrupt), closing(run_on_threads(work, range(100), 2, "t")) as out:
        for _ in out:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the first result is handled
    assert set(started) <= {0, 1, 2} and 0 in started
    assert not any(t.name.startswith("t_") and t.is_alive() for t in threading.enumerate())


def test_an_error_in_an_item_reaches_the_caller():
    def work(x):
        if x == 3:
            raise OSError("disk gone")
        return x

    with pytest.raises(OSError, match="disk gone"):
        list(run_on_threads(work, range(6), 2, "t", ordered=True))
