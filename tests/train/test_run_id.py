"""A run resumes only from checkpoints its own output folder wrote (DeepSpeed's .pt files are pickles)."""

from __future__ import annotations

import json
import shutil

import pytest

from dspark_model.config import DraftConfig
from tests.conftest import tiny_spec
from tests.train.helpers import FAST, run_train
from train.checkpointing import (
    FILES_NAME,
    RUN_NAME,
    STATE_NAME,
    CheckpointRunError,
    list_checkpoints,
    start_run,
)
from train.loop import train
from train.schema import DataConfig, LoggerConfig, OptimConfig, TrainJob


def _job(out, resume: str = "auto") -> TrainJob:
    return TrainJob(
        target=tiny_spec(), draft=DraftConfig(num_layers=1, block_size=4, markov_rank=16),
        data=DataConfig(synthetic=True, synthetic_rows=8, synthetic_response_tokens=16),
        train=OptimConfig(max_steps=2, global_batch_size=2, micro_batch_size=2, warmup_steps=1, lr=1e-3,
                          min_anchors=4, max_anchors=8, save_every=2, output_dir=str(out), device="cpu",
                          resume=resume),
        logger=LoggerConfig(tensorboard=False, progress_bar=False))


def test_start_run_draws_one_id_per_output_folder(tmp_path):
    a = start_run(tmp_path / "a" / "checkpoints", rank=0, barrier=lambda: None)
    assert start_run(tmp_path / "a" / "checkpoints", rank=0, barrier=lambda: None) == a  # a resume keeps it
    assert json.loads((tmp_path / "a" / RUN_NAME).read_text())["run_id"] == a
    assert start_run(tmp_path / "b" / "checkpoints", rank=0, barrier=lambda: None) != a


def test_checkpoints_of_another_run_folder_are_refused(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train(_job(first))
    ckpt = list_checkpoints(first / "checkpoints")[-1]
    run_id = json.loads((first / RUN_NAME).read_text())["run_id"]
    assert json.loads((ckpt / STATE_NAME).read_text())["run_id"] == run_id

    with pytest.raises(CheckpointRunError, match=rf"{ckpt}.*output folder {second} .*train\.resume=never") as err:
        train(_job(second, resume=str(ckpt)))  # named explicitly
    assert "\n" not in str(err.value)
    shutil.copytree(ckpt, second / "checkpoints" / ckpt.name)  # or copied in, then found by resume=auto
    with pytest.raises(CheckpointRunError, match="refusing to resume"):
        train(_job(second))

    state = json.loads((ckpt / STATE_NAME).read_text())
    del state["run_id"]  # a checkpoint that records no run id is not ours either
    (ckpt / STATE_NAME).write_text(json.dumps(state))
    (ckpt / FILES_NAME).unlink()  # as saved before files.json existed (else the edit reads as damage)
    with pytest.raises(CheckpointRunError, match="records no run id"):
        train(_job(first))


def test_cli_refuses_a_foreign_checkpoint_with_one_line(tmp_path):
    foreign = tmp_path / "elsewhere" / "step-00000002"
    foreign.mkdir(parents=True)
    (foreign / STATE_NAME).write_text(json.dumps({"step": 2, "run_id": "0123abcd"}))
    (foreign / "deepspeed").mkdir()  # what would be unpickled: never opened
    proc = run_train(FAST + ["train.max_steps=2", f"train.output_dir={tmp_path / 'run'}",
                             f"train.resume={foreign}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run id 0123abcd" in errors[0] and "Traceback" not in proc.stderr
