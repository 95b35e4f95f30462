"""Calibration records for tests, made as eval makes them: its calibration stage writes calibration.json and
the test reads that file back (never a hand-written dict)."""

from __future__ import annotations

from pathlib import Path

from dspark_model.atomic import file_sha256
from dspark_model.calibration import CALIBRATION_NAME, WEIGHTS_NAME, Calibration
from eval.calibration_report import run_calibration
from eval.scheduler import SpsTable
from eval.simulate import synthetic_round_records

SPS = SpsTable({1: 40.0, 4: 44.0, 16: 30.0, 64: 12.0})  # not monotone: the envelope lifts B=1 to 44


def fitted_calibration(out_dir: str | Path, gamma: int = 4, seed: int = 2,
                       weights_sha256: str | None = None) -> Calibration:
    """eval's calibration stage on synthetic rounds (12 prompts x 12 rounds), read back from its file."""
    records = synthetic_round_records(n_prompts=12, rounds_per_prompt=12, gamma=gamma, seed=seed)
    run_calibration(records, SPS.to_dict(), str(out_dir), n_bins=10, concurrency=(1, 4), n_steps=8,
                    weights_sha256=weights_sha256)
    return Calibration.read(Path(out_dir) / CALIBRATION_NAME)


def calibrate_checkpoint(ckpt: str | Path, out_dir: str | Path, gamma: int = 4) -> Calibration:
    """A calibration fitted on the weights in ``ckpt`` and written beside them, as eval writes it."""
    ckpt = Path(ckpt)
    record = fitted_calibration(out_dir, gamma, weights_sha256=file_sha256(ckpt / WEIGHTS_NAME))
    record.write(ckpt / CALIBRATION_NAME)
    return record
