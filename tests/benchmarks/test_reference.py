"""The reference benchmark's orchestration (stages, resume, budget check) and its report (ratios, goals,
the BENCHMARKS.md section), on hand-written stage outputs; the whole pipeline on a tiny target is `slow`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.reference import Budget, State, main, run_stage, stage_commands
from benchmarks.reference_report import BEGIN, END, collect
from dspark_model.calibration import CALIBRATION_NAME, Calibration
from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from eval.report import EvalReport
from tests.conftest import tiny_draft_config


def _arg(cmd: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(key + "=")), None)


def test_both_drafts_train_with_identical_settings(tmp_path):
    cmds = stage_commands(tmp_path, Budget(train_steps=7))
    a, b = cmds["train-dspark"], cmds["train-dflash"]
    differ = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b)
    assert [d[0].split("=")[0] for d in differ] == ["draft", "train.output_dir"]
    assert _arg(a, "draft") == "dspark" and _arg(b, "draft") == "dflash"
    assert _arg(a, "train.max_steps") == "7" and _arg(a, "data.path") == str(tmp_path / "data")
    data = cmds["data"]
    assert "prompts=shared-train" in data and "cache.enabled=true" in data
    assert {_arg(data, f"prompts.sources.{i}.num_samples") for i in range(3)} == {"400"}
    assert _arg(a, "draft.draft_vocab_size") == _arg(b, "draft.draft_vocab_size") == "8192"
    full = cmds["train-dspark-fullvocab"]  # the ablation: the DSpark command but for vocabulary and steps
    differ = [(x.split("=")[0], y) for x, y in zip(a, full) if x != y]
    assert len(full) == len(a) and [k for k, _ in differ] == ["draft.draft_vocab_size", "train.max_steps",
                                                              "train.output_dir"]
    assert _arg(full, "draft.draft_vocab_size") == "null"
    evals = [k for k in cmds if k.startswith("eval-")]
    assert evals == ["eval-dspark-t0", "eval-dspark-t1", "eval-dflash-t0", "eval-dflash-t1", "eval-eagle3-t0",
                     "eval-eagle3-t1", "eval-dspark-fullvocab-t0", "eval-dspark-t0-tuned", "eval-dflash-t0-tuned"]
    tuned = cmds["eval-dspark-t0-tuned"]  # the T=0 eval of the same draft, but for the tuned length
    assert [x for x in tuned if x not in cmds["eval-dspark-t0"]] == [
        f"out_dir={tmp_path / 'eval' / 'dspark-t0-tuned'}", "gamma_tuning.enabled=true", "baselines.prompt_lookup=false",
        "calibration.enabled=false"]
    assert cmds["heldout-tau"][-3:] == [f"{n}={tmp_path / ('train-' + n) / 'final'}"
                                        for n in ("dspark", "dflash", "dspark-fullvocab")]
    assert all(_arg(cmds[k], "prompts") == "shared-eval" for k in evals)
    assert _arg(cmds["eval-dflash-t0"], "baselines.generate") == "true"  # its greedy-identity check
    assert _arg(cmds["eval-dspark-t1"], "calibration.write_to_checkpoint") == "false"


def test_data_stage_runs_the_target_in_bf16_only_where_it_is_native(tmp_path, monkeypatch):
    import dspark_model.target as target_mod

    for native, want in ((True, "bfloat16"), (False, None)):
        monkeypatch.setattr(target_mod, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        assert _arg(stage_commands(tmp_path, Budget())["data"], "target.dtype") == want
    data = stage_commands(tmp_path, Budget(data_dtype="float32"))["data"]
    assert _arg(data, "target.dtype") == "float32" and _arg(stage_commands(tmp_path, Budget())["heldout-data"],
                                                            "target.dtype") is None


def test_eagle3_trains_on_the_same_data_for_dspark_s_wall_clock(tmp_path):
    from benchmarks.equal_wall_train import equal_wall_steps

    cmds = stage_commands(tmp_path, Budget(train_steps=7))
    a, e = cmds["train-dspark"], cmds["train-eagle3"]
    assert e[1].endswith("equal_wall_train.py")
    assert e[e.index("--reference") + 1] == str(tmp_path / "train-dspark" / "metrics.jsonl")
    inner = e[e.index("--") + 1:]
    differ = [(x.split("=")[0], y) for x, y in zip(a[1:], inner) if x != y]
    assert [k for k, _ in differ] == ["draft", "train.output_dir"] and inner[-1] == "draft.num_layers=1"
    assert _arg(inner, "draft") == "eagle3" and _arg(inner, "data.path") == str(tmp_path / "data")
    fixed = stage_commands(tmp_path, Budget(train_steps=7, eagle3_steps=30))["train-eagle3"]
    assert fixed[1:3] == ["-m", "train"] and _arg(fixed, "train.max_steps") == "30"
    assert "train-eagle3" not in stage_commands(tmp_path, Budget(eagle3_steps=-1))
    assert equal_wall_steps(700 * 2.0, 0.5, 5000) == 2800 and equal_wall_steps(10.0, 100.0, 50) == 1
    assert equal_wall_steps(1e9, 1.0, 50) == 50


def test_stage_resumes_after_failure_and_is_skipped_once_done(tmp_path, capsys):
    state = State(tmp_path / "state.json")
    flag = tmp_path / "flag"
    # fails until the flag file exists, then succeeds; prints something each time
    cmd = [sys.executable, "-c", f"import pathlib,sys; print('hello'); sys.exit(0 if pathlib.Path({str(flag)!r}).exists() else 3)"]
    with pytest.raises(SystemExit, match="exit code 3"):
        run_stage("s", cmd, state, tmp_path / "logs")
    assert not State(tmp_path / "state.json").stage("s")["done"]
    flag.touch()
    run_stage("s", cmd, state, tmp_path / "logs")
    rec = State(tmp_path / "state.json").stage("s")
    assert rec["done"] and rec["attempts"] == 2 and rec["wall_s"] > 0
    flag.unlink()  # would fail if run again
    run_stage("s", cmd, state, tmp_path / "logs")
    assert "skipped" in capsys.readouterr().out
    assert (tmp_path / "logs" / "s.log").read_text().count("hello") == 2


def test_other_sizes_on_a_started_run_are_refused_and_redo_starts_a_stage_afresh(tmp_path):
    main(["--run-dir", str(tmp_path), "--dry-run", "--train-steps", "4"])  # only prints: records nothing
    assert not (tmp_path / "state.json").exists()
    quiet = ["--run-dir", str(tmp_path), "--only", "--out", str(tmp_path / "r.json"), "--benchmarks-md", ""]
    main([*quiet, "--train-steps", "5"])  # runs no stage, but starts the run with these sizes
    with pytest.raises(SystemExit, match="Pass the same sizes"):
        main([*quiet, "--train-steps", "6"])
    state = json.loads((tmp_path / "state.json").read_text())
    state["stages"]["data"] = {"done": True, "attempts": 2, "wall_s": 30.0}
    (tmp_path / "state.json").write_text(json.dumps(state))
    main([*quiet, "--train-steps", "5", "--redo", "data"])
    rec = json.loads((tmp_path / "state.json").read_text())["stages"]["data"]
    assert rec == {"done": False, "attempts": 0, "wall_s": 0.0, "discarded_wall_s": 30.0}


def _report(tau: dict, cond: list, spec: float, gen: float | None, lookup: float | None, extra=None) -> EvalReport:
    """The eval report record with chosen numbers (eval's writer computes them from rounds)."""
    tps = {"spec": spec, "generate": gen, "prompt_lookup": lookup}
    return EvalReport(tau=tau["pooled"], tau_by_dataset={k: v for k, v in tau.items() if k != "pooled"},
                      conditional_acceptance={"pooled": cond, "by_dataset": {}}, tokens_per_s=tps,
                      prefix_survival={"pooled": [], "by_dataset": {}}, num_rounds=10, num_rounds_by_dataset={},
                      accepted_length_histogram={"pooled": [6, 3, 1]},  # rounds accepting 0, 1, 2 tokens
                      timing_totals={}, speedup_vs_generate=spec / gen if gen else None,
                      speedup_vs_prompt_lookup=spec / lookup if lookup else None, prompt_lookup_match_rate=None,
                      greedy_match_rate=1.0 if gen else None, settings={"target": "t"}, **(extra or {}))


def _write_run(run: Path, tiny_target) -> None:
    cal = {"ece_before": 0.05, "ece_after": 0.01, "auroc": 0.9, "brier": 0.1, "scheduler_vs_best_fixed": 0.98}
    reports = {
        "dspark-t0": _report({"a": 1.5, "b": 1.2, "pooled": 1.4}, [0.5, 0.4], 10.0, 5.0, 8.0, cal),
        "dspark-t1": _report({"a": 1.3, "b": 1.1, "pooled": 1.2}, [0.3, 0.2], 9.0, 4.5, 6.0, cal),
        "dflash-t0": _report({"a": 1.25, "b": 1.2, "pooled": 1.25}, [0.5, 0.2], 8.0, 5.0, None),
        "dflash-t1": _report({"a": 1.3, "b": 1.0, "pooled": 1.1}, [0.3, 0.1], 7.0, None, None),
        "eagle3-t0": _report({"a": 1.0, "b": 1.0, "pooled": 1.0}, [0.4, 0.1], 8.0, 5.0, None),
        "eagle3-t1": _report({"a": 1.3, "b": 1.1, "pooled": 1.2}, [0.3, 0.1], 7.0, None, None),
    }
    for name, rep in reports.items():
        (run / "eval" / name).mkdir(parents=True)
        rep.write(run / "eval" / name / "report.json")
    timings = [{"dataset": "a", "spec_tokens": 30, "spec_s": 1.0, "generate_tokens": 30, "generate_s": 1.5},
               {"dataset": "b", "spec_tokens": 20, "spec_s": 1.0, "generate_tokens": 20, "generate_s": 0.8}]
    (run / "eval" / "dspark-t0" / "prompts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timings))
    table = [{"concurrency": c, "throughput": {"algorithm1": a}, "best_fixed_length": 2,
              "best_fixed_throughput": f, "algorithm1_vs_best_fixed": a / f} for c, a, f in ((1, 10, 10), (4, 30, 32))]
    (run / "eval" / "dspark-t0" / "calibration").mkdir()
    Calibration(gamma=2, temperatures=[1.0, 1.0], weights_sha256=None, simulation={"table": table},
                sps={"batch_tokens": [1, 8]}).write(run / "eval" / "dspark-t0" / "calibration" / CALIBRATION_NAME)
    (run / "eval" / "dspark-fullvocab-t0").mkdir(parents=True)
    _report({"a": 1.2, "pooled": 1.2}, [0.3], 4.0, 5.0, None).write(run / "eval" / "dspark-fullvocab-t0" /
                                                                     "report.json")
    (run / "heldout_tau.json").write_text(json.dumps({"drafts": {
        "dspark": {"tau": 1.45, "vocab_mass_in_draft": 0.93, "argmax_outside_vocab": 0.05},
        "dspark-fullvocab": {"tau": 1.25}}}))
    (run / "train_throughput.json").write_text(json.dumps(
        {"train_throughput": {"positions_per_s": {"before": 100.0, "after": 600.0}}}))
    save_pretrained(build_draft_for(tiny_target, tiny_draft_config(draft_vocab_size=64)),
                    run / "train-dspark" / "final")  # the draft's config.json as training writes it
    for d in ("dspark", "dflash", "eagle3", "dspark-fullvocab"):
        (run / f"train-{d}").mkdir(exist_ok=True)
        lines = [json.dumps({"step": s, "loss": 3.0 - s, "top1": 0.1 * s, "expected_accept": 0.1 * s,
                             "tokens_per_s": 100.0, "step_time_s": 2.0 if d != "dspark-fullvocab" else 8.0,
                             "supervised": 50}) for s in (1, 2, 2)]
        (run / f"train-{d}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_collect_computes_ratios_goals_and_rewrites_only_its_section(tmp_path, tiny_target):
    run = tmp_path / "run"
    _write_run(run, tiny_target)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nintro stays\n\n{BEGIN}\nold table\n{END}\n\n## after stays\n")
    state = {"budget": {"train_steps": 2}, "stages": {"train-dspark": {"wall_s": 60.0, "done": True},
                                                      "eval-dspark-t0": {"wall_s": 30.0, "done": True}}}
    out = tmp_path / "results" / "reference.json"
    r = collect(run, state, out, md)
    assert r["tau"]["dspark"]["a"] == {"T=0": 1.5, "T=1": 1.3}
    assert r["tau_ratio_dspark_over_dflash"]["a"]["T=0"] == pytest.approx(1.2)
    assert r["tau_ratio_dspark_over_dflash"]["b"]["T=1"] == pytest.approx(1.1)
    assert r["speedup_vs_generate"]["dspark"] == {"T=0": 2.0, "T=1": 2.0}
    assert r["speedup_vs_generate_by_dataset"]["dspark"] == {"a": {"T=0": pytest.approx(1.5)},
                                                             "b": {"T=0": pytest.approx(0.8)}}
    assert r["speedup_vs_generate_by_dataset"]["dflash"] == {}  # its eval wrote no per-prompt timings here
    assert r["greedy_match_rate"] == {"dspark": 1.0, "dflash": 1.0, "eagle3": 1.0}
    assert r["tau"]["eagle3"]["pooled"] == {"T=0": 1.0, "T=1": 1.2}  # the same layout as the other drafts
    assert r["tau_ratio_dspark_over_eagle3"]["a"] == {"T=0": pytest.approx(1.5), "T=1": pytest.approx(1.0)}
    assert r["goals"]["tau_ratio_dspark_over_eagle3_min"] == {"measured": pytest.approx(1.0), "target": 1.35,
                                                              "met": False}
    assert r["eagle3_equal_wall_clock"]["eagle3"]["steps"] == 2
    assert r["conditional_acceptance"]["dflash"]["T=1"]["rounds_reaching"] == [10, 4]
    assert r["ece_after"] == 0.01 and r["auroc"] == 0.9
    g = r["goals"]
    assert g["tau_ratio_dspark_over_dflash_min"]["measured"] == pytest.approx(1.0)  # b at T=0
    assert g["tau_ratio_dspark_over_dflash_min"]["met"] is False
    assert g["ece_after"]["met"] is True and g["auroc"]["met"] is True
    assert g["speedup_vs_generate_min_dspark"]["measured"] == 2.0 and g["speedup_vs_generate_min_dspark"]["met"]
    assert g["tau_pooled_t0_dspark"] == {"measured": 1.4, "target": 2.0, "met": False}
    assert g["conditional_acceptance_k1_t0_dspark"]["measured"] == 0.5
    assert g["conditional_acceptance_k1_t0_dspark"]["met"] is True
    assert r["draft_vocab_size"] == 64 and r["vocab_mass_in_draft"] == 0.93
    assert r["sps"] == {"batch_tokens": [1, 8]}
    assert r["train_throughput"]["positions_per_s"] == {"before": 100.0, "after": 600.0}
    ab = r["ablation_full_vs_reduced_vocab"]
    assert ab["reduced"]["positions_per_s"] == pytest.approx(50 / 2.0) and ab["full"]["positions_per_s"] == 50 / 8
    assert ab["reduced"]["tau_t0"] == 1.4 and ab["full"]["tau_t0"] == 1.2 and ab["full"]["heldout_tau_t0"] == 1.25
    assert g["scheduler_vs_best_fixed_min_over_loads"]["measured"] == pytest.approx(30 / 32)
    t = r["train_budget"]
    assert t["train"]["dspark"]["steps"] == 2 and t["train"]["dspark"]["tokens"] == 400  # repeated step counted once
    assert t["total_wall_s"] == 90.0
    assert "train-memory" in r["missing"]
    assert json.loads(out.read_text())["tau_ratio_dspark_over_dflash"]["a"]["T=0"] == pytest.approx(1.2)
    assert (out.parent / "reference" / "tau.png").is_file()
    text = md.read_text()
    assert "old table" not in text and "intro stays" in text and "## after stays" in text
    assert "| a | 0 | 1.500 | 1.250 | 1.200 |" in text
    assert "| dspark | 0 | 0.500 (10) | 0.400 (4) |" in text
    assert "Speed-up vs `generate` per eval set at T=0: dspark a 1.50, b 0.80." in text
    collect(run, state, out, md)  # idempotent: one section, same text
    assert md.read_text() == text and text.count(BEGIN) == 1


@pytest.mark.slow
def test_whole_benchmark_on_a_tiny_target(tmp_path):
    args = ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "reference.json"), "--benchmarks-md",
            str(tmp_path / "B.md"), "--target", "tiny", "--prompts-per-source", "5", "--gen-tokens", "8",
            "--train-steps", "3", "--eval-prompts-per-source", "1", "--eval-tokens", "8", "--threads", "1",
            "--draft-vocab-size", "64", "--ablation-steps", "2", "--eagle3-steps", "2",
            "--only", "data", "heldout-data", "train-dspark", "train-dflash", "train-dspark-fullvocab",
            "train-eagle3", "eval-dspark-t0", "eval-dspark-t1", "eval-dflash-t0", "eval-dflash-t1",
            "eval-eagle3-t0", "eval-eagle3-t1", "eval-dspark-fullvocab-t0", "eval-dspark-t0-tuned",
            "eval-dflash-t0-tuned", "heldout-tau", "cache-dtypes"]
    main(args)
    r = json.loads((tmp_path / "reference.json").read_text())
    assert r["greedy_match_rate"] == {"dspark": 1.0, "dflash": 1.0, "eagle3": 1.0}
    assert set(r["tau"]["eagle3"]) == set(r["tau"]["dspark"])  # the same layout as the other drafts
    assert r["tau"]["eagle3"]["pooled"]["T=0"] >= 1.0 and r["tau"]["eagle3"]["pooled"]["T=1"] >= 1.0
    assert r["tau_ratio_dspark_over_eagle3"]["pooled"]["T=0"] == pytest.approx(
        r["tau"]["dspark"]["pooled"]["T=0"] / r["tau"]["eagle3"]["pooled"]["T=0"])
    assert r["eagle3_equal_wall_clock"]["eagle3"]["steps"] == 2
    assert set(r["tau"]["dspark"]) == {"gsm8k-test", "humaneval", "mt-bench", "pooled"}
    assert r["tau"]["dflash"]["pooled"]["T=1"] >= 1.0
    assert r["cache_dtypes"]["dtypes"]["float8"]["bytes_ratio_to_bfloat16"] == 0.5
    assert r["missing"] == ["train-memory"]
    assert r["draft_vocab_size"] == 64 and 0 < r["vocab_mass_in_draft"] <= 1
    assert r["ablation_full_vs_reduced_vocab"]["full"]["steps"] == 2
    for d in ("dspark", "dflash"):
        tuned = r["tuned_gamma_t0"][d]
        assert 1 <= tuned["gamma"] <= tuned["trained_block_size"] and tuned["greedy_match_rate"] == 1.0
    assert r["goals"]["speedup_vs_generate_tuned_gamma_t0_dspark"]["measured"] == r["tuned_gamma_t0"]["dspark"][
        "speedup_vs_generate"]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    main(args)  # everything done: only collected again
    assert json.loads((tmp_path / "run" / "state.json").read_text())["stages"] == state["stages"]


def test_two_partial_runners_keep_each_others_stage_records(tmp_path):
    a, b = State(tmp_path / "state.json"), State(tmp_path / "state.json")  # both loaded before either wrote
    a.stage("train-dspark").update(done=True, wall_s=5.0)
    a.save("train-dspark")
    b.stage("train-dflash").update(done=True, wall_s=7.0)
    b.save("train-dflash")
    stages = json.loads((tmp_path / "state.json").read_text())["stages"]
    assert stages["train-dspark"]["wall_s"] == 5.0 and stages["train-dflash"]["wall_s"] == 7.0


def test_scheduler_live_is_a_last_stage_and_its_record_is_collected(tmp_path, tiny_target):
    cmds = stage_commands(tmp_path, Budget())
    assert list(cmds)[-1] == "scheduler-live"
    live = cmds["scheduler-live"]
    assert live[1:3] == ["-m", "eval"] and "scheduler_live.enabled=true" in live
    assert _arg(live, "draft") == str(tmp_path / "train-dspark" / "final")
    assert _arg(live, "calibration.write_to_checkpoint") == "false"  # calibrates itself, leaves the draft's file
    run = tmp_path / "run"
    _write_run(run, tiny_target)
    record = {"requests": [1, 4], "algorithm1_tokens_per_s": [10.0, 30.0], "best_fixed_tokens_per_s": [9.0, 31.0],
              "best_fixed_length": [3, 2], "algorithm1_vs_best_fixed": [10 / 9, 30 / 31], "greedy_match_rate": 1.0,
              "fixed_tokens_per_s": {"1": [5.0, 20.0]}, "settings": {"gamma": 4},
              "full_batch": {"algorithm1_tokens_per_s": [10.0, 36.0], "best_fixed_tokens_per_s": [9.0, 33.0],
                             "best_fixed_length": [3, 1], "algorithm1_vs_best_fixed": [10 / 9, 36 / 33],
                             "fixed_tokens_per_s": {"1": [5.0, 33.0]}}}
    (run / "eval" / "scheduler-live").mkdir()
    _report({"pooled": 1.0}, [], 1.0, None, None, {"scheduler_live": record}).write(
        run / "eval" / "scheduler-live" / "report.json")
    (run / "eval" / "scheduler-live" / "scheduler_live.png").write_bytes(b"png")
    md = tmp_path / "B.md"
    r = collect(run, {"stages": {}}, tmp_path / "results" / "reference.json", md)
    assert r["scheduler_live"]["best_fixed_length"] == [3, 2] and "fixed_tokens_per_s" not in r["scheduler_live"]
    goal = r["goals"]["scheduler_live_vs_best_fixed_min_over_requests"]
    assert goal["measured"] == pytest.approx(30 / 31) and goal["met"] is False
    assert (tmp_path / "results" / "reference" / "scheduler_live.png").is_file()
    assert "| 4 | 30.00 | fixed_2 | 31.00 | 0.968 |" in md.read_text()
    full = r["goals"]["scheduler_live_full_batch_vs_best_fixed_min_over_requests"]  # the rounds with slots all busy
    assert full["measured"] == pytest.approx(36 / 33) and full["met"] is True
    assert "fixed_tokens_per_s" not in r["scheduler_live"]["full_batch"]
    assert "| 1.091 (fixed_1) |" in md.read_text()
    del record["full_batch"]  # a run recorded before the full-batch figures: its table says so, no goal
    _report({"pooled": 1.0}, [], 1.0, None, None, {"scheduler_live": record}).write(
        run / "eval" / "scheduler-live" / "report.json")
    r = collect(run, {"stages": {}}, tmp_path / "results" / "reference.json", md)
    assert r["goals"]["scheduler_live_full_batch_vs_best_fixed_min_over_requests"]["met"] is None
    assert "| 0.968 | — | — | - | - |" in md.read_text()


def test_throughput_after_is_the_variant_the_reference_recipe_trains_with():
    from benchmarks.train_throughput import after_variant

    measured = ["baseline", "full", "vocab-8192", "vocab-8192-bf16"]
    assert after_variant(measured, native_bf16=True) == "vocab-8192-bf16"  # precision=native -> bf16 here
    assert after_variant(measured, native_bf16=False) == "vocab-8192"  # AVX2-only: native means fp32
    assert after_variant(["baseline", "full"], native_bf16=True) == "full"
    assert "--bf16" in stage_commands(Path("/tmp/x"), Budget())["train-throughput"]


def test_scheduler_live_stage_runs_the_budget_s_repeats(tmp_path):
    assert _arg(stage_commands(tmp_path, Budget())["scheduler-live"], "scheduler_live.repeats") == "2"
    assert _arg(stage_commands(tmp_path, Budget(live_repeats=3))["scheduler-live"], "scheduler_live.repeats") == "3"
    live = stage_commands(tmp_path, Budget(live_min_requests=12))["scheduler-live"]
    assert _arg(live, "scheduler_live.min_requests") == "12"
    assert _arg(stage_commands(tmp_path, Budget())["scheduler-live"], "scheduler_live.min_requests") == "8"
