"""Checkpoint files round-trip exactly, and an in-process resume continues the run bit for bit."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from dspark_model.config import DraftConfig
from tests.conftest import tiny_spec
from train.checkpointing import (
    capture_rng,
    list_checkpoints,
    optimizer_from_files,
    optimizer_to_files,
    resolve_resume,
    restore_rng,
)
from train.loop import train
from train.optim import lr_lambda
from train.schema import DataConfig, LoggerConfig, OptimConfig, TrainJob


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_to_files(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # what goes to disk is plain JSON
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(optimizer_from_files(tensors, meta))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 0.1
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k]), k


def test_rng_round_trip():
    meta, tensors = capture_rng()
    meta = json.loads(json.dumps(meta))
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(meta, tensors)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_lr_schedule_shape():
    lrs = [lr_lambda(s, 4, 20, "cosine", 0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] >= 0.1


def test_resume_modes(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None and resolve_resume(tmp_path, "never") is None
    with pytest.raises(FileNotFoundError, match="train.resume"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def _job(out, steps=4):
    return TrainJob(
        target=tiny_spec(), draft=DraftConfig(num_layers=1, block_size=4, markov_rank=16),
        data=DataConfig(synthetic=True, synthetic_rows=16, synthetic_response_tokens=24),
        train=OptimConfig(max_steps=steps, global_batch_size=4, micro_batch_size=2, warmup_steps=1, lr=1e-3,
                          min_anchors=4, max_anchors=8, save_every=2, keep_last=5, output_dir=str(out),
                          device="cpu"),
        logger=LoggerConfig(tensorboard=False, progress_bar=False))


def _losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def test_resume_continues_identically(tmp_path):
    train(_job(tmp_path))
    want = _losses(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002", "step-00000004"]
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "final")
    train(_job(tmp_path))  # resume=auto picks step 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]  # steps 3 and 4 once: the resumed run's
    got = _losses(tmp_path)
    assert got[3] == want[3] and got[4] == want[4]
