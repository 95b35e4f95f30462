"""Lossless speculative decoding with a DSpark draft, one request at a time (batch size 1).

One generation:

* prefill: the target runs over the prompt with a KV cache; the first new token is sampled from the target at
  the last prompt position and becomes the first anchor. The draft's context cache receives the tapped
  target states of every prompt position.
* each round: the draft proposes gamma tokens after the anchor (at position p); the target verifies
  ``[anchor, d_1 .. d_gamma]`` (positions p .. p+gamma) in ONE forward on top of its KV cache. The target
  distribution for d_k is read at position p+k-1. Acceptance (DESIGN.md, paper section 2.1): T = 0 accepts
  d_k iff it equals the target's argmax; T > 0 accepts with probability min(1, p_t(d_k) / p_d(d_k)), samples
  the first rejected position from normalize(max(p_t - p_d, 0)), and samples a bonus token from the target at
  position p+gamma when every draft token passes. The target KV cache is cropped back to the anchor plus the
  n accepted tokens, the draft context gains the tapped target states of those n+1 positions, and the
  corrected (or bonus) token is the next anchor.
* stop at an EOS token (a round that accepts an EOS emits only its accepted tokens, no bonus) or after
  ``max_new_tokens`` (the output is truncated to exactly that many tokens, as plain ``generate`` does).

All sampling arithmetic is fp32 whatever the model dtype, with one ``torch.Generator`` per generation, so a
seed reproduces a run. The rounds are returned as plain dicts (the ``rounds.jsonl`` record layout of the
team brief, minus the dataset / prompt ids that the caller adds).

Multi-turn prompts go through ``run_conversation``: each turn's answer is decoded, appended to the
conversation as the assistant message, and the chat template is applied again for the next turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from data_prep.chat import generation_prompt_ids, stop_token_ids
from dspark_model.target import crop_cache


@dataclass
class Verdict:
    """The outcome of verifying one drafted block."""

    accepted: int  # n: draft tokens accepted, 0..gamma
    next_token: int | None  # correction (n < gamma) or bonus (n == gamma); None when an accepted EOS ends it
    accepted_mask: list[bool]  # position k accepted (True for k < n)
    eos: bool  # an accepted draft token was an EOS token


@dataclass
class SpecOutput:
    """One speculative generation: the new tokens, the per-round records and the forward counts."""

    tokens: list[int]
    rounds: list[dict] = field(default_factory=list)
    stopped_by_eos: bool = False
    target_forwards: int = 0  # prefill + one verification forward per round


# ----------------------------------------------------------------------------------------------------
# Verification of one block (pure tensors: unit-testable with hand-built distributions)
# ----------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on a GPU); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def target_distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, V) logits -> (N, V) fp32 distributions: softmax at ``temperature``, one-hot argmax at T = 0."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def residual_distribution(p_t: torch.Tensor, p_d: torch.Tensor) -> torch.Tensor:
    """normalize(max(p_t - p_d, 0)) for (V,) fp32 vectors; p_t itself if the two are identical."""
    residual = (p_t - p_d).clamp(min=0.0)  # (V,)
    total = residual.sum()
    return residual / total if total > 0 else p_t


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (V,) fp32 distribution."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_block(p_t: torch.Tensor, draft_tokens: Sequence[int], draft_probs: torch.Tensor, temperature: float,
                 generator: torch.Generator | None = None, eos_token_ids: Sequence[int] = (),
                 uniforms: torch.Tensor | None = None) -> Verdict:
    """Accept a prefix of the drafted block and pick the next token.

    p_t (gamma+1, V) fp32 target distributions at positions p .. p+gamma (row k judges d_{k+1}; the last row
    gives the bonus token); draft_tokens (gamma,); draft_probs (gamma, V) fp32 draft distributions the tokens
    were drawn from. ``uniforms`` (gamma,) replaces the acceptance draws (tests). At T = 0 acceptance is an
    exact match with the target's argmax and no randomness is used.
    """
    gamma = len(draft_tokens)
    eos = set(int(e) for e in eos_token_ids)
    greedy = temperature <= 0
    tokens = torch.as_tensor(list(draft_tokens), dtype=torch.long, device=p_t.device)  # (gamma,)
    # All acceptance tests at once, one host transfer: row k of p_t judges drafted token k.
    if greedy:
        target_argmax = p_t.argmax(-1)  # (gamma + 1,)
        ok = (target_argmax[:gamma] == tokens).tolist()
    else:
        if uniforms is None:
            uniforms = torch.rand(gamma, generator=generator, device=p_t.device, dtype=torch.float32)
        rows = torch.arange(gamma, device=p_t.device)
        ok = (uniforms.to(p_t.device) * draft_probs[rows, tokens] < p_t[rows, tokens]).tolist()
    mask = [False] * gamma
    for k, token in enumerate(tokens.tolist()):
        if not ok[k]:
            nxt = int(target_argmax[k]) if greedy else sample_token(
                residual_distribution(p_t[k], draft_probs[k]), generator)
            return Verdict(k, nxt, mask, False)
        mask[k] = True
        if token in eos:
            return Verdict(k + 1, None, mask, True)
    bonus = int(target_argmax[gamma]) if greedy else sample_token(p_t[gamma], generator)
    return Verdict(gamma, bonus, mask, False)


# ----------------------------------------------------------------------------------------------------
# The generation loop
# ----------------------------------------------------------------------------------------------------

def _first_token(target, input_ids: torch.Tensor, draft, temperature: float, generator):
    """Prefill: target KV cache over the prompt, draft context over it, first token from the target."""
    cache = target.new_cache()
    out = target.forward(input_ids, past_key_values=cache, use_cache=True)  # taps (1, T, k*d)
    context = draft.new_cache()
    _extend(draft, context, out.tap_hidden, input_ids)
    probs = target_distribution(target.logits(out.final_hidden[0, -1:]), temperature)[0]  # (V,)
    token = int(probs.argmax()) if temperature <= 0 else sample_token(probs, generator)
    return cache, context, token


def _extend(draft, context, tap_hidden: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Grow the draft's context; a draft that pairs features with tokens (EAGLE-3) also gets their ids."""
    if getattr(draft, "context_needs_tokens", False):
        draft.extend_context(context, tap_hidden, token_ids)
    else:
        draft.extend_context(context, tap_hidden)


