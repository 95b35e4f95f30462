"""Collect a reference-benchmark run (benchmarks/reference.py) into reference.json, plots and a Markdown table.

Reads only what the stages wrote under the run folder: eval reports (``eval/<draft>-t<T>/report.json``), the
calibration of the DSpark T=0 run, the live scheduler measurement (``eval/scheduler-live/report.json``), the training metrics, ``train_memory.json``, ``cache_dtypes.json`` and
``state.json`` (wall times). Missing stages leave their keys null and are named in ``missing``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_prep.manifest import DataManifest
from dspark_model.atomic import atomic_write_json, atomic_write_text
from dspark_model.calibration import CALIBRATION_NAME, Calibration
from dspark_model.checkpoint import CONFIG_NAME, read_draft_arch
from eval.metrics import speedup_by_dataset
from eval.report import EvalReport
from eval.scheduler import describe_hardware

DRAFT_NAMES = ("dspark", "dflash")  # conf/draft choices, trained with identical settings
EAGLE3 = "eagle3"  # the EAGLE-3 baseline: same data, DSpark's training wall clock, same evals
ABLATION = "dspark-fullvocab"  # DSpark over the full vocabulary, at about the reduced draft's wall time
TEMPERATURES = (0.0, 1.0)
TEMPS = tuple(f"{t:g}" for t in TEMPERATURES)  # as in the eval folder names: eval/<draft>-t<T>
GOALS = {"tau_ratio": 1.20, "tau_ratio_eagle3": 1.35, "speedup_vs_generate": 1.0, "ece_after": 0.015, "auroc": 0.85,
         "scheduler_vs_best_fixed": 1.0, "tau_pooled_t0": 2.0, "acceptance_k1_t0": 0.5}
TUNED = "tuned"  # eval/<draft>-t0-tuned: the same draft at the verification length tuned for the machine
LIVE_DIR = "scheduler-live"  # eval/<LIVE_DIR>: the scheduler-live stage's eval folder
LIVE_KEYS = ("requests", "algorithm1_tokens_per_s", "best_fixed_tokens_per_s", "best_fixed_length",
             "algorithm1_vs_best_fixed", "greedy_match_rate", "best_fixed_heldout_tokens_per_s",
             "algorithm1_vs_best_fixed_heldout", "spread")
BEGIN, END = "<!-- reference-benchmark:begin -->", "<!-- reference-benchmark:end -->"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _train_summary(run: Path, name: str, stages: dict) -> dict | None:
    path = run / f"train-{name}" / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in recs if "step" in r}  # a resumed run may repeat steps; the last wins
    steps = [by_step[s] for s in sorted(by_step)]
    tail = steps[-max(1, len(steps) // 10):]

    def mean(key):
        vals = [r[key] for r in tail if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "steps": len(steps),
        "tokens": round(sum(r.get("tokens_per_s", 0) * r.get("step_time_s", 0) for r in steps)),
        "supervised_positions": round(sum(r.get("supervised", 0) for r in steps)),
        "step_time_s_mean": sum(r.get("step_time_s", 0) for r in steps) / max(1, len(steps)),
        "wall_s": round(stages.get(f"train-{name}", {}).get("wall_s", 0.0), 1),
        "last_10pct": {k: mean(k) for k in ("loss", "ce", "l1", "top1", "expected_accept", "conf_bce")},
        "curve": [{"step": r["step"], "loss": r.get("loss"), "top1": r.get("top1"),
                   "expected_accept": r.get("expected_accept")} for r in steps],
    }


def _report(path: Path) -> EvalReport | None:
    """An eval stage's report record (eval/report.py), or None when that stage has not run."""
    return EvalReport.read(path) if path.is_file() else None


def _speedup_by_dataset(folder: Path) -> dict:
    """{dataset: speed-up vs generate} from an eval stage's per-prompt timings (``prompts.jsonl``, which every
    eval wrote, also before its report carried the figure); {} when absent."""
    path = folder / "prompts.jsonl"
    if not path.is_file():
        return {}
    with open(path) as f:
        return speedup_by_dataset([json.loads(line) for line in f if line.strip()])


def _calibration(path: Path) -> Calibration | None:
    """The T=0 run's calibration record (dspark_model/calibration.py), or None when that stage has not run."""
    return Calibration.read(path) if path.is_file() else None


