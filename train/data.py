"""Training data: data_prep's tokenized rows, the optional target cache, batching and a resumable order.

Order: each epoch is a seeded permutation of the rows; optimizer step s takes the next ``global_batch_size``
rows of it (a short last slice is dropped). The rows of a step are sorted by length and cut into
micro-batches, dealt to processes by token count (``micro_batches``). So the data order is a pure function of
(seed, step) — resuming needs no sampler state — and one process with gradient accumulation sees exactly
the micro-batches that several processes see together.

Data made for another target is refused (``check_data_target``). For random (tiny) targets,
``data.synthetic=true`` (``data=synthetic``) samples rows from the target itself, so
``python -m train target=tiny data=synthetic`` runs with nothing prepared; it is never a silent fallback.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import DataManifest
from train.anchors import anchor_candidates

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Training data is missing or unusable; the message says how to make it."""


@dataclass
class TrainData:
    input_ids: list[torch.Tensor]  # per row (T_i,) long
    loss_mask: list[torch.Tensor]  # per row (T_i,) long
    rows: list[int]  # dataset row index of each entry (for the target cache)
    fingerprint: str
    origin: str  # the data folder, or "synthetic"
    cache: object | None = None  # data_prep.cache.TargetCache in offline mode
    manifest: DataManifest | None = None  # None for synthetic rows
    starts: list[int] = field(default_factory=list)  # per row: tokens cut from its start (cache offset); [] = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def content_fingerprint(input_ids: list[torch.Tensor], loss_mask: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for ids, m in zip(input_ids, loss_mask):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(m, dtype=np.int8).tobytes())
    return h.hexdigest()


def load_data_dir(path: Path, max_length: int, limit: int | None) -> TrainData:
    """Rows of a data_prep output folder; rows with no anchor are skipped. A row longer than ``max_length``
    keeps its last ``max_length`` tokens: the answer (at the end) survives and the prompt's start goes, as in
    data_prep. The target cache's states stay valid for the kept tokens (they were computed on the whole row)."""
    from data_prep.store import load_tokenized

    ds, manifest = load_tokenized(path)
    missing = {"input_ids", "loss_mask"} - set(ds.column_names)
    if missing:
        raise DataError(f"{path}/dataset lacks column(s) {sorted(missing)}; regenerate it with python -m data_prep")
    n = len(ds) if limit is None else min(limit, len(ds))
    ids_col, mask_col = ds["input_ids"][:n], ds["loss_mask"][:n]
    ids_out, mask_out, rows, starts = [], [], [], []
    for i, (ids, mask) in enumerate(zip(ids_col, mask_col)):
        start = max(0, len(ids) - max_length)
        ids_t = torch.as_tensor(ids[start:], dtype=torch.long)
        mask_t = torch.as_tensor(mask[start:], dtype=torch.long)
        if anchor_candidates(mask_t).numel() == 0:
            continue
        ids_out.append(ids_t)
        mask_out.append(mask_t)
        rows.append(i)
        starts.append(start)
    if not ids_out:
        raise DataError(f"{path}: no row has two consecutive supervised tokens; check data_prep's loss masks")
    log.info("data: %d rows (%d skipped without anchors) from %s", len(rows), n - len(rows), path)
    if any(starts):
        log.info("data: %d rows longer than data.max_length=%d keep their last %d tokens (prompt start cut)",
                 sum(1 for x in starts if x), max_length, max_length)
    return TrainData(ids_out, mask_out, rows, manifest.fingerprint, str(path), None, manifest, starts)