def _round_record(index: int, gamma: int, proposal, verdict: Verdict) -> dict:
    confidences = proposal.confidences
    return {
        "round": index, "gamma": gamma, "proposed": proposal.tokens[0].tolist(),
        "accepted": verdict.accepted, "accepted_mask": verdict.accepted_mask,
        "confidences": None if confidences is None else confidences[0].float().tolist(),
        # tokens this round produced: accepted drafts + correction/bonus (no bonus after an accepted EOS)
        "emitted": verdict.accepted + (verdict.next_token is not None),
        "eos": False,  # set below when this round ended the generation at an EOS token
    }


@torch.no_grad()
def speculative_generate(target, draft, input_ids, max_new_tokens: int, temperature: float = 0.0,
                         gamma: int | None = None, generator: torch.Generator | None = None,
                         eos_token_ids: Sequence[int] = ()) -> SpecOutput:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ((1, T) tensor or list of ids).

    ``draft`` needs ``new_cache``, ``extend_context`` and ``propose`` (a ``DSparkDraft``, or any object with
    that interface). The output distribution equals the target's (exactly its greedy output at T = 0).
    """
    gamma = gamma or draft.block_size
    if gamma > draft.block_size:
        raise ValueError(f"gamma={gamma} exceeds the draft's trained block size {draft.block_size}; "
                         f"use gamma <= {draft.block_size}")
    if not torch.is_tensor(input_ids):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    input_ids = input_ids.to(target.device)
    eos = set(int(e) for e in eos_token_ids)
    cache, context, anchor = _first_token(target, input_ids, draft, temperature, generator)
    out = SpecOutput(tokens=[anchor], target_forwards=1, stopped_by_eos=anchor in eos)
    position = input_ids.shape[1]  # position of the anchor (not yet in either cache)
    while not out.stopped_by_eos and len(out.tokens) < max_new_tokens:
        anchor_t = torch.tensor([anchor], device=target.device)
        proposal = draft.propose(context, anchor_t, temperature, generator, gamma)  # tokens (1, G)
        block = torch.cat([anchor_t, proposal.tokens[0].to(target.device)])[None]  # (1, G+1)
        verified = target.forward(block, past_key_values=cache, use_cache=True)
        p_t = target_distribution(target.logits(verified.final_hidden[0]), temperature)  # (G+1, V)
        verdict = verify_block(p_t, proposal.tokens[0].tolist(), proposal.probs[0].float(), temperature,
                               generator, eos)
        n = verdict.accepted
        record = _round_record(len(out.rounds), gamma, proposal, verdict)
        out.target_forwards += 1
        new = proposal.tokens[0, :n].tolist() + ([verdict.next_token] if verdict.next_token is not None else [])
        out.tokens.extend(new)
        out.stopped_by_eos = verdict.eos or (verdict.next_token in eos)
        record["eos"] = out.stopped_by_eos
        out.rounds.append(record)
        if out.stopped_by_eos or len(out.tokens) >= max_new_tokens:
            break
        crop_cache(cache, position + n + 1)  # keep the anchor and the n accepted tokens
        _extend(draft, context, verified.tap_hidden[:, : n + 1], block[:, : n + 1])  # positions p .. p+n
        position += n + 1
        anchor = verdict.next_token
    if len(out.tokens) > max_new_tokens:
        out.tokens = out.tokens[:max_new_tokens]
    if out.stopped_by_eos and (not out.tokens or out.tokens[-1] not in eos):
        out.stopped_by_eos = False  # the EOS fell beyond max_new_tokens
    return out


# ----------------------------------------------------------------------------------------------------
# Chat prompts and multi-turn conversations (shared by speculative decoding and the baselines)
# ----------------------------------------------------------------------------------------------------

# Token ids of a conversation ending with a user turn, ready for the assistant's answer: data_prep's function,
# so eval conditions the target exactly as the training data did (one implementation, in data_prep/chat.py).
chat_prompt_ids = generation_prompt_ids


def first_turn_ids(tokenizer, prompt, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of ``prompt``'s first user turn (after its system message, if any), ready for the answer."""
    system = getattr(prompt, "system", None)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt.turns[0]}]
    return chat_prompt_ids(tokenizer, messages, chat_template_kwargs)


