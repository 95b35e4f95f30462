"""Offline target cache: per-token tapped hidden states and final hidden state, sharded safetensors.

Layout of ``<cache_dir>/``::

    manifest.json            CacheManifest (data_prep/manifest.py): target id/revision, tap_layer_ids +
                             convention (dspark_model.target.TAP_CONVENTION), final-hidden convention,
                             storage dtype, sizes, dataset fingerprint, shard list, complete flag
    shard-00000.safetensors  rows [row_start, row_end) of the dataset, tokens concatenated:
        tap_hidden   (N, k*d)   storage dtype       tap_hidden_scale   int8: (N, k) fp16; float8: (k,) fp32
        final_hidden (N, d)     storage dtype       final_hidden_scale int8: (N, 1) fp16; float8: (1,) fp32
        offsets      (rows + 1,) int64: token offset of each row inside the shard

Storage dtypes (bytes per token for k taps of width d):

- ``float32`` 4(k+1)d, ``bfloat16`` and ``float16`` 2(k+1)d (float16 values are clamped to its range).
- ``float8`` (k+1)d, exactly half of bf16: float8_e4m3fn values with one fp32 absmax scale per shard and
  tapped layer (and one for the final state), a (k+1) * 4 byte constant per shard. Values are divided by
  absmax / 448 before the cast, so a value comes back within 2^-4 of itself (3 mantissa bits, round to
  nearest) plus 2^-10 * absmax / 448 (the subnormal step). Use it to meet "at most half of bf16".
- ``int8`` (k+1)d + 2(k+1): symmetric absmax quantisation per token and tapped layer (and per token for
  the final state), one fp16 scale each, so a value comes back within absmax / 254 of the original. The
  per-token scales put it slightly above half of bf16 (0.5017 at SmolLM2's width 576); kept so existing
  caches stay readable.

The reader always returns float32. The final hidden state is stored after the target's final norm (the
trainer applies lm_head).

Shards are sized in bytes (``cache.shard_bytes``, 2 GiB by default; ``cache.shard_tokens`` optionally caps
tokens too), so a shard holds fewer tokens of a wider target. While a shard is written, host memory holds
it once, in its storage dtype: each batch of target states is encoded on the target's device and copied
into the shard's preallocated tensors, and the file is streamed from them (no concatenated or serialised
second copy). float8 is the exception: its per-shard scales need the whole shard first, so the shard waits in
the target's own dtype (bf16 for a bf16 target: twice its stored size) before the chunked cast.

Writing is resumable shard by shard: a shard is written to a temporary file and renamed into place, so a
file that exists is complete; a rerun skips those and keeps the shard layout the cache was started with
(caches written when shards were sized in tokens finish and load unchanged). The estimated size is logged
first and the run stops if the disk cannot hold it.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import struct
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep.errors import CacheError, CacheMismatchError
from data_prep.manifest import CacheManifest
from data_prep.store import read_json
from data_prep.threads import run_on_threads
from dspark_model.record import RecordError
from dspark_model.target import FINAL_HIDDEN_CONVENTION, TAP_CONVENTION, dtype_name

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB of payload per shard file
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "int8": torch.int8, "float8": torch.float8_e4m3fn}
_FP16_MAX = torch.finfo(torch.float16).max
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def bytes_per_token(num_taps: int, hidden_size: int, dtype: str) -> int:
    """Bytes one token takes in the cache (taps + final state, plus int8's per-token scales).

    float8's scales are per shard, not per token: see ``bytes_per_shard``.
    """
    values = (num_taps + 1) * hidden_size
    if dtype == "int8":
        return values + 2 * (num_taps + 1)
    return values * STORAGE_DTYPES[dtype].itemsize


def bytes_per_shard(num_taps: int, dtype: str) -> int:
    """Constant bytes per shard outside the per-token payload: float8's fp32 scales (offsets not counted)."""
    return 4 * (num_taps + 1) if dtype == "float8" else 0


def quantize_int8(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float -> int8 (N, D) and fp16 scales (N, groups), one absmax scale per row and group."""
    n, d = x.shape
    xg = x.float().reshape(n, groups, d // groups)  # (N, G, D/G)
    absmax = xg.abs().amax(dim=-1)  # (N, G)
    scale = (absmax / 127).clamp(max=_FP16_MAX).to(torch.float16)  # (N, G)
    # Where fp16 rounding made the scale too small, step it up one ulp so |x| / scale stays <= 127.
    low = scale.float() * 127 < absmax
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, _FP16_MAX)), scale)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)  # (N, G, 1)
    q = (xg / s).round().clamp(-127, 127).to(torch.int8).reshape(n, d)  # (N, D)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, d = q.shape
    groups = scale.shape[-1]
    return (q.float().reshape(n, groups, d // groups) * scale.float().unsqueeze(-1)).reshape(n, d)


def quantize_fp8(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float -> float8_e4m3fn (N, D) and fp32 absmax scales (groups,), one per group over all rows."""
    n, d = x.shape
    xg = x.float().reshape(n, groups, d // groups)  # (N, G, D/G)
    scale = xg.abs().amax(dim=(0, 2)) if n else torch.zeros(groups)  # (G,)
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)  # (G,) an all-zero group keeps a usable scale
    y = (xg / (scale / _FP8_MAX).view(1, groups, 1)).clamp(-_FP8_MAX, _FP8_MAX)  # (N, G, D/G) in [-448, 448]
    return y.to(torch.float8_e4m3fn).reshape(n, d), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, d = q.shape
    groups = scale.numel()
    step = (scale.float() / _FP8_MAX).view(1, groups, 1)  # (1, G, 1)
    return (q.float().reshape(n, groups, d // groups) * step).reshape(n, d)


def encode(name: str, x: torch.Tensor, dtype: str, groups: int) -> dict[str, torch.Tensor]:
    """Tensors to store for one (N, D) float block under ``name``."""
    if dtype in ("int8", "float8"):
        q, scale = (quantize_int8 if dtype == "int8" else quantize_fp8)(x, groups)
        return {name: q.contiguous(), f"{name}_scale": scale.contiguous()}
    if dtype == "float16":  # clamp in fp32: a bf16 tensor would round the bound 65504 up to 65536 (-> inf)
        x = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    return {name: x.to(STORAGE_DTYPES[dtype]).contiguous()}


def decode(values: torch.Tensor, scale: torch.Tensor | None, dtype: str = "int8", upcast: bool = True) -> torch.Tensor:
    """Stored values (and their scales, if any) -> float32. ``upcast=False`` returns unscaled storage dtypes
    (float32 / bfloat16 / float16) as stored, so a reader can move half the bytes and convert on the device."""
    if scale is None:
        return values.float() if upcast else values
    return dequantize_fp8(values, scale) if dtype == "float8" else dequantize_int8(values, scale)


def plan_shards(lengths: Sequence[int], bytes_per_token: int, shard_bytes: int,
                shard_tokens: int | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges whose payload stays within ``shard_bytes`` (and ``shard_tokens`` tokens when
    set); a row larger than that alone gets a shard of its own (at least one row per shard)."""
    cap = max(1, shard_bytes // max(1, bytes_per_token))  # tokens that fit in shard_bytes
    if shard_tokens:
        cap = min(cap, shard_tokens)
    shards, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if tokens and tokens + n > cap:
            shards.append((start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        shards.append((start, len(lengths)))
    return shards


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _shard_done(path: Path, row_start: int, row_end: int, fingerprint: str) -> bool:
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable leftover: rewrite it
        return False
    return meta.get("rows") == f"{row_start}:{row_end}" and meta.get("dataset_fingerprint") == fingerprint


def _check_space(cache_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise CacheError(f"target cache needs about {_fmt_bytes(needed)} more at {cache_dir} but only "
                         f"{_fmt_bytes(free)} is free; free disk space, choose a smaller cache.dtype "
                         f"(float8 or bfloat16), or set cache.dir to another disk")


def _row_batches(rows: Sequence[Sequence[int]], batch_tokens: int) -> list[tuple[int, int, int]]:
    """Consecutive (start, end, width) batches of at most ``batch_tokens`` padded tokens (one row at least)."""
    batches, i = [], 0
    while i < len(rows):
        j, width = i, 0
        while j < len(rows) and (j == i or max(width, len(rows[j])) * (j - i + 1) <= batch_tokens):
            width = max(width, len(rows[j]))
            j += 1
        batches.append((i, j, width))
        i = j
    return batches


@torch.no_grad()
def _forward_batch(target, rows: Sequence[Sequence[int]], width: int, dtype: str, k: int) -> dict:
    """The target over one right-padded batch -> its rows' tokens concatenated, (n, k*d) taps and (n, d) final
    states, encoded for ``dtype`` on the target's device and then copied to the CPU (so only storage-dtype
    bytes cross to the host). float8 returns the states unencoded, in the target's dtype (see module doc)."""
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.as_tensor(row)
        mask[b, : len(row)] = 1
    out = target.forward(ids.to(target.device), attention_mask=mask.to(target.device))
    taps = torch.cat([out.tap_hidden[b, : len(row)] for b, row in enumerate(rows)])  # (n, k*d)
    finals = torch.cat([out.final_hidden[b, : len(row)] for b, row in enumerate(rows)])  # (n, d)
    if dtype == "float8":
        encoded = {"tap_hidden": taps, "final_hidden": finals}
    else:
        encoded = {**encode("tap_hidden", taps, dtype, k), **encode("final_hidden", finals, dtype, 1)}
    return {name: t.to("cpu") for name, t in encoded.items()}


def _empty_shard(n: int, k: int, d: int, dtype: str, staging: torch.dtype) -> dict[str, torch.Tensor]:
    """The preallocated tensors one shard of ``n`` tokens fills batch by batch (offsets added at the end)."""
    if dtype == "float8":  # staged unencoded until the shard's scales are known
        return {"tap_hidden": torch.empty(n, k * d, dtype=staging), "final_hidden": torch.empty(n, d, dtype=staging)}
    store = STORAGE_DTYPES[dtype]
    out = {"tap_hidden": torch.empty(n, k * d, dtype=store), "final_hidden": torch.empty(n, d, dtype=store)}
    if dtype == "int8":
        out.update(tap_hidden_scale=torch.empty(n, k, dtype=torch.float16),
                   final_hidden_scale=torch.empty(n, 1, dtype=torch.float16))
    return out


def _fp8_in_chunks(staged: torch.Tensor, groups: int, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` of (N, D) ``staged`` with the same per-group scales and values, converted ``chunk``
    rows at a time so no float32 copy of the whole shard is made."""
    n, d = staged.shape
    absmax = torch.zeros(groups)
    for a in range(0, n, chunk):
        part = staged[a:a + chunk].float().reshape(-1, groups, d // groups)  # (c, G, D/G)
        absmax = torch.maximum(absmax, part.abs().amax(dim=(0, 2)))
    scale = absmax.clamp_min(torch.finfo(torch.float32).tiny)  # (G,) as quantize_fp8
    q = torch.empty(n, d, dtype=torch.float8_e4m3fn)
    step = (scale / _FP8_MAX).view(1, groups, 1)  # (1, G, 1)
    for a in range(0, n, chunk):
        part = staged[a:a + chunk].float().reshape(-1, groups, d // groups)
        q[a:a + chunk] = (part / step).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).reshape(-1, d)
    return q, scale


def _shard_tensors(target, rows: Sequence[Sequence[int]], dtype: str, batch_tokens: int, bar,
                   workers: int = 1) -> dict:
    """Run the target over ``rows`` (batched, right padded; ``workers`` batches at once on threads, results in
    row order) and fill one shard's tensors in place."""
    k, d = len(target.tap_layer_ids), target.hidden_size
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row))
    tensors = _empty_shard(offsets[-1], k, d, dtype, target.dtype)

    def run(batch: tuple[int, int, int]):
        i, j, width = batch
        return i, _forward_batch(target, rows[i:j], width, dtype, k)

    with closing(run_on_threads(run, _row_batches(rows, batch_tokens), workers, "dspark-cache", ordered=True)) as out:
        for i, encoded in out:
            a = offsets[i]
            n = encoded["tap_hidden"].shape[0]
            for name, t in encoded.items():
                tensors[name][a:a + n].copy_(t)
            bar.update(n)
    if dtype == "float8":
        for name, groups in (("tap_hidden", k), ("final_hidden", 1)):
            staged = tensors.pop(name)
            tensors[name], tensors[f"{name}_scale"] = _fp8_in_chunks(staged, groups)
            del staged
    tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
    return tensors


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                       torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64"}


def save_shard(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file, streaming each tensor's bytes from its own memory
    (``safetensors.torch.save_file`` first builds a bytes copy of every tensor: a second shard in RAM)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as the format


def write_cache(target, rows: Sequence[Sequence[int]], cache_dir: str | Path, dtype: str = "bfloat16",
                target_id: str = "", target_revision: str | None = None, dataset_fingerprint: str = "",
                shard_bytes: int = DEFAULT_SHARD_BYTES, shard_tokens: int | None = None, batch_tokens: int = 8192,
                overwrite: bool = False, workers: int = 1) -> CacheManifest:
    """Write (or finish) the cache of ``rows`` (token id lists, dataset order); returns the manifest.
    Shards hold at most ``shard_bytes`` of payload (and ``shard_tokens`` tokens when set); ``workers``:
    target forwards run at once on threads (the cache is the same for any value)."""
    if dtype not in STORAGE_DTYPES:
        raise CacheError(f"cache.dtype={dtype!r} is not a storage dtype; choose one of {sorted(STORAGE_DTYPES)}")
    cache_dir = Path(cache_dir)
    if overwrite:
        shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if shard_bytes < 1 or (shard_tokens is not None and shard_tokens < 1):
        raise CacheError(f"cache.shard_bytes must be >= 1 (got {shard_bytes}) and cache.shard_tokens null or "
                         f">= 1 (got {shard_tokens})")
    lengths = [len(r) for r in rows]
    bpt = bytes_per_token(len(target.tap_layer_ids), target.hidden_size, dtype)
    bps = bytes_per_shard(len(target.tap_layer_ids), dtype)
    shards = plan_shards(lengths, bpt, shard_bytes, shard_tokens)
    manifest = CacheManifest(
        target={"id": target_id, "revision": target_revision}, tap_layer_ids=list(target.tap_layer_ids),
        dtype=dtype, hidden_size=target.hidden_size, num_taps=len(target.tap_layer_ids), rows=len(rows),
        tokens=sum(lengths), bytes_per_token=bpt, bytes_per_shard=bps,
        int8_scales="per token and tap, fp16" if dtype == "int8" else None,
        float8_scales="per shard and tap, fp32 absmax" if dtype == "float8" else None,
        dataset_fingerprint=dataset_fingerprint, compute_dtype=dtype_name(target.dtype),
        shards=[{"file": _shard_name(s), "row_start": a, "row_end": b, "tokens": sum(lengths[a:b])}
                for s, (a, b) in enumerate(shards)])
    manifest.shards = _started_layout(cache_dir, manifest.to_dict())
    shards = [(s["row_start"], s["row_end"]) for s in manifest.shards]
    _check_existing(cache_dir, manifest.to_dict())
    done = [_shard_done(cache_dir / s["file"], s["row_start"], s["row_end"], dataset_fingerprint)
            for s in manifest.shards]
    todo_tokens = sum(s["tokens"] for s, d in zip(manifest.shards, done) if not d)
    log.info("target cache: %d tokens x %d bytes/token (%s) = about %s in %d shard(s); %d shard(s) to write",
             manifest.tokens, bpt, dtype, _fmt_bytes(manifest.tokens * bpt + len(shards) * bps),
             len(shards), done.count(False))
    _check_space(cache_dir, todo_tokens * bpt + done.count(False) * bps)
    manifest.write(cache_dir / MANIFEST_NAME)  # complete=False until every shard is in place
    with tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc="cache", dynamic_ncols=True) as bar:
        for s, finished in zip(manifest.shards, done):
            if finished:
                continue
            a, b = s["row_start"], s["row_end"]
            tensors = _shard_tensors(target, rows[a:b], dtype, batch_tokens, bar, workers)
            tmp = cache_dir / (s["file"] + ".tmp")
            save_shard(tensors, tmp, metadata={"rows": f"{a}:{b}", "dataset_fingerprint": dataset_fingerprint,
                                               "dtype": dtype})
            del tensors  # the next shard's tensors are allocated only after this one is released
            os.replace(tmp, cache_dir / s["file"])
    manifest.complete = True
    manifest.write(cache_dir / MANIFEST_NAME)
    return manifest


def _started_layout(cache_dir: Path, manifest: dict) -> list[dict]:
    """The shard list to write: the one an existing cache of the same data, target and dtype was started
    with (its shard files stay valid whatever the sizing settings are now), else the new plan."""
    path = cache_dir / MANIFEST_NAME
    if not path.exists():
        return manifest["shards"]
    old = read_json(path)
    same = all(old.get(key) == manifest.get(key)
               for key in ("dataset_fingerprint", "dtype", "target", "tap_layer_ids", "hidden_size", "rows"))
    same = same and old.get("compute_dtype") in (None, manifest.get("compute_dtype"))
    if not same or not old.get("shards") or old["shards"] == manifest["shards"]:
        return manifest["shards"]
    log.info("target cache: keeping the %d-shard layout this cache was started with", len(old["shards"]))
    return old["shards"]


def _check_existing(cache_dir: Path, manifest: dict) -> None:
    """A cache folder may only be resumed with the same data, target and dtype."""
    path = cache_dir / MANIFEST_NAME
    if not path.exists():
        return
    old = read_json(path)
    for key in ("dataset_fingerprint", "dtype", "target", "tap_layer_ids", "hidden_size", "shards",
                "compute_dtype"):
        if old.get(key) != manifest.get(key) and not (key == "compute_dtype" and old.get(key) is None):
            raise CacheError(f"{cache_dir} holds a cache with another {key} ({json.dumps(old.get(key))[:80]}); "
                             f"delete it or set cache.overwrite=true to rebuild it")


class TargetCache:
    """Reader: ``cache[i]`` -> {"tap_hidden": (T, k*d) fp32, "final_hidden": (T, d) fp32} for dataset row i."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheError(f"no target cache at {self.path} (manifest.json missing); build one with "
                             f"`python -m data_prep cache.enabled=true` or fix the path")
        try:
            self.manifest = CacheManifest.read(manifest_path)
        except RecordError as exc:
            raise CacheError(str(exc)) from None
        if not self.manifest.complete:
            raise CacheError(f"target cache at {self.path} is incomplete; rerun data_prep with "
                             f"cache.enabled=true to finish it")
        self._starts = [s["row_start"] for s in self.manifest.shards]
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.manifest.rows

    def _shard(self, s: int):
        if s not in self._open:
            from safetensors import safe_open

            handle = safe_open(str(self.path / self.manifest.shards[s]["file"]), framework="pt")
            scales = ({n: handle.get_tensor(f"{n}_scale") for n in ("tap_hidden", "final_hidden")}
                      if self.manifest.dtype == "float8" else {})  # per-shard fp32 scales
            self._open[s] = (handle, handle.get_tensor("offsets").tolist(), scales)
        return self._open[s]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.row(i)

    def row(self, i: int, upcast: bool = True) -> dict[str, torch.Tensor]:
        """Row ``i``'s (T, k*d) tap and (T, d) final states: float32, or with ``upcast=False`` the storage dtype
        when it needs no scales (int8 / float8 rows are always dequantised to float32)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is outside the cache's {len(self)} rows")
        s = bisect.bisect_right(self._starts, i) - 1
        handle, offsets, shard_scales = self._shard(s)
        local = i - self._starts[s]
        a, b = offsets[local], offsets[local + 1]
        out, dtype = {}, self.manifest.dtype
        for name in ("tap_hidden", "final_hidden"):
            values = handle.get_slice(name)[a:b]
            scale = handle.get_slice(f"{name}_scale")[a:b] if dtype == "int8" else shard_scales.get(name)
            out[name] = decode(values, scale, dtype, upcast)  # (T, k*d) / (T, d)
        return out

    def check_compatible(self, target_id: str, tap_layer_ids: Sequence[int], hidden_size: int) -> None:
        """Raise ``CacheMismatchError`` naming every field that differs from the draft's target."""
        m = self.manifest
        problems = []
        if m.target["id"] != target_id:
            problems.append(f"target {m.target['id']!r} != {target_id!r}")
        if list(m.tap_layer_ids) != list(tap_layer_ids):
            problems.append(f"tap_layer_ids {m.tap_layer_ids} != {list(tap_layer_ids)}")
        if m.tap_layer_convention != TAP_CONVENTION:
            problems.append(f"tap_layer_convention {m.tap_layer_convention!r} != {TAP_CONVENTION!r}")
        if m.hidden_size != int(hidden_size):
            problems.append(f"hidden_size {m.hidden_size} != {hidden_size}")
        if m.final_hidden != FINAL_HIDDEN_CONVENTION:
            problems.append(f"final_hidden {m.final_hidden!r} != {FINAL_HIDDEN_CONVENTION!r}")
        if problems:
            raise CacheMismatchError(f"target cache {self.path} does not match the draft: "
                                     f"{'; '.join(problems)}; rebuild it with python -m data_prep "
                                     f"target=<this target> cache.enabled=true")
