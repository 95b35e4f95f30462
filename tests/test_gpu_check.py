"""scripts/gpu_check.sh: what can be checked without a GPU — the refusal, the stage plan, the JSON summary.

The check itself needs a CUDA GPU (`make gpu-check` on a GPU machine); here the stage commands are composed
into the stages' typed configs, the summary is built from fake stage outputs, and the script is run for real
to show that it stops with one line when torch sees no GPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.report import write_outputs
from tests.test_configs import _compose

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _overrides(cmd: list[str], stage: str) -> list[str]:
    return [a for a in cmd[cmd.index(stage) + 1:] if "=" in a and not a.startswith("-")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: the check would run")
def test_refuses_with_one_line_without_a_cuda_gpu(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--work-dir", str(tmp_path / "w")], cwd=REPO,
                          env={"PY": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu_check needs a CUDA GPU"), proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was run or written


@pytest.mark.parametrize("gpus", [1, 2])
def test_stage_plan_composes_and_trains_in_bf16_on_cuda(tmp_path, gpus):
    stages = gpu_check.plan(tmp_path, 20, gpus, "python")
    assert list(stages) == ["train-tiny", "data-smollm2", "train-smollm2",
                            *(["nccl-2proc"] if gpus >= 2 else []), "eval-smollm2"]
    for name, cmd in stages.items():
        if name.startswith(("train-", "nccl-")):
            job = _compose("train", _overrides(cmd, "train"))
            assert (job.train.device, job.train.precision, job.train.max_steps) == ("cuda", "bf16", 20), name
            assert Path(job.train.output_dir) == tmp_path / name  # where summarize() reads the metrics
    assert _compose("data_prep", _overrides(stages["data-smollm2"], "data_prep")).device == "cuda"
    data = _compose("train", _overrides(stages["train-smollm2"], "train")).data.path
    assert data == str(tmp_path / "data") and "device=cuda" in stages["eval-smollm2"]
    if gpus >= 2:
        nccl = stages["nccl-2proc"]
        assert nccl[nccl.index("--nproc_per_node") + 1] == "2" and "deepspeed=zero2" in nccl


def _metrics(folder: Path, losses: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": x, "step_time_s": 0.5}) + "\n" for i, x in enumerate(losses)))


def _report(folder: Path, greedy: float) -> None:
    from eval.metrics import acceptance_summary, throughput_summary
    from eval.report import build_report

    rows = [{"spec_tokens": 90, "spec_s": 1.0, "generate_tokens": 90, "generate_s": 1.1, "greedy_match": greedy == 1}]
    report = build_report(acceptance_summary([], 4), throughput_summary(rows), {})
    report.greedy_match_rate, report.tau = greedy, 1.4  # as measured over more prompts than one row
    write_outputs(str(folder), report)


@pytest.mark.parametrize("greedy, changed, ok", [(1.0, None, True), (0.95, None, False), (1.0, "failed", False),
                                                 (1.0, "skipped", False)])
def test_summary_passes_only_when_every_stage_passed_and_decoding_was_lossless(tmp_path, greedy, changed, ok):
    """ok needs every planned stage to pass (one skipped for lack of time fails the check too) and greedy
    speculative output identical to plain greedy output."""
    _metrics(tmp_path / "train-tiny", [5.0, 4.0])
    _metrics(tmp_path / "train-smollm2", [9.0, 8.0, 7.5])
    _report(tmp_path / "eval", greedy)
    results = {n: {"status": "ok", "seconds": 10.0} for n in ("train-tiny", "data-smollm2", "train-smollm2",
                                                              "eval-smollm2")}
    if changed == "failed":
        results["train-tiny"] = {"status": "failed", "seconds": 3.0, "returncode": 2, "error": "error: boom"}
    if changed == "skipped":
        results["nccl-2proc"] = {"status": "skipped", "error": "time budget used up"}
    summary = gpu_check.summarize(tmp_path, results, "1 x H100")
    assert summary["ok"] is ok
    assert json.loads(json.dumps(summary)) == summary  # printable as JSON
    s = summary["stages"]
    assert s["train-smollm2"] == {"status": "ok", "seconds": 10.0, "steps": 3, "final_loss": 7.5, "first_loss": 9.0,
                                  "mean_step_time_s": 0.5}
    assert s["eval-smollm2"]["greedy_match_rate"] == greedy and s["eval-smollm2"]["tau"] == 1.4
    assert summary["total_s"] == (33.0 if changed == "failed" else 40.0)
    if changed == "failed":
        assert s["train-tiny"]["error"] == "error: boom" and "final_loss" not in s["train-tiny"]


def test_a_failed_stage_reports_its_error_line_and_a_stuck_one_its_time_limit(tmp_path):
    fail = [sys.executable, "-c", "import sys; print('loading'); print('error: no data at x', file=sys.stderr); "
                                  "sys.exit(2)"]
    res = gpu_check.run_stage(fail, tmp_path / "fail.log", 60)
    assert (res["status"], res["returncode"], res["error"]) == ("failed", 2, "error: no data at x")
    res = gpu_check.run_stage([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log", 1)
    assert res["status"] == "failed" and res["error"] == "timed out after 1 s"


def test_bad_arguments_are_refused():
    for argv in (["--steps", "0"], ["--budget-s", "-1"], ["--gpus", "2"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(argv)
        assert exc.value.code == 2
