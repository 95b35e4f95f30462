"""Draft initialisation A/B on SmolLM2: random vs target layers copied in, at equal steps, same data and seed.

Stages (each skipped when its output exists, so an interrupted run continues):

1. data: 40 prompts from each shared training set, answers regenerated greedily (<= 192 tokens), target cache;
   held-out: 8 / 8 / 6 prompts of gsm8k-test / humaneval / mt-bench regenerated the same way, no cache.
2. one ``python -m train train=reference data=demo-offline`` run per variant (``--steps`` steps, draft
   vocabulary ``--vocab``), differing only in ``draft.init_from_target`` (or one loss weight).
3. ``benchmarks/heldout_tau.py`` on the held-out answers: greedy tau replayed exactly, per-slot acceptance.

    .venv/bin/python benchmarks/warm_start.py      # -> benchmarks/results/warm_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "warm_start.json"
VARIANTS = {  # name -> extra train overrides
    "rand": [],
    "last2": ["draft.init_from_target=last"],
    "mid": ['draft.init_from_target="14,15"'],
    "first": ['draft.init_from_target="0,1"'],
    "rand-ce1": ["train.alpha_ce=1.0"],
}


def _run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: command failed, see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "exp")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    run, py = args.run_dir, sys.executable
    run.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    gen = ["generation.max_new_tokens=192", "num_threads=1", "max_length=1024"]
    if not (run / "data" / "manifest.json").is_file():
        _run([py, "-m", "data_prep", "prompts=shared-train", *[f"prompts.sources.{i}.num_samples=40" for i in range(3)],
              *gen, "generation.batch_size=24", "cache.enabled=true", "cache.dtype=bfloat16",
              f"out_dir={run / 'data'}"], run / "data.log")
    if not (run / "heldout" / "manifest.json").is_file():
        _run([py, "-m", "data_prep", "prompts=shared-eval", "prompts.sources.0.num_samples=8",
              "prompts.sources.1.num_samples=8", "prompts.sources.2.num_samples=6", *gen,
              "generation.batch_size=22", f"out_dir={run / 'heldout'}"], run / "heldout.log")
    names = {}
    for name, extra in VARIANTS.items():
        out = run / f"k{args.vocab}-{name}"
        names[name] = out / "final"
        if not (out / "final" / "config.json").is_file():
            _run([py, "-m", "train", "train=reference", "data=demo-offline", f"data.path={run / 'data'}",
                  f"draft.draft_vocab_size={args.vocab}", f"train.max_steps={args.steps}", "train.save_every=1000",
                  "train.max_anchors=24", "train.warmup_steps=20",  # the recipe these figures were measured with
                  f"train.output_dir={out}", "logger.tensorboard=false", "logger.progress_bar=false", *extra],
                 run / f"{out.name}.log")
    replay = run / "warm_start_heldout.json"
    _run([py, str(ROOT / "benchmarks" / "heldout_tau.py"), "--data", str(run / "heldout"), "--threads", "1",
          "--out", str(replay), "--draft", *[f"{n}={p}" for n, p in names.items()]], run / "heldout_tau.log")
    result = json.loads(replay.read_text())
    result.update(steps=args.steps, draft_vocab_size=args.vocab,
                  variants={n: VARIANTS[n] for n in names}, recipe="conf/train/reference.yaml")
    sys.path.insert(0, str(ROOT))
    from dspark_model.atomic import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    for n, r in result["drafts"].items():
        print(f"{n}: tau {r['tau']:.3f}, acceptance k1 {r['conditional_acceptance'][0]:.3f}")


if __name__ == "__main__":
    main()
