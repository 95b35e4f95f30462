"""Chat template -> ``input_ids`` + assistant-only ``loss_mask``, for any template.

Assistant spans are found by rendering the target's own chat template on message prefixes, never by
knowing its markup. For assistant message ``i``:

* ``prompt_i``  = render(messages[:i], add_generation_prompt=True)   (what the target saw when generating)
* ``through_i`` = render(messages[:i + 1])                           (the same plus the assistant turn)

The template must be *prefix-stable*: ``through_i`` starts with ``prompt_i`` and the full rendering starts
with ``through_i``. Then the characters ``[len(prompt_i), len(through_i))`` are assistant content plus the
template's end-of-turn markup. A token belongs to the loss mask when its first character lies in that
span, up to and including the first stop token (the tokenizer's / generation config's EOS ids, e.g.
``<|im_end|>``): the draft must learn to predict it, while anything the template adds after it (a newline)
is never produced by the target and is excluded. A response cut by ``max_new_tokens`` gets no stop token
in the mask, because the target did not produce one. Role headers, system and user text are always 0.

Truncation policy (``max_length``): a row longer than ``max_length`` keeps its answers. The start of the
text before the first answer is cut (the system message first, then the first user message, from their
beginning, at a word boundary where one is near) and the conversation rendered again, so the template's
markup stays whole and every answer token keeps its loss mask (``prompt_cut``). Only when even an empty
prompt does not make the row fit is its end cut (``truncated``); a row left with fewer than
``min_loss_tokens`` answer tokens is dropped (``too_long``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from data_prep.errors import TemplateError


def build_messages(system: str | None, turns: list[str], responses: list[str]) -> list[dict[str, str]]:
    """Interleave user turns and assistant responses (``responses`` may be one shorter than ``turns``)."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(responses):
            messages.append({"role": "assistant", "content": responses[i]})
    return messages


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False,
           chat_template_kwargs: dict[str, Any] | None = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set "
                            f"chat_template=<file or Jinja text>, or chat_template=plain to train on the "
                            f"continuation of the raw prompt text")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **(chat_template_kwargs or {}))


def encode(tokenizer, text: str, offsets: bool = False):
    """Token ids of rendered template text (the template supplies BOS etc., so no special tokens added)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def generation_prompt_ids(tokenizer, messages, chat_template_kwargs=None) -> list[int]:
    """Token ids the target is conditioned on to produce the next assistant turn."""
    return encode(tokenizer, render(tokenizer, messages, True, chat_template_kwargs))


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Ids at which the target stops a turn: the tokenizer's EOS plus the generation config's EOS ids."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def template_sha256(tokenizer) -> str:
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the token -> id map (added tokens included): equal exactly when token ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def assistant_spans(tokenizer, messages, chat_template_kwargs=None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character span of each assistant turn in it (see module docstring)."""
    full = render(tokenizer, messages, False, chat_template_kwargs)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], True, chat_template_kwargs)
        through = render(tokenizer, messages[: i + 1], False, chat_template_kwargs)
        if not through.startswith(prompt):
            raise TemplateError(
                f"chat template is not prefix-stable at message {i}: the generation prompt is not a prefix of "
                f"the rendered assistant turn, so assistant tokens cannot be located; use a template whose "
                f"add_generation_prompt output matches its assistant header (or set chat_template_kwargs)")
        if not full.startswith(through):
            raise TemplateError(
                f"chat template is not prefix-stable at message {i}: rendering the whole conversation "
                f"rewrites an earlier turn (e.g. drops earlier reasoning); use single-turn prompts with this "
                f"template or a template that keeps earlier turns verbatim")
        spans.append((len(prompt), len(through)))
    return full, spans


