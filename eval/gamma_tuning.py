"""The verification length gamma for this draft on this machine, chosen before the eval is timed.

A round of speculative decoding costs the draft's proposal of gamma tokens, D(gamma), plus one target forward
over the gamma + 1 tokens of the block, V(gamma + 1), and yields 1 + sum_{k <= gamma} s_k tokens on average,
where s_k is the probability that at least k drafted tokens are accepted. Verifying fewer tokens than the
draft was trained for loses only the tail of that sum, and on a CPU it can save a good part of the forward:
on SmolLM2 (2 threads) a forward over 3 tokens costs ~1.2 one-token steps, over 8 tokens ~1.6 prepacked and
~1.8-1.9 plain (``benchmarks/decode_cost.py``, ``round_cost_by_length``). Where the draft's first positions
carry most of its acceptance, the best length is short.

``tune_gamma`` measures both sides instead of assuming them:

* s_k from a pilot: speculative decoding at the full length on prompts drawn from the same sources as the
  eval's but disjoint from the timed ones (the seeded subsets extend, ``data_prep.sources.seeded_subset``);
* D(gamma) and V(gamma + 1) by timing, on the pilot's first prompt, the calls the decoding loop makes, the
  target's GEMM weights plain and prepacked for each row count (``dspark_model/prepack.py``), alternated;
  prepacking is kept only for the winning count, and only where it was measured faster.

It picks the gamma with the most tokens per second, 1 + sum_{k <= gamma} s_k over D(gamma) + V(gamma + 1),
and returns the whole table for the report (``settings.gamma_tuning``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def survival(records: Sequence[dict], gamma: int) -> np.ndarray:
    """(gamma,) share of rounds that accepted at least k drafted tokens, k = 1..gamma."""
    from eval.calibration import survival_labels

    accepted = np.asarray([int(r["accepted"]) for r in records])
    if accepted.size == 0:
        raise ValueError("gamma tuning: the pilot decoded no rounds; give it more prompts or longer answers")
    return survival_labels(accepted, gamma).mean(axis=0)


def expected_tokens(surv: np.ndarray, gamma: int) -> float:
    """Tokens one round yields when gamma drafted tokens are verified: 1 + s_1 + ... + s_gamma."""
    return 1.0 + float(np.sum(surv[:gamma]))


def _median_alternated(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each call, the calls alternated (ABAB, order flipped every repeat)."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            calls[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def packs_at_once(model, counts: int) -> int:
    """How many row counts to hold packs for at the same time while profiling: all of them where half the free
    memory holds that many copies of the linear weights, else fewer (at least one)."""
    import psutil

    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    if weights == 0:
        return 1
    return max(1, min(counts, int(psutil.virtual_memory().available // 2 // weights)))


@torch.no_grad()
def profile_round_costs(target, draft, prompt_ids: Sequence[int], gammas: Sequence[int], temperature: float,
                        prepack: bool, repeats: int = 9, seed: int = 0) -> dict[int, dict]:
    """{gamma: {draft_s, verify_s, verify_prepacked_s (None without packing), one_token_s}} on the context
    ``prompt_ids``: the draft's ``propose`` of gamma tokens, and the target forward over gamma + 1 tokens with
    the logits and distributions the loop computes, its cache cropped back after every call; one_token_s is
    plain decoding's one-token step, timed alongside. All calls are alternated in every repeat (machine drift
    hits every candidate alike); with ``prepack`` (CPU only) the plain and packed kernels of each count too,
    packs held for as many counts at once as memory allows and dropped after."""
    from dspark_model.prepack import PackedLinear, prepack_linears, unpack_linears
    from dspark_model.target import crop_cache
    from eval.speculative import _first_token, sync, target_distribution

    device = target.device
    ids = torch.tensor([list(prompt_ids)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache, context, anchor = _first_token(target, ids, draft, temperature, generator)
    length = ids.shape[1]
    anchor_t = torch.tensor([anchor], device=device)
    linears = [m for m in target.model.modules() if type(m) in (torch.nn.Linear, PackedLinear)]

    def verify(rows: int, packed: bool | None):
        def call():
            if packed is not None:  # the same modules with and without their packs
                for m in linears:
                    m.__class__ = PackedLinear if packed else torch.nn.Linear
            block = torch.full((1, rows), anchor, dtype=torch.long, device=device)
            out = target.forward(block, past_key_values=cache, use_cache=True)
            target_distribution(target.logits(out.final_hidden[0]), temperature)
            sync(device)
            crop_cache(cache, length)
        return call

    def propose(gamma: int):
        def call():  # a shallow copy: a draft may consume its context (EAGLE-3 commits the pending pairs)
            draft.propose(copy.copy(context), anchor_t, temperature, generator, gamma)
            sync(device)
        return call

    gammas = list(gammas)
    step = packs_at_once(target.model, len(gammas)) if prepack else len(gammas)
    costs = {}
    for i in range(0, len(gammas), step):
        group = gammas[i:i + step]
        packed = prepack and prepack_linears(target.model, [g + 1 for g in group]) > 0
        calls = {("one", "one_token_s"): verify(1, False if packed else None)}  # plain decoding's step
        for g in group:
            calls[(g, "draft_s")] = propose(g)
            calls[(g, "verify_s")] = verify(g + 1, False if packed else None)
            if packed:
                calls[(g, "verify_prepacked_s")] = verify(g + 1, True)
        try:
            seconds = _median_alternated(calls, repeats)
        finally:
            if packed:
                unpack_linears(target.model)
        for g in group:
            costs[g] = {"draft_s": seconds[g, "draft_s"], "verify_s": seconds[g, "verify_s"],
                        "verify_prepacked_s": seconds.get((g, "verify_prepacked_s")),
                        "one_token_s": seconds["one", "one_token_s"]}
    return costs


def prepack_pays(cost: dict) -> bool:
    """Whether one length's profiled forward (``profile_round_costs``) was faster with prepacked weights."""
    return cost["verify_prepacked_s"] is not None and cost["verify_prepacked_s"] < cost["verify_s"]


