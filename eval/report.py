"""Eval outputs: ``report.json``, ``report.md``, ``rounds.jsonl``, ``prompts.jsonl``, ``outputs.jsonl``, plots.

Layout of an output folder (default ``runs/eval/<name>``)::

    report.json               every number of the run: the ``EvalReport`` record below, strict JSON
    report.md                 the same as readable tables
    rounds.jsonl              one record per speculative round (input of calibration / scheduling)
    prompts.jsonl             per-prompt timing rows (tokens and seconds per method, greedy match)
    outputs.jsonl             generated token ids per prompt and turn (spec, and plain generate)
    acceptance_by_position.png    conditional acceptance and prefix survival, one line per dataset
    accepted_length_histogram.png
    calibration/              calibration.json + figures (drafts with a confidence head)
    scheduler_live.png        Algorithm 1 vs fixed lengths, measured live (``scheduler_live.enabled=true``)

All files are written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dspark_model.atomic import atomic_write_text
from dspark_model.calibration import CALIBRATION_NAME
from dspark_model.record import JsonRecord
from dspark_model.target import dtype_name
from eval.metrics import DEFINITIONS

PLOTS = {"acceptance": "acceptance_by_position.png", "histogram": "accepted_length_histogram.png"}


def jsonable(value):
    """Numbers/containers to strict-JSON values (NaN/inf -> None), recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _atomic_write(path: str, write) -> None:
    """Render with ``write(handle)`` into memory, then write the file atomically."""
    buffer = io.StringIO()
    write(buffer)
    atomic_write_text(path, buffer.getvalue())


def write_json(path: str, data: Mapping) -> None:
    _atomic_write(path, lambda h: (json.dump(jsonable(data), h, indent=2, allow_nan=False), h.write("\n")))


def write_jsonl(path: str, rows: Iterable[Mapping]) -> None:
    def write(handle):
        for row in rows:
            handle.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
    _atomic_write(path, write)


@dataclass
class EvalReport(JsonRecord):
    """``report.json``: one eval run's numbers, written by ``eval`` (``write_outputs``), read by the model card
    (``dspark_model/card.py``) and ``benchmarks/reference_report.py``.

    Acceptance (``metrics.acceptance_summary``; per position lists have gamma entries, ``pooled`` and
    ``by_dataset``): tau, tau_by_dataset, conditional_acceptance, prefix_survival, accepted_length_histogram,
    num_rounds, num_rounds_by_dataset. Wall clock (``metrics.throughput_summary``): tokens_per_s {spec,
    generate, prompt_lookup}, timing_totals, the speed-ups (pooled, and vs generate per dataset) and match rates. ``definitions``: what each number
    means; ``settings``: what produced them (``run_settings_record``). Calibration (``calibrate``): its headline
    numbers and where it was written, or ``calibration_error``. ``scheduler_live``: eval/live.py's record.
    Reports written before the record had no ``format`` key; they are read as this version."""

    FORMAT = "dspark-eval-report/1"
    WHAT = "eval report"
    FIX = "re-run eval (`python -m eval draft=<checkpoint>`) to write a current one"
    UNVERSIONED_IS_CURRENT = True

    tau: float | None
    tau_by_dataset: dict
    conditional_acceptance: dict
    prefix_survival: dict
    accepted_length_histogram: dict
    num_rounds: int
    num_rounds_by_dataset: dict
    tokens_per_s: dict
    timing_totals: dict
    speedup_vs_generate: float | None
    speedup_vs_prompt_lookup: float | None
    greedy_match_rate: float | None
    prompt_lookup_match_rate: float | None
    settings: dict
    definitions: dict = dataclasses.field(default_factory=lambda: dict(DEFINITIONS))
    ece_before: float | None = None
    ece_after: float | None = None
    auroc: float | None = None
    brier: float | None = None
    scheduler_vs_best_fixed: float | None = None
    calibration_dir: str | None = None
    calibration_figures: list | None = None
    calibration_written_to: str | None = None
    calibration_error: str | None = None
    speedup_vs_generate_by_dataset: dict = dataclasses.field(default_factory=dict)  # absent before 2026-11-30
    scheduler_live: dict | None = None

    def write(self, path: str | Path) -> None:
        """Strict JSON: NaN and infinities become null."""
        write_json(str(path), self.to_dict())