@dataclass
class TurnResult:
    prompt_ids: list[int]
    tokens: list[int]
    result: object = None  # whatever generate_turn returned (e.g. a SpecOutput)


def run_conversation(tokenizer, turns: Sequence[str], generate_turn: Callable[[list[int]], object],
                     system: str | None = None, chat_template_kwargs: dict | None = None,
                     eos_token_ids: Sequence[int] = ()) -> list[TurnResult]:
    """Answer each user turn in order. ``generate_turn(prompt_ids)`` returns new token ids (a list, or an
    object with ``.tokens``); the decoded answer (EOS stripped) becomes the assistant message of the turn."""
    messages = [{"role": "system", "content": system}] if system else []
    eos = set(int(e) for e in eos_token_ids)
    results = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt_ids = chat_prompt_ids(tokenizer, messages, chat_template_kwargs)
        result = generate_turn(prompt_ids)
        tokens = list(getattr(result, "tokens", result))
        answer = tokens[:-1] if tokens and tokens[-1] in eos else tokens
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
        results.append(TurnResult(prompt_ids, tokens, result))
    return results


def eos_token_ids_of(target) -> list[int]:
    """EOS ids used to stop: ``data_prep.chat.stop_token_ids`` of the target (tokenizer EOS + the model's
    generation-config EOS ids), the ids data_prep stopped its generations at."""
    return sorted(stop_token_ids(target.tokenizer, getattr(target.model, "generation_config", None)))
