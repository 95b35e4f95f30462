"""train.estimate_memory (train/memory.py): the fake-tensor estimate of a step against the measured peak of the
same step on real tensors, the sharding arithmetic, and the CLI switch."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_model.config import DraftConfig, TargetSpec
from train.memory import estimate_memory, shard_plan, target_config, target_from_config, trace_step
from train.schema import DataConfig, DeepSpeedConfig, OptimConfig, TrainJob

ROOT = Path(__file__).resolve().parents[2]
# a vocabulary large enough that the loss chunks dominate the step, as on a real target (tens of MB here)
TINY = TargetSpec(id="tiny-random-llama", path=None, dtype="float32",
                  random={"family": "llama", "num_hidden_layers": 4, "seed": 0, "vocab_size": 16384})


def _job(**train) -> TrainJob:
    t = dict(micro_batch_size=2, global_batch_size=2, anchors_per_4096=0, min_anchors=24, max_anchors=24,
             logits_chunk_size=168, recompute_chunks=True, device="cpu", precision="fp32")
    t.update(train)
    return TrainJob(target=TINY, draft=DraftConfig(num_layers=2, markov_rank=32),
                    data=DataConfig(mode="offline", max_length=256), train=OptimConfig(**t))


def _measured_step_mb(job: TrainJob) -> float | None:
    """The step's peak resident memory on real tensors, as benchmarks/train_memory.py measures it (None where
    the kernel cannot reset the high-water mark). Call it in a fresh process (``_measured_in_child``): the
    resident set is the whole process's, and what earlier tests left in the heap or in MKL's buffers moves it."""
    from benchmarks.train_memory import _mmap_large_allocations, _release_free_heap, _reset_peak, _status_kb
    from dspark_model.draft import build_draft

    _mmap_large_allocations()
    real = contextlib.nullcontext()
    target = target_from_config(job.target, target_config(job.target), real)
    draft = build_draft(job.draft, target.config, target.tap_layer_ids, mask_token_id=0).attach_target(target)
    args = (target, draft, job, real, 2, 256, 24, None, False)
    trace_step(*args)  # warm-up
    draft.zero_grad(set_to_none=True)
    _release_free_heap()
    if not _reset_peak():
        return None
    before = _status_kb("VmRSS")
    trace_step(*args)
    return (_status_kb("VmHWM") - before) / 1024


def _measured_in_child() -> float | None:
    code = ("import json; from tests.train.test_memory import _job, _measured_step_mb; "
            "print(json.dumps(_measured_step_mb(_job())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_estimate_matches_the_measured_peak_of_the_same_tiny_step():
    est = estimate_memory(_job(), world=1)
    estimated = (est.rows["activations"] + est.rows["gradients"]) / 1024 ** 2
    measured = _measured_in_child()
    if measured is None:
        pytest.skip("this kernel does not let a process reset its resident-set high-water mark")
    assert measured > 20  # the step is big enough for the measurement to mean something
    print(f"estimated {estimated:.1f} MiB, measured {measured:.1f} MiB")
    assert abs(estimated - measured) / measured < 0.2, (estimated, measured)


def test_recompute_off_keeps_every_chunk_and_costs_more():
    on = estimate_memory(_job(logits_chunk_size=56), world=1).rows["activations"]
    off = estimate_memory(_job(logits_chunk_size=56, recompute_chunks=False), world=1).rows["activations"]
    print(f"recompute on {on / 2 ** 20:.1f} MiB, off {off / 2 ** 20:.1f} MiB")
    assert off > on * 1.5


def test_shard_plan_arithmetic():
    zero = {"reduce_bucket_size": 10, "overlap_comm": False}
    assert shard_plan("none", 1, 800, 800, 1600) == {"params": 800, "grad_factor": 1.0, "states": 1600,
                                                     "buffers": 0.0}
    assert shard_plan("none", 4, 800, 800, 1600)["buffers"] == 800  # DDP's gradient buckets
    two = shard_plan("2", 8, 800, 800, 1600, zero)
    assert two == {"params": 800.0, "grad_factor": 1 / 8, "states": 200.0, "buffers": 100 + 40}
    assert shard_plan("2", 8, 800, 800, 1600, dict(zero, overlap_comm=True))["buffers"] == 100 + 80
    three = shard_plan("3", 8, 800, 800, 1600, zero, largest_module=30)
    assert three == {"params": 100.0, "grad_factor": 1 / 8, "states": 200.0, "buffers": 100 + 40 + 60}


def test_zero2_divides_optimizer_states_and_gradients_by_the_world_size():
    job = _job(global_batch_size=8)
    job.deepspeed = DeepSpeedConfig(stage="2", config={"zero_optimization": {"reduce_bucket_size": 1000}})
    one, four = estimate_memory(job, world=1), estimate_memory(job, world=4)
    assert one.settings["accumulation"] == 4 and four.settings["accumulation"] == 1
    assert four.rows["optimizer states"] == pytest.approx(one.rows["optimizer states"] / 4)
    assert four.rows["draft parameters"] == one.rows["draft parameters"]  # ZeRO-2 keeps parameters whole
    assert four.rows["gradients"] <= one.rows["gradients"] / 4 + 1


def test_cli_prints_the_estimate_and_trains_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", "target=tiny", "data=synthetic",
                          "train.estimate_memory=true", "train.estimate_processes=2", "deepspeed=zero2",
                          f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "estimated peak memory per process" in out.stdout and "2 process(es), deepspeed=2" in out.stdout
    assert "optimizer states" in out.stdout and not (tmp_path / "run").exists()
