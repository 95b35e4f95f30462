"""Algorithm 1, live: N concurrent requests decoded together by lossless speculative decoding.

``eval/simulate.py`` judges the verification scheduler by replaying recorded rounds; this module runs it. Each
round every active request drafts a block, a policy picks its verification length l_r (Algorithm 1 on the
request's calibrated prefix survival and the profiled SPS table, or a fixed length L), and the target
verifies all requests in ONE forward. Each request's block is then judged by ``verify_block``, the
single-request lossless rule, so every request's output is exactly what it would be alone (greedy: token
for token; T > 0: in distribution). Requests that finish (EOS or their ``max_new_tokens``) leave the batch.

Layout of the verification forward: packed, one row. The round's blocks ``[anchor_r, d_r1 .. d_rl]`` are
concatenated into one row of B = sum_r (1 + l_r) tokens, each at its own request's position (``position_ids``),
on top of one KV cache that holds every active request's accepted context side by side. Every cache column
records its request and position; a 4-D additive mask lets a query see only columns of its own request at
positions <= its own (causal within the new block too). Why not a (N, max_r(1 + l_r)) padded batch: it costs
N * max_r(1 + l_r) tokens whatever the lengths, so the ragged lengths Algorithm 1 picks would be charged as
if every request verified its longest block, while its cost model SPS(B), B = sum_r(1 + l_r), is that of a
packed (varlen) forward, which is what serving engines run. The price of packing with a dense mask: attention
scores span every request's keys (masked out), and each round's cache cleanup copies the cache once (the
same order of cost as ``DynamicCache`` appending). Cleanup: after verification the rejected columns of the
round and every column of a finished request are dropped, so the cache holds exactly the accepted context of
the active requests (the packed form of ``crop_cache``). A plain ``DynamicCache`` is used: a sliding-window
layer would trim across requests, so targets with sliding-window attention are refused when a request could
outgrow the window (below it, full attention is the same computation).

The draft keeps one context cache per request (each grows by the request's accepted tokens) and drafts for
all active requests in one call (``live_cost.draft_round``, ``DSparkDraft.propose_batch``): the contexts are
right-padded to the longest and the padding masked, each block at its own request's positions. The draft
always proposes its full block (gamma tokens), which Algorithm 1 needs to see all confidences; a fixed
length L verifies the first L.

What Algorithm 1 plans with (eval/live_cost.py): for each N, an SPS table profiled in this very layout (N
packed contexts, the 4-D mask, logits at all B positions, the cleanup; warm-up, median of repeats) and, with
``draft_cost`` (default), the profiled drafting time of a round of R active requests, D(R), folded into the
objective: Theta = tau* / (D(R) + 1 / SPS(B)), i.e. tau* x ``with_draft_cost(SPS, D(R))``. The paper's
Algorithm 1 maximises tau* x SPS(B) (an engine whose drafting overlaps verification, or is negligible);
here drafting is serial and on a CPU a good part of each round, so it is part of the round's cost.
Lines 4-15 of the algorithm (sort, greedy admission, early stop) are unchanged.

Sampling is fp32 with one ``torch.Generator`` per request, used in the same order as ``speculative_generate``
(first token, then per round: propose, verify), so with a fixed length gamma a request draws exactly what it
would draw alone. Algorithm 1 stays lossless batched: whether x_{r,j} is verified depends on survivals ranked
above it (other requests' and r's positions 1..j), never on x_{r,j} itself (``schedule_algorithm1``).

``measure_scheduler_live`` times Algorithm 1 against every fixed length 1..gamma for N = 1, 2, 4, 8, 16
concurrent requests (the eval option ``scheduler_live.enabled=true``, ``run_live_stage``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from eval.calibration import apply_sts, prefix_survival
from eval.live_batch import BatchOutput, BatchRun, Policy, batched_speculative_generate
from eval.live_cost import profile_draft_seconds, profile_packed_sps
from eval.scheduler import SpsLike, SpsTable, describe_hardware, schedule_algorithm1, with_draft_cost

log = logging.getLogger(__name__)

DEFAULT_REQUESTS = (1, 2, 4, 8, 16)
PLOT_NAME = "scheduler_live.png"


# ----------------------------------------------------------------------------------------------------
# Verification-length policies
# ----------------------------------------------------------------------------------------------------

def fixed_policy(length: int) -> Policy:
    """Every request verifies min(length, gamma) draft tokens (0 = plain decoding)."""
    if length < 0:
        raise ValueError(f"fixed verification length must be >= 0, got {length}")

    def choose(confidences, gamma: int) -> np.ndarray:
        rows = 1 if confidences is None else confidences.shape[0]
        return np.full(rows, min(length, gamma), dtype=np.int64)

    choose.fixed_length = length
    return choose


def algorithm1_policy(temperatures: Sequence[float], sps: SpsLike,
                      draft_seconds: Sequence[float] = ()) -> Policy:
    """Algorithm 1 on the STS-calibrated prefix survival of each request's confidences. ``draft_seconds``:
    D(R) at index R - 1, the drafting time of a round of R requests; a round is costed D(R) + 1 / SPS(B)
    (module docstring; empty = the paper's tau* x SPS(B))."""
    temps = np.asarray(temperatures, dtype=np.float64)
    rounds = list(draft_seconds)

    def choose(confidences, gamma: int) -> np.ndarray:
        if confidences is None:
            raise ValueError("Algorithm 1 needs the draft's confidence head (this draft has none)")
        if gamma > temps.size:
            raise ValueError(f"the calibration has {temps.size} temperatures, fewer than gamma={gamma}")
        survival = prefix_survival(apply_sts(confidences, temps[:gamma]))  # (R, gamma)
        R = survival.shape[0]
        drafting = (rounds[R - 1] if R <= len(rounds) else rounds[-1] * R / len(rounds)) if rounds else 0.0
        return schedule_algorithm1(survival, with_draft_cost(sps, drafting))

    return choose


# ----------------------------------------------------------------------------------------------------
# Measurement: Algorithm 1 vs every fixed length, N concurrent requests
# ----------------------------------------------------------------------------------------------------

def _policies(temperatures, sps, gamma: int, draft_seconds: Sequence[float] = ()) -> dict[str, Policy]:
    return {"algorithm1": algorithm1_policy(temperatures, sps, draft_seconds),
            **{f"fixed_{length}": fixed_policy(length) for length in range(1, gamma + 1)}}


def _run_stats(out: BatchOutput) -> dict:
    request_rounds = sum(len(v) for v in out.verified)
    return {"tokens": out.decode_tokens, "decode_s": out.decode_s, "draft_s": out.draft_s,
            "prefill_s": out.prefill_s, "rounds": out.rounds, "requests_decoded": len(out.outputs),
            "full_batch_tokens": out.full_batch_tokens, "full_batch_s": out.full_batch_s,
            "full_batch_rounds": out.full_batch_rounds,
            "mean_verified": sum(map(sum, out.verified)) / request_rounds if request_rounds else None,
            "tokens_per_request_round": out.decode_tokens / request_rounds if request_rounds else None,
            "mean_batch_tokens": statistics.fmean(out.batch_tokens) if out.batch_tokens else None}


def round_costs(target, draft, batch: Sequence[Sequence[int]], gamma: int, max_new_tokens: int,
                temperature: float, sps: SpsLike | None, draft_cost: bool, warmup: int = 1,
                repeats: int = 5) -> tuple[SpsLike, list[float]]:
    """(SPS, D(R) for R = 1 .. len(batch)) Algorithm 1 plans with for the requests ``batch``: ``sps``, else a
    table profiled in the packed layout (eval/live_cost.py) over len(batch) contexts of the batch's mean prompt
    length + max_new_tokens / 2 (mid-generation); the drafting times are profiled likewise (empty without
    ``draft_cost``)."""
    context_len = max(1, round(statistics.fmean(len(p) for p in batch) + max_new_tokens / 2))
    n = len(batch)
    if sps is None:
        sps = profile_packed_sps(target, n, gamma, context_len, temperature, warmup, repeats, describe_hardware())
    seconds = (profile_draft_seconds(draft, target, n, gamma, context_len, temperature, warmup, repeats)
               if draft_cost else [])
    return sps, seconds


def measure_scheduler_live(target, draft, prompts: Sequence[Sequence[int]], temperatures: Sequence[float],
                           sps: SpsLike | None = None, requests: Sequence[int] = DEFAULT_REQUESTS,
                           gamma: int | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                           seed: int = 0, eos_token_ids: Sequence[int] = (), repeats: int = 1,
                           reference: Callable[[list[int]], list[int]] | None = None,
                           warmup: bool = True, draft_cost: bool = True, profile_warmup: int = 1,
                           profile_repeats: int = 5, requests_per_slot: int = 1, min_requests: int = 0) -> dict:
    """Tokens/s of Algorithm 1 and of every fixed length 1..gamma with N concurrent requests, N in ``requests``.

    max(N x ``requests_per_slot``, ``min_requests``) requests are decoded, at most N at a time: a waiting
    request takes the place of a finished one (``BatchRun``), so with more than one per slot the batch stays
    full as on a server, instead of draining while its last, slowest request finishes. Request i decodes
    ``prompts[i % len(prompts)]`` with its own generator (seeded from ``seed`` and i, the same for every
    policy). Tokens/s = tokens emitted by the rounds / wall time of the rounds (the prefills, the same for
    every policy, are excluded and reported apart), median over ``repeats`` runs; in each repeat the
    policies' rounds are interleaved (``_lockstep``; see ``_row`` for the held-out best). At T = 0,
    ``reference(prompt ids)`` (plain greedy decoding) gives the tokens every request must match.
    Algorithm 1's costs for each N come from ``round_costs``: ``sps`` None = profiled in the packed layout
    (``profile_warmup`` / ``profile_repeats``), ``draft_cost`` = the profiled drafting time in the objective.
    Returns the ``scheduler_live`` record: requests, algorithm1_tokens_per_s, best_fixed_tokens_per_s,
    best_fixed_length, algorithm1_vs_best_fixed, best_fixed_heldout_tokens_per_s and
    algorithm1_vs_best_fixed_heldout (None below two repeats), spread, fixed_tokens_per_s {L: [...]},
    the same lists under ``full_batch`` for the rounds run with all N slots busy (``_row``), per-policy
    details, settings.
    """
    gamma = gamma or draft.block_size
    prompts = [list(p) for p in prompts]
    if not prompts or repeats < 1 or not requests or min(requests) < 1 or requests_per_slot < 1:
        raise ValueError("measure_scheduler_live needs prompts, repeats >= 1, request counts >= 1 and "
                         "requests_per_slot >= 1")
    eos = list(eos_token_ids)
    if warmup:
        batched_speculative_generate(target, draft, prompts[:2], min(8, max_new_tokens), fixed_policy(gamma),
                                     temperature, gamma, None, eos)
    expected: dict[tuple, list[int]] = {}
    checked = matched = 0
    rows, costs = [], {}
    for n_requests in requests:
        batch = [prompts[i % len(prompts)] for i in range(max(n_requests * requests_per_slot, min_requests))]
        table, seconds = round_costs(target, draft, batch[:n_requests], gamma, max_new_tokens, temperature, sps,
                                     draft_cost, profile_warmup, profile_repeats)
        costs[str(n_requests)] = {"sps": table.to_dict() if isinstance(table, SpsTable) else None,
                                  "draft_seconds_per_round": seconds}
        policies = _policies(temperatures, table, gamma, seconds)
        runs: dict[str, list[dict]] = {name: [] for name in policies}
        for r in range(repeats):
            outputs = _lockstep(target, draft, batch, max_new_tokens, policies, temperature, gamma, seed, eos, r,
                                n_requests)
            for name, out in outputs.items():
                runs[name].append(_run_stats(out))
                if reference is not None and temperature <= 0:
                    for prompt, output in zip(batch, out.outputs):
                        key = tuple(prompt)
                        if key not in expected:
                            expected[key] = list(reference(prompt))
                        checked += 1
                        matched += output.tokens == expected[key]
        rows.append(_row(n_requests, runs))
        row, full = rows[-1], rows[-1]["full_batch"]
        log.info("scheduler_live N=%d: algorithm1 %.1f tok/s, best fixed L=%d %.1f tok/s; all slots busy: "
                 "%.1f vs L=%d %.1f", n_requests, row["tokens_per_s"]["algorithm1"], row["best_fixed_length"],
                 row["best_fixed_tokens_per_s"], full["tokens_per_s"]["algorithm1"], full["best_fixed_length"],
                 full["best_fixed_tokens_per_s"])
    summary = _summary(rows, gamma, max_new_tokens, temperature, repeats, len(prompts), temperatures, costs,
                       draft_cost, matched / checked if checked else None)
    summary["settings"].update(requests_per_slot=requests_per_slot, min_requests=min_requests)
    return summary


def _lockstep(target, draft, batch, max_new_tokens, policies: Mapping[str, Policy], temperature: float,
              gamma: int, seed: int, eos, repeat: int, concurrency: int | None = None) -> dict[str, BatchOutput]:
    """One timed run of every policy on ``batch``, the policies' rounds interleaved: each prefill, then round
    after round one step of every unfinished run, the order rotated each round. A policy's time is the sum of
    its own prefill and rounds, so a drift in machine speed, even within a run, hits every policy alike."""
    names = list(policies) if repeat % 2 == 0 else list(policies)[::-1]
    runs = {}
    for name in names:
        generators = [torch.Generator(device=target.device).manual_seed(seed * 1_000_003 + i)
                      for i in range(len(batch))]
        runs[name] = BatchRun(target, draft, batch, max_new_tokens, policies[name], temperature, gamma, generators,
                              eos, concurrency)
    turn = 0
    while True:
        live = [n for n in names if not runs[n].done]
        if not live:
            break
        shift = turn % len(live)
        for name in live[shift:] + live[:shift]:
            runs[name].step()
        turn += 1
    return {name: runs[name].output for name in policies}


def _best_fixed(tps: Mapping[str, float]) -> int:
    """The fixed length with the highest tokens/s (the shorter one on a tie)."""
    fixed = {int(name.split("_")[1]): v for name, v in tps.items() if name.startswith("fixed_")}
    return max(fixed, key=lambda length: (fixed[length], -length))


def _median_tps(each: Mapping[str, list[float]], which=slice(None)) -> dict[str, float]:
    """policy -> median tokens/s over the repeats ``which`` selects, from each repeat's tokens/s."""
    return {name: statistics.median(v[which]) for name, v in each.items()}


def _compare(each: Mapping[str, list[float]]) -> dict:
    """Median tokens/s of each policy (``each``: policy -> tokens/s of every repeat), the best fixed length, and
    with two repeats or more the best fixed length picked on held-out repeats and each policy's spread.

    The best of several noisy fixed-length measurements is biased upwards (the largest of seven draws), so
    with two repeats or more the best fixed length is also chosen on the even repeats and measured on the odd
    ones and the other way round (``best_fixed_heldout_tokens_per_s``, the mean of the two): an unbiased
    figure for "the best fixed length, picked in advance". ``spread``: each policy's (max - min) / median
    tokens/s over the repeats."""
    tps = _median_tps(each)
    best = _best_fixed(tps)
    out = {"tokens_per_s": tps, "best_fixed_length": best, "best_fixed_tokens_per_s": tps[f"fixed_{best}"],
           "best_fixed_heldout_tokens_per_s": None, "spread": None}
    if min(len(v) for v in each.values()) >= 2:
        even, odd = _median_tps(each, slice(0, None, 2)), _median_tps(each, slice(1, None, 2))
        out["best_fixed_heldout_tokens_per_s"] = (odd[f"fixed_{_best_fixed(even)}"]
                                                  + even[f"fixed_{_best_fixed(odd)}"]) / 2
        out["spread"] = {name: (max(v) - min(v)) / tps[name] if tps[name] else None for name, v in each.items()}
    return out


def _rates(runs: Mapping[str, list[dict]], tokens: str, seconds: str) -> dict[str, list[float]]:
    return {name: [r[tokens] / max(r[seconds], 1e-9) for r in rs] for name, rs in runs.items()}


def _row(n_requests: int, runs: Mapping[str, list[dict]]) -> dict:
    """One request count: ``_compare`` on the whole runs (every round: tokens / decode_s), per-policy
    details, and under ``full_batch`` ``_compare`` on the rounds run with all N slots busy (the steady state of
    a server at N requests; the drain at the end of a finite run, where fewer requests remain, is left out)."""
    details = {name: {key: statistics.median(r[key] for r in rs) if rs[0][key] is not None else None
                      for key in rs[0]} for name, rs in runs.items()}
    return {"requests": n_requests, **_compare(_rates(runs, "tokens", "decode_s")), "details": details,
            "full_batch": _compare(_rates(runs, "full_batch_tokens", "full_batch_s"))}


def _comparison(rows: Sequence[Mapping], gamma: int) -> dict:
    """The per-N lists of one comparison (``_compare`` records, one per request count)."""
    algorithm1 = [row["tokens_per_s"]["algorithm1"] for row in rows]
    best = [row["best_fixed_tokens_per_s"] for row in rows]
    heldout = [row["best_fixed_heldout_tokens_per_s"] for row in rows]
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    return {
        "algorithm1_tokens_per_s": algorithm1,
        "best_fixed_tokens_per_s": best,
        "best_fixed_length": [row["best_fixed_length"] for row in rows],
        "algorithm1_vs_best_fixed": [ratio(a, b) for a, b in zip(algorithm1, best)],
        "best_fixed_heldout_tokens_per_s": heldout,
        "algorithm1_vs_best_fixed_heldout": [ratio(a, b) for a, b in zip(algorithm1, heldout)],
        "spread": [row.get("spread") for row in rows],
        "fixed_tokens_per_s": {str(length): [row["tokens_per_s"][f"fixed_{length}"] for row in rows]
                               for length in range(1, gamma + 1)},
    }


def _summary(rows, gamma, max_new_tokens, temperature, repeats, n_prompts, temperatures, costs, draft_cost,
             match) -> dict:
    return {
        "requests": [row["requests"] for row in rows],
        **_comparison(rows, gamma),
        "full_batch": _comparison([row["full_batch"] for row in rows], gamma),
        "details": [{"requests": row["requests"], **row["details"]} for row in rows],
        "greedy_match_rate": match,
        "settings": {"gamma": gamma, "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "repeats": repeats, "distinct_prompts": n_prompts, "layout": "packed (one row, 4-D mask)",
                     "draft": "one propose_batch() over the active requests",
                     "timed": "rounds only (prefill excluded); full_batch: the rounds with all N slots busy",
                     "sts_temperatures": [float(t) for t in temperatures],
                     "objective": ("tau* / (D(R) + 1 / SPS(B)), D(R) = draft_seconds_per_round[R - 1]"
                                   if draft_cost else "tau* x SPS(B) (paper)"),
                     "round_costs": costs},
    }


def plot_live(live: Mapping, path: str) -> str:
    """Measured tokens/s vs requests beside the simulated figure: ``plot_simulation`` on the live rows."""
    from eval.simulate import plot_simulation

    table = [{"concurrency": n, "best_fixed_throughput": best,
              "throughput": {"algorithm1": a1, **{f"fixed_{k}": v[i] for k, v in live["fixed_tokens_per_s"].items()}}}
             for i, (n, a1, best) in enumerate(zip(live["requests"], live["algorithm1_tokens_per_s"],
                                                    live["best_fixed_tokens_per_s"]))]
    return plot_simulation(table, path, kind="measured, live")


# ----------------------------------------------------------------------------------------------------
# The eval stage (``scheduler_live.enabled=true``)
# ----------------------------------------------------------------------------------------------------

def interleave_by_source(prompts: Sequence, limit: int) -> list:
    """Up to ``limit`` prompts taken round-robin over their datasets, so a small N mixes the datasets."""
    groups: dict[str, list] = {}
    for prompt in prompts:
        groups.setdefault(str(prompt.source), []).append(prompt)
    picked = []
    while len(picked) < limit and any(groups.values()):
        for items in groups.values():
            if items and len(picked) < limit:
                picked.append(items.pop(0))
    return picked


def live_problem(draft, calibration_enabled: bool) -> str | None:
    """Why the live stage cannot run with this draft (checked before the eval), or None."""
    if draft.confidence_head is None:
        return "the draft has no confidence head, so Algorithm 1 has no confidences to schedule on"
    if not calibration_enabled and getattr(draft, "calibration", None) is None:
        return ("Algorithm 1 needs STS temperatures: keep calibration.enabled=true or evaluate a checkpoint with "
                "a calibration.json beside its weights")
    return None


def live_temperatures(draft, calibration_dir: str | None) -> list[float] | None:
    """STS temperatures for Algorithm 1: this eval's calibration, else the one beside the checkpoint. (Its SPS
    table, profiled on one plain row, is not used: the live stage profiles the packed layout it runs.)"""
    from pathlib import Path

    from dspark_model.calibration import CALIBRATION_NAME, Calibration

    record = None
    if calibration_dir and (Path(calibration_dir) / CALIBRATION_NAME).is_file():
        record = Calibration.read(Path(calibration_dir) / CALIBRATION_NAME)
    record = record or getattr(draft, "calibration", None)
    return None if record is None else list(record.temperatures)


def run_live_stage(target, draft, prompts: Sequence, live_cfg, settings, out_dir: str,
                   calibration_dir: str | None) -> dict:
    """Measure Algorithm 1 live on the eval's prompts (first user turn of each); writes ``scheduler_live.png``.

    Returns the ``scheduler_live`` report record, or {"error": why} when it cannot run (no confidence head,
    no calibration), so the rest of the eval is kept.
    """
    import os

    from eval.baselines import hf_generate
    from eval.speculative import first_turn_ids

    problem = live_problem(draft, calibration_enabled=True)
    temperatures = None if problem else live_temperatures(draft, calibration_dir)
    if temperatures is None:
        problem = problem or "no calibration (STS temperatures): this eval's calibration was skipped"
        log.warning("scheduler_live skipped: %s", problem)
        return {"error": problem}
    n_prompts = live_cfg.num_prompts or max(live_cfg.requests)
    chosen = interleave_by_source(prompts, n_prompts)
    prompt_ids = [first_turn_ids(target.tokenizer, p, settings.chat_template_kwargs) for p in chosen]
    max_new = live_cfg.max_new_tokens or settings.max_new_tokens

    def reference(ids):
        return hf_generate(target, ids, max_new, 0.0, settings.eos_token_ids)

    live = measure_scheduler_live(target, draft, prompt_ids, temperatures, None, live_cfg.requests,
                                  settings.gamma, max_new, settings.temperature, settings.seed,
                                  settings.eos_token_ids, live_cfg.repeats,
                                  reference if live_cfg.check_greedy else None, settings.warmup,
                                  live_cfg.draft_cost, live_cfg.profile_warmup, live_cfg.profile_repeats,
                                  live_cfg.requests_per_slot, live_cfg.min_requests)
    os.makedirs(out_dir, exist_ok=True)
    live["figure"] = os.path.basename(plot_live(live, os.path.join(out_dir, PLOT_NAME)))
    return live