def _scheduler_by_load(cal: Calibration | None) -> list[dict] | None:
    if cal is None or not cal.simulation:
        return None
    return [{"concurrency": row["concurrency"], "algorithm1": row["throughput"]["algorithm1"],
             "best_fixed": f"fixed_{row['best_fixed_length']}", "best_fixed_throughput": row["best_fixed_throughput"],
             "ratio": row["algorithm1_vs_best_fixed"]} for row in cal.simulation["table"]]


def _scheduler_live(run: Path) -> dict | None:
    """The measured Algorithm 1 vs best fixed length record of the scheduler-live stage, or None."""
    report = _report(run / "eval" / LIVE_DIR / "report.json")
    live = report.scheduler_live if report is not None else None
    if not live or "error" in live:
        return live
    full = live.get("full_batch")
    if full:  # the same comparison over the rounds with every slot busy (eval/live.py), its per-N lists
        full = {k: full.get(k) for k in LIVE_KEYS if k in full}
    return {**{k: live.get(k) for k in LIVE_KEYS}, "full_batch": full, "settings": live.get("settings")}


def build(run: Path, state: dict) -> tuple[dict, dict]:
    """(reference.json content, per-draft training summaries with their curves)."""
    drafts = (*DRAFT_NAMES, EAGLE3)
    reports = {(d, t): _report(run / "eval" / f"{d}-t{t}" / "report.json") for d in drafts for t in TEMPS}
    missing = [f"eval-{d}-t{t}" for (d, t), r in reports.items() if r is None]
    tau: dict = {d: {} for d in drafts}
    cond: dict = {d: {} for d in drafts}
    speed: dict = {d: {} for d in drafts}  # per eval set, from the per-prompt timings
    for (d, t), r in reports.items():
        if r is None:
            continue
        for ds, v in _speedup_by_dataset(run / "eval" / f"{d}-t{t}").items():
            speed[d].setdefault(ds, {})[f"T={t}"] = v
        for ds, v in {**r.tau_by_dataset, "pooled": r.tau}.items():
            tau[d].setdefault(ds, {})[f"T={t}"] = v
        hist = r.accepted_length_histogram["pooled"]  # rounds by accepted length 0..gamma
        cond[d][f"T={t}"] = {**r.conditional_acceptance,
                             "rounds_reaching": [sum(hist[k:]) for k in range(len(hist) - 1)]}
    def over(other):  # DSpark's tau / the other draft's, per eval set and temperature
        return {ds: {T: (tau["dspark"][ds][T] / tau[other][ds][T])
                     for T in tau["dspark"][ds] if T in tau[other].get(ds, {})}
                for ds in tau["dspark"] if ds in tau[other]}

    ratio = over("dflash")

    def per(key):
        return {d: {f"T={t}": getattr(reports[d, t], key) for t in TEMPS if reports[d, t]} for d in DRAFT_NAMES}

    cal0 = _calibration(run / "eval" / "dspark-t0" / "calibration" / CALIBRATION_NAME)
    calib = {f"T={t}": {k: getattr(reports["dspark", t], k) for k in
                        ("ece_before", "ece_after", "auroc", "brier", "scheduler_vs_best_fixed")}
             for t in TEMPS if reports["dspark", t]}
    stages = state.get("stages", {})
    data_path = run / "data" / "manifest.json"
    data_manifest = DataManifest.read(data_path) if data_path.is_file() else None
    train = {d: _train_summary(run, d, stages) for d in drafts}
    d0 = reports.get(("dspark", "0"))
    result = {
        "target": d0.settings.get("target") if d0 else None,
        "tau": tau,
        "tau_ratio_dspark_over_dflash": ratio,
        "tau_ratio_dspark_over_eagle3": over(EAGLE3),
        "eagle3_equal_wall_clock": _equal_wall(run, train),
        "conditional_acceptance": cond,
        "tokens_per_s": per("tokens_per_s"),
        "speedup_vs_generate": per("speedup_vs_generate"),
        "speedup_vs_generate_by_dataset": speed,
        "speedup_vs_prompt_lookup": {"dspark": per("speedup_vs_prompt_lookup")["dspark"]},
        "tuned_gamma_t0": _tuned(run),
        "greedy_match_rate": {d: reports[d, "0"].greedy_match_rate if reports[d, "0"] else None for d in drafts},
        "ece_before": calib.get("T=0", {}).get("ece_before"),
        "ece_after": calib.get("T=0", {}).get("ece_after"),
        "auroc": calib.get("T=0", {}).get("auroc"),
        "brier": calib.get("T=0", {}).get("brier"),
        "scheduler_vs_best_fixed": calib.get("T=0", {}).get("scheduler_vs_best_fixed"),
        "calibration_by_temperature": calib,
        "scheduler_by_load": _scheduler_by_load(cal0),
        "scheduler_live": _scheduler_live(run),
        "sps": cal0.sps if cal0 is not None else None,
        "train_memory": _read(run / "train_memory.json"),
        "cache_dtypes": _read(run / "cache_dtypes.json"),
        "train_budget": {
            "budget": state.get("budget"),
            "data": {"counts": data_manifest.counts if data_manifest else None,
                     "tokens": data_manifest.tokens if data_manifest else None},
            "train": {d: ({k: v for k, v in s.items() if k != "curve"} if s else None) for d, s in train.items()},
            "stage_wall_s": {k: round(v["wall_s"], 1) for k, v in stages.items()},
            "total_wall_s": round(sum(v["wall_s"] for v in stages.values()), 1),
            "discarded_wall_s": round(sum(v.get("discarded_wall_s", 0.0) for v in stages.values()), 1),
            "machine": describe_hardware(),
        },
        "eval_settings": {f"{d}-t{t}": r.settings for (d, t), r in reports.items() if r},
        **_vocab_and_speed(run, stages, train),
        "missing": missing + [s for s in ("train-memory", "cache-dtypes", "heldout-tau",
                                          *(f"eval-{d}-t0-{TUNED}" for d in DRAFT_NAMES))
                              if not stages.get(s, {}).get("done")],
    }
    result["goals"] = goals(result)
    return result, train


