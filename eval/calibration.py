"""Confidence calibration for the DSpark confidence head: Sequential Temperature Scaling and its metrics.

The confidence head emits, per draft position k, c_k = P(position k accepted | positions 1..k-1 accepted).
The scheduler needs the absolute value of the prefix survival a_k = prod_{i<=k} c_i (the probability that
the first k draft tokens all survive verification), so the raw head outputs are calibrated post hoc.

Sequential Temperature Scaling (STS, paper section 3.2.1) walks the block left to right: for position k it
picks one temperature T_k from a 1-D grid that minimises the ECE of the calibrated prefix survival
prod_{i<=k} sigmoid(logit(c_i) / T_i) against the label "accepted >= k", with T_1..T_{k-1} already fixed.
Dividing a logit by T > 0 is strictly increasing, so calibration never changes how rows rank at a position.

Everything here is a pure numpy function of arrays. Input comes as round records (one dict per speculative
decoding round, see ``records_to_arrays``); ``split_by_prompt`` keeps all rounds of one prompt together.

Shapes: N = rounds, gamma = draft block length (positions 1..gamma are columns 0..gamma-1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

PROB_CLIP = 1e-6
DEFAULT_GRID = np.geomspace(0.05, 20.0, 200)
DEFAULT_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)
DEFAULT_MAX_WASTED_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------------
# Round records
# ----------------------------------------------------------------------------------------------------

def _prompt_key(record: Mapping) -> tuple[str, int]:
    return (str(record["dataset"]), int(record["prompt_id"]))


def split_by_prompt(records: Sequence[Mapping], calib_fraction: float = 0.5,
                    seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split round records into (calibration, held-out test) parts by prompt, never by round.

    Rounds of one prompt are strongly correlated, so all of them go to the same side. The prompt keys
    (dataset, prompt_id) are sorted, then shuffled with ``seed``: the split is deterministic and does not
    depend on record order. Each side gets at least one prompt; fewer than two prompts is an error.
    """
    if not records:
        raise ValueError("split_by_prompt: no round records given")
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"split_by_prompt: calib_fraction must lie in (0, 1), got {calib_fraction}")
    keys = sorted({_prompt_key(r) for r in records})
    if len(keys) < 2:
        raise ValueError(f"split_by_prompt: need at least 2 distinct (dataset, prompt_id) prompts to hold "
                         f"some out, got {len(keys)}: {keys}")
    order = np.random.default_rng(seed).permutation(len(keys))
    n_calib = int(np.clip(round(calib_fraction * len(keys)), 1, len(keys) - 1))
    calib_keys = {keys[i] for i in order[:n_calib]}
    calib = [dict(r) for r in records if _prompt_key(r) in calib_keys]
    test = [dict(r) for r in records if _prompt_key(r) not in calib_keys]
    return calib, test


