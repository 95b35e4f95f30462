"""The metrics logger: JSONL always, TensorBoard optional, and a failing sink never stops training."""

from __future__ import annotations

import json

from train.metrics_log import MetricsLogger


class _Broken:
    def write(self, step, metrics):
        raise OSError("disk full")

    def close(self):
        raise OSError("still full")


def test_failing_sink_is_dropped_and_jsonl_keeps_going(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True, wandb=False)
    assert set(logger.sinks) == {"jsonl", "tensorboard"}
    logger.sinks["broken"] = _Broken()
    logger.log(1, {"loss": 2.5, "grad_norm": float("nan")})
    assert "broken" not in logger.sinks
    logger.log(2, {"loss": 2.0})
    logger.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs == [{"step": 1, "loss": 2.5, "grad_norm": "nan"}, {"step": 2, "loss": 2.0}]
    assert any((tmp_path / "tensorboard").iterdir())


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True, config={"a": 1})
    assert "wandb" in logger.sinks
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))
