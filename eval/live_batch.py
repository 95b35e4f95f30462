"""Batched lossless speculative decoding of N requests, one packed target forward per round (eval/live.py).

Layout of the verification forward: packed, one row. The round's blocks ``[anchor_r, d_r1 .. d_rl]`` are
concatenated into one row of B = sum_r (1 + l_r) tokens, each at its own request's position (``position_ids``),
on top of one KV cache that holds every active request's accepted context side by side (``PackedContext``).
``BatchRun`` advances one batched generation a round at a time (prefill at construction, ``step()`` per round)
so that the live measurement can interleave the runs of several policies; ``batched_speculative_generate``
runs one to the end. Why this layout, and what Algorithm 1 plans with: eval/live.py's docstring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from eval.live_cost import draft_round
from eval.speculative import SpecOutput, sample_token, sync, target_distribution, verify_block

# policy(confidences (R, gamma) float array or None, gamma) -> verification lengths (R,) in 0..gamma
Policy = Callable[[np.ndarray | None, int], np.ndarray]

# ----------------------------------------------------------------------------------------------------
# The packed KV cache of all active requests
# ----------------------------------------------------------------------------------------------------

class PackedContext:
    """The target's KV cache of every active request in one row; each column's request and position."""

    def __init__(self, device: torch.device):
        from transformers import DynamicCache

        self.cache = DynamicCache()  # plain full-attention layers (see the module docstring)
        self.owner = torch.empty(0, dtype=torch.long, device=device)  # (L,) request index of each column
        self.position = torch.empty(0, dtype=torch.long, device=device)  # (L,) its position in that request

    @property
    def length(self) -> int:
        return int(self.owner.numel())

    def mask(self, owner: torch.Tensor, position: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1, Q, L + Q) additive mask for Q new tokens: own request, position <= the query's."""
        keys_owner = torch.cat([self.owner, owner])  # (L + Q,)
        keys_pos = torch.cat([self.position, position])
        allowed = (owner[:, None] == keys_owner[None, :]) & (keys_pos[None, :] <= position[:, None])  # (Q, L+Q)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=owner.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def forward(self, target, ids: torch.Tensor, owner: torch.Tensor, position: torch.Tensor):
        """One target forward over the packed tokens ``ids`` (Q,); their columns join the cache."""
        out = target.forward(ids[None], attention_mask=self.mask(owner, position, target.dtype),
                             past_key_values=self.cache, position_ids=position[None], use_cache=True)
        self.owner = torch.cat([self.owner, owner])
        self.position = torch.cat([self.position, position])
        return out

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the columns where ``keep`` (L,) is False, in every layer."""
        if bool(keep.all()):
            return
        index = keep.nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self.owner, self.position = self.owner[index], self.position[index]


def check_window(config, longest: int) -> None:
    """Refuse a target whose sliding-window layers a request of ``longest`` positions could outgrow."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if sliding and longest > int(window):
        raise ValueError(f"batched decoding masks full attention over a packed cache; this target has "
                         f"sliding-window layers (window {window}) and a request may reach {longest} positions: "
                         f"lower max_new_tokens or the prompt length below the window")


# ----------------------------------------------------------------------------------------------------
# Batched speculative decoding
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Request:
    index: int
    max_new_tokens: int
    generator: torch.Generator | None
    context: object  # the draft's context cache of this request
    anchor: int
    position: int  # position of the anchor (not yet in either cache)
    out: SpecOutput = field(default_factory=lambda: SpecOutput(tokens=[]))
    done: bool = False


@dataclass
class BatchOutput:
    """One batched generation: per-request outputs (input order) and the batch's accounting."""

    outputs: list[SpecOutput]
    rounds: int = 0  # verification forwards (the prefill is one more target forward)
    batch_tokens: list[int] = field(default_factory=list)  # B = sum_r (1 + l_r) of each round
    verified: list[list[int]] = field(default_factory=list)  # the chosen l_r of each round's active requests
    prefill_s: float = 0.0
    decode_s: float = 0.0  # every round: drafting, scheduling, verification, cache cleanup
    draft_s: float = 0.0  # the draft's part of decode_s
    # the rounds run with every slot busy (``BatchRun``'s concurrency, or all requests): the steady state of a
    # server at that load, without the drain at the end, where fewer requests remain than slots
    full_batch_rounds: int = 0
    full_batch_tokens: int = 0  # tokens those rounds emitted
    full_batch_s: float = 0.0  # their part of decode_s

    @property
    def decode_tokens(self) -> int:
        """Tokens emitted by the rounds (each request's first token comes from the prefill)."""
        return sum(max(len(o.tokens) - 1, 0) for o in self.outputs)


