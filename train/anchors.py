"""Anchor sampling and block supervision masks (DESIGN.md, "Training").

An anchor is a position p whose token is already known (the last token the target produced); the draft
block starting there predicts tokens p+1 .. p+gamma. Training samples many anchors per sequence:

* candidates: positions p (1 <= p <= T-2) with loss_mask[p] = loss_mask[p+1] = 1, i.e. the anchor is a
  response token and so is the first token the block must predict;
* count: ``anchors_per_4096`` scaled by the sequence length, clamped to [min_anchors, max_anchors] and to the
  number of candidates; drawn uniformly without replacement;
* each sequence draws from its own generator seeded by (seed, epoch, dataset row), so the anchors of a row do
  not depend on how rows are split over micro-batches, processes or a resume.

Slot k of a block (0-based) is supervised when its label x_{p+k+1} lies inside the sequence and every label
up to it is a response token: the mask is the cumulative product of loss_mask[p+k+1] over k, so only the
contiguous valid prefix of a block counts.
"""

from __future__ import annotations

import torch


def anchor_count(length: int, anchors_per_4096: float, min_anchors: int, max_anchors: int) -> int:
    """Anchors for a sequence of ``length`` tokens: proportional to length, clamped."""
    n = round(anchors_per_4096 * length / 4096)
    return int(min(max(n, min_anchors), max_anchors))


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """(T,) 0/1 mask -> (n,) positions p with 1 <= p <= T-2 and loss_mask[p] = loss_mask[p+1] = 1."""
    m = loss_mask.bool()
    ok = m[1:-1] & m[2:]  # (T-2,) entry i is position p = i + 1
    return ok.nonzero().squeeze(-1) + 1


def sample_anchors(loss_mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``count`` distinct candidate positions of one sequence, sorted; uniform without replacement."""
    cand = anchor_candidates(loss_mask)  # (n,)
    if cand.numel() <= count:
        return cand
    pick = torch.randperm(cand.numel(), generator=generator)[:count]
    return cand[pick].sort().values


def row_generator(seed: int, epoch: int, row: int) -> torch.Generator:
    """A generator private to one dataset row in one epoch (independent of batching and world size)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + row)
    return g


def batch_anchors(loss_masks: list[torch.Tensor], rows: list[int], epoch: int, seed: int,
                  anchors_per_4096: float, min_anchors: int, max_anchors: int):
    """Anchors for a micro-batch, padded to the longest list.

    loss_masks: per-sequence (T_i,) masks (unpadded); rows: dataset row ids.
    Returns anchors (B, A) long (padding points at position 1) and valid (B, A) bool.
    """
    picked = []
    for mask, row in zip(loss_masks, rows):
        n = anchor_count(mask.numel(), anchors_per_4096, min_anchors, max_anchors)
        picked.append(sample_anchors(mask, n, row_generator(seed, epoch, row)))
    A = max(1, max(p.numel() for p in picked))
    anchors = torch.ones(len(picked), A, dtype=torch.long)  # (B, A)
    valid = torch.zeros(len(picked), A, dtype=torch.bool)
    for i, p in enumerate(picked):
        anchors[i, : p.numel()] = p
        valid[i, : p.numel()] = True
    return anchors, valid


def slot_mask(loss_mask: torch.Tensor, anchors: torch.Tensor, anchor_valid: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """Supervised (anchor, slot) pairs: (B, T) loss mask, (B, A) anchors / valid flags -> (B, A, G) float.

    Slot k predicts x_{p+k+1}; it counts when that label is inside the sequence, every label of the block
    up to it is a response token (cumulative product), and the anchor is a real one (not padding).
    """
    B, T = loss_mask.shape
    label_pos = anchors.unsqueeze(-1) + 1 + torch.arange(block_size, device=anchors.device)  # (B, A, G)
    in_range = label_pos < T
    b = torch.arange(B, device=anchors.device)[:, None, None]
    lm = loss_mask[b, label_pos.clamp(max=T - 1)].float() * in_range  # (B, A, G)
    return lm.cumprod(dim=-1) * anchor_valid.unsqueeze(-1).float()