def _equal_wall(run: Path, train: dict) -> dict | None:
    """EAGLE-3's training budget next to DSpark's: steps, summed step time, and the step-count record."""
    a, b = train.get("dspark"), train.get(EAGLE3)
    if not a or not b:
        return None
    secs = {d: s["step_time_s_mean"] * s["steps"] for d, s in (("dspark", a), (EAGLE3, b))}
    return {"dspark": {"steps": a["steps"], "train_step_s_total": round(secs["dspark"], 1), "wall_s": a["wall_s"]},
            EAGLE3: {"steps": b["steps"], "train_step_s_total": round(secs[EAGLE3], 1), "wall_s": b["wall_s"]},
            "step_time_ratio_eagle3_over_dspark": secs[EAGLE3] / secs["dspark"] if secs["dspark"] else None,
            "step_count_rule": _read(run / f"train-{EAGLE3}.steps.json")}


def _vocab_and_speed(run: Path, stages: dict, train: dict) -> dict:
    """Draft vocabulary, held-out replay, the full-vocabulary ablation and the throughput figures."""
    final = run / "train-dspark" / "final"
    arch = read_draft_arch(final)[1] if (final / CONFIG_NAME).is_file() else None
    heldout = _read(run / "heldout_tau.json") or {}
    replay = heldout.get("drafts", {})
    throughput = _read(run / "train_throughput.json") or {}
    data_gen = _read(Path(__file__).resolve().parent / "results" / "data_prep.json") or {}
    full = _train_summary(run, ABLATION, stages)
    report = _report(run / "eval" / f"{ABLATION}-t0" / "report.json")

    def side(summary, rep, name):
        if not summary:
            return None
        secs = summary["step_time_s_mean"] * summary["steps"]
        return {"steps": summary["steps"], "train_wall_s": summary["wall_s"], "train_step_s_total": round(secs, 1),
                "positions_per_s": summary["supervised_positions"] / secs if secs else None,
                "tau_t0": rep.tau if rep else None, "heldout_tau_t0": replay.get(name, {}).get("tau")}

    reduced_report = _report(run / "eval" / "dspark-t0" / "report.json")
    return {
        "draft_vocab_size": arch.out_vocab_size if arch is not None else None,
        "vocab_mass_in_draft": replay.get("dspark", {}).get("vocab_mass_in_draft"),
        "argmax_outside_draft_vocab": replay.get("dspark", {}).get("argmax_outside_vocab"),
        "heldout_replay": heldout or None,
        "train_throughput": throughput.get("train_throughput"),
        "train_throughput_runs": throughput.get("median_positions_per_s"),
        "data_gen_tokens_per_s": data_gen.get("data_gen_tokens_per_s"),
        "data_gen_source": "benchmarks/results/data_prep.json (benchmarks/data_prep_throughput.py)",
        "ablation_full_vs_reduced_vocab": {"reduced": side(train.get("dspark"), reduced_report, "dspark"),
                                           "full": side(full, report, ABLATION)},
    }