def build_report(acceptance: Mapping, throughput: Mapping, settings: Mapping) -> EvalReport:
    """report.json content: acceptance metrics + wall clock + the settings that produced them."""
    return EvalReport(**acceptance, **throughput, settings=dict(settings))


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend)
# ----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(values: Sequence) -> tuple[list[int], list[float]]:
    pts = [(k + 1, v) for k, v in enumerate(values) if v is not None]
    return [k for k, _ in pts], [v for _, v in pts]


def plot_acceptance(report: Mapping, path: str) -> str:
    """Two panels: conditional acceptance and prefix survival by draft position, one line per dataset."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, key, title in ((axes[0], "conditional_acceptance", "conditional: P(k | 1..k-1 accepted)"),
                             (axes[1], "prefix_survival", "prefix survival: P(1..k all accepted)")):
        for name, values in report[key]["by_dataset"].items():
            axis.plot(*_series(values), marker="o", label=name)
        axis.plot(*_series(report[key]["pooled"]), color="k", ls="--", label="pooled")
        gamma = len(report[key]["pooled"])
        axis.set(xlabel="draft position k", title=title, ylim=(0, 1.02), xlim=(0.5, gamma + 0.5),
                 xticks=list(range(1, gamma + 1)))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("probability")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_histogram(report: Mapping, path: str) -> str:
    """Fraction of rounds by accepted length, grouped bars per dataset."""
    plt = _pyplot()
    groups = report["accepted_length_histogram"]["by_dataset"]
    fig, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(groups), 1)
    for i, (name, counts) in enumerate(groups.items()):
        total = max(sum(counts), 1)
        xs = [n + (i - (len(groups) - 1) / 2) * width for n in range(len(counts))]
        axis.bar(xs, [c / total for c in counts], width=width, label=name)
    axis.set(xlabel="accepted draft tokens per round", ylabel="fraction of rounds",
             title=f"Accepted length (tau = {report['tau']:.2f} tokens / verification)"
             if report.get("tau") is not None else "Accepted length")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _position_table(report: Mapping, key: str) -> list[str]:
    per = report[key]["by_dataset"]
    gamma = len(report[key]["pooled"])
    rows = [[name] + list(values) for name, values in per.items()] + [["pooled"] + report[key]["pooled"]]
    return _table(["dataset"] + [f"k={k}" for k in range(1, gamma + 1)], rows)


def render_markdown(report: Mapping) -> str:
    s = report["settings"]
    lines = [f"# Speculative decoding eval: {s.get('draft')}", "",
             f"Target `{s.get('target')}`, temperature {s.get('temperature')}, gamma {s.get('gamma')}, "
             f"max_new_tokens {s.get('max_new_tokens')}, {s.get('num_prompts_evaluated')} prompts, batch size 1, "
             f"device {s.get('device')}.", "", "## Acceptance length tau", "", f"_{DEFINITIONS['tau']}_", ""]
    lines += _table(["dataset", "tau", "rounds"],
                    [[n, t, report["num_rounds_by_dataset"].get(n)] for n, t in report["tau_by_dataset"].items()]
                    + [["pooled", report["tau"], report["num_rounds"]]])
    lines += ["## Conditional acceptance by position", "", f"_{DEFINITIONS['conditional_acceptance']}_", ""]
    lines += _position_table(report, "conditional_acceptance")
    lines += ["## Prefix survival by position", "", f"_{DEFINITIONS['prefix_survival']}_", ""]
    lines += _position_table(report, "prefix_survival")
    hist = report["accepted_length_histogram"]["pooled"]
    lines += ["## Accepted-length histogram (pooled)", ""]
    lines += _table(["accepted"] + [str(n) for n in range(len(hist))], [["rounds"] + hist])
    tps = report.get("tokens_per_s", {})
    lines += ["## Wall clock (same prompts, same max_new_tokens, warm-up excluded)", ""]
    lines += _table(["method", "tokens/s", "tokens", "seconds"],
                    [[m, tps.get(m), t["tokens"], t["seconds"]] for m, t in report.get("timing_totals", {}).items()])
    by_dataset = report.get("speedup_vs_generate_by_dataset") or {}
    lines += [f"- speed-up vs generate: {_fmt(report.get('speedup_vs_generate'))}"
              + (" (" + ", ".join(f"{d} {_fmt(v)}" for d, v in by_dataset.items()) + ")" if by_dataset else ""),
              f"- speed-up vs prompt lookup: {_fmt(report.get('speedup_vs_prompt_lookup'))}",
              f"- greedy match rate (spec == plain greedy, token for token): {_fmt(report.get('greedy_match_rate'))}",
              ""]
    if report.get("calibration_dir"):  # the calibration stage ran
        lines += ["## Calibration (held-out rounds)", ""]
        lines += _table(["ece_before", "ece_after", "auroc", "brier", "scheduler_vs_best_fixed"],
                        [[report.get(k) for k in ("ece_before", "ece_after", "auroc", "brier",
                                                  "scheduler_vs_best_fixed")]])
    elif report.get("calibration_error"):
        lines += ["## Calibration", "", f"Skipped: {report['calibration_error']}", ""]
    live = report.get("scheduler_live")
    if live and "error" not in live:
        lines += ["## Algorithm 1 live (concurrent requests, one packed verification forward per round)", ""]
        full = live.get("full_batch") or {}
        n_rows = len(live["requests"])
        lines += _table(["requests", "Algorithm 1 tokens/s", "best fixed length", "its tokens/s", "ratio",
                         "all slots busy: ratio", "its best fixed length"],
                        zip(live["requests"], live["algorithm1_tokens_per_s"], live["best_fixed_length"],
                            live["best_fixed_tokens_per_s"], live["algorithm1_vs_best_fixed"],
                            full.get("algorithm1_vs_best_fixed") or [None] * n_rows,
                            full.get("best_fixed_length") or [None] * n_rows))
        lines += ["- all slots busy: only the rounds run with every one of the N slots taken (a server's steady "
                  "state; the drain at the end of the run left out)"]
        lines += [f"- greedy match rate (every request of every run vs plain greedy): "
                  f"{_fmt(live.get('greedy_match_rate'))}", ""]
    elif live:
        lines += ["## Algorithm 1 live", "", f"Skipped: {live['error']}", ""]
    figures = list(PLOTS.values()) + list(report.get("calibration_figures") or [])
    figures += [live["figure"]] if live and live.get("figure") else []
    lines += ["Figures: " + ", ".join(f"`{f}`" for f in figures), ""]
    return "\n".join(lines)


def write_outputs(out_dir: str, report: EvalReport, records: Sequence[Mapping] | None = None,
                  rows: Sequence[Mapping] | None = None, outputs: Sequence[Mapping] | None = None) -> dict:
    """Write every file of the output folder; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"report_json": os.path.join(out_dir, "report.json"), "report_md": os.path.join(out_dir, "report.md")}
    for key, items, name in (("rounds", records, "rounds.jsonl"), ("prompts", rows, "prompts.jsonl"),
                             ("outputs", outputs, "outputs.jsonl")):
        if items is not None:
            paths[key] = os.path.join(out_dir, name)
            write_jsonl(paths[key], items)
    doc = jsonable(report.to_dict())
    if report.num_rounds:
        paths["acceptance_plot"] = plot_acceptance(doc, os.path.join(out_dir, PLOTS["acceptance"]))
        paths["histogram_plot"] = plot_histogram(doc, os.path.join(out_dir, PLOTS["histogram"]))
    report.write(paths["report_json"])
    _atomic_write(paths["report_md"], lambda h: h.write(render_markdown(doc)))
    return paths


