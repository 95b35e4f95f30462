"""The EAGLE-3 training objective: training-time test over ``gamma`` unrolled steps, forward KL per step.

Step k (0-based) of the unrolled draft (``Eagle3Draft.forward_steps``) at index i predicts x_{i+k+2}; its
teacher is the target's next-token distribution at position i+k+1, restricted to the draft's K tokens WITHOUT
renormalising (as for DSpark, issue 13): p_K, with mass s = sum_K p_K <= 1. The per-position loss is the
forward KL to the restricted teacher, weighted by its mass:
    KL_k(i) = sum_{v in K} p_K(v) (log p_K(v) - log q_k(v | i)) - s log s  =  s * KL(p_K / s || q_k)  >= 0
whose gradient is that of EAGLE-3's soft cross-entropy -sum_K p_K log q; its minimiser over q is p_K / s,
and a position counts in proportion to the target mass inside K (mass outside K is never acceptable).
Why forward KL and not DSpark's TV: it is what EAGLE-3 and its public trainers use, so the baseline is the
published recipe rather than a DSpark-flavoured one, and it gives every draft token a gradient.

Supervision: index i (anchor p = i+1 in DSpark's words) counts at step k when x_{i+1} and the labels
x_{i+2} .. x_{i+k+2} are all answer tokens (the same cumulative rule as a DSpark block's slot mask).
Total: sum_k w_k * mean_i KL_k(i) with w_k = base^k (EAGLE-3: 0.8). Metrics per step: 1 - TV against p_K
(= sum_K min(p, q), the expected acceptance of step k at T=1, as DSpark's accept_k) and top-1 agreement.
Logits are computed only at supervised indices, in chunks of ``chunk_size`` of them, each recomputed in
backward (``recompute``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.loss import teacher_probs


def step_masks(loss_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) 0/1 loss mask -> (steps, B, T) float: index i supervised at step k (see the module docstring)."""
    B, T = loss_mask.shape
    lm = torch.cat([loss_mask.float(), loss_mask.new_zeros(B, steps + 2).float()], dim=1)  # beyond T: not answer
    anchor = lm[:, 1: T + 1]  # x_{i+1}
    labels = torch.stack([lm[:, k + 2: k + 2 + T] for k in range(steps)])  # (steps, B, T): x_{i+k+2}
    return labels.cumprod(0) * anchor


def _chunk(draft, h, t_prob, m):
    """h (M, d) states, t_prob (M, K) teacher (no grad), m (M,) mask -> sum of m*KL (grad), detached metric
    sums [m*(1-TV), m*top1-hit]."""
    logq = torch.log_softmax(draft.logits(h), dim=-1)  # (M, K) fp32
    plogp = torch.where(t_prob > 0, t_prob * t_prob.clamp_min(1e-30).log(), torch.zeros_like(t_prob))
    mass = t_prob.sum(-1)  # (M,) target mass inside K
    kl = (plogp - t_prob * logq).sum(-1) - torch.where(mass > 0, mass * mass.clamp_min(1e-30).log(), 0.0)  # >= 0
    with torch.no_grad():
        accept = torch.minimum(logq.exp(), t_prob).sum(-1)  # 1 - TV against the full distribution
        hit = (logq.argmax(-1) == t_prob.argmax(-1)).float()
        extra = torch.stack([(m * accept).sum(), (m * hit).sum()])
    return (m * kl).sum(), extra