def _prefill(target, draft, packed: PackedContext, prompts, max_new, temperature, generators,
             first_index: int = 0) -> list[_Request]:
    """All prompts in one packed forward (their columns join ``packed``); each request's draft context and
    first token. The requests are numbered from ``first_index``; ``max_new`` and ``generators`` are theirs."""
    device = target.device
    lengths = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)  # (sum T,)
    owner = torch.repeat_interleave(torch.arange(first_index, first_index + len(prompts), device=device),
                                    torch.tensor(lengths, device=device))
    position = torch.cat([torch.arange(n, device=device) for n in lengths])
    out = packed.forward(target, ids, owner, position)
    ends = np.cumsum(lengths)
    last = torch.as_tensor(ends - 1, device=device)
    probs = target_distribution(target.logits(out.final_hidden[0, last]), temperature)  # (N, V)
    requests = []
    for i, (start, end) in enumerate(zip(ends - np.array(lengths), ends)):
        context = draft.new_cache()
        draft.extend_context(context, out.tap_hidden[:, int(start):int(end)])
        first = int(probs[i].argmax()) if temperature <= 0 else sample_token(probs[i], generators[i])
        request = _Request(first_index + i, max_new[i], generators[i], context, first, lengths[i])
        request.out.tokens.append(first)
        request.out.target_forwards = 1
        requests.append(request)
    return requests


def _finish(request: _Request, eos: set) -> None:
    """Truncate to max_new_tokens (as ``generate`` does) and settle whether an EOS ended the output."""
    out = request.out
    out.tokens = out.tokens[:request.max_new_tokens]
    out.stopped_by_eos = bool(out.tokens) and out.tokens[-1] in eos
    request.done = True


