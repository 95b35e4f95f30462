"""Prepacked fp32 GEMM weights for the CPU forwards whose row count is known in advance.

On an x86 CPU, ``F.linear`` over a few rows (a verification block of gamma + 1 tokens) calls MKL's sgemm,
which re-packs the whole weight matrix on every call. For a 576-wide model that repacking costs more than the
multiply: on SmolLM2 a target forward over 8 tokens cost 1.87 one-token steps, although both read the same
weights once (1.60 prepacked; ``benchmarks/decode_cost.py``). Packing each weight once (MKL's packed-GEMM
API, exposed by torch as ``torch.ops.mkl``) removes it. torch's packed kernel only runs for the exact row
count it was packed for and falls back to ``F.linear`` otherwise, so each packed count costs one more copy of
the weights, and every other count (the one-token step of plain decoding, a prefill) runs exactly the kernel
it ran before.

Numbers: the packed GEMM sums in its own order, so its outputs differ from the unpacked call's in the last
bits (relative ~1e-7, like any change of kernel: the one-row and the multi-row kernels already differ so).
Speculative decoding stays lossless by construction; greedy identity with plain decoding is measured by
every eval as before.

Only frozen fp32 weights on a CPU with torch's MKL build are packed; elsewhere ``prepack_linears`` is a no-op
that says why. Gradients never flow through a packed call: with autograd recording a call to a parameter
that requires grad, the plain kernel runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def prepack_problem(model: nn.Module) -> str | None:
    """Why ``model``'s linears cannot be prepacked here, or None."""
    if not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_linear"):
        return "this torch build has no MKL packed GEMM"
    weight = next((m.weight for m in model.modules() if type(m) in (nn.Linear, PackedLinear)), None)
    if weight is None:
        return "the model has no nn.Linear layers"
    if weight.device.type != "cpu":
        return f"weights are on {weight.device.type}, not the CPU"
    if weight.dtype != torch.float32:
        return f"weights are {weight.dtype}, packing is for float32"
    return None


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that keeps MKL-packed copies of its weight for some input row counts.

    Made by re-classing an existing ``nn.Linear`` (``prepack_linears``), so its parameters, state-dict keys and
    weight tying stay what they were; the packs are plain attributes, never saved."""

    _packs: dict[int, torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        packed = self._packs.get(rows)
        if packed is None or x.dtype != torch.float32 or (torch.is_grad_enabled() and (
                x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), packed, self.weight, self.bias, rows)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def prepack_linears(model: nn.Module, rows: Iterable[int]) -> int:
    """Pack every plain ``nn.Linear`` weight of ``model`` for inputs of exactly each count in ``rows`` (token rows:
    batch x sequence). Returns the number of layers packed (0, with a log line, where packing does not apply).

    Each count keeps one packed copy of the weights in memory. The weights must not change afterwards (the
    packs would go stale): this is for frozen models, such as the target in eval."""
    counts = sorted({int(r) for r in rows})
    if not counts:
        return 0
    if counts[0] < 1:
        raise ValueError(f"row counts to prepack must be >= 1, got {counts}")
    problem = prepack_problem(model)
    if problem:
        log.info("not prepacking GEMM weights: %s", problem)
        return 0
    packed = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) not in (nn.Linear, PackedLinear):  # a subclass of Linear may compute otherwise
                continue
            packs = dict(getattr(module, "_packs", {}))
            weight = module.weight.detach()
            for n in counts:
                if n not in packs:
                    packs[n] = torch.ops.mkl._mkl_reorder_linear_weight(weight, n)
            module.__class__ = PackedLinear
            module._packs = packs
            packed += 1
    log.info("prepacked %d linear layers for %s-row inputs", packed, "/".join(map(str, counts)))
    return packed


def unpack_linears(model: nn.Module) -> None:
    """Drop the packs ``prepack_linears`` made: every packed layer becomes a plain ``nn.Linear`` again, also one
    a benchmark has switched back to ``nn.Linear`` to time the plain kernel while it still holds its packs."""
    for module in model.modules():
        if type(module) in (nn.Linear, PackedLinear) and hasattr(module, "_packs"):
            del module._packs
            module.__class__ = nn.Linear
