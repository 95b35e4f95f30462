"""A metrics record with train.log_every > 1 is the mean over its window, the gradient norm included."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.train.test_checkpointing import _job
from train.loop import train


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_window_of_three_steps_is_their_mean(tmp_path):
    def job(out, every):
        j = _job(out, steps=3)
        return dataclasses.replace(j, train=dataclasses.replace(j.train, log_every=every, save_every=10))

    train(job(tmp_path / "each", 1))
    train(job(tmp_path / "window", 3))
    each, (window,) = _records(tmp_path / "each"), _records(tmp_path / "window")
    assert [r["step"] for r in each] == [1, 2, 3] and window["step"] == 3
    for key in ("grad_norm", "loss", "top1"):
        assert window[key] == pytest.approx(sum(r[key] for r in each) / 3, rel=1e-5), key