def _verify_round(target, draft, packed, active, proposals, lengths, temperature, eos, columns_before):
    """Run the packed verification forward and settle every active request; returns (keep mask, B)."""
    device = target.device
    ids, owner, position = [], [], []
    for request, proposal, length in zip(active, proposals, lengths):
        ids += [request.anchor] + proposal.tokens[0, :length].tolist()
        owner += [request.index] * (length + 1)
        position += range(request.position, request.position + length + 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    out = packed.forward(target, as_long(ids), as_long(owner), as_long(position))
    p_all = target_distribution(target.logits(out.final_hidden[0]), temperature)  # (B, V) fp32
    keep = torch.ones(packed.length, dtype=torch.bool, device=device)
    offset = 0
    for request, proposal, length in zip(active, proposals, lengths):
        verdict = verify_block(p_all[offset:offset + length + 1], proposal.tokens[0, :length].tolist(),
                               proposal.probs[0, :length].float(), temperature, request.generator, eos)
        n = verdict.accepted
        new = proposal.tokens[0, :n].tolist() + ([verdict.next_token] if verdict.next_token is not None else [])
        out_r = request.out
        out_r.tokens.extend(new)
        out_r.target_forwards += 1
        out_r.rounds.append({"round": len(out_r.rounds), "gamma": int(proposal.tokens.shape[1]),
                             "verified": length, "accepted": n, "emitted": len(new)})
        if verdict.eos or verdict.next_token in eos or len(out_r.tokens) >= request.max_new_tokens:
            _finish(request, eos)
        else:  # keep the anchor and the n accepted tokens; the rejected tail leaves the cache
            start = columns_before + offset
            keep[start + n + 1:start + length + 1] = False
            draft.extend_context(request.context, out.tap_hidden[:, offset:offset + n + 1])
            request.position += n + 1
            request.anchor = verdict.next_token
        offset += length + 1
    return keep, len(ids)


class BatchRun:
    """One batched generation advanced a round at a time: construction runs the prefill, each ``step()`` one
    round (drafting, scheduling, verification, cache cleanup), timed into ``output``. ``measure_scheduler_live``
    steps the runs of all policies in turn, so a drift in machine speed hits every policy alike.

    ``concurrency``: at most this many requests decode at once (default: all); the others wait in input order
    and each takes the place of a finished one at the end of a round, as a server keeps its slots busy. The
    prefill of a late request is timed into ``prefill_s``, not ``decode_s``."""

    def __init__(self, target, draft, prompts: Sequence[Sequence[int]], max_new_tokens, policy: Policy,
                 temperature: float = 0.0, gamma: int | None = None,
                 generators: Sequence[torch.Generator | None] | None = None, eos_token_ids: Sequence[int] = (),
                 concurrency: int | None = None):
        gamma = gamma or draft.block_size
        if gamma > draft.block_size:
            raise ValueError(f"gamma={gamma} exceeds the draft's trained block size {draft.block_size}")
        prompts = [list(p) for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("batched_speculative_generate needs at least one prompt, none of them empty")
        max_new = (list(max_new_tokens) if isinstance(max_new_tokens, Sequence)
                   else [int(max_new_tokens)] * len(prompts))
        if len(max_new) != len(prompts) or min(max_new) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, one value or one per prompt, got {max_new_tokens}")
        check_window(target.config, max(len(p) + m for p, m in zip(prompts, max_new)) + gamma)
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
        self.generators = list(generators) if generators is not None else [None] * len(prompts)
        self.target, self.draft, self.policy, self.temperature, self.gamma = target, draft, policy, temperature, gamma
        self.prompts, self.max_new = prompts, max_new
        self.eos = {int(e) for e in eos_token_ids}
        self.packed = PackedContext(target.device)
        self.requests: list[_Request] = []
        self.output = BatchOutput([None] * len(prompts))
        self.slots = concurrency or len(prompts)
        self._fill()

    def _fill(self) -> None:
        """Prefill waiting prompts into the packed cache until ``slots`` requests are active or none waits
        (timed into prefill_s); a request can finish at its prefill (EOS first, max_new_tokens 1)."""
        while len(self.requests) < len(self.prompts):
            free = self.slots - sum(not r.done for r in self.requests)
            if free <= 0:
                return
            self._admit(free)

    def _admit(self, count: int) -> None:
        first = len(self.requests)
        new = range(first, min(first + count, len(self.prompts)))
        sync(self.target.device)
        start = time.perf_counter()
        with torch.no_grad():
            requests = _prefill(self.target, self.draft, self.packed, [self.prompts[i] for i in new],
                                [self.max_new[i] for i in new], self.temperature,
                                [self.generators[i] for i in new], first)
        for request in requests:
            self.output.outputs[request.index] = request.out
            if request.anchor in self.eos or request.max_new_tokens <= 1:
                _finish(request, self.eos)
        self.requests += requests
        self._drop_finished()
        sync(self.target.device)
        self.output.prefill_s += time.perf_counter() - start

    def _drop_finished(self) -> None:
        """Every column of a finished request leaves the packed cache."""
        done = torch.tensor([r.done for r in self.requests], device=self.target.device)
        self.packed.keep(~done[self.packed.owner])

    @property
    def done(self) -> bool:
        return len(self.requests) == len(self.prompts) and all(r.done for r in self.requests)

    @torch.no_grad()
    def step(self) -> bool:
        """One round over the active requests, then waiting requests take the places of finished ones;
        False (and nothing run) once every request is done."""
        if self.done:
            return False
        device, result, packed = self.target.device, self.output, self.packed
        sync(device)
        start = time.perf_counter()
        active = [r for r in self.requests if not r.done]
        full = len(active) == min(self.slots, len(self.prompts))
        emitted_before = sum(len(r.out.tokens) for r in active)
        draft_start = time.perf_counter()
        proposals = draft_round(self.draft, [r.context for r in active], [r.anchor for r in active],
                                self.temperature, [r.generator for r in active], self.gamma)
        confidences = None
        if all(p.confidences is not None for p in proposals):
            confidences = torch.cat([p.confidences for p in proposals]).double().cpu().numpy()  # (R, gamma)
        sync(device)
        result.draft_s += time.perf_counter() - draft_start
        lengths = [int(n) for n in self.policy(confidences, self.gamma)]
        keep, batch = _verify_round(self.target, self.draft, packed, active, proposals, lengths, self.temperature,
                                    self.eos, packed.length)
        packed.keep(keep)
        self._drop_finished()
        result.rounds += 1
        result.batch_tokens.append(batch)
        result.verified.append(lengths)
        sync(device)
        seconds = time.perf_counter() - start
        result.decode_s += seconds
        if full:
            result.full_batch_rounds += 1
            result.full_batch_tokens += sum(len(r.out.tokens) for r in active) - emitted_before
            result.full_batch_s += seconds
        self._fill()
        return True


def batched_speculative_generate(target, draft, prompts: Sequence[Sequence[int]], max_new_tokens,
                                 policy: Policy, temperature: float = 0.0, gamma: int | None = None,
                                 generators: Sequence[torch.Generator | None] | None = None,
                                 eos_token_ids: Sequence[int] = (), concurrency: int | None = None) -> BatchOutput:
    """Decode every prompt (lists of ids) concurrently, at most ``concurrency`` at a time (``BatchRun``);
    ``max_new_tokens``: one int or one per prompt.

    Each round the draft proposes gamma tokens per active request, ``policy`` picks the verification lengths,
    one packed target forward verifies them all (module docstring), and ``verify_block`` settles each request.
    ``generators``: one per request (None: torch's default generator). Outputs are in input order.
    """
    run = BatchRun(target, draft, prompts, max_new_tokens, policy, temperature, gamma, generators, eos_token_ids,
                   concurrency)
    while run.step():
        pass
    return run.output
