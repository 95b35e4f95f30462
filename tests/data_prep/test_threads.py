"""run_on_threads: every result once (in order when asked), and a caller that stops early cancels the rest."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest

from data_prep.threads import run_on_threads


@pytest.mark.parametrize("workers", [1, 3])
def test_every_result_once_and_in_order_when_asked(workers):
    items = list(range(20))
    assert list(run_on_threads(lambda x: x * x, items, workers, "t", ordered=True)) == [x * x for x in items]
    assert sorted(run_on_threads(lambda x: x * x, items, workers, "t")) == [x * x for x in items]


def test_stopping_early_cancels_the_items_not_started():
    """100 items of 0.2 s on 2 threads would take 10 s; stopping at the first result leaves most never run."""
    started = []

    def work(x):
        started.append(x)
        time.sleep(0.2)
        return x

    with pytest.raises(KeyboardInterrupt), closing(run_on_threads(work, range(100), 2, "t")) as out:
        for _ in out:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the first result is handled
    assert len(started) < 20
    assert not any(t.name.startswith("t_") and t.is_alive() for t in threading.enumerate())


def test_an_error_in_an_item_reaches_the_caller():
    def work(x):
        if x == 3:
            raise OSError("disk gone")
        return x

    with pytest.raises(OSError, match="disk gone"):
        list(run_on_threads(work, range(6), 2, "t", ordered=True))
