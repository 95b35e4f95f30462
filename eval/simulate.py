"""Load simulation: replay recorded speculative-decoding rounds under R concurrent requests.

At every simulated step each of R slots holds one recorded round: its calibrated prefix survival
(STS-calibrated confidences, cumulative product) and its true accepted count. A policy chooses verification
lengths l_r; request r then emits min(accepted_r, l_r) + 1 tokens (accepted drafts plus the bonus or
correction token), the target forward covers B = sum_r (1 + l_r) batch tokens and takes 1 / SPS(B) seconds.
Simulated throughput = total tokens / total time, in tokens per second of the profiled hardware.

Policies compared: Algorithm 1 (``schedule_algorithm1``), every fixed verification length L = 0..gamma
(L = 0 is plain decoding), one static survival threshold, and optionally the asynchronous scheduler of
section 5.2 (capacity from the survival of the round the same slot held two steps earlier).

Rounds are replayed in a seeded permutation, slot s at step t taking entry (t * R + s) mod N, so every R
cycles through the same rounds deterministically. This assumes a round's acceptance does not depend on the
verification length chosen, which holds for lossless verification of a fixed draft block.

Also here: ``synthetic_round_records`` for tests and demos, and ``plot_simulation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from eval.calibration import apply_sts, prefix_survival, records_to_arrays, temper, verified_lengths
from eval.scheduler import SpsLike, schedule_algorithm1, schedule_practical, sps_values

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
STALE_STEPS = 2  # the section 5.2 scheduler sizes capacity from survival this many steps old
MAX_STEPS = 4096


def _choose_lengths(surv: np.ndarray, stale: np.ndarray, sps: SpsLike, threshold: float | None,
                    include_practical: bool) -> dict[str, np.ndarray]:
    """Verification lengths (R,) of every policy for one step; surv and stale are (R, gamma)."""
    n_requests, gamma = surv.shape
    lengths = {"algorithm1": schedule_algorithm1(surv, sps)}
    if include_practical:
        lengths["practical"] = schedule_practical(surv, stale, sps)
    if threshold is not None:
        lengths["threshold"] = verified_lengths(surv, threshold)
    for fixed in range(gamma + 1):
        lengths[f"fixed_{fixed}"] = np.full(n_requests, fixed, dtype=np.int64)
    return lengths


def _simulate_one(survival: np.ndarray, accepted: np.ndarray, sps: SpsLike, n_requests: int,
                  n_steps: int, order: np.ndarray, threshold: float | None,
                  include_practical: bool) -> dict:
    """Replay ``n_steps`` steps with ``n_requests`` slots; one table row."""
    n_rounds, gamma = survival.shape
    max_batch = n_requests * (gamma + 1)
    step_time = 1.0 / sps_values(sps, np.arange(max_batch + 1).clip(min=1))  # seconds, indexed by B
    slots = np.arange(n_requests)
    tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    batch_sum: dict[str, float] = {}
    for step in range(n_steps):
        now = order[(step * n_requests + slots) % n_rounds]  # (R,)
        stale = order[((step - STALE_STEPS) * n_requests + slots) % n_rounds]  # (R,)
        lengths = _choose_lengths(survival[now], survival[stale], sps, threshold, include_practical)
        for name, chosen in lengths.items():
            batch = int(np.sum(1 + chosen))
            tokens[name] = tokens.get(name, 0.0) + float(np.minimum(accepted[now], chosen).sum() + n_requests)
            seconds[name] = seconds.get(name, 0.0) + float(step_time[batch])
            batch_sum[name] = batch_sum.get(name, 0.0) + batch
    throughput = {name: tokens[name] / seconds[name] for name in tokens}
    fixed = [throughput[f"fixed_{length}"] for length in range(gamma + 1)]
    best_length = int(np.argmax(fixed))
    return {"concurrency": n_requests, "n_steps": n_steps, "throughput": throughput,
            "mean_batch_tokens": {name: batch_sum[name] / n_steps for name in batch_sum},
            "tokens_per_request_step": {name: tokens[name] / (n_steps * n_requests) for name in tokens},
            "best_fixed_length": best_length, "best_fixed_throughput": fixed[best_length],
            "algorithm1_vs_best_fixed": throughput["algorithm1"] / fixed[best_length]}


def simulate_load(survival: np.ndarray, accepted: np.ndarray, sps: SpsLike,
                  concurrency: Sequence[int] = DEFAULT_CONCURRENCY, n_steps: int | None = None,
                  threshold: float | None = None, include_practical: bool = True, seed: int = 0) -> dict:
    """Simulated throughput of every policy for each concurrency R.

    survival: calibrated prefix survival (N, gamma); accepted: true accepted counts (N,).
    ``n_steps`` defaults to enough steps to visit every round once (at least 64, at most 4096).
    Returns {"table": [one row per R], "scheduler_vs_best_fixed": min over R of
    algorithm1 / best fixed length, ...}.
    """
    survival = np.asarray(survival, dtype=np.float64)
    accepted = np.asarray(accepted, dtype=np.int64)
    if survival.ndim != 2 or survival.shape[0] == 0 or survival.shape[0] != accepted.shape[0]:
        raise ValueError(f"simulate_load: need survival (N, gamma) and accepted (N,) with N > 0, got "
                         f"{survival.shape} and {accepted.shape}")
    order = np.random.default_rng(seed).permutation(survival.shape[0])
    table = []
    for n_requests in concurrency:
        steps = n_steps or min(MAX_STEPS, max(64, math.ceil(survival.shape[0] / n_requests)))
        table.append(_simulate_one(survival, accepted, sps, int(n_requests), steps, order, threshold,
                                   include_practical))
    ratios = [row["algorithm1_vs_best_fixed"] for row in table]
    return {"table": table, "scheduler_vs_best_fixed": float(min(ratios)) if ratios else float("nan"),
            "concurrency": [int(r) for r in concurrency], "threshold": threshold, "seed": seed,
            "stale_steps_practical": STALE_STEPS}


def simulate_records(records: Sequence[Mapping], temperatures: Sequence[float], sps: SpsLike,
                     **kwargs) -> dict:
    """``simulate_load`` on round records: calibrate with ``apply_sts``, then take the prefix survival."""
    conf, accepted = records_to_arrays(records)
    return simulate_load(prefix_survival(apply_sts(conf, temperatures)), accepted, sps, **kwargs)


def plot_simulation(table: Sequence[Mapping], path: str, kind: str = "simulated") -> str:
    """Throughput vs concurrency (left) and throughput relative to the best fixed length (right), PNG.

    ``kind`` names where the numbers come from in the axis label (``eval/live.py`` plots measured ones).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [row["concurrency"] for row in table]
    names = [n for n in ("algorithm1", "practical", "threshold") if n in table[0]["throughput"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fixed_names = sorted((n for n in table[0]["throughput"] if n.startswith("fixed_")),
                         key=lambda n: int(n.split("_")[1]))
    for name in fixed_names:
        left.plot(conc, [row["throughput"][name] for row in table], color="0.75", lw=0.8)
    left.plot(conc, [row["best_fixed_throughput"] for row in table], "k--", label="best fixed length")
    for name in names:
        left.plot(conc, [row["throughput"][name] for row in table], marker="o", label=name)
        right.plot(conc, [row["throughput"][name] / row["best_fixed_throughput"] for row in table],
                   marker="o", label=name)
    right.axhline(1.0, color="k", ls="--", lw=0.8)
    lengths = [name.split("_")[1] for name in fixed_names]
    left.set(xscale="log", yscale="log", xlabel="concurrent requests R", ylabel=f"tokens / s ({kind})",
             title=f"throughput (grey: fixed lengths {lengths[0]}..{lengths[-1]})" if lengths else "throughput")
    right.set(xscale="log", xlabel="concurrent requests R", ylabel="throughput / best fixed length",
              title="relative to best fixed length")
    for axis in (left, right):
        axis.set_xticks(conc, [str(c) for c in conc])
        axis.tick_params(axis="x", which="minor", labelbottom=False)  # only the R ticks are labelled
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def synthetic_round_records(n_prompts: int = 40, rounds_per_prompt: int = 20, gamma: int = 8,
                            distortion_temperature: float = 3.0, datasets: Sequence[str] = ("chat", "code"),
                            seed: int = 0) -> list[dict]:
    """Round records with known ground truth, for tests and demos.

    Each round draws true conditional acceptance probabilities q_1..q_gamma (per-prompt level, per-round
    noise, decay along the block), samples acceptance left to right, and reports confidences
    sigmoid(logit(q) * distortion_temperature): over-confident for a temperature above 1, so STS should
    recover temperatures near ``distortion_temperature``.
    """
    rng = np.random.default_rng(seed)
    records = []
    positions = np.arange(gamma)
    for prompt in range(n_prompts):
        dataset = datasets[prompt % len(datasets)]
        level = rng.normal(1.5 if dataset == "code" else 0.5, 0.7)
        for rnd in range(rounds_per_prompt):
            logits = level + rng.normal(0.0, 1.0, gamma) - 0.15 * positions  # (gamma,)
            truth = 1.0 / (1.0 + np.exp(-logits))  # true conditional acceptance, (gamma,)
            survived = np.cumprod(rng.random(gamma) < truth).astype(bool)  # (gamma,)
            accepted = int(survived.sum())
            conf = temper(truth, 1.0 / distortion_temperature)
            records.append({"dataset": dataset, "prompt_id": prompt, "round": rnd, "gamma": gamma,
                            "proposed": rng.integers(0, 1000, gamma).tolist(), "accepted": accepted,
                            "confidences": conf.tolist(), "accepted_mask": survived.tolist()})
    return records
