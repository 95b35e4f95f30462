"""Batched decoding for the local backend: plain greedy or temperature / top-p sampling, nothing else.

Why not ``model.generate``: ``generate`` merges the model's own ``generation_config`` into the request, so a
checkpoint that ships ``repetition_penalty`` or ``top_k`` there silently changes what "greedy" means. This
loop applies exactly the settings it is given. It is also faster on CPU (measured in
``benchmarks/data_prep_throughput.py``):

* the KV cache is written into a buffer allocated once per batch (``SlotLayer``) instead of growing by
  ``torch.cat``, which copies the whole cache every step (profiled on SmolLM2 at batch 64 on CPU: about
  40 % of a decode step);
* prompts are prefilled in groups of similar length, each padded only to its own longest prompt, and
  their keys / values placed right-aligned in the batch's buffer (left padding, masked);
* rows that stopped are dropped from the batch once that saves at least one step of work.

Models with sliding-window or other non-plain cache layers fall back to ``DynamicCache`` and one prefill.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

PREFILL_TOKENS = 2048  # padded tokens per prefill forward (rows grouped by length up to this budget)


class SlotLayer(DynamicLayer):
    """A full-attention cache layer backed by one (B, H, capacity, D) buffer per keys / values.

    ``keys`` / ``values`` are views of the filled slots, so attention reads exactly what a ``DynamicLayer``
    would hold; appending writes in place.
    """

    def __init__(self, batch_size: int, capacity: int):
        super().__init__()
        self.batch_size, self.capacity, self.filled = batch_size, capacity, 0
        self._k = self._v = None

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        heads = k.shape[1]
        self._k = k.new_zeros(self.batch_size, heads, self.capacity, k.shape[-1])  # (B, H, S, D)
        self._v = v.new_zeros(self.batch_size, heads, self.capacity, v.shape[-1])
        self.device, self.is_initialized = k.device, True

    def _expose(self) -> None:
        self.keys, self.values = self._k[:, :, : self.filled], self._v[:, :, : self.filled]

    def place(self, rows: torch.Tensor, end: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a prefill group's states (g, H, w, D) into slots [end - w, end) of ``rows``."""
        if self._k is None:
            self._allocate(k, v)
        self._k[rows, :, end - k.shape[-2]: end] = k
        self._v[rows, :, end - v.shape[-2]: end] = v

    def set_filled(self, filled: int) -> None:
        self.filled = filled
        self._expose()

    def update(self, key_states, value_states, *args, **kwargs):
        if self._k is None:
            self._allocate(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} slots overflows at {end}; this is a bug in "
                               f"data_prep.decode (capacity must cover prompt width + max_new_tokens)")
        self._k[:, :, self.filled: end] = key_states
        self._v[:, :, self.filled: end] = value_states
        self.set_filled(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self.batch_size = self._k.shape[0]
            self._expose()

    reorder_cache = batch_select_indices

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SlotLayer is append-only (data_prep decoding never rolls back)")


def slot_cache(model, batch_size: int, capacity: int) -> DynamicCache | None:
    """A DynamicCache whose layers are SlotLayers, or None when the model needs other layer kinds."""
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding windows, linear attention, KV sharing...: keep transformers' own layers
    cache.layers = [SlotLayer(batch_size, capacity) for _ in cache.layers]
    return cache


def pick_next(logits: torch.Tensor, temperature: float, top_p: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(b, V) logits -> (b,) next tokens: argmax at temperature 0, else a temperature / top-p sample drawn
    from ``generator`` (torch's global RNG when None)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (b, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always survives
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (g, w)
    mask = torch.zeros_like(ids)  # (g, w)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids, mask


def _prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices sorted by prompt length, cut so that each group pads to at most PREFILL_TOKENS tokens."""
    groups, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > PREFILL_TOKENS:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current]


def _prefill(model, prompts: list[list[int]], pad_id: int, capacity: int, device):
    """Fill a cache with the prompts -> (cache, attention mask (B, capacity), last logits (B, V))."""
    B, width = len(prompts), max(map(len, prompts))
    mask = torch.zeros(B, capacity, dtype=torch.long, device=device)  # (B, S)
    cache = slot_cache(model, B, capacity)
    if cache is None:  # one left-padded forward over the whole batch
        ids, m = _left_pad(prompts, pad_id)
        ids, m = ids.to(device), m.to(device)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), cache=cache,
                    use_cache=True, logits_to_keep=1)
        mask[:, :width] = m
        return cache, mask, out.logits[:, -1]
    logits = None
    for group in _prefill_groups([len(p) for p in prompts]):
        ids, m = _left_pad([prompts[i] for i in group], pad_id)
        ids, m = ids.to(device), m.to(device)
        part = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), cache=part,
                    use_cache=True, logits_to_keep=1)
        rows = torch.tensor(group, device=device)
        for layer, filled in zip(cache.layers, part.layers):
            layer.place(rows, width, filled.keys, filled.values)
        mask[rows, width - ids.shape[1]: width] = m
        if logits is None:
            logits = out.logits.new_empty(B, out.logits.shape[-1])  # (B, V)
        logits[rows] = out.logits[:, -1]
    for layer in cache.layers:
        layer.set_filled(width)
    return cache, mask, logits


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], pad_id: int, stop_ids: set[int], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[tuple[list[int], str]]:
    """Decode a batch of prompts -> per row (new tokens incl. the stop token, "stop" | "length").

    Sampling draws from ``generator`` (a seeded one gives reproducible samples, also when several batches are
    decoded at once on threads), or from torch's global RNG when None.
    """
    device = next(model.parameters()).device
    width = max(map(len, prompt_ids))
    cache, mask, logits = _prefill(model, prompt_ids, pad_id, width + max_new_tokens, device)
    position = torch.tensor([len(p) for p in prompt_ids], device=device)  # (b,) next position per row
    active = list(range(len(prompt_ids)))  # batch slot -> row
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    finish = ["length"] * len(prompt_ids)
    for step in range(max_new_tokens):
        nxt = pick_next(logits, temperature, top_p, generator)  # (b,)
        for slot, token in enumerate(nxt.tolist()):
            row = active[slot]
            if finish[row] == "length":  # a row kept in the batch after its stop token ignores the rest
                tokens[row].append(token)
                finish[row] = "stop" if token in stop_ids else "length"
        done = [s for s, row in enumerate(active) if finish[row] == "stop"]
        steps_left = max_new_tokens - step - 1
        if steps_left == 0 or len(done) == len(active):
            break
        if done and len(done) * steps_left >= len(active):  # dropping them saves at least one step of work
            keep = [s for s, row in enumerate(active) if finish[row] == "length"]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, position, nxt = mask[index], position[index], nxt[index]
            active = [active[s] for s in keep]
        mask[:, width + step] = 1
        out = model(input_ids=nxt[:, None], attention_mask=mask[:, : width + step + 1],
                    position_ids=position[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1]  # (b, V)
        position = position + 1
    return list(zip(tokens, finish))
