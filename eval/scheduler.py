"""Verification-budget scheduling: the SPS cost table and the hardware-aware prefix scheduler (Algorithm 1).

Each speculative-decoding step, R active requests each hold a draft block with calibrated prefix survival
a_{r,1} >= ... >= a_{r,gamma} (a_{r,j} = probability that draft tokens 1..j of request r all survive). The
scheduler picks per-request verification lengths l_r in 0..gamma. The target forward then runs over
B = sum_r (1 + l_r) batch tokens (each request always sends its anchor position) and is expected to emit
tau* = sum_r (1 + sum_{j<=l_r} a_{r,j}) tokens, at SPS(B) steps per second: expected throughput
Theta = tau* * SPS(B) tokens/s. SPS(B) is a table profiled once on the actual hardware (``profile_sps``).

Because a_{r,j} is non-increasing in j, admitting (request, position) candidates in descending order of
survival always extends some request's prefix by one, so the greedy path respects prefix order.

Three schedulers, all pure functions of (survival, SPS):
- ``schedule_algorithm1``: paper Algorithm 1, greedy with early stopping. Lossless.
- ``schedule_global``: the same greedy path without the break (best point on the whole path). NOT lossless
  on its own (paper Appendix A): it looks at a_{r,k+1}, which depends on the sampled x_{r,k}, before
  deciding whether x_{r,k} is verified.
- ``schedule_practical``: paper section 5.2, capacity from ``schedule_global`` on survival from two steps
  earlier, then a top-K of the current candidates.

torch is imported only inside the profiling helpers.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

SpsLike = Callable[[int], float] | Mapping


class SpsTable:
    """Target forward steps per second as a function of batch tokens B, from profiled points.

    Lookup interpolates linearly between points and holds the end values constant outside them.
    ``hardware`` optionally records where the points were measured.

    A measured table need not be monotone (on CPUs a 4-token forward can be slower than an 8-token one, as
    matmul kernels change with the shape). A step over B tokens can always be run padded to a larger
    profiled size, so the usable rate at B is the best rate among the sizes >= B: ``steps_per_s`` holds
    that non-increasing envelope, ``measured_steps_per_s`` the raw points. Every policy (Algorithm 1 and
    the fixed lengths it is compared with) is costed with the envelope.
    """

    def __init__(self, points: Mapping | Sequence, hardware: Mapping | None = None):
        items = points.items() if isinstance(points, Mapping) else points
        pairs = sorted((int(b), float(s)) for b, s in items)
        if not pairs:
            raise ValueError("SpsTable: no (batch_tokens, steps_per_s) points")
        batch = np.array([b for b, _ in pairs], dtype=np.int64)
        steps = np.array([s for _, s in pairs], dtype=np.float64)
        if np.any(np.diff(batch) == 0):
            raise ValueError(f"SpsTable: duplicate batch sizes in {batch.tolist()}")
        if np.any(batch < 1) or np.any(~np.isfinite(steps)) or np.any(steps <= 0):
            raise ValueError("SpsTable: batch sizes must be >= 1 and steps/s finite and > 0")
        self.batch_tokens = batch
        self.measured_steps_per_s = steps
        self.steps_per_s = np.maximum.accumulate(steps[::-1])[::-1]  # best rate at any size >= B
        self.hardware = dict(hardware) if hardware else None

    def __call__(self, batch_tokens):
        """SPS at one batch size (float) or at an array of batch sizes (array)."""
        values = np.interp(np.asarray(batch_tokens, dtype=np.float64), self.batch_tokens, self.steps_per_s)
        return float(values) if np.ndim(values) == 0 else values

    def __repr__(self) -> str:
        return f"SpsTable({dict(zip(self.batch_tokens.tolist(), self.steps_per_s.tolist()))})"

    def to_dict(self) -> dict:
        return {"batch_tokens": self.batch_tokens.tolist(), "steps_per_s": self.steps_per_s.tolist(),
                "measured_steps_per_s": self.measured_steps_per_s.tolist(), "hardware": self.hardware}

    @classmethod
    def from_dict(cls, data: Mapping) -> SpsTable:
        """Inverse of ``to_dict``; also accepts a plain {batch_tokens: steps_per_s} mapping (JSON str keys ok)."""
        if "batch_tokens" in data and "steps_per_s" in data:
            steps = data.get("measured_steps_per_s") or data["steps_per_s"]
            return cls(list(zip(data["batch_tokens"], steps)), hardware=data.get("hardware"))
        return cls({int(b): float(s) for b, s in data.items()})


def as_sps(sps: SpsLike) -> Callable:
    """An SPS callable from an SpsTable, any callable B -> steps/s, or a {B: steps/s} mapping."""
    if callable(sps):
        return sps
    if isinstance(sps, Mapping):
        return SpsTable.from_dict(sps)
    raise TypeError(f"SPS must be callable or a mapping, got {type(sps).__name__}")


def sps_values(sps: SpsLike, batch_tokens: np.ndarray) -> np.ndarray:
    """Evaluate SPS at every batch size of a 1-D integer array."""
    sps = as_sps(sps)
    if isinstance(sps, SpsTable):
        return np.atleast_1d(sps(batch_tokens)).astype(np.float64)
    return np.array([float(sps(int(b))) for b in batch_tokens], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# The greedy admission path
# ----------------------------------------------------------------------------------------------------

def as_survival_matrix(survival) -> np.ndarray:
    """Per-request survival vectors as one (R, gamma) float64 matrix, validated.

    Accepts a 2-D array or a list of vectors (ragged lists are right-padded with 0, which is never a
    candidate). Values must lie in [0, 1] and be non-increasing along the block.
    """
    if isinstance(survival, np.ndarray) and survival.ndim == 2:
        matrix = survival.astype(np.float64, copy=False)
    else:
        rows = [np.asarray(row, dtype=np.float64).ravel() for row in survival]
        matrix = np.zeros((len(rows), max((row.size for row in rows), default=0)))
        for r, row in enumerate(rows):
            matrix[r, :row.size] = row
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0) or np.any(matrix > 1):
        raise ValueError("prefix survival must lie in [0, 1]")
    if np.any(np.diff(matrix, axis=1) > 1e-12):
        bad = int(np.flatnonzero(np.any(np.diff(matrix, axis=1) > 1e-12, axis=1))[0])
        raise ValueError(f"prefix survival of request {bad} must be non-increasing along the block: "
                         f"{matrix[bad].tolist()}")
    return matrix


def _sorted_candidates(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates (request, position) with a > 0, sorted by survival, descending.

    The sort is stable over row-major (request, position) order: ties go to the lower request index, and
    within a request to the earlier position, so prefix order holds even when survival plateaus.
    Returns request index, 1-based position and survival, each (n_candidates,).
    """
    flat = matrix.ravel()  # (R * gamma,), request-major
    index = np.flatnonzero(flat > 0)
    index = index[np.argsort(-flat[index], kind="stable")]
    gamma = max(matrix.shape[1], 1)
    return index // gamma, index % gamma + 1, flat[index]


