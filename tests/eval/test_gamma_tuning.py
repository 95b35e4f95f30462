"""gamma_tuning: the pilot's acceptance profile, the cost profile, the choice, and the eval that uses it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dspark_model.draft import build_draft_for
from dspark_model.prepack import PackedLinear
from eval.gamma_tuning import choose_gamma, expected_tokens, pilot_prompts, profile_round_costs, survival
from tests.conftest import tiny_draft_config
from tests.eval.test_cli import _checkpoint, _prompt_file, _run, _sources


def test_survival_and_expected_tokens_follow_the_accepted_counts():
    records = [{"accepted": a} for a in (0, 0, 1, 2, 4)]
    surv = survival(records, 4)
    np.testing.assert_allclose(surv, [3 / 5, 2 / 5, 1 / 5, 1 / 5])
    # verifying gamma tokens yields min(accepted, gamma) + 1 tokens per round
    for gamma in range(1, 5):
        assert expected_tokens(surv, gamma) == pytest.approx(np.mean([min(r["accepted"], gamma) + 1
                                                                      for r in records]))
    with pytest.raises(ValueError, match="no rounds"):
        survival([], 3)


def _cost(draft_s, verify_s, packed_s=None):
    return {"draft_s": draft_s, "verify_s": verify_s, "verify_prepacked_s": packed_s}


def test_choose_gamma_maximises_expected_tokens_per_second_and_keeps_the_faster_kernel():
    surv = np.array([0.5, 0.2, 0.1])
    costs = {1: _cost(0.1, 1.2, 1.3), 2: _cost(0.1, 1.3, 1.25), 3: _cost(0.1, 1.8, 1.5)}
    gamma, packed, table = choose_gamma(surv, costs)
    # 1.5 / 1.3 = 1.154, 1.7 / 1.35 = 1.259, 1.8 / 1.6 = 1.125
    assert (gamma, packed) == (2, True)
    assert table[1]["prepack"] is False and table[1]["round_s"] == pytest.approx(1.3)
    assert table[3]["expected_tokens_per_s"] == pytest.approx(1.8 / 1.6)
    # without packs the plain kernel is used; a draft that is never accepted verifies one token
    gamma, packed, _ = choose_gamma(np.zeros(3), {g: _cost(0.1, 1.0 + 0.1 * g) for g in (1, 2, 3)})
    assert (gamma, packed) == (1, False)
    # equal figures: the shorter length
    assert choose_gamma(np.array([0.0, 0.0]), {1: _cost(0.1, 1.0), 2: _cost(0.1, 1.0)})[0] == 1


def _prompt(source, row, text):
    return SimpleNamespace(source=source, row_id=row, turns=[text])


def test_pilot_prompts_extend_the_timed_subset_and_exclude_it():
    pool = {s: [_prompt(s, i, f"{s}-{i}") for i in range(6)] for s in ("a", "b")}

    def load(n):  # like seeded_subset: a larger n extends a smaller
        return [p for s in pool for p in pool[s][:n]]

    timed = load(2)
    pilot = pilot_prompts(load, timed, 3, 2)
    assert [(p.source, p.row_id) for p in pilot] == [("a", 2), ("a", 3), ("a", 4), ("b", 2), ("b", 3), ("b", 4)]
    with pytest.raises(ValueError, match="no prompt beyond the 6 timed"):
        pilot_prompts(load, load(6), 3, 6)
    with pytest.raises(ValueError, match="set num_prompts=<n>"):
        pilot_prompts(load, timed, 3, None)


def test_profile_round_costs_times_every_length_and_leaves_the_target_as_it_was(tiny_target):
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, tiny_draft_config()).eval()
    before = {k: v.clone() for k, v in tiny_target.model.state_dict().items()}
    costs = profile_round_costs(tiny_target, draft, list(range(3, 20)), [1, 2, 4], 0.0, prepack=True, repeats=2)
    assert sorted(costs) == [1, 2, 4]
    for c in costs.values():
        assert c["draft_s"] > 0 and c["verify_s"] > 0
        assert c["verify_prepacked_s"] is None or c["verify_prepacked_s"] > 0
    assert not any(isinstance(m, PackedLinear) or hasattr(m, "_packs") for m in tiny_target.model.modules())
    after = tiny_target.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    plain = profile_round_costs(tiny_target, draft, list(range(3, 20)), [2], 1.0, prepack=False, repeats=1)
    assert plain[2]["verify_prepacked_s"] is None
    # a draft that consumes its context on every proposal (EAGLE-3) is timed as often as the others
    eagle3 = build_draft_for(tiny_target, tiny_draft_config(architecture="eagle3", num_layers=1,
                                                            sequential_head="none", confidence_head=False)).eval()
    assert sorted(profile_round_costs(tiny_target, eagle3, list(range(3, 20)), [1, 3], 0.0, False, 2)) == [1, 3]


def test_eval_with_gamma_tuning_times_the_chosen_length_and_keeps_its_calibration_local(tmp_path):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out"
    # two timed prompts (a calibration holds one out), the third one is the pilot
    proc = _run(f"draft={ckpt}", f"out_dir={out}", _sources(_prompt_file(tmp_path)), "num_prompts=2",
                "max_new_tokens=12", "gamma_tuning.enabled=true", "gamma_tuning.pilot_prompts=1",
                "gamma_tuning.profile_repeats=1", "calibration.sps_batch_sizes=[1,4]", "progress=false",
                "baselines.prompt_lookup=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    tuning = report["settings"]["gamma_tuning"]
    assert tuning["enabled"] and tuning["max_gamma"] == 4 and tuning["pilot_prompts"] == 1
    assert sorted(tuning["candidates"]) == ["1", "2", "3", "4"] and len(tuning["survival"]) == 4
    best = max(tuning["candidates"].values(), key=lambda c: c["expected_tokens_per_s"])
    assert tuning["candidates"][str(tuning["gamma"])] == best
    assert report["settings"]["gamma"] == tuning["gamma"]
    assert report["settings"]["target_gemm_prepacked_rows"] == ([tuning["gamma"] + 1] if tuning["prepack"] else [])
    assert report["greedy_match_rate"] == 1.0
    assert all(json.loads(r)["gamma"] == tuning["gamma"] for r in (out / "rounds.jsonl").read_text().splitlines())
    # the calibration ran; fitted below the block size it never replaces the checkpoint's
    assert report["calibration_error"] is None and (out / "calibration" / "calibration.json").exists()
    assert (ckpt / "calibration.json").exists() == (tuning["gamma"] == 4)


def test_a_calibration_fitted_below_the_block_size_stays_out_of_the_checkpoint():
    from eval.gamma_tuning import calibration_config_for
    from eval.schema import CalibrationConfig

    on = CalibrationConfig()
    assert on.enabled and on.write_to_checkpoint
    assert calibration_config_for(on, 4, 4) is on
    kept_local = calibration_config_for(on, 2, 4)
    assert not kept_local.write_to_checkpoint and kept_local.n_bins == on.n_bins and on.write_to_checkpoint


def test_gamma_tuning_without_prompts_beyond_the_timed_ones_is_one_clear_error(tmp_path):
    proc = _run("draft=random", "target=tiny", f"out_dir={tmp_path / 'out'}", _sources(_prompt_file(tmp_path)),
                "num_prompts=3", "gamma_tuning.enabled=true", "progress=false")
    assert proc.returncode == 2 and "no prompt beyond the 3 timed" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run("draft=random", "target=tiny", "num_prompts=null", "gamma_tuning.enabled=true")
    assert proc.returncode == 2 and "set num_prompts=<n>" in proc.stderr


def test_gamma_tuning_and_the_live_scheduler_are_not_combined():
    from eval.schema import EvalConfig, EvalConfigError, GammaTuningConfig, SchedulerLiveConfig, validate

    cfg = EvalConfig(draft_checkpoint="x", gamma_tuning=GammaTuningConfig(enabled=True),
                     scheduler_live=SchedulerLiveConfig(enabled=True))
    with pytest.raises(EvalConfigError, match="enable one of them per eval"):
        validate(cfg)


def test_prepack_pays_only_when_a_packed_forward_was_measured_faster():
    from eval.gamma_tuning import prepack_pays

    assert prepack_pays(_cost(0.1, 1.0, 0.9)) and not prepack_pays(_cost(0.1, 1.0, 1.1))
    assert not prepack_pays(_cost(0.1, 1.0, None))  # nothing was packed (no layer could be): never compared


def test_packs_at_once_stays_between_one_and_every_count(tiny_target):
    from eval.gamma_tuning import packs_at_once

    assert 1 <= packs_at_once(tiny_target.model, 7) <= 7
    assert packs_at_once(torch.nn.Sequential(torch.nn.ReLU()), 7) == 1  # no linear weights to hold
