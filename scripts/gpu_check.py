"""`make gpu-check` (scripts/gpu_check.sh): what a GPU machine must show before a real run, in under 8 minutes.

On one CUDA GPU, each stage through the real command line, every output under ``--work-dir``:

1. ``train-tiny``     bf16 training steps of a DSpark draft on the tiny random target (data sampled from it);
2. ``data-smollm2``   data_prep on the embedded SmolLM2-135M target (a few prompts, short answers, on the GPU);
3. ``train-smollm2``  bf16 training steps on that data;
4. ``nccl-2proc``     the tiny job on 2 processes over NCCL with DeepSpeed ZeRO-2 (only when 2 GPUs are visible);
5. ``eval-smollm2``   lossless speculative decoding of the trained draft on the GPU: greedy identity with plain
                      decoding, τ, tokens/s and the wall time.

It prints one JSON summary (also written to ``<work-dir>/summary.json``): per stage status, seconds, the last
training loss and step time, the eval figures; ``ok`` is true when every stage that ran passed and greedy
speculative output equals plain greedy output. Exit status 0 when ok, 1 otherwise, 2 when no CUDA GPU is
visible (one ``error:`` line, nothing run). The stages share one time budget (``--budget-s``, 480 s): a stage
gets what is left of it, and stages after an exhausted budget are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Per-stage time limits in seconds (each also capped by what is left of the overall budget).
STAGE_LIMITS = {"train-tiny": 120, "data-smollm2": 150, "train-smollm2": 150, "nccl-2proc": 150,
                "eval-smollm2": 150}
TINY = ["target=tiny", "data=synthetic", "data.synthetic_rows=32", "data.synthetic_response_tokens=32",
        "draft.num_layers=1", "draft.markov_rank=16", "logger=jsonl", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.warmup_steps=2", "train.device=cuda", "train.precision=bf16"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="runs/gpu-check", help="outputs and logs of every stage (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="training steps per training stage (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=480.0, help="time for all stages together (default: %(default)s)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the stages")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands as JSON and run nothing")
    p.add_argument("--gpus", type=int, default=None, help="with --dry-run: plan for this many GPUs")
    args = p.parse_args(argv)
    if args.steps < 1 or args.budget_s <= 0:
        p.error(f"--steps must be >= 1 and --budget-s > 0 (got {args.steps}, {args.budget_s})")
    if args.gpus is not None and not args.dry_run:
        p.error("--gpus only plans (with --dry-run); a real check uses the GPUs it sees")
    return args


def visible_gpus() -> tuple[int, str]:
    """(number of CUDA GPUs torch sees, a short description for the summary or the refusal)."""
    import torch

    if not torch.cuda.is_available():
        return 0, f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    n = torch.cuda.device_count()
    return n, f"{n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def plan(work: Path, steps: int, gpus: int, python: str) -> dict[str, list[str]]:
    """Stage name -> command line, in run order; the NCCL stage only with two GPUs or more."""
    steps_args = [f"train.max_steps={steps}", f"train.save_every={steps}", "train.keep_last=1"]
    stages = {
        "train-tiny": [python, "-m", "train", *TINY, *steps_args, f"train.output_dir={work / 'train-tiny'}"],
        "data-smollm2": [python, "-m", "data_prep", "num_prompts=24", "generation.max_new_tokens=64",
                         "device=cuda", "workers=1", f"out_dir={work / 'data'}"],
        "train-smollm2": [python, "-m", "train", f"data.path={work / 'data'}", "logger=jsonl", "train.device=cuda",
                          "train.precision=bf16", "train.global_batch_size=8", "train.micro_batch_size=4",
                          "train.warmup_steps=2", *steps_args, f"train.output_dir={work / 'train-smollm2'}"],
    }
    if gpus >= 2:
        stages["nccl-2proc"] = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "-m", "train",
                                *TINY, "deepspeed=zero2", *steps_args, f"train.output_dir={work / 'nccl-2proc'}"]
    stages["eval-smollm2"] = [python, "-m", "eval", f"draft={work / 'train-smollm2' / 'final'}",
                              "prompts=demo-heldout", "num_prompts=4", "max_new_tokens=64", "device=cuda",
                              "calibration.enabled=false", f"out_dir={work / 'eval'}"]
    return stages


def _last_error(log: str) -> str | None:
    """The line a failed stage ended with: its ``error:`` line, else its last non-empty line."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or [None])[-1]


def train_figures(out_dir: Path) -> dict:
    """Last step, its loss, and the mean step time over the run's metrics.jsonl (empty when absent)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not records:
        return {}
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return {"steps": records[-1]["step"], "final_loss": records[-1]["loss"], "first_loss": records[0]["loss"],
            "mean_step_time_s": sum(times) / len(times) if times else None}


def eval_figures(out_dir: Path) -> dict:
    """The eval report's lossless check, τ and speed (empty when no report was written)."""
    path = out_dir / "report.json"
    if not path.is_file():
        return {}
    from eval.report import EvalReport

    r = EvalReport.read(path)
    return {"greedy_match_rate": r.greedy_match_rate, "tau": r.tau, "tokens_per_s": r.tokens_per_s,
            "speedup_vs_generate": r.speedup_vs_generate}


def summarize(work: Path, results: dict[str, dict], device: str) -> dict:
    """The JSON summary: stage results with their figures, and whether the whole check passed."""
    stages = {}
    for name, res in results.items():
        entry = dict(res)
        if res["status"] == "ok" and name.startswith(("train-", "nccl-")):
            entry.update(train_figures(work / name))
        if res["status"] == "ok" and name.startswith("eval-"):
            entry.update(eval_figures(work / "eval"))
        stages[name] = entry
    ran = [s for s in stages.values() if s["status"] != "skipped"]
    lossless = [s["greedy_match_rate"] for s in stages.values() if "greedy_match_rate" in s]
    ok = bool(ran) and all(s["status"] == "ok" for s in stages.values()) and lossless == [1.0]
    return {"ok": ok, "device": device, "total_s": round(sum(s.get("seconds", 0) for s in ran), 1),
            "stages": stages}


def run_stage(cmd: list[str], log_path: Path, limit: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled")
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - start, 1)
    if rc == 0:
        return {"status": "ok", "seconds": seconds}
    reason = f"timed out after {limit:.0f} s" if rc is None else _last_error(log_path.read_text())
    return {"status": "failed", "seconds": seconds, "returncode": rc, "error": reason, "log": str(log_path)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args.dry_run:
        gpus = args.gpus if args.gpus is not None else visible_gpus()[0]
        print(json.dumps(plan(work, args.steps, max(gpus, 1), args.python), indent=2))
        return 0
    gpus, device = visible_gpus()
    if gpus == 0:
        print(f"error: gpu_check needs a CUDA GPU and torch sees none ({device}); run it on a GPU machine",
              file=sys.stderr)
        return 2
    (work / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = {}
    for name, cmd in plan(work, args.steps, gpus, args.python).items():
        left = deadline - time.monotonic()
        if left < 10:
            results[name] = {"status": "skipped", "error": "time budget used up"}
            continue
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        results[name] = run_stage(cmd, work / "logs" / f"{name}.log", min(STAGE_LIMITS[name], left))
    summary = summarize(work, results, device)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
