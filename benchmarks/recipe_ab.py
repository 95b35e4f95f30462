"""Training-recipe A/B on SmolLM2: variants of one recipe at equal steps, same data and seed, judged by the
greedy acceptance length replayed on held-out answers.

Sets of variants (``--set``):

- ``init`` (-> ``results/warm_start.json``): random initialisation vs target layers copied into the draft
  (``draft.init_from_target``), 2-layer draft, 24 anchors per row, 20 warm-up steps.
- ``recipe`` (-> ``results/recipes.json``): the reference recipe (``conf/train/reference.yaml``) vs the
  recipes peers use: the paper's LR 6e-4, hidden-state noise, Muon, bf16 autocast, and the same recipe on half
  the data (the first half of every source: how much more data is worth).

Stages (each skipped when its output exists, so an interrupted run continues):

1. data: ``--prompts`` prompts from each shared training set, answers regenerated greedily (<= 192 tokens),
   target cache; held-out: ``--heldout`` prompts of each of gsm8k-test / humaneval / mt-bench, no cache.
   ``--data`` / ``--half-data`` / ``--heldout-data`` reuse folders data_prep already wrote (e.g. the
   reference run's).
2. one ``python -m train train=reference data=demo-offline`` run per variant (``--steps`` steps, draft
   vocabulary ``--vocab``), timed.
3. ``benchmarks/heldout_tau.py`` on the held-out answers: greedy tau replayed exactly, per-slot acceptance.

    .venv/bin/python benchmarks/recipe_ab.py --set init      # -> benchmarks/results/warm_start.json
    .venv/bin/python benchmarks/recipe_ab.py --set recipe --data runs/reference/data --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HALF = "half-data"  # the variant trained on the first half of each source's rows (a second data_prep folder)
SETS = {
    "init": {
        "result": "warm_start.json",
        "base": ["train.max_anchors=24", "train.warmup_steps=20"],  # the recipe those figures were measured with
        "variants": {
            "rand": [],
            "last2": ["draft.init_from_target=last"],
            "mid": ['draft.init_from_target="14,15"'],
            "first": ['draft.init_from_target="0,1"'],
            "rand-ce1": ["train.alpha_ce=1.0"],
        },
    },
    "recipe": {
        "result": "recipes.json",
        "base": [],
        "variants": {
            "reference": [],
            "lr6e-4": ["train.lr=6e-4"],
            "noise0.05": ["train.feature_noise=0.05"],
            "muon": ["train.optimizer=muon"],
            "bf16": ["train.precision=bf16"],
            HALF: [],
        },
    },
}


def _run(cmd: list[str], log: Path) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: command failed, see {log}")
    return time.perf_counter() - start


def _data(py, out: Path, prompts: int, log: Path) -> None:
    if not (out / "manifest.json").is_file():
        _run([py, "-m", "data_prep", "prompts=shared-train",
              *[f"prompts.sources.{i}.num_samples={prompts}" for i in range(3)], "generation.max_new_tokens=192",
              "num_threads=1", "max_length=1024", "cache.enabled=true", "cache.dtype=bfloat16", f"out_dir={out}"],
             log)


def _throughput(out: Path) -> dict:
    """Supervised positions per second and wall time of a finished run, from its metrics.jsonl."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    seconds = sum(r.get("step_time_s", 0.0) for r in recs)
    return {"train_step_s": seconds, "positions_per_s": sum(r.get("supervised", 0.0) for r in recs) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=sorted(SETS), default="init")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "exp")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=40, help="training prompts per shared training set")
    p.add_argument("--heldout", type=int, default=8, help="held-out prompts per eval set")
    p.add_argument("--data", type=Path, help="an existing data_prep folder with a target cache")
    p.add_argument("--half-data", type=Path, help="an existing folder with the first half of --data's prompts")
    p.add_argument("--heldout-data", type=Path, help="an existing held-out data_prep folder (greedy answers)")
    p.add_argument("--only", nargs="*", help="variants to run (default: all of the set)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    spec = SETS[args.set]
    run, py = args.run_dir, sys.executable
    run.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = args.data or run / "data"
    _data(py, data, args.prompts, run / "data.log")
    heldout = args.heldout_data or run / "heldout"
    if not (heldout / "manifest.json").is_file():
        n = args.heldout
        _run([py, "-m", "data_prep", "prompts=shared-eval", *[f"prompts.sources.{i}.num_samples={n}" for i in range(3)],
              "generation.max_new_tokens=192", "num_threads=1", "max_length=1024", f"out_dir={heldout}"],
             run / "heldout.log")
    variants = {k: v for k, v in spec["variants"].items() if not args.only or k in args.only}
    half = args.half_data or run / "data-half"
    if HALF in variants:  # the first half of each source's prompts: a nested subset of the full data
        _data(py, half, max(1, args.prompts // 2), run / "data-half.log")
    names, timing = {}, {}
    for name, extra in variants.items():
        out = run / f"k{args.vocab}-{name}"
        names[name] = out / "final"
        if not (out / "final" / "config.json").is_file():
            source = half if name == HALF else data
            _run([py, "-m", "train", "train=reference", "data=demo-offline", f"data.path={source}",
                  f"draft.draft_vocab_size={args.vocab}", f"train.max_steps={args.steps}", "train.save_every=1000",
                  *spec["base"], f"train.output_dir={out}", "logger.tensorboard=false", "logger.progress_bar=false",
                  *extra], run / f"{out.name}.log")
        timing[name] = _throughput(out)
    replay = run / f"{args.set}_heldout.json"
    _run([py, str(ROOT / "benchmarks" / "heldout_tau.py"), "--data", str(heldout), "--threads", "1",
          "--out", str(replay), "--draft", *[f"{n}={p}" for n, p in names.items()]], run / "heldout_tau.log")
    result = json.loads(replay.read_text())
    for n, t in timing.items():
        result["drafts"][n].update(t)
    result.update(steps=args.steps, draft_vocab_size=args.vocab, variants={n: variants[n] for n in names},
                  base_overrides=spec["base"], recipe="conf/train/reference.yaml")
    sys.path.insert(0, str(ROOT))
    from dspark_model.atomic import atomic_write_json

    out_file = args.out or ROOT / "benchmarks" / "results" / spec["result"]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_file, result)
    for n, r in result["drafts"].items():
        print(f"{n}: tau {r['tau']:.3f}, acceptance k1 {r['conditional_acceptance'][0]:.3f}, "
              f"{r['positions_per_s']:.0f} positions/s")


if __name__ == "__main__":
    main()
