"""Calibration stage of the eval report: STS fit, metrics, plots, threshold sweep, load simulation.

``run_calibration`` takes the round records of the speculative-decoding eval and a profiled SPS table,
splits the records by prompt, fits Sequential Temperature Scaling on one part and scores it on the held-out
part, then writes into ``out_dir``:

- ``calibration.json``: temperatures and everything needed to judge and reuse them, the ``Calibration``
  record of ``dspark_model/calibration.py`` (its readers import the same record), written atomically;
- ``reliability.png``: reliability diagram of the pooled prefix survival, before vs after STS;
- ``ece_per_position.png``: prefix-survival ECE per draft position, before vs after;
- ``threshold_sweep.png``: static-threshold verification, tokens verified / accepted and waste;
- ``load_simulation.png``: simulated throughput vs concurrency for each verification policy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dspark_model.calibration import CALIBRATION_NAME, Calibration
from eval.calibration import (
    DEFAULT_MAX_WASTED_FRACTION,
    apply_sts,
    calibration_metrics,
    fit_sts,
    prefix_survival,
    recommend_threshold,
    records_to_arrays,
    reliability_bins,
    split_by_prompt,
    survival_labels,
    threshold_sweep,
)
from eval.scheduler import SpsTable
from eval.simulate import DEFAULT_CONCURRENCY, plot_simulation, simulate_load

FIGURES = {"reliability": "reliability.png", "ece_per_position": "ece_per_position.png",
           "threshold_sweep": "threshold_sweep.png", "load_simulation": "load_simulation.png"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_jsonable(value):
    """Numpy scalars/arrays to Python, NaN/inf to None, recursively (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def plot_reliability(before: Mapping, after: Mapping, path: str) -> str:
    """Reliability diagram (accuracy vs mean predicted survival per bin), before vs after STS."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for name, bins, marker in (("before STS", before, "s"), ("after STS", after, "o")):
        filled = np.asarray(bins["count"]) > 0
        axis.plot(np.asarray(bins["confidence"])[filled], np.asarray(bins["accuracy"])[filled],
                  marker=marker, label=name)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted prefix survival (bin mean)",
             ylabel="observed prefix survival", title="Reliability, pooled over positions")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ece_per_position(before: Sequence[float], after: Sequence[float], path: str) -> str:
    """Prefix-survival ECE at each draft position, before vs after STS."""
    plt = _pyplot()
    positions = np.arange(1, len(before) + 1)
    fig, axis = plt.subplots(figsize=(6, 4))
    axis.bar(positions - 0.2, before, width=0.4, label="before STS")
    axis.bar(positions + 0.2, after, width=0.4, label="after STS")
    axis.set(xlabel="draft position k", ylabel="ECE of prefix survival", xticks=positions,
             title="Calibration error per position")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_threshold_sweep(sweep: Sequence[Mapping], recommended: float, path: str) -> str:
    """Tokens verified / accepted per round (left axis) and wasted fraction (right axis) vs threshold."""
    plt = _pyplot()
    thresholds = [row["threshold"] for row in sweep]
    fig, axis = plt.subplots(figsize=(6.5, 4))
    axis.plot(thresholds, [row["mean_verified"] for row in sweep], marker="o", label="verified / round")
    axis.plot(thresholds, [row["mean_accepted"] for row in sweep], marker="s", label="accepted / round")
    axis.set(xlabel="static prefix-survival threshold", ylabel="draft tokens per round")
    waste = axis.twinx()
    waste.plot(thresholds, [row["wasted_fraction"] for row in sweep], color="tab:red", ls=":",
               label="wasted fraction")
    waste.set(ylabel="wasted verification fraction", ylim=(0, 1))
    axis.axvline(recommended, color="k", lw=0.8, ls="--", label=f"recommended {recommended:g}")
    lines = axis.get_legend_handles_labels()
    extra = waste.get_legend_handles_labels()
    axis.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _validate(records: Sequence[Mapping]) -> int:
    """Clear errors for degenerate input; returns gamma."""
    if not records:
        raise ValueError("run_calibration: no round records to calibrate on")
    conf, _ = records_to_arrays(records)  # raises on mixed gamma or malformed records
    return int(conf.shape[1])


def _fit_and_score(calib: Sequence[Mapping], test: Sequence[Mapping], n_bins: int) -> dict:
    """Fit STS on the calibration rounds; metrics and reliability bins before/after on the test rounds."""
    calib_conf, calib_accepted = records_to_arrays(calib)
    test_conf, test_accepted = records_to_arrays(test)
    temps = fit_sts(calib_conf, calib_accepted, n_bins=n_bins)
    test_calibrated = apply_sts(test_conf, temps)  # (N_test, gamma)
    labels = survival_labels(test_accepted, test_conf.shape[1])  # (N_test, gamma)
    survival = prefix_survival(test_calibrated)  # (N_test, gamma)
    return {"temperatures": temps, "survival": survival, "accepted": test_accepted,
            "before": calibration_metrics(test_conf, test_accepted, n_bins),
            "after": calibration_metrics(test_calibrated, test_accepted, n_bins),
            "bins_before": reliability_bins(prefix_survival(test_conf), labels, n_bins),
            "bins_after": reliability_bins(survival, labels, n_bins)}


def _split_summary(calib: Sequence[Mapping], test: Sequence[Mapping], calib_fraction: float,
                   seed: int) -> dict:
    def n_prompts(part):
        return len({(r["dataset"], r["prompt_id"]) for r in part})

    return {"calib_fraction": calib_fraction, "seed": seed, "n_calib_rounds": len(calib),
            "n_test_rounds": len(test), "n_calib_prompts": n_prompts(calib), "n_test_prompts": n_prompts(test)}


def _write_figures(out_dir: str, scored: Mapping, sweep: Sequence[Mapping], threshold: float,
                   simulation: Mapping) -> dict:
    """Write the four PNGs; returns {figure key: file name inside out_dir}."""
    paths = {key: os.path.join(out_dir, name) for key, name in FIGURES.items()}
    plot_reliability(scored["bins_before"], scored["bins_after"], paths["reliability"])
    plot_ece_per_position(scored["before"]["per_position"]["ece"], scored["after"]["per_position"]["ece"],
                          paths["ece_per_position"])
    plot_threshold_sweep(sweep, threshold, paths["threshold_sweep"])
    plot_simulation(simulation["table"], paths["load_simulation"])
    return dict(FIGURES)


def run_calibration(records: Sequence[Mapping], sps_table: SpsTable | Mapping, out_dir: str,
                    n_bins: int = 15, calib_fraction: float = 0.5, seed: int = 0,
                    hardware: Mapping | None = None,
                    max_wasted_fraction: float = DEFAULT_MAX_WASTED_FRACTION,
                    concurrency: Sequence[int] = DEFAULT_CONCURRENCY, n_steps: int | None = None,
                    target: Mapping | None = None, weights_sha256: str | None = None) -> Calibration:
    """Calibrate, score, sweep, simulate and write ``calibration.json`` + PNGs into ``out_dir``.

    calibration.json (and the returned ``Calibration``) holds: schema_version, weights_sha256, gamma,
    temperatures, n_bins, split, metrics {before, after, reliability_before, reliability_after}, threshold
    {recommended, rule, ...}, threshold_sweep, sps {batch_tokens, steps_per_s (non-increasing envelope),
    measured_steps_per_s, hardware}, scheduler {policy, early_stop, ...},
    simulation {table, scheduler_vs_best_fixed, ...}, figures, and the report keys ece_before, ece_after
    (pooled prefix-survival ECE on the held-out part), auroc, brier (after STS, pooled) and
    scheduler_vs_best_fixed. ``hardware`` defaults to the hardware recorded in the SPS table. ``target``: the
    target the records were measured on (id, revision, fingerprint; ``dspark_model/identity.py``), stored
    as ``target`` so that a calibration beside a draft's weights says which target it was fitted with.
    ``weights_sha256``: the sha256 of the draft's ``model.safetensors`` the records were measured with (None
    for a draft that was never saved); readers trust the calibration only beside those weights.
    """
    gamma = _validate(records)
    sps = sps_table if isinstance(sps_table, SpsTable) else SpsTable.from_dict(sps_table)
    calib, test = split_by_prompt(records, calib_fraction=calib_fraction, seed=seed)
    scored = _fit_and_score(calib, test, n_bins)
    sweep = threshold_sweep(scored["survival"], scored["accepted"])
    recommended = recommend_threshold(sweep, max_wasted_fraction=max_wasted_fraction)
    simulation = simulate_load(scored["survival"], scored["accepted"], sps, concurrency=concurrency,
                               n_steps=n_steps, threshold=recommended["threshold"], seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    figures = _write_figures(out_dir, scored, sweep, recommended["threshold"], simulation)
    before, after = scored["before"], scored["after"]
    result = Calibration(**to_jsonable({
        "weights_sha256": weights_sha256, "gamma": gamma, "temperatures": scored["temperatures"],
        "n_bins": n_bins, "split": _split_summary(calib, test, calib_fraction, seed),
        "metrics": {"before": before, "after": after, "reliability_before": scored["bins_before"],
                    "reliability_after": scored["bins_after"]},
        "threshold": {"recommended": recommended["threshold"], "rule": recommended["rule"],
                      "max_wasted_fraction": recommended["max_wasted_fraction"],
                      "met_target": recommended["met_target"], "row": recommended["row"]},
        "threshold_sweep": sweep,
        "sps": {**sps.to_dict(), "hardware": hardware if hardware is not None else sps.hardware},
        "scheduler": {"policy": "algorithm1", "early_stop": True,
                      "practical_stale_steps": simulation["stale_steps_practical"]},
        "simulation": simulation, "figures": figures,
        "ece_before": before["pooled"]["ece"], "ece_after": after["pooled"]["ece"],
        "auroc": after["pooled"]["auroc"], "brier": after["pooled"]["brier"],
        "scheduler_vs_best_fixed": simulation["scheduler_vs_best_fixed"], "target": target,
    }))
    result.write(os.path.join(out_dir, CALIBRATION_NAME))  # strict JSON: to_jsonable made NaN null
    return result