def eagle3_loss(draft, target, states: list[torch.Tensor], final_hidden: torch.Tensor, loss_mask: torch.Tensor,
                step_weight: float = 0.8, chunk_size: int = 2048, recompute: bool = True,
                teacher_lse: torch.Tensor | None = None, teacher_argmax: torch.Tensor | None = None):
    """states: ``forward_steps`` output (G x (B, T, d)); final_hidden (B, T, d) target states after the final
    norm; loss_mask (B, T); teacher_lse / teacher_argmax (B, T) from ``train.teacher.TeacherMemo`` (reduced
    vocabulary). Returns (loss, metrics) with DSpark's metric keys (accept_per_slot = per step)."""
    G = len(states)
    T = final_hidden.shape[1]
    masks = step_masks(loss_mask, G)  # (G, B, T)
    loss, accept, hits, outside = 0.0, [], [], 0.0
    counts = masks.sum((1, 2))  # (G,)
    # Teacher and head only where step 0 supervises (every later step's mask is a subset): prompt and padding
    # positions, most of a chat row, cost nothing. One host sync per call, for the index.
    row, col = masks[0].nonzero(as_tuple=True)  # (M,) each: the supervised (b, i)
    M = int(row.numel())
    for k, h in enumerate(states):
        pos = (col + k + 1).clamp(max=T - 1)  # teacher position of index i
        fh = final_hidden[row, pos]  # (M, d)
        lse = None if teacher_lse is None else teacher_lse[row, pos]
        arg = None if teacher_argmax is None else teacher_argmax[row, pos]
        hk, mk = h[row, col], masks[k][row, col]
        step = max(M, 1) if chunk_size <= 0 else chunk_size
        kl_sum, extra = hk.sum() * 0.0, hk.new_zeros(2, dtype=torch.float32)  # no supervised index: zeros
        for s in range(0, M, step):
            sl = slice(s, s + step)
            t_prob, out_k = teacher_probs(draft, target, fh[sl], None if lse is None else lse[sl],
                                          None if arg is None else arg[sl])
            lse_ok = torch.isfinite(lse[sl]) if lse is not None else None
            m = mk[sl] if lse_ok is None else mk[sl] * lse_ok.float()  # memo marks unsupervised positions +inf
            t_prob = torch.nan_to_num(t_prob)  # exp(logit - inf) rows: zero, never supervised
            outside = outside + (out_k.float() * m).sum()
            if recompute and torch.is_grad_enabled():
                cs, ce = checkpoint(_chunk, draft, hk[sl], t_prob, m, use_reentrant=False)
            else:
                cs, ce = _chunk(draft, hk[sl], t_prob, m)
            kl_sum, extra = kl_sum + cs, extra + ce
        loss = loss + step_weight ** k * kl_sum / counts[k].clamp_min(1.0)
        accept.append(extra[0])
        hits.append(extra[1])
    accept, hits = torch.stack(accept), torch.stack(hits)  # (G,) sums
    n = counts.sum().clamp_min(1.0)
    metrics = {
        "loss": loss.detach(), "kl": loss.detach() / sum(step_weight ** k for k in range(G)),
        "expected_accept": accept.sum() / n, "top1": hits.sum() / n,
        "accept_per_slot": accept / counts.clamp_min(1.0), "supervised": counts.sum(),
        "argmax_outside_vocab": torch.as_tensor(outside, dtype=torch.float32).detach() / n,
    }
    return loss, metrics


class Eagle3Objective(nn.Module):
    """The EAGLE-3 draft and its loss as one module, called like ``train.loop.DraftObjective`` (the anchors
    and block mask the loop samples are not used: every answer position is supervised at every step)."""

    def __init__(self, draft, step_weight: float, chunk_size: int, recompute: bool, feature_noise: float = 0.0,
                 attention: str = "sdpa"):
        super().__init__()
        self.draft, self.step_weight, self.chunk_size, self.recompute = draft, step_weight, chunk_size, recompute
        self.feature_noise, self.attention = feature_noise, attention  # attention: sdpa (dense) | flex (CUDA)

    def forward(self, tap_hidden, final_hidden, input_ids, anchors, mask, teacher_lse=None, teacher_argmax=None,
                loss_mask=None):
        from train.loop import noisy_taps

        if loss_mask is None:
            raise ValueError("the EAGLE-3 objective needs the batch's loss_mask")
        if self.training and self.feature_noise > 0:
            tap_hidden = noisy_taps(tap_hidden, self.feature_noise, tap_hidden.shape[-1] // final_hidden.shape[-1])
        states = self.draft.forward_steps(tap_hidden, input_ids, attention=self.attention)
        return eagle3_loss(self.draft, self.draft.target, states, final_hidden, loss_mask, self.step_weight,
                           self.chunk_size, self.recompute, teacher_lse, teacher_argmax)
