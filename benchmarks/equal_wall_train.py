"""Train a draft for the same training wall clock as a finished reference run (the EAGLE-3 row of the benchmark).

    python benchmarks/equal_wall_train.py --reference runs/reference/train-dspark/metrics.jsonl -- \
        -m train target=smollm2-135m draft=eagle3 ... train.output_dir=runs/reference/train-eagle3

Step count rule: steps = round(T_ref / t_probe), where T_ref is the reference run's summed ``step_time_s``
(its optimizer steps only: target loading and checkpoints excluded) and t_probe the median ``step_time_s``
of steps 3..N of a probe run of this very command for N (``--probe-steps``, default 12) steps, clamped to
[1, --max-steps]. The probe runs in ``<output_dir>/../<name>-probe`` and is discarded; the chosen count is
written to ``<output_dir>.steps.json`` first, so that a resumed stage trains to the same step count.
Same data, same rows per step, same seed: only the step count differs from the reference command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def step_times(metrics: Path) -> dict[int, float]:
    """step -> step_time_s of a metrics.jsonl (the last record of a repeated step wins)."""
    out = {}
    for line in metrics.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec and rec.get("step_time_s") is not None:
                out[rec["step"]] = float(rec["step_time_s"])
    return out


def equal_wall_steps(reference_total_s: float, probe_step_s: float, max_steps: int) -> int:
    return int(min(max(1, round(reference_total_s / max(probe_step_s, 1e-9))), max_steps))


def _arg(args: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(key + "=")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="metrics.jsonl of the finished reference run")
    p.add_argument("--probe-steps", type=int, default=12)
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--dry-run", action="store_true", help="print the rule's inputs and the commands only")
    args, cmd = p.parse_args(argv[:split]), argv[split + 1:]
    out = _arg(cmd, "train.output_dir")
    if out is None:
        raise SystemExit("equal_wall_train.py: the train command needs train.output_dir=...")
    chosen = Path(out + ".steps.json")
    base = [a for a in cmd if not a.startswith(("train.max_steps=", "train.output_dir="))]
    if args.dry_run:
        print(f"probe: {sys.executable} {' '.join(base)} train.max_steps={args.probe_steps} "
              f"train.output_dir={out}-probe; then steps = round(sum step_time_s of {args.reference} / median "
              f"probe step_time_s)")
        return 0
    if not chosen.is_file():
        probe = f"{out}-probe"
        subprocess.run([sys.executable, *base, f"train.max_steps={args.probe_steps}", f"train.output_dir={probe}",
                        "train.resume=never"], check=True)
        probe_times = [t for s, t in step_times(Path(probe) / "metrics.jsonl").items() if s >= 3]
        ref_total = sum(step_times(Path(args.reference)).values())
        t_probe = statistics.median(probe_times)
        steps = equal_wall_steps(ref_total, t_probe, args.max_steps)
        chosen.write_text(json.dumps({"steps": steps, "reference_step_s_total": ref_total,
                                      "probe_step_s_median": t_probe, "probe_steps": args.probe_steps,
                                      "reference": str(args.reference)}, indent=1) + "\n")
    steps = json.loads(chosen.read_text())["steps"]
    print(f"[equal-wall] training {steps} steps ({chosen})", flush=True)
    return subprocess.run([sys.executable, *base, f"train.max_steps={steps}", f"train.output_dir={out}"]).returncode


if __name__ == "__main__":
    sys.exit(main())
