"""The prefetch thread hands over the plain iterator's items in order, re-raises its errors in place, and
stops when closed."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from train.prefetch import Prefetcher


def test_same_items_same_order():
    assert list(Prefetcher(iter(range(50)), depth=2)) == list(range(50))
    assert list(Prefetcher([])) == []


def test_error_is_raised_at_its_item():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    p = Prefetcher(items())
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(OSError, match="disk gone"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)


def test_runs_ahead_by_depth_only_and_close_stops_it():
    made = []

    def items():
        for i in itertools.count():
            made.append(i)
            yield i

    p = Prefetcher(items(), depth=2)
    assert next(p) == 0
    time.sleep(0.3)
    assert len(made) <= 4  # the item handed over, two queued, one in the worker's hand
    p.close()
    assert not any(t.name == "dspark-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(p)