def _tuned(run: Path) -> dict:
    """Each draft at T=0 with the verification length eval tuned for this machine (``eval-<draft>-t0-tuned``):
    the chosen gamma, tau and the speed-up against ``generate`` measured in that run."""
    out = {}
    for d in DRAFT_NAMES:
        folder = run / "eval" / f"{d}-t{TEMPS[0]}-{TUNED}"
        r = _report(folder / "report.json")
        if r is None:
            continue
        tuning = r.settings.get("gamma_tuning") or {}
        out[d] = {"gamma": r.settings.get("gamma"), "trained_block_size": r.settings.get("draft_block_size"),
                  "prepacked_rows": r.settings.get("target_gemm_prepacked_rows"), "tau": r.tau,
                  "tau_by_dataset": r.tau_by_dataset, "speedup_vs_generate": r.speedup_vs_generate,
                  "speedup_vs_generate_by_dataset": _speedup_by_dataset(folder),
                  "greedy_match_rate": r.greedy_match_rate, "tokens_per_s": r.tokens_per_s,
                  "pilot": {k: tuning.get(k) for k in ("pilot_prompts", "pilot_rounds", "survival")},
                  "expected_tokens_per_s": {g: c.get("expected_tokens_per_s")
                                            for g, c in (tuning.get("candidates") or {}).items()}}
    return out


def live_ratios(live: dict) -> list[float]:
    """Algorithm 1 / best fixed length per request count, live: against the best fixed length picked on
    held-out repeats when the run had two or more (the in-sample best is biased upwards, eval/live.py)."""
    heldout = live.get("algorithm1_vs_best_fixed_heldout") or []
    ratios = heldout if heldout and None not in heldout else live.get("algorithm1_vs_best_fixed") or []
    return [v for v in ratios if v is not None]


def goals(r: dict) -> dict:
    """Each goal of the benchmark with its measured value and whether it is met."""
    ratios = [v for ds in r["tau_ratio_dspark_over_dflash"].values() for v in ds.values()]
    over_eagle3 = [v for ds in r.get("tau_ratio_dspark_over_eagle3", {}).values() for v in ds.values()]
    speed = [v for v in r["speedup_vs_generate"].get("dspark", {}).values() if v is not None]
    sched = [row["ratio"] for row in r["scheduler_by_load"] or []]
    live = live_ratios(r.get("scheduler_live") or {})
    full = live_ratios((r.get("scheduler_live") or {}).get("full_batch") or {})

    def rec(value, target, higher=True):
        return {"measured": value, "target": target,
                "met": None if value is None else (value >= target if higher else value <= target)}

    return {
        "tau_ratio_dspark_over_dflash_min": rec(min(ratios) if ratios else None, GOALS["tau_ratio"]),
        "tau_ratio_dspark_over_eagle3_min": rec(min(over_eagle3) if over_eagle3 else None,
                                                GOALS["tau_ratio_eagle3"]),
        "speedup_vs_generate_min_dspark": rec(min(speed) if speed else None, GOALS["speedup_vs_generate"]),
        "speedup_vs_generate_tuned_gamma_t0_dspark": rec(
            (r.get("tuned_gamma_t0") or {}).get("dspark", {}).get("speedup_vs_generate"), GOALS["speedup_vs_generate"]),
        "greedy_match_rate_min": rec(min((v for v in r["greedy_match_rate"].values() if v is not None),
                                         default=None), 1.0),
        "ece_after": rec(r["ece_after"], GOALS["ece_after"], higher=False),
        "auroc": rec(r["auroc"], GOALS["auroc"]),
        "scheduler_vs_best_fixed_min_over_loads": rec(min(sched) if sched else None,
                                                      GOALS["scheduler_vs_best_fixed"]),
        "scheduler_live_vs_best_fixed_min_over_requests": rec(min(live) if live else None,
                                                              GOALS["scheduler_vs_best_fixed"]),
        "scheduler_live_full_batch_vs_best_fixed_min_over_requests": rec(min(full) if full else None,
                                                                         GOALS["scheduler_vs_best_fixed"]),
        "tau_pooled_t0_dspark": rec(r["tau"].get("dspark", {}).get("pooled", {}).get("T=0"), GOALS["tau_pooled_t0"]),
        "conditional_acceptance_k1_t0_dspark": rec(
            ((r["conditional_acceptance"].get("dspark", {}).get("T=0") or {}).get("pooled") or [None])[0],
            GOALS["acceptance_k1_t0"]),
    }