def choose_gamma(surv: np.ndarray, costs: dict[int, dict]) -> tuple[int, bool, dict]:
    """(gamma, prepack, table): the candidate with the most expected tokens per second; ``prepack`` when that
    gamma's prepacked forward was the faster. The table has each candidate's figures."""
    table = {}
    for gamma, c in sorted(costs.items()):
        packed = prepack_pays(c)
        round_s = c["draft_s"] + (c["verify_prepacked_s"] if packed else c["verify_s"])
        tokens = expected_tokens(surv, gamma)
        table[gamma] = {**c, "prepack": packed, "expected_tokens_per_round": tokens, "round_s": round_s,
                        "expected_tokens_per_s": tokens / round_s}
        if c.get("one_token_s"):  # against one token per one-token step (plain decoding, its loop's overheads aside)
            table[gamma]["expected_speedup_vs_one_token_steps"] = tokens * c["one_token_s"] / round_s
    best = max(table, key=lambda g: (table[g]["expected_tokens_per_s"], -g))
    return best, table[best]["prepack"], table


def pilot_prompts(load, timed: Sequence, per_source: int, num_prompts: int | None) -> list:
    """Prompts of the same sources as ``timed`` and none of them: ``load(n)`` returns the seeded subset of n
    prompts per source, which extends the timed subset (n = num_prompts)."""
    from eval.schema import EvalConfigError

    if num_prompts is None:
        raise EvalConfigError("gamma_tuning needs prompts outside the timed set, but num_prompts=null times "
                              "every prompt of each source: set num_prompts=<n>")

    def key(p):
        return str(p.source), str(getattr(p, "row_id", "")), tuple(p.turns)

    seen = {key(p) for p in timed}
    extra = [p for p in load(num_prompts + per_source) if key(p) not in seen]
    if not extra:
        raise EvalConfigError(f"gamma_tuning: the prompt sources hold no prompt beyond the {num_prompts} timed "
                              f"per source; lower num_prompts or set gamma=<n> yourself")
    return extra


def tune_gamma(target, draft, prompts: Sequence, settings, max_gamma: int, prepack: bool,
               repeats: int = 15) -> dict:
    """Pilot (untimed) at ``max_gamma`` on ``prompts``, cost profile, choice. Returns the record that goes into
    the report: chosen gamma and prepacking, pilot size, survival s_k and the candidates' table."""
    from eval.baselines import compare_on_prompts
    from eval.speculative import first_turn_ids

    if not prompts:
        raise ValueError("gamma tuning: no pilot prompts")
    pilot = dataclasses.replace(settings, gamma=max_gamma, run_generate=False, run_prompt_lookup=False,
                                warmup=False, progress_label="gamma-tuning pilot (untimed)")
    log.info("gamma tuning: pilot at gamma=%d on %d prompts (untimed)", max_gamma, len(prompts))
    records, _, outputs = compare_on_prompts(target, draft, prompts, pilot)
    surv = survival(records, max_gamma)
    # the first pilot prompt and its answer: a context as long as a late round's
    answer = outputs[0]["turns"][0]["spec_tokens"][:-1]
    context = first_turn_ids(target.tokenizer, prompts[0], settings.chat_template_kwargs) + answer
    costs = profile_round_costs(target, draft, context, range(1, max_gamma + 1), settings.temperature, prepack,
                                repeats=repeats, seed=settings.seed)
    gamma, packed, table = choose_gamma(surv, costs)
    log.info("gamma tuning: gamma=%d (%s), %.2f expected tokens per round, %s", gamma,
             "prepacked" if packed else "plain kernels", table[gamma]["expected_tokens_per_round"],
             {g: round(t["expected_tokens_per_s"], 1) for g, t in table.items()})
    return {"gamma": gamma, "prepack": packed, "enabled": True, "max_gamma": max_gamma, "pilot_prompts": len(prompts),
            "pilot_rounds": len(records), "survival": [float(s) for s in surv], "context_tokens": len(context),
            "profile_repeats": repeats, "candidates": {str(g): t for g, t in table.items()}}


def calibration_config_for(calibration, chosen: int, block: int):
    """The calibration settings for an eval timed at ``chosen`` tokens per round: a calibration fitted below the
    draft's block size ``block`` stays in the eval's output and never replaces the checkpoint's, since servers
    verify up to the block size."""
    if chosen < block and calibration.enabled and calibration.write_to_checkpoint:
        log.info("gamma_tuning chose gamma=%d < %d: its calibration stays in the eval's output folder, not written "
                 "to the checkpoint (servers verify up to the block size)", chosen, block)
        return dataclasses.replace(calibration, write_to_checkpoint=False)
    return calibration
