"""Response regeneration: the target answers every prompt, turn by turn, resumably.

Two backends produce the same record per prompt (one line of ``generations.jsonl``)::

    {"row_id", "source", "prompt_sha", "system", "turns": [user...], "responses": [assistant...],
     "finish_reasons": ["stop" | "length", ...], "num_tokens": [generated tokens per turn]}

* ``local``: batched decoding with the target in this process (``data_prep/decode.py``: left padding, a
  preallocated KV cache). Prompts are sorted by length and cut into fixed batches; the batch plan depends
  only on the prompt set, ``batch_size``, ``max_batch_tokens`` and ``max_new_tokens``. Plain greedy (temperature 0, the default) or sampled with
  temperature / top-p; the model's own ``generation_config`` (repetition penalty, top-k...) is never applied.
* ``openai``: any OpenAI-compatible ``/v1/chat/completions`` server, a bounded thread pool, retries with
  exponential backoff, timeouts.

Multi-turn prompts: assistant turn t is generated from the conversation holding the target's own turns
0..t-1. Resume: rows already in the log are skipped. Determinism rule, so that a resumed run gives the same
dataset as an uninterrupted one with the same seed:

* local: a batch with any missing row is regenerated whole (same composition, same numerics) and only
  its missing rows are appended. Sampling reseeds the torch RNG before each batch and turn from
  sha256(seed, the batch's row ids, turn): changing ``batch_size`` changes samples, resuming does not.
* openai: every request carries ``seed`` = sha256(seed, row_id, turn), so each row is independent of
  batching and order (as far as the server honours seeds; greedy needs none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import closing
from urllib.parse import unquote, urlsplit, urlunsplit

import torch
from tqdm import tqdm

from data_prep.chat import build_messages, generation_prompt_ids
from data_prep.decode import generate_ids
from data_prep.errors import BadRowError, GenerationError
from data_prep.sources import Prompt
from data_prep.store import GenerationLog
from data_prep.threads import run_on_threads
from dspark_model.redact import RedactingFilter, redact_text, redact_url, url_secrets

log = logging.getLogger(__name__)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_sha(p: Prompt) -> str:
    return hashlib.sha256(json.dumps([p.system, p.turns], ensure_ascii=False).encode()).hexdigest()[:16]


def new_record(p: Prompt) -> dict:
    return {"row_id": p.row_id, "source": p.source, "prompt_sha": prompt_sha(p), "system": p.system,
            "turns": list(p.turns), "responses": [], "finish_reasons": [], "num_tokens": []}


def drop_long_prompts(prompts: list[Prompt], tokenizer, max_length: int, chat_template_kwargs=None,
                      strict: bool = False) -> tuple[list[Prompt], list[int], int]:
    """Keep prompts whose first generation prompt fits in ``max_length`` tokens -> (kept, lengths, dropped)."""
    kept, lengths = [], []
    for p in prompts:
        n = len(generation_prompt_ids(tokenizer, build_messages(p.system, p.turns[:1], []), chat_template_kwargs))
        if n >= max_length:
            if strict:
                raise BadRowError(f"prompt {p.row_id}: too_long ({n} template tokens >= max_length "
                                  f"{max_length}); raise max_length or run with strict=false")
            continue
        kept.append(p)
        lengths.append(n)
    return kept, lengths, len(prompts) - len(kept)


# ---- local backend -------------------------------------------------------------------------------------

def plan_batches(lengths: list[int], batch_size: int, max_new_tokens: int = 0,
                 max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices sorted by prompt length (ties by position), cut into batches of at most ``batch_size`` rows
    and, when ``max_batch_tokens`` is set, at most that many rows x (longest prompt + max_new_tokens) tokens
    (the KV cache a batch holds at its end); a batch always takes at least one row."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current = [], []
    for i in order:  # ascending lengths: the row being added is the batch's longest
        too_many = len(current) >= batch_size
        too_big = max_batch_tokens and (len(current) + 1) * (lengths[i] + max_new_tokens) > max_batch_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def _local_batch(model, tokenizer, batch: list[Prompt], pad_id: int, stop_ids: set[int], kwargs: dict,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[dict]:
    """Generate every turn of one batch of prompts."""
    records = [new_record(p) for p in batch]
    for t in range(max(len(p.turns) for p in batch)):
        active = [j for j, p in enumerate(batch) if len(p.turns) > t]
        ids = [generation_prompt_ids(tokenizer, build_messages(batch[j].system, batch[j].turns[: t + 1],
                                                               records[j]["responses"]), kwargs)
               for j in active]
        device = next(model.parameters()).device
        rng = torch.Generator(device=device).manual_seed(derive_seed(seed, [batch[j].row_id for j in active], t))
        outs = generate_ids(model, ids, pad_id, stop_ids, max_new_tokens, temperature, top_p, rng)
        for j, (tokens, finish) in zip(active, outs):
            content = tokens[:-1] if finish == "stop" else tokens
            records[j]["responses"].append(tokenizer.decode(content, skip_special_tokens=True))
            records[j]["finish_reasons"].append(finish)
            records[j]["num_tokens"].append(len(tokens))
    return records


def generate_local(prompts: list[Prompt], lengths: list[int], model, tokenizer, glog: GenerationLog,
                   done: dict[str, dict], stop_ids: set[int], batch_size: int = 64, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   chat_template_kwargs: dict | None = None, max_batch_tokens: int | None = None,
                   workers: int = 1) -> int:
    """Fill ``done`` (row_id -> record) for every prompt; returns tokens generated in this call.

    ``workers`` > 1 decodes that many batches at once on threads (one core each when torch runs one thread per
    op: the matrix work releases the GIL); records are appended as batches finish, and each batch's output is
    the same as when decoded alone (same composition, its own seeded generator)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    batches = plan_batches(lengths, batch_size, max_new_tokens, max_batch_tokens)
    todo = [b for b in batches if any(prompts[i].row_id not in done for i in b)]
    remaining = sum(len(b) for b in todo)
    log.info("local generation: %d prompts to do in %d batches (%d already done)", remaining, len(todo),
             len(prompts) - remaining)
    tokens, start = 0, time.perf_counter()

    def run(b: list[int]) -> list[dict]:
        return _local_batch(model, tokenizer, [prompts[i] for i in b], pad_id, stop_ids, chat_template_kwargs or {},
                            max_new_tokens, temperature, top_p, seed)

    with tqdm(total=remaining, unit="row", desc="generate", dynamic_ncols=True) as bar, \
            closing(run_on_threads(run, todo, workers, "dspark-decode")) as finished:
        for records in finished:
            new = [r for r in records if r["row_id"] not in done]
            glog.append(new)
            done.update((r["row_id"], r) for r in new)
            tokens += sum(sum(r["num_tokens"]) for r in new)
            bar.update(len(new))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    return tokens


