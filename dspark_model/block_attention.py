"""Training attention of the draft: one mask rule, two kernels.

In ``forward_train`` the queries are the A blocks of G slots laid side by side (Q = A*G) and the keys are the
T context positions followed by the same Q block slots (C + Q). Query slot k of block a, whose anchor sits at
position p_a, may see
  * context positions c < p_a (strictly before its anchor), and
  * every slot of its own block (bidirectional inside the block), nothing of other blocks.

Kernels:
  * ``sdpa``: a dense boolean mask (B, 1, Q, C + Q) for ``F.scaled_dot_product_attention``. Simple, and the
    fastest choice on CPU, but on a GPU a dense mask rules out the flash kernel, and the math fallback keeps
    fp32 scores of B*H*Q*(C+Q) elements per layer.
  * ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the same rule. Tiles that
    the rule masks out entirely (context after the last anchor of a tile, other blocks) are skipped. On CUDA
    the kernel is compiled (Triton); eager flex materialises the scores and has no CPU backward in torch 2.13.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "flex")


def anchor_of_query(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, A) anchor positions -> (B, A*G): the anchor of each query slot."""
    return anchors.repeat_interleave(block_size, dim=1)


def dense_block_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """The rule as a boolean SDPA mask (B, 1, A*G, T + A*G), True = may attend."""
    B, A = anchors.shape
    ctx_pos = torch.arange(context_len, device=anchors.device)
    ctx_ok = ctx_pos[None, None, :] < anchor_of_query(anchors, block_size)[:, :, None]  # (B, A*G, T)
    blk = torch.arange(A, device=anchors.device).repeat_interleave(block_size)  # (A*G,) block of each slot
    blk_ok = (blk[:, None] == blk[None, :]).expand(B, -1, -1)  # (B, A*G, A*G)
    return torch.cat([ctx_ok, blk_ok], dim=-1).unsqueeze(1)


def flex_block_mask(anchors: torch.Tensor, context_len: int, block_size: int):
    """The same rule as a flex_attention ``BlockMask`` (batch-specific, shared by all heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, A = anchors.shape
    Q, T, G = A * block_size, context_len, block_size
    anchor_q = anchor_of_query(anchors, block_size).contiguous()  # (B, Q)

    def rule(b, h, q_idx, kv_idx):
        before_anchor = kv_idx < anchor_q[b, q_idx]  # anchors are <= T - 1, so this is context only
        same_block = (kv_idx >= T) & ((kv_idx - T) // G == q_idx // G)
        return before_anchor | same_block

    return create_block_mask(rule, B, None, Q, T + Q, device=anchors.device)


def block_mask(kernel: str, anchors: torch.Tensor, context_len: int, block_size: int):
    """The mask object the chosen kernel takes: a dense bool tensor (sdpa) or a BlockMask (flex)."""
    if kernel == "flex":
        return flex_block_mask(anchors, context_len, block_size)
    if kernel != "sdpa":
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    return dense_block_mask(anchors, context_len, block_size)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k, v, mask, gqa: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    # flex is no autocast op: give it one dtype (SDPA would be run in the autocast dtype too).
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fn = _compiled_flex() if q.is_cuda else flex_attention  # eager flex is a reference, not a fast path
    return fn(q, k, v, block_mask=mask, enable_gqa=gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, gqa: bool) -> torch.Tensor:
    """q (B, H, Q, hd), k/v (B, H_kv, S, hd) -> (B, H, Q, hd). ``mask``: None (attend to all), a bool
    tensor (SDPA) or a BlockMask (flex_attention)."""
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _flex(q, k, v, mask, gqa)


def flex_available(device: torch.device | str) -> str | None:
    """None when flex_attention can train on ``device``, else the reason it cannot (one phrase)."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    if torch.device(device).type != "cuda":
        return "flex_attention has no CPU backward (and runs unfused without a GPU)"
    if importlib.util.find_spec("triton") is None:
        return "compiled flex_attention needs Triton, which is not installed"
    return None
