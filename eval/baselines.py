"""Side-by-side runs on the same prompts: speculative decoding vs plain ``generate`` vs prompt lookup.

For every prompt (all its turns), in one process and with the same ``max_new_tokens`` and temperature:

* ``spec``: ``speculative_generate`` with the draft (one request at a time, batch size 1);
* ``generate``: the target's own ``model.generate`` (greedy at T = 0, plain sampling at T > 0, no top-k/top-p);
* ``prompt_lookup``: ``model.generate(prompt_lookup_num_tokens=...)``, transformers' n-gram drafting.

Only the generation calls are timed (``time.perf_counter``, CUDA synchronised), never templating or
decoding. A warm-up pass over the first prompt runs each method once untimed. At T = 0 each prompt's
speculative output is compared token for token with plain greedy ``generate`` (it must match).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from eval.speculative import run_conversation, speculative_generate, sync

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    gamma: int | None = None
    seed: int = 0
    eos_token_ids: Sequence[int] = ()
    chat_template_kwargs: dict | None = None
    run_generate: bool = True
    run_prompt_lookup: bool = True
    prompt_lookup_num_tokens: int = 10
    prompt_lookup_max_ngram: int = 2
    warmup: bool = True
    progress: bool = True
    progress_label: str = "eval prompts"


def hf_generate(target, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                eos_token_ids: Sequence[int] = (), prompt_lookup_num_tokens: int | None = None,
                prompt_lookup_max_ngram: int | None = None) -> list[int]:
    """New token ids from the target's ``generate`` with a clean generation config: the model's own defaults
    (top-k, top-p, repetition penalties) are NOT applied, so it decodes the same distribution as spec. Stops
    at ``eos_token_ids`` only (none: runs to ``max_new_tokens``)."""
    from transformers import GenerationConfig

    pad = getattr(target.tokenizer, "pad_token_id", None)
    eos = list(eos_token_ids) or None
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                              temperature=temperature if sample else None, top_k=0 if sample else None,
                              top_p=1.0 if sample else None, eos_token_id=eos,
                              pad_token_id=pad if pad is not None else (eos[0] if eos else None),
                              prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                              max_matching_ngram_size=prompt_lookup_max_ngram if prompt_lookup_num_tokens else None)
    input_ids = torch.tensor([list(prompt_ids)], device=target.device)  # (1, T)
    # generate() fills every unset field from model.generation_config (a Hub file may add repetition
    # penalties, min_p, ...): swap in a clean one for the call so both sides decode the same distribution.
    saved, target.model.generation_config = target.model.generation_config, GenerationConfig()
    try:
        with torch.no_grad():
            out = target.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        generation_config=config)
    finally:
        target.model.generation_config = saved
    tokens = out[0, input_ids.shape[1]:].tolist()
    if eos:  # batch size 1 never pads, but be safe: cut after the first EOS
        for i, t in enumerate(tokens):
            if t in eos:
                return tokens[: i + 1]
    return tokens


class _Timer:
    """Accumulates the wall time of the wrapped generation calls."""

    def __init__(self, device):
        self.device, self.seconds = device, 0.0

    def wrap(self, fn):
        def timed(prompt_ids):
            sync(self.device)
            start = time.perf_counter()
            result = fn(prompt_ids)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return result
        return timed


def _method_fns(target, draft, s: RunSettings, generator, max_new_tokens: int) -> dict:
    """name -> generate_turn(prompt_ids) for each method that runs."""
    fns = {"spec": lambda ids: speculative_generate(target, draft, ids, max_new_tokens, s.temperature, s.gamma,
                                                    generator, s.eos_token_ids)}
    if s.run_generate:
        fns["generate"] = lambda ids: hf_generate(target, ids, max_new_tokens, s.temperature, s.eos_token_ids)
    if s.run_prompt_lookup:
        fns["prompt_lookup"] = lambda ids: hf_generate(target, ids, max_new_tokens, s.temperature,
                                                       s.eos_token_ids, s.prompt_lookup_num_tokens,
                                                       s.prompt_lookup_max_ngram)
    return fns


def run_prompt(target, draft, prompt, s: RunSettings, seed: int, max_new_tokens: int | None = None) -> dict:
    """All methods on one prompt. Returns {method: (turn results, seconds)}; spec turns carry SpecOutputs."""
    max_new_tokens = max_new_tokens or s.max_new_tokens
    generator = torch.Generator(device=target.device).manual_seed(seed)
    results = {}
    for name, fn in _method_fns(target, draft, s, generator, max_new_tokens).items():
        torch.manual_seed(seed)  # generate() samples from the global RNG
        timer = _Timer(target.device)
        turns = run_conversation(target.tokenizer, list(prompt.turns), timer.wrap(fn),
                                 system=getattr(prompt, "system", None),
                                 chat_template_kwargs=s.chat_template_kwargs, eos_token_ids=s.eos_token_ids)
        results[name] = (turns, timer.seconds)
    return results


def _row_and_records(prompt, prompt_id: int, results: dict, greedy: bool):
    """Flatten one prompt's results into a timing row, round records and an output line."""
    base = {"dataset": str(prompt.source), "prompt_id": prompt_id, "row_id": str(getattr(prompt, "row_id", ""))}
    spec_turns, _ = results["spec"]
    records = []
    for t, turn in enumerate(spec_turns):
        for r in turn.result.rounds:
            records.append({**base, "turn": t, **r})
    row = dict(base, num_turns=len(spec_turns))
    for name, (turns, secs) in results.items():
        row[f"{name}_tokens"] = sum(len(tr.tokens) for tr in turns)
        row[f"{name}_s"] = secs
    row["target_forwards"] = sum(tr.result.target_forwards for tr in spec_turns)
    spec_ids = [tr.tokens for tr in spec_turns]
    for name, key in (("generate", "greedy_match"), ("prompt_lookup", "prompt_lookup_match")):
        row[key] = ([tr.tokens for tr in results[name][0]] == spec_ids) if greedy and name in results else None
    output = dict(base, turns=[{"prompt_ids_len": len(tr.prompt_ids), "spec_tokens": tr.tokens,
                                **({"generate_tokens": results["generate"][0][i].tokens}
                                   if "generate" in results else {})}
                               for i, tr in enumerate(spec_turns)])
    return row, records, output


def compare_on_prompts(target, draft, prompts: Sequence, s: RunSettings):
    """Run every method on every prompt. Returns (round records, per-prompt timing rows, outputs).

    Prompts are objects with ``source`` (dataset name), ``row_id``, ``turns`` and optionally ``system``.
    ``prompt_id`` in the records counts prompts within their dataset (0, 1, ...).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if s.warmup:
        log.info("warm-up (untimed) on the first prompt")
        run_prompt(target, draft, prompts[0], s, seed=s.seed, max_new_tokens=min(16, s.max_new_tokens))
    records, rows, outputs = [], [], []
    per_dataset: dict[str, int] = {}
    bar = tqdm(prompts, desc=s.progress_label, unit="prompt", disable=not s.progress)
    for index, prompt in enumerate(bar):
        prompt_id = per_dataset.get(str(prompt.source), 0)
        per_dataset[str(prompt.source)] = prompt_id + 1
        results = run_prompt(target, draft, prompt, s, seed=s.seed * 1_000_003 + index)
        row, recs, out = _row_and_records(prompt, prompt_id, results, greedy=s.temperature <= 0)
        records.extend(recs)
        rows.append(row)
        outputs.append(out)
        emitted = sum(r["emitted"] for r in records)
        bar.set_postfix(tau=f"{emitted / max(len(records), 1):.2f}")
    return records, rows, outputs
