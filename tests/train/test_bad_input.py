"""`python -m train` ends every problem a user can fix with one `error:` line: bad settings (before the target
loads), missing data (tiny target included), a folder in use, a full disk, Ctrl-C."""

from __future__ import annotations

import dataclasses
import math
import signal
import subprocess
import sys
import time

import pytest

from dspark_model.config import DraftConfig, TargetSpec
from dspark_model.output_lock import output_lock
from tests.train.helpers import FAST, REPO, cli_env, run_train, start_train
from train.checkpointing import list_checkpoints
from train.loop import train
from train.schema import DataConfig, OptimConfig, TrainConfigError, TrainJob


def _error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "train.lr must be a positive number, got 0.0"),
    ("lr", -1e-3, "train.lr must be a positive number"),
    ("lr", math.nan, "train.lr must be a positive number, got nan"),
    ("block_size", 0, "draft.block_size must be >= 1"),
    ("num_layers", 0, "draft.num_layers must be >= 1"),
])
def test_bad_settings_fail_before_the_target_loads(tmp_path, field, value, message):
    job = TrainJob(target=TargetSpec(id="nowhere", path=str(tmp_path / "no-model")), draft=DraftConfig(),
                   data=DataConfig(path=str(tmp_path / "no-data")), train=OptimConfig(output_dir=str(tmp_path / "o")))
    group = "train" if field == "lr" else "draft"
    job = dataclasses.replace(job, **{group: dataclasses.replace(getattr(job, group), **{field: value})})
    with pytest.raises(TrainConfigError, match=message):  # not TargetNotFoundError: checked first
        train(job)
    assert not (tmp_path / "o").exists()


def test_cli_nan_learning_rate_is_one_line(tmp_path):
    proc = run_train(["target=qwen2.5-7b", "train.lr=nan", f"train.output_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2
    assert _error_line(proc) == "error: train.lr must be a positive number, got nan"


def test_missing_data_is_an_error_for_the_tiny_target_too(tmp_path):
    proc = run_train(["target=tiny", f"data.path={tmp_path / 'nothing'}", f"train.output_dir={tmp_path / 'o'}"],
                     timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert f"no training data at {tmp_path / 'nothing'}" in line and "data=synthetic" in line


def test_cli_refuses_an_output_folder_in_use(tmp_path):
    out = tmp_path / "run"
    with output_lock(out, "train", "train.output_dir=<another folder>"):
        proc = run_train(FAST + ["train.max_steps=2", f"train.output_dir={out}"], timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert f"output folder {out} is in use by pid" in line and "train.output_dir=<another folder>" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# Runs the real entry point with checkpoint writes failing as on a full disk.
DISK_FULL = r"""
import errno, runpy, sys
import train.checkpointing as checkpointing
def full(tensors, filename, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", filename)
checkpointing.save_file = full
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def test_a_full_disk_names_the_path_and_the_space_left(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, *FAST, "train.max_steps=2", f"train.output_dir={out}"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert f"no space left on the device while writing {out}/checkpoints/.tmp-step-00000002/draft.safetensors (" in line
    assert "MiB free there" in line and "rerun the same command" in line


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start_train(FAST + ["train.max_steps=100000", "train.save_every=1", f"train.output_dir={out}"])
    deadline = time.time() + 240
    while not list_checkpoints(out / "checkpoints") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where every thread of the run was (see helpers.start_train)
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"train did not stop within 120 s of Ctrl-C; its threads when aborted:\n{stderr[-8000:]}")
    assert proc.returncode == 130, stderr[-3000:]
    line = _error_line(subprocess.CompletedProcess([], 130, "", stderr))
    assert line.startswith("error: interrupted; checkpoints in") and "rerun the same command" in line
