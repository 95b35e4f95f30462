"""What one round of live Algorithm 1 costs, profiled in the layout the live loop runs (eval/live.py).

Algorithm 1 plans with SPS(B), the steps per second of the forward it schedules. In the live loop that forward is
packed: N requests' accepted contexts side by side in one KV cache, the round's B = sum_r (1 + l_r) tokens in
one row with per-request positions and a 4-D mask, then target logits and fp32 distributions at all B
positions and the cache cleanup. ``packed_step_fn`` runs exactly that (``PackedContext``, the loop's own
class) over N random contexts, and ``profile_sps`` times it: warm-up calls, then the median of repeats. A table
profiled on one plain row (eval/report.py's, made for the calibration's load simulation) has no mask, no keys
of other requests and no cleanup, and so mis-states what a longer verification costs.

Drafting: every round first drafts a full block for each active request (``draft_round``: one batched
``propose_batch`` call over the R active requests, their contexts padded to the longest and masked), then
schedules. A round therefore takes D(R) + 1 / SPS(B) seconds, where D(R), the profiled time of one drafting
call for R requests (``profile_draft_seconds``, R = 1 .. N), does not depend on the lengths chosen.
Algorithm 1 maximising tau* x SPS(B) ignores D and, where D is a good part of the round, verifies too little
(each round's drafting is paid whatever is verified, so an extra accepted token is worth more than SPS alone
says). ``eval.scheduler.with_draft_cost`` turns SPS into whole rounds per second, 1 / (1 / SPS(B) + D), and
Algorithm 1 runs unchanged on it (``scheduler_live.draft_cost``; false = the paper's objective).
"""

from __future__ import annotations

import statistics
import time

import torch

from dspark_model.draft import DraftProposal
from eval.scheduler import SpsTable, profile_sps
from eval.speculative import sync, target_distribution


def draft_round(draft, contexts, anchors, temperature: float, generators, gamma: int) -> list:
    """The round's proposals, one per request (``contexts``: their draft context caches, ``anchors``: their
    last tokens, ints): one batched ``propose_batch`` call where the draft has it, else one ``propose`` per
    request. Either way request r draws from ``generators[r]`` as it would alone."""
    device = next(draft.parameters()).device
    if hasattr(draft, "propose_batch") and len(contexts) > 1:
        both = draft.propose_batch(contexts, torch.tensor(anchors, device=device), temperature, generators, gamma)
        return [DraftProposal(both.tokens[r:r + 1], both.probs[r:r + 1],
                              None if both.confidences is None else both.confidences[r:r + 1])
                for r in range(len(contexts))]
    return [draft.propose(context, torch.tensor([anchor], device=device), temperature, generator, gamma)
            for context, anchor, generator in zip(contexts, anchors, generators)]


def live_batch_sizes(requests: int, gamma: int) -> list[int]:
    """The batch sizes profiled for ``requests`` requests: R x k for block lengths k = 1..gamma + 1 (R anchors
    only, up to full blocks), interpolated between. Evenly spaced on purpose: neighbouring sizes cost the same
    up to timing noise, and a noisy dip between close points is a cliff that stops Algorithm 1's greedy
    admission early (paper section 5.2)."""
    return [requests * k for k in range(1, gamma + 2)]


def packed_step_fn(target, requests: int, context_len: int, temperature: float = 0.0, seed: int = 0):
    """A ``step_fn(B)`` for ``profile_sps``: the live loop's verification of B tokens over a packed cache of
    ``requests`` contexts of ``context_len`` random tokens. The B tokens go to min(B, requests) requests, as
    evenly as they divide, each run at its own positions; logits and distributions of all B positions are
    computed, then the new columns are dropped (the loop's cleanup), so every call sees the same cache."""
    from eval.live_batch import PackedContext

    device, vocab = target.device, target.vocab_size
    generator = torch.Generator().manual_seed(seed)
    packed = PackedContext(device)
    ids = torch.randint(0, vocab, (requests * context_len,), generator=generator).to(device)
    owner = torch.arange(requests, device=device).repeat_interleave(context_len)
    position = torch.arange(context_len, device=device).repeat(requests)
    with torch.no_grad():
        packed.forward(target, ids, owner, position)

    def step_fn(batch_tokens: int):
        active = min(batch_tokens, requests)
        counts = torch.tensor([batch_tokens // active + (r < batch_tokens % active) for r in range(active)])
        new_owner = torch.repeat_interleave(torch.arange(active), counts).to(device)  # (B,)
        new_position = torch.cat([torch.arange(context_len, context_len + int(c)) for c in counts]).to(device)
        new_ids = torch.randint(0, vocab, (batch_tokens,), generator=generator).to(device)
        before = packed.length
        with torch.no_grad():
            out = packed.forward(target, new_ids, new_owner, new_position)
            target_distribution(target.logits(out.final_hidden[0]), temperature)  # (B, V)
            keep = torch.ones(packed.length, dtype=torch.bool, device=device)
            keep[before:] = False
            packed.keep(keep)
        sync(device)

    return step_fn


def profile_packed_sps(target, requests: int, gamma: int, context_len: int, temperature: float = 0.0,
                       warmup: int = 1, repeats: int = 5, hardware=None) -> SpsTable:
    """The SPS table of ``requests`` concurrent requests in the live loop's packed layout (median of repeats)."""
    step = packed_step_fn(target, requests, context_len, temperature)
    return profile_sps(step, live_batch_sizes(requests, gamma), warmup=warmup, repeats=repeats, hardware=hardware)


def profile_draft_seconds(draft, target, requests: int, gamma: int, context_len: int, temperature: float = 0.0,
                          warmup: int = 1, repeats: int = 5) -> list[float]:
    """D(R) for R = 1 .. ``requests``: seconds of one ``draft_round`` of R requests (contexts of
    ``context_len`` random target states; median over ``repeats`` rounds). Index R - 1 holds D(R)."""
    device = target.device
    generator = torch.Generator().manual_seed(0)
    width = len(draft.tap_layer_ids) * target.hidden_size
    contexts = []
    for _ in range(requests):
        context = draft.new_cache()
        taps = torch.randn(1, context_len, width, generator=generator).to(device=device, dtype=target.dtype)
        draft.extend_context(context, taps)
        contexts.append(context)
    anchors = torch.randint(0, target.vocab_size, (requests,), generator=generator).tolist()
    generators = [torch.Generator(device=device).manual_seed(r) for r in range(requests)]
    seconds = []
    for active in range(1, requests + 1):
        durations = []
        for i in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            draft_round(draft, contexts[:active], anchors[:active], temperature, generators[:active], gamma)
            sync(device)
            if i >= warmup:
                durations.append(time.perf_counter() - start)
        seconds.append(statistics.median(durations))
    return seconds