# ---- openai backend ------------------------------------------------------------------------------------

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def chat_completions_url(base_url: str):
    """(chat-completions URL without userinfo, httpx BasicAuth from the userinfo or None).

    ``http://host:8000`` and ``http://host:8000/v1`` both give ``.../v1/chat/completions``; a query
    (``?api_key=...``) stays at the end, where the server reads it.
    """
    import httpx

    parts = urlsplit(base_url.strip())
    userinfo, _, netloc = parts.netloc.rpartition("@")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += ("/v1" if path == "" else "") + "/chat/completions"
    auth = None
    if userinfo:
        user, _, password = userinfo.partition(":")
        auth = httpx.BasicAuth(unquote(user), unquote(password))
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment)), auth


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (httpx), safe to share between threads."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 120.0, max_retries: int = 4,
                 backoff_s: float = 1.0, api_key: str | None = None, extra_body: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        import httpx

        url, auth = chat_completions_url(base_url)
        # self.url is what messages and logs show (credentials redacted); requests use the full address
        self.url, self._post_url = redact_url(url), url
        self.model, self.max_retries, self.backoff_s = model, max_retries, backoff_s
        self.extra_body, self._sleep = dict(extra_body or {}), sleep
        self._secrets = url_secrets(base_url) + ([api_key] if api_key else [])
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers, auth=auth)
        # httpx logs every request's URL (with its query) at INFO: redact those records while we live
        self._log_filter = RedactingFilter(self._secrets)
        logging.getLogger("httpx").addFilter(self._log_filter)

    def close(self) -> None:
        self._http.close()
        logging.getLogger("httpx").removeFilter(self._log_filter)

    def _clean(self, text: str) -> str:
        return redact_text(text, self._secrets)

    def complete(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
                 seed: int) -> tuple[str, str, int | None]:
        """-> (content, "stop" | "length", completion tokens or None); retries transient failures."""
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, **self.extra_body}
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(min(self.backoff_s * 2 ** (attempt - 1), 60.0))
            try:
                resp = self._http.post(self._post_url, json=body)
            except httpx.TransportError as exc:
                last = self._clean(f"{type(exc).__name__}: {exc}")
                continue
            if resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code != 200:
                raise GenerationError(f"server {self.url} answered HTTP {resp.status_code} "
                                      f"({self._clean(resp.text[:200])!r}); check generation.base_url and "
                                      f"generation.model")
            return self._parse(resp)
        raise GenerationError(f"cannot get a completion from {self.url} after {self.max_retries + 1} attempts "
                              f"({last}); start the OpenAI-compatible server or fix generation.base_url")

    def _parse(self, resp) -> tuple[str, str, int | None]:
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise GenerationError(f"server {self.url} sent a reply that is not a chat completion "
                                  f"({self._clean(resp.text[:200])!r}); is it an OpenAI-compatible "
                                  f"server?") from None
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        usage = data.get("usage") or {}
        return content, finish, usage.get("completion_tokens")


def _openai_row(client: ChatClient, p: Prompt, max_new_tokens: int, temperature: float, top_p: float,
                seed: int) -> dict:
    rec = new_record(p)
    for t in range(len(p.turns)):
        messages = build_messages(p.system, p.turns[: t + 1], rec["responses"])
        content, finish, n = client.complete(messages, max_new_tokens, temperature, top_p,
                                             derive_seed(seed, p.row_id, t))
        rec["responses"].append(content)
        rec["finish_reasons"].append(finish)
        rec["num_tokens"].append(n if n is not None else 0)
    return rec


def generate_openai(prompts: list[Prompt], client: ChatClient, glog: GenerationLog, done: dict[str, dict],
                    concurrency: int = 8, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0) -> int:
    """Fill ``done`` through the server, ``concurrency`` requests at a time; returns completion tokens."""
    todo = [p for p in prompts if p.row_id not in done]
    log.info("openai generation: %d prompts to do at %s (%d already done)", len(todo), client.url,
             len(prompts) - len(todo))
    tokens, start = 0, time.perf_counter()

    def request(p: Prompt) -> dict:
        return _openai_row(client, p, max_new_tokens, temperature, top_p, seed)

    with tqdm(total=len(todo), unit="row", desc="generate", dynamic_ncols=True) as bar, \
            closing(run_on_threads(request, todo, concurrency, "dspark-request")) as finished:
        for rec in finished:
            glog.append([rec])
            done[rec["row_id"]] = rec
            tokens += sum(rec["num_tokens"])
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    return tokens