def _greedy_path(survival, sps: SpsLike):
    """Expected throughput along the greedy admission path.

    Returns (R, request, position, theta): request and position (1-based) of the sorted candidates,
    (n_candidates,) each, and theta[i] = Theta after admitting the first i of them (theta[0] = R * SPS(R),
    nothing admitted), shape (n_candidates + 1,).
    """
    matrix = as_survival_matrix(survival)  # (R, gamma)
    n_requests = matrix.shape[0]
    req, pos, val = _sorted_candidates(matrix)
    tau = n_requests + np.concatenate([[0.0], np.cumsum(val)])  # (n+1,)
    batch = n_requests + np.arange(val.size + 1)  # (n+1,)
    theta = tau * sps_values(sps, batch)
    return n_requests, req, pos, theta


def _lengths_from_prefix(n_requests: int, req: np.ndarray, pos: np.ndarray, n_admitted: int) -> np.ndarray:
    """Per-request lengths after admitting the first ``n_admitted`` sorted candidates."""
    lengths = np.zeros(n_requests, dtype=np.int64)
    np.maximum.at(lengths, req[:n_admitted], pos[:n_admitted])
    return lengths


def schedule_algorithm1(survival, sps: SpsLike) -> np.ndarray:
    """Per-request verification lengths l_r (R,) by Algorithm 1 (paper lines 4-15), a pure function.

    Candidates with a > 0 are sorted by survival, descending (stable). Starting from B = R, tau* = R and
    Theta_best = R * SPS(R), each candidate is admitted in turn (l_r = j, B += 1, tau* += a_{r,j}); it is
    kept if Theta = tau* * SPS(B) > Theta_best, otherwise the search stops at once.

    Why the early stop matters (non-anticipation): a_{r,j+1} depends on the sampled draft token x_{r,j}
    through the Markov feature of the confidence head. With the break, (r, j) is admitted iff every
    candidate ranked at or above it improved Theta; those are other requests' candidates and (r, 1..j),
    never (r, j+1..) whose survival reveals x_{r,j} (it ranks below (r, j), ties included, by the stable
    sort). A search over the whole path lets later candidates decide (``schedule_global``, Appendix A).
    Early stopping reaches the global maximum only when Theta is unimodal along the path.

    The whole path is evaluated in one vectorised pass; the result equals the step-by-step loop because
    only the prefix before the first non-improvement is used.
    """
    n_requests, req, pos, theta = _greedy_path(survival, sps)
    improves = theta[1:] > theta[:-1]  # (n,): admitting candidate i beats the best so far, theta[i]
    n_admitted = int(np.argmin(improves)) if not improves.all() else improves.size
    return _lengths_from_prefix(n_requests, req, pos, n_admitted)