# ----------------------------------------------------------------------------------------------------
# Settings record and the calibration step
# ----------------------------------------------------------------------------------------------------

def run_settings_record(cfg, spec, target, draft, settings, prompts: Sequence, checkpoint: str | None,
                        prepacked_rows: Sequence[int] = ()) -> dict:
    """What produced the numbers: models, decoding settings, prompts, software and hardware.
    ``prepacked_rows``: the row counts the target's GEMM weights were packed for while timing."""
    import platform

    import torch
    import transformers

    datasets: dict[str, int] = {}
    for p in prompts:
        datasets[str(p.source)] = datasets.get(str(p.source), 0) + 1
    device = target.device
    return {
        "draft": checkpoint or cfg.draft_checkpoint, "target": spec.id, "target_path": spec.path,
        "target_dtype": dtype_name(target.dtype), "draft_block_size": draft.block_size,
        "sequential_head": draft.sequential_head, "confidence_head": draft.confidence_head is not None,
        "temperature": settings.temperature, "gamma": settings.gamma, "max_new_tokens": settings.max_new_tokens,
        "num_prompts_per_source": cfg.num_prompts, "num_prompts_evaluated": len(prompts),
        "prompts_by_dataset": datasets, "prompts_group": cfg.prompts.name, "seed": settings.seed,
        "batch_size": 1, "eos_token_ids": list(settings.eos_token_ids),
        "chat_template_kwargs": settings.chat_template_kwargs,
        "baselines": {"generate": settings.run_generate, "prompt_lookup": settings.run_prompt_lookup,
                      "prompt_lookup_num_tokens": settings.prompt_lookup_num_tokens,
                      "prompt_lookup_max_ngram": settings.prompt_lookup_max_ngram},
        "warmup_excluded": settings.warmup, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(), "target_gemm_prepacked_rows": list(prepacked_rows),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def calibrate(records: Sequence[Mapping], target, out_dir: str, checkpoint: str | None, cal_cfg,
              seed: int = 0, spec=None, weights_sha256: str | None = None) -> dict:
    """Profile SPS on this machine and run the calibration stage (eval/calibration_report.py).

    Writes ``<out_dir>/calibration/`` and, when ``cal_cfg.write_to_checkpoint`` and a checkpoint folder is
    known, the same ``calibration.json`` beside the checkpoint; it records the target it was fitted with
    (``spec``'s id and revision, the weights fingerprint) and ``weights_sha256``, the sha256 of the draft
    weights the records were measured with (taken when the draft was loaded: should the checkpoint's weights
    be replaced meanwhile, readers see that the calibration is not theirs). Returns the report keys to merge (ece_before,
    ece_after, auroc, brier, scheduler_vs_best_fixed), or {"calibration_error": reason} when it cannot run,
    so the rest of the eval never depends on it.
    """
    import logging

    log = logging.getLogger(__name__)
    try:
        from dspark_model.identity import identity_record
        from eval.calibration_report import run_calibration
        from eval.scheduler import describe_hardware, make_target_step_fn, profile_sps

        usable = [r for r in records if r.get("confidences")]
        step = make_target_step_fn(target.model, context_len=cal_cfg.sps_context_len, device=str(target.device),
                                   seed=seed)
        sps = profile_sps(step, cal_cfg.sps_batch_sizes, warmup=cal_cfg.sps_warmup, repeats=cal_cfg.sps_repeats,
                          hardware=describe_hardware())
        cal_dir = os.path.join(out_dir, "calibration")
        fitted_with = identity_record(spec.id if spec else target.name_or_path,
                                      spec.revision if spec else target.revision, target)
        result = run_calibration(usable, sps, cal_dir, n_bins=cal_cfg.n_bins,
                                 calib_fraction=cal_cfg.calib_fraction, seed=seed, target=fitted_with,
                                 weights_sha256=weights_sha256)
    except Exception as exc:  # calibration is an add-on: report why it was skipped, keep the eval
        log.warning("calibration skipped: %s: %s", type(exc).__name__, exc)
        return {"calibration_error": f"{type(exc).__name__}: {exc}"}
    keys = {k: getattr(result, k) for k in ("ece_before", "ece_after", "auroc", "brier", "scheduler_vs_best_fixed")}
    keys["calibration_dir"] = cal_dir
    keys["calibration_figures"] = [f"calibration/{name}" for name in (result.figures or {}).values()]
    if cal_cfg.write_to_checkpoint and checkpoint:
        dest = os.path.join(checkpoint, CALIBRATION_NAME)
        result.write(dest)
        keys["calibration_written_to"] = dest
    return keys
