"""Two CPU processes over gloo (torchrun + accelerate + DeepSpeed ZeRO) train like one process.

Same global batch: one plain process accumulates 4 micro-batches per step; two ZeRO processes accumulate 2
each. The data order deals micro-batches so both see the same ones, so the losses match step for step. A
ZeRO-2 run then resumes from DeepSpeed's own checkpoint and continues identically.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.train.helpers import FAST, losses, run_train

JOB = FAST + ["train.max_steps=4", "train.save_every=2"]


def _torchrun() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def _final_weights(out: Path):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one(tmp_path, stage):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_train(JOB + [f"train.output_dir={one}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train(JOB + [f"deepspeed={stage}", f"train.output_dir={two}"], launcher=_torchrun(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 2 micro x 2 accumulation" in proc.stdout
    want, got = losses(one), losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    a, b = _final_weights(one), _final_weights(two)  # ZeRO-3 shards are gathered for the final save
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    if stage == "zero2":  # resume from DeepSpeed's checkpoint of step 2: steps 3 and 4 come out the same
        shutil.rmtree(two / "checkpoints" / "step-00000004")
        shutil.rmtree(two / "final")
        proc = run_train(JOB + [f"deepspeed={stage}", f"train.output_dir={two}"], launcher=_torchrun(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "at step 2" in proc.stdout
        resumed = losses(two)
        for step in (3, 4):
            assert resumed[step] == pytest.approx(want[step], rel=1e-5), step
