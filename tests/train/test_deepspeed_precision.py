"""train.precision reaches DeepSpeed: under ZeRO a bf16 run computes in bf16 inside the engine.

DeepSpeed 0.19 wraps the engine's forward in its own autocast context and switches an outer
``torch.autocast`` off unless its config has an enabled ``torch_autocast`` block; without it the draft and
its loss ran in fp32 on GPUs. One CPU process (gloo) in a subprocess, so no process group outlives the test
(and the autocast probe the script adjusts stays inside it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train.helpers import REPO, cli_env
from train.distributed import deepspeed_config
from train.schema import TrainConfigError

# The loop's own precision decision and autocast, a Linear (plus a loss) handed to DeepSpeed ZeRO-2 through
# train.distributed.setup, one forward + backward + step. Prints the output dtypes as JSON.
SCRIPT = r"""
import json, sys
import torch
from torch import nn
from train import distributed
from train.loop import _autocast, uses_bf16

# On a GPU node DeepSpeed's accelerator is CUDA and torch.is_autocast_enabled() (no argument: CUDA) sees the
# loop's autocast, which DeepSpeed then switches off unless told about it. On CPU that probe misses a CPU
# autocast, so the failure would hide; make the no-argument probe look at the CPU, as it does at CUDA there.
_probe = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda device_type=None: _probe(device_type or "cpu")

precision = sys.argv[1]
device = torch.device("cpu")
rt, _ = distributed.setup("2", {"zero_optimization": {"stage": 2}}, 1, 1, 1.0, "cpu",
                          bf16_autocast=uses_bf16(device, precision))
torch.manual_seed(0)
linear = nn.Linear(8, 8)
x = torch.randn(2, 8)
with _autocast(device, precision):
    plain = linear(x).dtype
model, opt = rt.accelerator.prepare(linear, torch.optim.AdamW(linear.parameters(), lr=1e-3))
with _autocast(device, precision):
    y = model(x)
    loss = y.float().pow(2).mean()
    rt.accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
print("RESULT " + json.dumps({"plain": str(plain), "engine": str(y.dtype),
                              "finite": bool(torch.isfinite(loss).item())}))
"""


def _run(precision: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, precision], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_linear_in_zero_engine_follows_train_precision():
    bf16 = _run("bf16")
    assert bf16["plain"] == "torch.bfloat16"
    assert bf16["engine"] == "torch.bfloat16", bf16  # was torch.float32: DeepSpeed disabled the outer autocast
    assert bf16["finite"]
    fp32 = _run("fp32")
    assert fp32["plain"] == fp32["engine"] == "torch.float32"


def test_torch_autocast_block_follows_precision():
    on = deepspeed_config({}, "2", 2, 1, 1, 1.0, bf16_autocast=True)["torch_autocast"]
    assert on == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    off = deepspeed_config({}, "3", 2, 1, 1, 1.0, bf16_autocast=False)["torch_autocast"]
    assert off == {"enabled": False}
    safe = ["torch.nn.modules.linear.Linear"]  # bf16 gradient reduction for Linear layers, if a user asks
    user = {"torch_autocast": {"lower_precision_safe_modules": safe}}
    assert deepspeed_config(user, "2", 2, 1, 1, 1.0, True)["torch_autocast"]["lower_precision_safe_modules"] == safe
    with pytest.raises(TrainConfigError, match="train.precision"):
        deepspeed_config({"torch_autocast": {"enabled": True}}, "2", 2, 1, 1, 1.0, False)