def _save(plt, fig, fig_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(fig_dir / name, dpi=120)
    plt.close(fig)
    return name


def plots(result: dict, train: dict, run: Path, fig_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    datasets = sorted({ds for d in DRAFT_NAMES for ds in result["tau"][d]})
    if datasets:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        bars = [(d, T) for d in DRAFT_NAMES for T in ("T=0", "T=1")]
        width = 0.8 / len(bars)
        for i, (d, T) in enumerate(bars):
            ys = [result["tau"][d].get(ds, {}).get(T, 0) for ds in datasets]
            ax.bar([x + i * width for x in range(len(datasets))], ys, width, label=f"{d} {T}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(datasets))], datasets)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("tau (tokens / verification)")
        ax.legend(fontsize=8)
        made.append(_save(plt, fig, fig_dir, "tau.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d, style in zip(DRAFT_NAMES, ("-", "--")):
        for T, color in (("T=0", "C0"), ("T=1", "C1")):
            ys = (result["conditional_acceptance"][d].get(T) or {}).get("pooled")
            if ys:
                ax.plot(range(1, len(ys) + 1), [y if y is not None else float("nan") for y in ys], style,
                        color=color, marker="o", label=f"{d} {T}")
    ax.set_xlabel("block position k")
    ax.set_ylabel("P(accept k | accepted 1..k-1)")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend(fontsize=8)
    made.append(_save(plt, fig, fig_dir, "conditional_acceptance.png"))
    if any(train.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for d, s in train.items():
            if not s:
                continue
            steps = [c["step"] for c in s["curve"]]
            axes[0].plot(steps, [c["loss"] for c in s["curve"]], label=d, lw=0.8)
            axes[1].plot(steps, [c["expected_accept"] for c in s["curve"]], label=d, lw=0.8)
        axes[0].set_ylabel("training loss")
        axes[1].set_ylabel("expected acceptance per slot")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        made.append(_save(plt, fig, fig_dir, "training.png"))
    # from the DSpark T=0 calibration, and the live measurement beside the simulated one
    for src in (run / "eval" / "dspark-t0" / "calibration" / "reliability.png",
                run / "eval" / "dspark-t0" / "calibration" / "load_simulation.png",
                run / "eval" / LIVE_DIR / "scheduler_live.png"):
        if src.is_file():
            shutil.copyfile(src, fig_dir / src.name)
            made.append(src.name)
    return made


def _f(v, digits=3, pct=False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.{max(0, digits - 2)}f} %" if pct else f"{v:.{digits}f}"


def _vocab_markdown(r: dict) -> list[str]:
    lines = ["", f"**Draft vocabulary:** {r['draft_vocab_size']} tokens; on the held-out eval answers the target puts "
             f"{_f(r['vocab_mass_in_draft'], 4, True)} of its probability inside them, and its argmax lies outside "
             f"them at {_f(r['argmax_outside_draft_vocab'], 4, True)} of the positions."]
    tt, dg = r.get("train_throughput"), r.get("data_gen_tokens_per_s")
    if tt:
        pos = tt["positions_per_s"]
        lines.append(f"Training throughput (supervised block positions/s, previous code vs this, one run of "
                     f"benchmarks/train_throughput.py): {_f(pos['before'], 1)} → {_f(pos['after'], 1)} "
                     f"({_f(pos['after'] / pos['before'], 2)}×; after = "
                     f"{tt.get('after_variant', 'the reduced vocabulary')}, what the reference recipe trains with "
                     f"here).")
    if dg:
        lines.append(f"data_prep generation (tokens/s, old vs new defaults, {r['data_gen_source']}): "
                     f"{_f(dg.get('before'), 1)} → {_f(dg.get('after'), 1)}.")
    ab = r.get("ablation_full_vs_reduced_vocab") or {}
    if ab.get("full") and ab.get("reduced"):
        lines += ["", "| ablation | steps | train wall | positions/s | τ T=0 (eval) | τ T=0 (held-out replay) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, a in (("reduced vocabulary", ab["reduced"]), ("full vocabulary", ab["full"])):
            lines.append(f"| {name} | {a['steps']} | {a['train_wall_s'] / 60:.1f} min | {_f(a['positions_per_s'], 1)} | "
                         f"{_f(a['tau_t0'])} | {_f(a['heldout_tau_t0'])} |")
    return lines


def markdown(r: dict, figs: list[str], fig_rel: str) -> str:
    """The BENCHMARKS.md section: every number comes from ``r``."""
    b = r["train_budget"]
    lines = [BEGIN, "",
             f"Produced by `python benchmarks/reference.py` (results: `benchmarks/results/reference.json`). "
             f"Machine: {b['machine']['cpu']} ({b['machine']['cpu_count']} cores), torch {b['machine']['torch']}; "
             f"total wall time of all stages {b['total_wall_s'] / 60:.0f} min"
             + (f" (plus {b['discarded_wall_s'] / 60:.0f} min of attempts measured again with `--redo`, not "
                f"counted)" if b.get("discarded_wall_s") else "") + ".", ""]
    if r["missing"]:
        lines += [f"**Incomplete run:** missing {', '.join(r['missing'])}.", ""]
    lines += ["| stage | wall time |", "| --- | --- |"]
    lines += [f"| {k} | {v / 60:.1f} min |" for k, v in b["stage_wall_s"].items()] + [""]
    for d, s in b["train"].items():
        if s:
            lines.append(f"- {d}: {s['steps']} steps, {s['tokens']:,} tokens read, {s['supervised_positions']:,} "
                         f"supervised block positions, {s['step_time_s_mean']:.2f} s/step; last 10 %: top-1 "
                         f"{_f(s['last_10pct']['top1'])}, expected acceptance {_f(s['last_10pct']['expected_accept'])}")
    lines += _vocab_markdown(r)
    lines += ["", "**τ (tokens per target verification)** and the DSpark/DFlash ratio (goal ≥ "
              f"{GOALS['tau_ratio']:.2f}), EAGLE-3 (same data, DSpark's training wall clock) and the DSpark/EAGLE-3 "
              f"ratio (goal ≥ {GOALS['tau_ratio_eagle3']:.2f}):", "",
              "| eval set | T | DSpark | DFlash | ratio | EAGLE-3 | ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    e3, e3_ratio = r["tau"].get(EAGLE3, {}), r.get("tau_ratio_dspark_over_eagle3", {})
    for ds in sorted(r["tau"]["dspark"], key=lambda k: (k == "pooled", k)):
        for T in ("T=0", "T=1"):
            a, c = r["tau"]["dspark"][ds].get(T), r["tau"]["dflash"].get(ds, {}).get(T)
            lines.append(f"| {ds} | {T[2:]} | {_f(a)} | {_f(c)} | {_f(r['tau_ratio_dspark_over_dflash'].get(ds, {}).get(T))} "
                         f"| {_f(e3.get(ds, {}).get(T))} | {_f(e3_ratio.get(ds, {}).get(T))} |")
    lines += ["", "**Conditional acceptance by block position** (pooled over the three sets; in brackets the "
              "number of rounds that reached the position):", "",
              "| draft | T | " + " | ".join(f"k={k}" for k in range(1, 8)) + " |", "|" + " --- |" * 9]
    for d in DRAFT_NAMES:
        for T, ca in r["conditional_acceptance"][d].items():
            n = ca.get("rounds_reaching") or [None] * len(ca["pooled"])
            lines.append(f"| {d} | {T[2:]} | " + " | ".join(
                f"{_f(v, 3)} ({c})" if c is not None else _f(v, 3) for v, c in zip(ca["pooled"], n)) + " |")
    lines += ["", "**Wall clock** (batch 1; baselines measured in the same eval run):", "",
              "| draft | T | spec tok/s | generate tok/s | prompt lookup tok/s | vs generate | vs prompt lookup |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in DRAFT_NAMES:
        for T, tps in r["tokens_per_s"][d].items():
            lines.append(f"| {d} | {T[2:]} | {_f(tps.get('spec'), 1)} | {_f(tps.get('generate'), 1)} | "
                         f"{_f(tps.get('prompt_lookup'), 1)} | {_f(r['speedup_vs_generate'][d].get(T), 2)} | "
                         f"{_f(r['speedup_vs_prompt_lookup'].get(d, {}).get(T), 2)} |")
    by_set = [f"{d} " + ", ".join(f"{ds} {_f(v.get('T=0'), 2)}" for ds, v in sets.items())
              for d, sets in r.get("speedup_vs_generate_by_dataset", {}).items()
              if any(v.get("T=0") is not None for v in sets.values())]
    if by_set:
        lines += ["", "Speed-up vs `generate` per eval set at T=0: " + "; ".join(by_set) + "."]
    tuned = [f"{d} γ = {t['gamma']} of {t['trained_block_size']}: τ {_f(t['tau'])}, {_f(t['speedup_vs_generate'], 2)}× "
             f"`generate` pooled (" + ", ".join(f"{ds} {_f(v, 2)}" for ds, v in t["speedup_vs_generate_by_dataset"].items())
             + f"), greedy identity {_f(t['greedy_match_rate'], 3)}" for d, t in r.get("tuned_gamma_t0", {}).items()]
    if tuned:
        lines += ["", "At the verification length eval tunes for this machine (`gamma_tuning.enabled=true`: an "
                  "untimed pilot on other prompts of the same sets, each length's round timed; "
                  "`eval/gamma_tuning.py`), T=0: " + "; ".join(tuned) + "."]
    lines += ["", "Greedy identity (T=0, speculative output == `generate` output): " +
              ", ".join(f"{d} {_f(v, 3)}" for d, v in r["greedy_match_rate"].items()), ""]
    lines += ["**Calibration (DSpark confidence head, Sequential Temperature Scaling, held-out prompts):**", "",
              "| T | ECE before | ECE after | AUROC | Brier |", "| --- | --- | --- | --- | --- |"]
    for T, c in r["calibration_by_temperature"].items():
        lines.append(f"| {T[2:]} | {_f(c['ece_before'], 4, True)} | {_f(c['ece_after'], 4, True)} | "
                     f"{_f(c['auroc'])} | {_f(c['brier'], 4)} |")
    if r["scheduler_by_load"]:
        lines += ["", "**Algorithm 1 vs the best fixed verification length** (simulated concurrent requests, "
                  "measured SPS table, DSpark T=0 rounds):", "",
                  "| requests | Algorithm 1 tokens/s | best fixed length | its tokens/s | ratio |", "| --- | --- | --- | --- | --- |"]
        for row in r["scheduler_by_load"]:
            lines.append(f"| {row['concurrency']} | {_f(row['algorithm1'], 2)} | {row['best_fixed']} | "
                         f"{_f(row['best_fixed_throughput'], 2)} | {_f(row['ratio'])} |")
        lines += ["", "(simulated tokens/s of the profiled hardware: the measured steps/s of a verification forward "
                  "over B tokens, `sps` in the JSON, applied to the recorded rounds)"]
    live = r.get("scheduler_live")
    if live and "error" not in live:
        lines += ["", "**Algorithm 1 live vs the best fixed verification length** (measured: N requests decoded "
                  "together on the target, one packed verification forward per round, DSpark T=0; greedy match "
                  f"{_f(live.get('greedy_match_rate'))}):", "",
                  "| requests | Algorithm 1 tokens/s | best fixed length | its tokens/s | ratio | best fixed, "
                  "picked on held-out repeats | ratio | spread over repeats (Alg. 1 / best fixed) | all N slots "
                  "busy: ratio to the held-out best fixed (its length) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        n_rows = len(live["requests"])
        heldout = live.get("best_fixed_heldout_tokens_per_s") or [None] * n_rows
        heldout_ratio = live.get("algorithm1_vs_best_fixed_heldout") or [None] * n_rows
        spread = live.get("spread") or [None] * n_rows
        full = live.get("full_batch") or {}
        full_ratio = live_ratios(full) if full else []
        full_ratio = full_ratio if len(full_ratio) == n_rows else [None] * n_rows
        full_length = full.get("best_fixed_length") or [None] * n_rows
        for i, (n, a1, best, length, ratio) in enumerate(zip(*(live[k] for k in LIVE_KEYS[:5]))):
            sp = spread[i]
            sp = f"{_f(sp['algorithm1'])} / {_f(sp[f'fixed_{length}'])}" if sp else "-"
            steady = f"{_f(full_ratio[i])} (fixed_{full_length[i]})" if full_ratio[i] is not None else "-"
            lines.append(f"| {n} | {_f(a1, 2)} | fixed_{length} | {_f(best, 2)} | {_f(ratio)} | "
                         f"{_f(heldout[i], 2)} | {_f(heldout_ratio[i])} | {sp} | {steady} |")
        settings = live.get("settings") or {}
        per_slot = settings.get("requests_per_slot", 1)
        lines += ["", f"({settings.get('repeats', '?')} repeat(s), medians; "
                  + (f"max(N x {per_slot}, {settings['min_requests']}) requests per run, at most N at a time; "
                     if per_slot > 1 and settings.get("min_requests")
                     else f"N x {per_slot} requests per run, at most N at a time; " if per_slot > 1
                     else "one closed batch of N requests per run; ")
                  + "the goal is judged on the held-out column when there are two repeats or more: the best of "
                  "seven noisy measurements overstates what picking one fixed length in advance would give; the "
                  "last column times only the rounds run with every one of the N slots busy, the steady state of a "
                  "server at N requests, leaving out the drain at the end of the run)"]
    tm = r["train_memory"]
    if tm:
        lines += ["", f"**Training peak memory** (same run, benchmarks/train_memory.py settings): chunked "
                  f"{tm['chunked']['step_peak_mb']:.0f} MB / naive {tm['naive']['step_peak_mb']:.0f} MB = "
                  f"{_f(tm['ratio_chunked_over_naive'])} (goal ≤ 0.5)."]
    cd = r["cache_dtypes"]
    if cd:
        lines += ["", f"**Cache storage dtype** ({cd['rows']} rows, {cd['tokens']} tokens of this run's data; "
                  "draft = the trained DSpark fed decoded features, scored against the float32 teacher):", "",
                  "| dtype | bytes/token | vs bf16 | relative error | teacher TV shift | chained τ estimate | vs fp32 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, c in cd["dtypes"].items():
            lines.append(f"| {name} | {c['bytes_per_token']} | {_f(c['bytes_ratio_to_bfloat16'], 4)} | "
                         f"{_f(c['relative_rms_error'], 4, True)} | {_f(c['teacher_tv_shift'], 4)} | "
                         f"{_f(c['draft_chained_tau'], 4)} | {_f(c['chained_tau_ratio_to_float32'], 4)} |")
    lines += ["", "**Goals:**", "", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for name, g in r["goals"].items():
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {name} | {g['target']} | {_f(g['measured'])} | {met} |")
    lines += [""] + [f"![{f}]({fig_rel}/{f})" for f in figs] + ["", END]
    return "\n".join(lines)


def collect(run: Path, state: dict, out: Path, md_path: Path | None) -> dict:
    result, train = build(run, state)
    fig_dir = out.parent / out.stem
    figs = plots(result, train, run, fig_dir)
    result["figures"] = [os.path.relpath(fig_dir / f, out.parent) for f in figs]
    atomic_write_json(out, result)
    if md_path is not None:
        section = markdown(result, figs, os.path.relpath(fig_dir, md_path.parent))
        text = md_path.read_text() if md_path.is_file() else "# Benchmarks\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        atomic_write_text(md_path, text)
    print(f"[reference] wrote {out}, {len(figs)} plot(s) in {fig_dir}" + (f", table in {md_path}" if md_path else ""))
    for name, g in result["goals"].items():
        print(f"  {name}: measured {_f(g['measured'])} target {g['target']} met {g['met']}")
    return result