def schedule_global(survival, sps: SpsLike) -> np.ndarray:
    """Lengths (R,) at the best Theta anywhere on the greedy path (Algorithm 1 without the break).

    Not lossless on its own: admission of x_{r,j} can depend on survivals computed from x_{r,j}
    (paper Appendix A). Used by ``schedule_practical`` on stale survival, where it is safe.
    Ties: the earliest point on the path reaching the maximum (matching the strict '>' update).
    """
    n_requests, req, pos, theta = _greedy_path(survival, sps)
    return _lengths_from_prefix(n_requests, req, pos, int(np.argmax(theta)))


def schedule_practical(current_survival, stale_survival, sps: SpsLike) -> np.ndarray:
    """Lengths (R,) by the asynchronous scheduler of paper section 5.2.

    The capacity K (number of draft tokens to verify this step) comes from ``schedule_global`` on the
    survival of two steps earlier (``stale_survival``), which cannot depend on the current draft tokens.
    The current candidates (a > 0) are then ranked by their current survival and the top K admitted, with
    no early stop. Non-increasing survival makes each admitted set a prefix per request.
    """
    capacity = int(schedule_global(stale_survival, sps).sum())
    matrix = as_survival_matrix(current_survival)  # (R, gamma)
    req, pos, _ = _sorted_candidates(matrix)
    return _lengths_from_prefix(matrix.shape[0], req, pos, min(capacity, req.size))


def with_draft_cost(sps: SpsLike, draft_seconds: float) -> Callable:
    """Whole rounds per second when each round also spends ``draft_seconds`` drafting before it is scheduled:
    B -> 1 / (1 / SPS(B) + D). Algorithm 1 on this rate maximises expected tokens per second of whole rounds
    (eval/live_cost.py); D does not depend on the lengths chosen, so the early stop keeps it lossless.
    D <= 0 returns ``sps`` itself (the paper's objective)."""
    if draft_seconds <= 0:
        return sps
    base = as_sps(sps)

    def rate(batch_tokens):
        values = 1.0 / (1.0 / sps_values(base, np.atleast_1d(np.asarray(batch_tokens))) + draft_seconds)
        return float(values[0]) if np.ndim(batch_tokens) == 0 else values

    return rate