def tokenize_conversation(tokenizer, messages, stop_ids: set[int], stopped: list[bool] | None = None,
                          chat_template_kwargs=None) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) for one conversation; ``stopped[j]`` says whether assistant turn j ended on
    a stop token the target produced (False for a response cut by max_new_tokens)."""
    full, spans = assistant_spans(tokenizer, messages, chat_template_kwargs)
    ids, offsets = encode(tokenizer, full, offsets=True)
    mask = [0] * len(ids)
    stopped = stopped if stopped is not None else [True] * len(spans)
    j = 0
    for (start, end), did_stop in zip(spans, stopped):
        while j < len(ids) and offsets[j][0] < start:
            j += 1
        while j < len(ids) and offsets[j][0] < end:
            if ids[j] in stop_ids:
                mask[j] = int(did_stop)
                break
            mask[j] = 1
            j += 1
    return ids, mask


def apply_max_length(ids: list[int], mask: list[int], max_length: int, min_loss_tokens: int = 2):
    """Cut a row's end to ``max_length`` -> (ids, mask, status) with status "ok" | "truncated" | "too_long"."""
    if len(ids) <= max_length:
        return ids, mask, "ok"
    if sum(mask[:max_length]) < min_loss_tokens:
        return None, None, "too_long"
    return ids[:max_length], mask[:max_length], "truncated"


def _cut_start(text: str, n: int) -> str:
    """``text`` without its first ``n`` characters, moved on to the next word when one starts nearby."""
    if n <= 0:
        return text
    rest = text[n:]
    for i, ch in enumerate(rest[:32]):
        if ch.isspace():
            return rest[i:].lstrip()
    return rest


def fit_prompt(tokenizer, messages: list[dict], stop_ids: set[int], stopped: list[bool] | None, max_length: int,
               chat_template_kwargs=None) -> tuple[list[int], list[int], bool]:
    """Cut the start of the text before the first answer so that the conversation fits ``max_length`` tokens
    -> (ids, mask, whether the prompt was cut). When even an empty prompt does not fit, the conversation is
    returned whole (and uncut) for ``apply_max_length``.

    Per message (system, then the first user turn), a binary search finds the fewest leading characters to
    drop; the row is rendered again each time, so template markup is never split.
    """
    ids, mask = tokenize_conversation(tokenizer, messages, stop_ids, stopped, chat_template_kwargs)
    if len(ids) <= max_length:
        return ids, mask, False
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    messages = [dict(m) for m in messages]
    length = lambda: len(encode(tokenizer, render(tokenizer, messages, False, chat_template_kwargs)))  # noqa: E731
    for i in range(first_answer):
        content = messages[i]["content"]
        messages[i]["content"] = ""
        if length() > max_length:
            continue  # emptying this message is not enough: keep it empty and cut the next one
        lo, hi = 0, len(content)  # invariant: cutting hi characters fits
        while lo < hi:
            mid = (lo + hi) // 2
            messages[i]["content"] = _cut_start(content, mid)
            lo, hi = (lo, mid) if length() <= max_length else (mid + 1, hi)
        messages[i]["content"] = _cut_start(content, hi)
        cut_ids, cut_mask = tokenize_conversation(tokenizer, messages, stop_ids, stopped, chat_template_kwargs)
        return cut_ids, cut_mask, True
    return ids, mask, False


def tokenize_records(records: list[dict], tokenizer, stop_ids: set[int], max_length: int,
                     chat_template_kwargs=None, min_loss_tokens: int = 2) -> tuple[dict[str, list], Counter]:
    """Tokenize generated conversations into dataset columns; counts rows by status (ok, prompt_cut,
    truncated, too_long, too_few_loss_tokens)."""
    cols: dict[str, list] = {"input_ids": [], "loss_mask": [], "source": [], "row_id": []}
    stats: Counter = Counter()
    for rec in records:
        messages = build_messages(rec.get("system"), rec["turns"], rec["responses"])
        stopped = [reason == "stop" for reason in rec["finish_reasons"]]
        ids, mask, cut = fit_prompt(tokenizer, messages, stop_ids, stopped, max_length, chat_template_kwargs)
        if sum(mask) < min_loss_tokens:
            stats["too_few_loss_tokens"] += 1
            continue
        ids, mask, status = apply_max_length(ids, mask, max_length, min_loss_tokens)
        status = "prompt_cut" if cut and status == "ok" else status
        stats[status] += 1
        if status == "too_long":
            continue
        cols["input_ids"].append(ids)
        cols["loss_mask"].append(mask)
        cols["source"].append(rec["source"])
        cols["row_id"].append(rec["row_id"])
    return cols, stats