def check_data_target(manifest: DataManifest, path: Path, spec, target, allow_mismatch: bool) -> None:
    """Refuse data that data_prep made for another target: its manifest's target id, revision (when both
    are known) and tokenizer hash must match the target trained against. ``allow_mismatch`` warns instead."""
    from data_prep.chat import tokenizer_sha256
    from dspark_model.identity import refuse_mismatch

    made = manifest.target
    problems = []
    if made.get("id") != spec.id:
        problems.append(f"id {made.get('id')!r} there, {spec.id!r} here")
    if made.get("revision") and spec.revision and made["revision"] != spec.revision:
        problems.append(f"revision {made['revision']} there, {spec.revision} here")
    if made.get("tokenizer_sha256") and made["tokenizer_sha256"] != tokenizer_sha256(target.tokenizer):
        problems.append("a different tokenizer (token ids mean other tokens)")
    refuse_mismatch(f"data at {path} was prepared", problems, allow_mismatch, "data.allow_target_mismatch",
                    "prepare data with `python -m data_prep target=<this target>`", DataError, log)


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
    fp = cache.manifest.dataset_fingerprint
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
    """This process's micro-batches of a step. The step's rows are sorted by length (longest first) and cut
    into micro-batches of similar rows (little padding); the micro-batches are then dealt to processes by
    token count: each in turn (largest first) goes to the process with the fewest tokens so far among those
    still short of their share, so every process runs the same number of micro-batches (gradient accumulation
    stays in step) and the longest rows do not all land on one rank. A pure function of its arguments."""
    ordered = sorted(rows, key=lambda r: (-lengths[r], r))
    chunks = [ordered[i: i + micro] for i in range(0, len(ordered), micro)]
    if world == 1:
        return chunks
    share = -(-len(chunks) // world)  # ceil: a short tail leaves some processes one micro-batch fewer
    size = [sum(lengths[r] for r in c) for c in chunks]
    tokens, mine = [0] * world, [[] for _ in range(world)]
    for c in sorted(range(len(chunks)), key=lambda c: (-size[c], chunks[c][0])):
        k = min((j for j in range(world) if len(mine[j]) < share), key=lambda j: (tokens[j], j))
        mine[k].append(chunks[c])
        tokens[k] += size[c]
    return mine[rank]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    loss_mask: torch.Tensor  # (B, T) 0 on padding
    masks: list[torch.Tensor]  # per row (T_i,) unpadded loss masks (anchor sampling)
    indices: list[int]  # indices into TrainData
    tokens: int  # real tokens in the batch
    tap_hidden: torch.Tensor | None = None  # (B, T, k*d) offline mode
    final_hidden: torch.Tensor | None = None  # (B, T, d) offline mode


def collate(data: TrainData, indices: list[int], pad_id: int, pin: bool = False) -> Batch:
    """Right-padded micro-batch of rows ``indices``. Cached target states keep their storage dtype (a bf16
    cache moves half the bytes of float32; the training step converts on its device); ``pin`` puts every
    tensor in page-locked memory for asynchronous copies to a GPU."""
    lengths = [data.input_ids[i].numel() for i in indices]
    B, T = len(indices), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, i in enumerate(indices):
        ids[b, : lengths[b]] = data.input_ids[i]
        mask[b, : lengths[b]] = data.loss_mask[i]
    batch = Batch(ids, mask, [data.loss_mask[i] for i in indices], list(indices), sum(lengths))
    if data.cache is not None:
        rows = [data.cache.row(data.rows[i], upcast=False) for i in indices]
        starts = [data.starts[i] if data.starts else 0 for i in indices]
        batch.tap_hidden = _pad_stack([r["tap_hidden"][s: s + n] for r, s, n in zip(rows, starts, lengths)], T)
        batch.final_hidden = _pad_stack([r["final_hidden"][s: s + n] for r, s, n in zip(rows, starts, lengths)], T)
    if pin:
        for name in ("input_ids", "loss_mask", "tap_hidden", "final_hidden"):
            if getattr(batch, name) is not None:
                setattr(batch, name, getattr(batch, name).pin_memory())
    return batch


def _pad_stack(parts: list[torch.Tensor], T: int) -> torch.Tensor:
    out = parts[0].new_zeros(len(parts), T, parts[0].shape[-1])  # (B, T, D)
    for b, p in enumerate(parts):
        out[b, : p.shape[0]] = p
    return out
