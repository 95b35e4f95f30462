"""Shared helpers for the train tests: run the real CLI in a subprocess and read its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli_env() -> dict[str, str]:
    """One thread per process: on a busy 2-core machine this is much faster and just as deterministic."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")  # SIGABRT dumps every thread
    return env


def run_train(args: list[str], timeout: float = 300, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable]) + ["-m", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _sigint_as_at_a_terminal() -> None:
    """In the child before exec: SIGINT handled by default. A shell without job control starts background
    commands (``cmd &``, as CI runners may) with SIGINT ignored, the child would inherit that, and Python
    leaves an inherited SIG_IGN alone, so a test's Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run's later record of a step wins)."""
    result = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        result[rec["step"]] = rec["loss"]
    return result


# A small, fast job on the tiny random target (overrides shared by the resume and distributed tests).
FAST = ["target=tiny", "logger=jsonl", "draft.num_layers=1", "draft.markov_rank=16", "data=synthetic",
        "data.synthetic_rows=32", "data.synthetic_response_tokens=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.warmup_steps=2", "train.lr=1e-3"]
