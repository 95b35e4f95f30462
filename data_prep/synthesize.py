"""Prompts written by the target itself, for traffic no prompt set covers (the Magpie recipe).

An instruction-tuned model given only the opening of a user turn in its own chat template (for ChatML
``<|im_start|>user\\n``, after the template's default system message) continues it with a plausible user
message and closes the turn. Sampled many times, these are prompts from the distribution the target was
aligned on, which is often closer to what it will serve than any public set at hand; data_prep then answers
them like any other prompt, and the draft learns from those answers.

A prompt source with ``synthesize: N`` (and a ``name``) is written once to
``<out_dir>/synthesized/<name>.jsonl`` in the ``{"turns": [...]}`` shape every source reads, with every
sample drawn and the settings that drew them beside it (``<name>.samples.json``); data_prep then reads that
file as a plain file source. Rerunning reuses it; a larger N samples more batches after the ones already
drawn (each batch has its own seed, so the first N prompts do not change); other settings, or another target
or template, are refused unless ``overwrite=true``. Kept: samples that close their turn (a stop token) with a non-empty, new text;
the rest are counted by reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from data_prep.chat import encode, render, template_sha256
from data_prep.errors import DataPrepError
from data_prep.sources import PromptSource, source_name
from dspark_model.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SYNTH_DIR = "synthesized"
_MARK = "@@dspark-user-message@@"


def user_turn_prefix(tokenizer, chat_template_kwargs: dict | None = None) -> str:
    """The rendered text before the first user message's content: system message (the template's default,
    if any), then the opening of a user turn."""
    text = render(tokenizer, [{"role": "user", "content": _MARK}], False, chat_template_kwargs)
    cut = text.find(_MARK)
    if cut <= 0:
        raise DataPrepError("the chat template does not render the user's message verbatim after an opening, so "
                            "the target cannot be asked to write one; use a file or dataset of prompts instead")
    return text[:cut]


def sample_prompts(model, tokenizer, prefix_ids: list[int], stop_ids: set[int], count: int, batch_size: int,
                   max_new_tokens: int, temperature: float, top_p: float, seed: int,
                   first_batch: int = 0, workers: int = 1) -> list[list[str]]:
    """``count`` batches of ``batch_size`` samples continuing ``prefix_ids``, batch i seeded from (seed, i) and
    decoded on ``workers`` threads: per batch, the decoded text of each sample that stopped, '' for the others
    (unfinished)."""
    import torch

    from data_prep.decode import generate_ids
    from data_prep.generate import derive_seed
    from data_prep.threads import run_on_threads

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    device = next(model.parameters()).device

    def batch(i: int) -> list[str]:
        rng = torch.Generator(device=device).manual_seed(derive_seed(seed, "synthesize", i))
        outs = generate_ids(model, [prefix_ids] * batch_size, pad_id, stop_ids, max_new_tokens, temperature, top_p,
                            rng)
        return [tokenizer.decode(tokens[:-1], skip_special_tokens=True).strip() if finish == "stop" else ""
                for tokens, finish in outs]

    with closing(run_on_threads(batch, range(first_batch, first_batch + count), workers, "dspark-synth",
                                ordered=True)) as done:
        return list(done)


def _keep(batches: list[list[str]]) -> tuple[list[str], int]:
    """(non-empty texts not seen before, ignoring case and spacing, in sampling order; duplicates dropped)."""
    kept, seen, duplicates = [], set(), 0
    for text in (t for batch in batches for t in batch):
        key = " ".join(text.lower().split())
        if not key:
            continue  # unfinished or empty, counted by the caller
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(text)
    return kept, duplicates


def synthesize_source(src: PromptSource, model, tokenizer, stop_ids: set[int], out_dir: Path, seed: int,
                      chat_template_kwargs: dict | None, target_id: str, overwrite: bool = False,
                      workers: int = 1) -> PromptSource:
    """Write (or reuse, or extend) ``src``'s synthesized prompts, ``workers`` batches at a time; returns the
    source as a file source."""
    name = source_name(src)
    path = out_dir / SYNTH_DIR / f"{name}.jsonl"
    settings_path = path.with_suffix(".samples.json")
    prefix = user_turn_prefix(tokenizer, chat_template_kwargs)
    settings = {"target_id": target_id, "chat_template_sha256": template_sha256(tokenizer), "prefix": prefix,
                "temperature": src.synthesize_temperature, "top_p": src.synthesize_top_p,
                "max_new_tokens": src.synthesize_max_tokens, "batch_size": src.synthesize_batch_size, "seed": seed}
    state = json.loads(settings_path.read_text()) if settings_path.is_file() and not overwrite else None
    if state is not None and state["settings"] != settings:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise DataPrepError(f"{path} was synthesized with other settings ({', '.join(changed)} differ); use "
                            f"overwrite=true to write it again, or another out_dir")
    raw = state["batches"] if state else []
    kept, duplicates = _keep(raw)
    if len(kept) < src.synthesize:
        prefix_ids = encode(tokenizer, prefix)
        budget = 4 * -(-src.synthesize // src.synthesize_batch_size)  # give up after 4x the batches N needs
        with tqdm(total=src.synthesize, initial=len(kept), unit="prompt", desc=f"synthesize {name}",
                  dynamic_ncols=True) as bar:
            while len(kept) < src.synthesize and len(raw) < budget:
                count = min(workers, budget - len(raw))
                more = sample_prompts(model, tokenizer, prefix_ids, stop_ids, count, src.synthesize_batch_size,
                                      src.synthesize_max_tokens, src.synthesize_temperature, src.synthesize_top_p,
                                      seed, first_batch=len(raw), workers=workers)
                raw += more
                atomic_write_json(settings_path, {"settings": settings, "batches": raw}, ensure_ascii=False)
                before = len(kept)
                kept, duplicates = _keep(raw)
                bar.update(min(len(kept), src.synthesize) - min(before, src.synthesize))
    counts = {"sampled": sum(map(len, raw)), "kept": min(len(kept), src.synthesize),
              "unfinished_or_empty": sum(1 for batch in raw for t in batch if not t), "duplicate": duplicates}
    if len(kept) < src.synthesize:
        log.warning("synthesized prompts %r: %d of the %d asked for (%s); raise synthesize_max_tokens or "
                    "synthesize_temperature", name, len(kept), src.synthesize, counts)
    else:
        log.info("synthesized prompts %r: %s", name, counts)
    rows = "".join(json.dumps({"turns": [text]}, ensure_ascii=False) + "\n" for text in kept[:src.synthesize])
    atomic_write_text(path, rows)
    return dataclasses.replace(src, path=str(path), synthesize=None)
