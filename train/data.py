"""Training data: data_prep's tokenized rows, the optional target cache, batching and a resumable order.

Order: each epoch is a seeded permutation of the rows; optimizer step s takes the next ``global_batch_size``
rows of it (a short last slice is dropped). The rows of a step are sorted by length and cut into
micro-batches; micro-batch i goes to process i mod world_size. So the data order is a pure function of
(seed, step) — resuming needs no sampler state — and one process with gradient accumulation sees exactly
the micro-batches that several processes see together.

For random (tiny) targets a missing data folder is replaced by rows sampled from the target itself, so
``python -m train target=tiny`` runs with nothing prepared.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.anchors import anchor_candidates

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Training data is missing or unusable; the message says how to make it."""


def default_data_dir(prompts_name: str, target_id: str) -> Path:
    """data_prep's default output folder: runs/data/<prompts>-<last part of the target id, lowercased>."""
    tail = (target_id or "target").rstrip("/").split("/")[-1].lower()
    return Path("runs") / "data" / re.sub(r"[^a-z0-9._-]+", "-", f"{prompts_name}-{tail}")


@dataclass
class TrainData:
    input_ids: list[torch.Tensor]  # per row (T_i,) long
    loss_mask: list[torch.Tensor]  # per row (T_i,) long
    rows: list[int]  # dataset row index of each entry (for the target cache)
    fingerprint: str
    origin: str  # the data folder, or "synthetic"
    cache: object | None = None  # data_prep.cache.TargetCache in offline mode
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def content_fingerprint(input_ids: list[torch.Tensor], loss_mask: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for ids, m in zip(input_ids, loss_mask):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(m, dtype=np.int8).tobytes())
    return h.hexdigest()


def load_data_dir(path: Path, max_length: int, limit: int | None) -> TrainData:
    """Rows of a data_prep output folder, truncated to ``max_length``; rows with no anchor are skipped."""
    from data_prep.store import load_tokenized

    ds, manifest = load_tokenized(path)
    missing = {"input_ids", "loss_mask"} - set(ds.column_names)
    if missing:
        raise DataError(f"{path}/dataset lacks column(s) {sorted(missing)}; regenerate it with python -m data_prep")
    n = len(ds) if limit is None else min(limit, len(ds))
    ids_col, mask_col = ds["input_ids"][:n], ds["loss_mask"][:n]
    ids_out, mask_out, rows = [], [], []
    for i, (ids, mask) in enumerate(zip(ids_col, mask_col)):
        ids_t = torch.as_tensor(ids[:max_length], dtype=torch.long)
        mask_t = torch.as_tensor(mask[:max_length], dtype=torch.long)
        if anchor_candidates(mask_t).numel() == 0:
            continue
        ids_out.append(ids_t)
        mask_out.append(mask_t)
        rows.append(i)
    if not ids_out:
        raise DataError(f"{path}: no row has two consecutive supervised tokens; check data_prep's loss masks")
    log.info("data: %d rows (%d skipped without anchors) from %s", len(rows), n - len(rows), path)
    return TrainData(ids_out, mask_out, rows, manifest.get("fingerprint", ""), str(path), None, manifest)