def expected_throughput(survival, lengths: Sequence[int], sps: SpsLike) -> tuple[float, float]:
    """(tau*, Theta): expected tokens emitted this step and tau* * SPS(B) with B = sum(1 + l_r)."""
    matrix = as_survival_matrix(survival)  # (R, gamma)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (matrix.shape[0],):
        raise ValueError(f"expected {matrix.shape[0]} lengths, got shape {lengths.shape}")
    admitted = np.arange(1, matrix.shape[1] + 1)[None, :] <= lengths[:, None]  # (R, gamma)
    tau = float(matrix.shape[0] + np.sum(matrix * admitted))
    batch = int(np.sum(1 + lengths))
    return tau, tau * float(sps_values(sps, np.array([batch]))[0])


# ----------------------------------------------------------------------------------------------------
# Profiling the SPS table
# ----------------------------------------------------------------------------------------------------

def profile_sps(step_fn: Callable[[int], object], batch_sizes: Sequence[int], warmup: int = 2,
                repeats: int = 5, hardware: Mapping | None = None,
                clock: Callable[[], float] = time.perf_counter) -> SpsTable:
    """Measure steps/s of ``step_fn(B)`` (one target forward over B new tokens) for each batch size.

    ``warmup`` calls per B are not timed; steps/s = 1 / median of ``repeats`` timed calls, timed with
    ``clock`` (seconds). The timed calls go round-robin over the sizes, so that a change in background load
    while profiling spreads over every size instead of bending the curve at a few (a dip between neighbouring
    sizes is a cliff to Algorithm 1). ``step_fn`` must block until the work is done (e.g. synchronise CUDA).
    """
    if repeats < 1:
        raise ValueError("profile_sps: repeats must be >= 1")
    sizes = sorted({int(b) for b in batch_sizes})
    for batch in sizes:
        for _ in range(warmup):
            step_fn(batch)
    durations: dict[int, list[float]] = {batch: [] for batch in sizes}
    for _ in range(repeats):
        for batch in sizes:
            start = clock()
            step_fn(batch)
            durations[batch].append(clock() - start)
    points = {batch: 1.0 / max(statistics.median(times), 1e-9) for batch, times in durations.items()}
    return SpsTable(points, hardware=hardware)


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware() -> dict:
    """Where a measurement was taken: CPU model and count, platform, torch version and threads, CUDA device."""
    import torch

    cuda = torch.cuda.is_available()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if cuda else None}


def make_target_step_fn(model, context_len: int = 128, device: str = "cpu", seed: int = 0):
    """A ``step_fn(B)`` for ``profile_sps``: one forward of B new tokens of any transformers causal LM
    on top of a prefilled KV cache of ``context_len`` random tokens.

    After each call the cache is cropped back to ``context_len`` (a slice, no copy), so every call sees
    the same context length. Runs under ``torch.inference_mode``.
    """
    import torch
    from transformers import DynamicCache

    model = model.to(device).eval()
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (1, context_len), generator=generator).to(device)  # (1, T)
    cache = DynamicCache()
    # Recent transformers name the argument `cache`; older ones (and the deprecated alias) `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        model(input_ids=context, use_cache=True, **{cache_arg: cache})
    new_tokens: dict[int, torch.Tensor] = {}

    def step_fn(batch_tokens: int):
        if batch_tokens not in new_tokens:
            new_tokens[batch_tokens] = torch.randint(0, vocab, (1, batch_tokens),
                                                     generator=generator).to(device)  # (1, B)
        with torch.inference_mode():
            out = model(input_ids=new_tokens[batch_tokens], use_cache=True, **{cache_arg: cache})
        # A negative count removes that many trailing positions in every transformers version
        # (recent versions reject a positive target length).
        extra = cache.get_seq_length() - context_len
        if extra > 0:
            cache.crop(-extra)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return out.logits.shape

    step_fn.cache = cache
    return step_fn
