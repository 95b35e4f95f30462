"""Load simulation and the calibration report (calibration.json + figures)."""

import json
import math
import os

import numpy as np
import pytest

from eval.calibration import apply_sts, fit_sts, prefix_survival, records_to_arrays
from eval.calibration_report import FIGURES, run_calibration
from eval.scheduler import SpsTable
from eval.simulate import simulate_load, simulate_records, synthetic_round_records

REPORT_KEYS = ("ece_before", "ece_after", "auroc", "brier", "scheduler_vs_best_fixed")
FALLING_SPS = SpsTable({1: 100.0, 8: 97.0, 32: 85.0, 64: 60.0, 128: 35.0, 256: 18.0})


def _survival_and_accepted(seed=0, gamma=5):
    records = synthetic_round_records(n_prompts=16, rounds_per_prompt=15, gamma=gamma, seed=seed)
    conf, accepted = records_to_arrays(records)
    return prefix_survival(apply_sts(conf, fit_sts(conf, accepted))), accepted


def test_flat_sps_algorithm1_matches_or_beats_every_fixed_length():
    survival, accepted = _survival_and_accepted()
    result = simulate_load(survival, accepted, SpsTable({1: 10.0}), concurrency=(1, 4, 16), n_steps=40)
    for row in result["table"]:
        fixed = [v for k, v in row["throughput"].items() if k.startswith("fixed_")]
        assert row["throughput"]["algorithm1"] >= max(fixed) * (1 - 1e-12)


def test_plain_decoding_throughput_and_ratio_key():
    survival, accepted = _survival_and_accepted()
    result = simulate_load(survival, accepted, FALLING_SPS, concurrency=(1, 2, 8, 32), n_steps=30,
                           threshold=0.3)
    assert math.isfinite(result["scheduler_vs_best_fixed"]) and result["scheduler_vs_best_fixed"] > 0
    assert result["scheduler_vs_best_fixed"] == min(r["algorithm1_vs_best_fixed"] for r in result["table"])
    for row in result["table"]:
        n_requests = row["concurrency"]
        # Fixed length 0 is plain decoding: R tokens per step at SPS(R) steps/s.
        assert row["throughput"]["fixed_0"] == pytest.approx(n_requests * FALLING_SPS(n_requests))
        assert set(row["throughput"]) >= {"algorithm1", "practical", "threshold", "fixed_5"}
        assert row["mean_batch_tokens"]["fixed_5"] == pytest.approx(6 * n_requests)


def test_simulation_is_deterministic_given_the_seed():
    survival, accepted = _survival_and_accepted()
    first = simulate_load(survival, accepted, FALLING_SPS, concurrency=(4,), n_steps=20, seed=7)
    second = simulate_load(survival, accepted, FALLING_SPS, concurrency=(4,), n_steps=20, seed=7)
    assert first["table"] == second["table"]


def test_simulate_records_calibrates_before_replaying():
    records = synthetic_round_records(n_prompts=6, rounds_per_prompt=10, gamma=4)
    result = simulate_records(records, [1.0] * 4, FALLING_SPS, concurrency=(2,), n_steps=10)
    assert result["table"][0]["concurrency"] == 2


def test_run_calibration_writes_json_and_figures(tmp_path):
    records = synthetic_round_records(n_prompts=16, rounds_per_prompt=20, gamma=4, seed=1)
    out = run_calibration(records, FALLING_SPS.to_dict(), str(tmp_path), n_bins=10,
                          hardware={"note": "unit test"}, concurrency=(1, 4, 16), n_steps=24)
    for key in REPORT_KEYS:
        assert math.isfinite(getattr(out, key)), key
    assert out.ece_after < out.ece_before
    path = tmp_path / "calibration.json"

    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    saved = json.loads(path.read_text(), parse_constant=reject)
    assert saved == out.to_dict()
    assert len(saved["temperatures"]) == saved["gamma"] == 4
    assert saved["scheduler"] == {"policy": "algorithm1", "early_stop": True, "practical_stale_steps": 2}
    assert SpsTable.from_dict(saved["sps"])(8) == pytest.approx(97.0)
    assert saved["sps"]["hardware"] == {"note": "unit test"}
    assert saved["threshold"]["rule"] and 0 < saved["threshold"]["recommended"] < 1
    assert len(saved["metrics"]["after"]["per_position"]["ece"]) == 4
    for name in FIGURES.values():
        assert os.path.getsize(tmp_path / name) > 1000
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_run_calibration_rejects_degenerate_input(tmp_path):
    with pytest.raises(ValueError, match="no round records"):
        run_calibration([], FALLING_SPS, str(tmp_path))
    one_prompt = synthetic_round_records(n_prompts=1, rounds_per_prompt=8, gamma=3)
    with pytest.raises(ValueError, match="at least 2"):
        run_calibration(one_prompt, FALLING_SPS, str(tmp_path))
    mixed = synthetic_round_records(n_prompts=3, gamma=3) + synthetic_round_records(n_prompts=3, gamma=4)
    with pytest.raises(ValueError, match="gamma"):
        run_calibration(mixed, FALLING_SPS, str(tmp_path))
    assert not (tmp_path / "calibration.json").exists()


def test_survival_must_match_accepted():
    with pytest.raises(ValueError):
        simulate_load(np.ones((3, 2)), np.ones(4, dtype=int), FALLING_SPS)