def records_to_arrays(records: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Stack round records into raw confidences (N, gamma) float64 and accepted counts (N,) int64.

    Every record must have the same gamma, ``len(confidences) == gamma`` and ``0 <= accepted <= gamma``.
    """
    if not records:
        raise ValueError("records_to_arrays: no round records given")
    gammas = sorted({int(r["gamma"]) for r in records})
    if len(gammas) != 1:
        raise ValueError(f"records_to_arrays: records mix draft block lengths gamma={gammas}; "
                         "calibrate one gamma at a time")
    gamma = gammas[0]
    if gamma < 1:
        raise ValueError(f"records_to_arrays: gamma must be >= 1, got {gamma}")
    bad = [i for i, r in enumerate(records) if len(r["confidences"]) != gamma]
    if bad:
        raise ValueError(f"records_to_arrays: {len(bad)} record(s) have len(confidences) != gamma={gamma} "
                         f"(first at index {bad[0]})")
    conf = np.asarray([r["confidences"] for r in records], dtype=np.float64)  # (N, gamma)
    accepted = np.asarray([int(r["accepted"]) for r in records], dtype=np.int64)  # (N,)
    if accepted.min() < 0 or accepted.max() > gamma:
        raise ValueError(f"records_to_arrays: accepted must lie in 0..{gamma}, got "
                         f"[{accepted.min()}, {accepted.max()}]")
    return conf, accepted


def survival_labels(accepted: np.ndarray, gamma: int) -> np.ndarray:
    """Prefix-survival labels (N, gamma): column k-1 is True where ``accepted >= k``."""
    return np.asarray(accepted)[:, None] >= np.arange(1, gamma + 1)[None, :]


# ----------------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------------

def temper(prob: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """Temperature-scale probabilities on the logit: sigmoid(logit(p) / T), with p clipped to (1e-6, 1-1e-6)."""
    p = np.clip(np.asarray(prob, dtype=np.float64), PROB_CLIP, 1.0 - PROB_CLIP)
    logit = np.log(p) - np.log1p(-p)
    return 1.0 / (1.0 + np.exp(-logit / temperature))


def _check_order_preserved(raw: np.ndarray, calibrated: np.ndarray) -> None:
    """Raise if calibration ever ranks two rows of a position in the opposite order to the raw confidences.

    Sorting each column by its raw value must leave the calibrated column non-decreasing (ties may appear
    where the sigmoid saturates in float64, but never an inversion). Cost: one argsort per position.
    """
    order = np.argsort(raw, axis=0, kind="stable")  # (N, gamma)
    ranked = np.take_along_axis(calibrated, order, axis=0)
    if np.any(np.diff(ranked, axis=0) < 0):
        raise AssertionError("temperature scaling changed the ranking of rows at some draft position")


def apply_sts(conf: np.ndarray, temps: Sequence[float]) -> np.ndarray:
    """Calibrated conditional confidences (N, gamma): position k scaled with its own temperature T_k."""
    conf = np.asarray(conf, dtype=np.float64)
    temps = np.asarray(temps, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[1] != temps.shape[0]:
        raise ValueError(f"apply_sts: conf shape {conf.shape} does not match {temps.shape[0]} temperatures")
    if np.any(temps <= 0):
        raise ValueError("apply_sts: temperatures must be > 0")
    calibrated = temper(conf, temps[None, :])  # (N, gamma)
    _check_order_preserved(conf, calibrated)
    return calibrated


def fit_sts(conf: np.ndarray, accepted: np.ndarray, grid: np.ndarray | None = None,
            n_bins: int = 15, ece_tolerance: float | None = None) -> np.ndarray:
    """Fit one temperature per draft position, left to right (Sequential Temperature Scaling).

    For k = 1..gamma: with T_1..T_{k-1} fixed, choose the grid temperature minimising
    ECE(prod_{i<=k} sigmoid(logit(c_i)/T_i), accepted >= k), as the paper does. Among the temperatures whose
    ECE is within ``ece_tolerance`` of the smallest, the one with the lowest Brier score wins (then the
    smaller one). Why: binned ECE alone is minimised by flattening every confidence towards the base rate
    (T at the top of the grid): on 150 rounds of a perfectly calibrated head with acceptance near 1/2 it picks
    T ~ 20 in 26 of 30 draws, because a calibrated head's binned ECE on so few rows is sampling noise of
    ~1/sqrt(N), larger than the flat answer's. The Brier score is a proper score, so among choices the ECE
    cannot tell apart it keeps the sharpest. ``ece_tolerance=None`` sets that noise level, 1/sqrt(N) for N
    rounds; ``0`` is the paper's rule.
    Returns temperatures (gamma,).
    """
    conf = np.asarray(conf, dtype=np.float64)
    accepted = np.asarray(accepted)
    grid = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] == 0:
        raise ValueError(f"fit_sts: conf must be a non-empty (N, gamma) array, got shape {conf.shape}")
    if np.any(grid <= 0):
        raise ValueError("fit_sts: temperature grid must be strictly positive")
    gamma = conf.shape[1]
    if ece_tolerance is None:
        ece_tolerance = 1.0 / math.sqrt(conf.shape[0])
    labels = survival_labels(accepted, gamma)  # (N, gamma)
    temps = np.ones(gamma)
    prefix = np.ones(conf.shape[0])  # calibrated survival of positions 1..k-1, (N,)
    for k in range(gamma):
        scaled = temper(conf[:, k][None, :], grid[:, None])  # (n_grid, N)
        errors = np.array([ece(prefix * row, labels[:, k], n_bins) for row in scaled])
        near = np.flatnonzero(errors <= errors.min() + ece_tolerance)
        scores = [brier(prefix * scaled[i], labels[:, k]) for i in near]
        best = int(near[int(np.argmin(scores))])
        temps[k] = grid[best]
        prefix = prefix * scaled[best]
    apply_sts(conf, temps)  # runs the order-preservation check on the fitted temperatures
    return temps


def prefix_survival(conf: np.ndarray) -> np.ndarray:
    """Prefix survival a_k = prod_{i<=k} c_i (N, gamma) from conditional confidences (N, gamma)."""
    return np.cumprod(np.asarray(conf, dtype=np.float64), axis=1)


# ----------------------------------------------------------------------------------------------------
# Metrics of (prob, label) arrays
# ----------------------------------------------------------------------------------------------------

def _bin_index(prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability on [0, 1]; p = 1 falls in the last bin."""
    return np.clip((prob * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_bins(prob: np.ndarray, label: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width bin: edges, mean predicted probability, observed accuracy and count (NaN if empty)."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    label = np.asarray(label, dtype=np.float64).ravel()
    idx = _bin_index(prob, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_prob = np.bincount(idx, weights=prob, minlength=n_bins)
    sum_label = np.bincount(idx, weights=label, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(count > 0, sum_prob / count, np.nan)
        accuracy = np.where(count > 0, sum_label / count, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": confidence,
            "accuracy": accuracy, "count": count}


def ece(prob: np.ndarray, label: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width bins of (count / N) * |mean prob - accuracy|."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    if prob.size == 0:
        return float("nan")
    bins = reliability_bins(prob, label, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["confidence"][filled] - bins["accuracy"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / prob.size)


def brier(prob: np.ndarray, label: np.ndarray) -> float:
    """Brier score: mean squared difference between probability and 0/1 label."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    if prob.size == 0:
        return float("nan")
    return float(np.mean((prob - np.asarray(label, dtype=np.float64).ravel()) ** 2))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(prob: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half); NaN with one class."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    label = np.asarray(label, dtype=bool).ravel()
    n_pos = int(label.sum())
    n_neg = label.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(prob)
    u_pos = ranks[label].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_pos / (n_pos * n_neg))


def calibration_metrics(conf: np.ndarray, accepted: np.ndarray, n_bins: int = 15) -> dict:
    """ECE / Brier / AUROC of prefix survival prod_{i<=k} c_i against ``accepted >= k``.

    ``per_position`` holds lists indexed by position 1..gamma, ``pooled`` scores every (row, position) pair
    together. The conditional view (c_k against "k accepted" on rows that reached k, i.e. accepted >= k-1)
    is reported beside it as mean confidence vs observed rate, so the two are never confused.
    """
    conf = np.asarray(conf, dtype=np.float64)
    accepted = np.asarray(accepted)
    gamma = conf.shape[1]
    survival = prefix_survival(conf)  # (N, gamma)
    labels = survival_labels(accepted, gamma)  # (N, gamma)
    per = {key: [] for key in ("ece", "brier", "auroc", "mean_survival", "survival_rate",
                               "conditional_mean_confidence", "conditional_rate", "n_reached")}
    for k in range(gamma):
        s, y = survival[:, k], labels[:, k]
        per["ece"].append(ece(s, y, n_bins))
        per["brier"].append(brier(s, y))
        per["auroc"].append(auroc(s, y))
        per["mean_survival"].append(float(s.mean()))
        per["survival_rate"].append(float(y.mean()))
        reached = accepted >= k  # position k+1 (1-based) was verified with all earlier ones accepted
        per["n_reached"].append(int(reached.sum()))
        per["conditional_mean_confidence"].append(float(conf[reached, k].mean()) if reached.any() else None)
        per["conditional_rate"].append(float(y[reached].mean()) if reached.any() else None)
    pooled = {"ece": ece(survival, labels, n_bins), "brier": brier(survival, labels),
              "auroc": auroc(survival, labels), "n_pairs": int(survival.size)}
    return {"n_rounds": int(conf.shape[0]), "gamma": gamma, "per_position": per, "pooled": pooled}


# ----------------------------------------------------------------------------------------------------
# Static-threshold verification
# ----------------------------------------------------------------------------------------------------

def verified_lengths(survival: np.ndarray, threshold: float) -> np.ndarray:
    """Per row, the longest prefix whose prefix survival is >= threshold (N,) int64."""
    keep = np.asarray(survival) >= threshold  # (N, gamma)
    return np.cumprod(keep, axis=1).sum(axis=1).astype(np.int64)


def threshold_sweep(survival: np.ndarray, accepted: np.ndarray,
                    thresholds: Sequence[float] | None = None) -> list[dict]:
    """Static-threshold verification: for each threshold t, every round verifies its longest prefix with
    calibrated prefix survival >= t.

    Per threshold: mean tokens verified, mean tokens accepted (min(accepted, verified)), and the wasted
    verification fraction 1 - accepted / verified over all rounds (0 when nothing is verified).
    """
    survival = np.asarray(survival, dtype=np.float64)
    accepted = np.asarray(accepted)
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    rows = []
    for t in thresholds:
        verified = verified_lengths(survival, float(t))  # (N,)
        kept = np.minimum(accepted, verified)  # (N,)
        total_verified = int(verified.sum())
        wasted = 1.0 - kept.sum() / total_verified if total_verified > 0 else 0.0
        rows.append({"threshold": float(t), "mean_verified": float(verified.mean()),
                     "mean_accepted": float(kept.mean()), "wasted_fraction": float(wasted)})
    return rows


def recommend_threshold(sweep: Sequence[Mapping],
                        max_wasted_fraction: float = DEFAULT_MAX_WASTED_FRACTION) -> dict:
    """Pick a static threshold from a sweep with this rule:

    the LOWEST threshold whose wasted verification fraction is <= ``max_wasted_fraction``. A lower threshold
    verifies longer prefixes and so accepts at least as many tokens per round; the cap bounds how much of
    the verification budget is spent on tokens that get rejected. If no threshold meets the cap, take the
    one with the smallest wasted fraction (lowest threshold on ties).
    Returns the threshold, the rule as a sentence, the cap and the chosen sweep row.
    """
    if not sweep:
        raise ValueError("recommend_threshold: empty sweep")
    rows = sorted(sweep, key=lambda row: row["threshold"])
    meeting = [row for row in rows if row["wasted_fraction"] <= max_wasted_fraction]
    if meeting:
        chosen = meeting[0]
    else:
        chosen = min(rows, key=lambda row: (row["wasted_fraction"], row["threshold"]))
    rule = (f"lowest threshold whose wasted verification fraction (1 - accepted/verified) is <= "
            f"{max_wasted_fraction}; if none, the threshold with the smallest wasted fraction")
    return {"threshold": float(chosen["threshold"]), "rule": rule,
            "max_wasted_fraction": float(max_wasted_fraction), "met_target": bool(meeting),
            "row": dict(chosen)}