@torch.no_grad()
def synthesize(target, rows: int, response_tokens: int, seed: int) -> TrainData:
    """Rows sampled from a (tiny) target: ChatML user prompt of random letters, then a sampled response.

    Responses are cut to a seeded length in [response_tokens/3, response_tokens] and end with EOS; the loss
    mask covers the response and its EOS, as data_prep's would.
    """
    tok = target.tokenizer
    gen = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    prompts = ["".join(gen.choice(letters, 24)) for _ in range(rows)]
    enc = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                   return_dict=True)["input_ids"] for p in prompts]
    prompt = torch.tensor(enc, dtype=torch.long, device=target.device)  # (rows, P): same length (byte-level)
    sampled = _sample(target.model, prompt, response_tokens, seed).cpu()  # (rows, R)
    lengths = gen.integers(max(2, response_tokens // 3), response_tokens + 1, size=rows)
    ids_out, mask_out = [], []
    P = prompt.shape[1]
    for r in range(rows):
        resp = sampled[r, : int(lengths[r])]
        ids = torch.cat([prompt[r].cpu(), resp, torch.tensor([tok.eos_token_id])])
        mask = torch.cat([torch.zeros(P, dtype=torch.long), torch.ones(resp.numel() + 1, dtype=torch.long)])
        ids_out.append(ids)
        mask_out.append(mask)
    log.info("data: %d rows sampled from the random target (seed %d)", rows, seed)
    return TrainData(ids_out, mask_out, list(range(rows)), content_fingerprint(ids_out, mask_out), "synthetic")


def _sample(model, prompt: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Ancestral sampling at temperature 1 with a KV cache: (N, P) prompt -> (N, steps) tokens."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    out = model(input_ids=prompt, use_cache=True)
    tokens = []
    for _ in range(steps):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)  # (N, V)
        nxt = torch.multinomial(probs, 1, generator=g)  # (N, 1)
        tokens.append(nxt)
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    return torch.cat(tokens, dim=1)


def open_cache(data: TrainData, path: Path, target, target_id: str) -> None:
    """Attach data_prep's target cache (offline mode), refusing one built for another target or data."""
    from data_prep.cache import TargetCache

    cache = TargetCache(path)
    cache.check_compatible(target_id, target.tap_layer_ids, target.hidden_size)
    fp = cache.manifest.get("dataset_fingerprint")
    if fp and data.fingerprint and fp != data.fingerprint:
        raise DataError(f"target cache {path} was built for other data (fingerprint {fp[:12]} vs "
                        f"{data.fingerprint[:12]}); rebuild it with python -m data_prep cache.enabled=true")
    data.cache = cache


class StepSampler:
    """Rows of optimizer step s: a slice of a per-epoch seeded permutation (see the module docstring)."""

    def __init__(self, num_rows: int, global_batch: int, seed: int):
        if num_rows < global_batch:
            raise DataError(f"the data has {num_rows} usable rows, fewer than train.global_batch_size="
                            f"{global_batch}; lower the batch size or prepare more data")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.steps_per_epoch = num_rows // global_batch
        self._perm: tuple[int, list[int]] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset of the step's first row in that epoch's order)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, k * self.global_batch

    def rows(self, step: int) -> tuple[int, list[int]]:
        epoch, start = self.position(step)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(self.num_rows, generator=g).tolist())
        return epoch, self._perm[1][start: start + self.global_batch]


def micro_batches(rows: list[int], lengths: list[int], micro: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of a step: rows sorted by length (longest first), cut, dealt round-robin."""
    ordered = sorted(rows, key=lambda r: (-lengths[r], r))
    chunks = [ordered[i: i + micro] for i in range(0, len(ordered), micro)]
    return chunks[rank::world]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    loss_mask: torch.Tensor  # (B, T) 0 on padding
    masks: list[torch.Tensor]  # per row (T_i,) unpadded loss masks (anchor sampling)
    indices: list[int]  # indices into TrainData
    tokens: int  # real tokens in the batch
    tap_hidden: torch.Tensor | None = None  # (B, T, k*d) offline mode
    final_hidden: torch.Tensor | None = None  # (B, T, d) offline mode


def collate(data: TrainData, indices: list[int], pad_id: int) -> Batch:
    lengths = [data.input_ids[i].numel() for i in indices]
    B, T = len(indices), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, i in enumerate(indices):
        ids[b, : lengths[b]] = data.input_ids[i]
        mask[b, : lengths[b]] = data.loss_mask[i]
    batch = Batch(ids, mask, [data.loss_mask[i] for i in indices], list(indices), sum(lengths))
    if data.cache is not None:
        rows = [data.cache[data.rows[i]] for i in indices]
        batch.tap_hidden = _pad_stack([r["tap_hidden"][:n] for r, n in zip(rows, lengths)], T)
        batch.final_hidden = _pad_stack([r["final_hidden"][:n] for r, n in zip(rows, lengths)], T)
    return batch


def _pad_stack(parts: list[torch.Tensor], T: int) -> torch.Tensor:
    out = parts[0].new_zeros(len(parts), T, parts[0].shape[-1])  # (B, T, D)
    for b, p in enumerate(parts):
        out[b, : p.shape[0]] = p
    return out
