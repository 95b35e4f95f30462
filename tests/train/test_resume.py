"""Kill a CPU training run with SIGKILL, resume it, and get the losses of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.train.helpers import FAST, losses, run_train, start_train
from train.checkpointing import list_checkpoints

STEPS = 8
JOB = FAST + [f"train.max_steps={STEPS}", "train.save_every=2", "train.keep_last=2"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    proc = start_train(JOB + [f"train.output_dir={out}"])
    deadline = time.time() + 240
    while not list_checkpoints(out / "checkpoints") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "final").exists()
    saved = int(list_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert saved < STEPS
    # Leftovers of a crash while saving must be ignored: a temp folder and a folder without trainer_state.
    (out / "checkpoints" / ".tmp-step-00000099").mkdir()
    (out / "checkpoints" / "step-00000098").mkdir()

    resumed = run_train(JOB + [f"train.output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{saved:08d} at step {saved}" in resumed.stdout
    uninterrupted = run_train(JOB + [f"train.output_dir={ref}"])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    want, got = losses(ref), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # steps before the kill and after the resume
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), step
    kept = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert kept == [f"step-{STEPS - 2:08d}", f"step-{STEPS:08d}"]  # keep_last=2
