"""The DSpark training objective (paper section 3.3, DESIGN.md), as pure functions of tensors.

    L = a_ce * CE + a_tv * L1 + a_conf * BCE(c_k, c*_k)

over supervised (anchor, slot) pairs, each term a weighted mean sum(w m l) / sum(w m) with position weights
w_k = exp(-(k-1)/gamma_w). CE is against the data token; L1 = ||p_d - p_t||_1 = 2 TV, in fp32 at T=1;
c*_k = clamp(1 - L1/2, 0, 1), detached, is the probability the target accepts slot k's token.

With a reduced draft vocabulary (K tokens) the teacher is the target distribution restricted to K without
renormalising: L1 = sum_K |q - p| + p(outside K), and c* = sum_K min(p, q) = 1 - L1/2.

Vocabulary-sized logits are the memory hog: B*A*G block positions times K. ``draft_loss`` therefore walks the
blocks in chunks of about ``chunk_size`` positions and (``recompute=True``) wraps each chunk's draft part in
activation checkpointing, so that the logits of a single chunk are alive at any time. Teacher probabilities
are computed once per chunk without autograd, outside the recomputed part; with a reduced vocabulary they
need only the K head rows and the target's log-normaliser per position (``teacher_stats``, memoised per row
by ``train.teacher.TeacherMemo``). ``naive_draft_loss`` is the plain reference: full target distributions for
the whole batch, draft logits for every block at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dspark_model.draft import position_weights


@dataclass
class LossWeights:
    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    position_decay: float = 4.0  # gamma_w in w_k = exp(-(k-1)/gamma_w)


def teacher_stats(target, final_hidden: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """log-normaliser and argmax of the target's full next-token distribution: (M, d) -> (M,), (M,).

    Costs one full-vocabulary matmul per position, without autograd; ``train.teacher.TeacherMemo`` runs it
    once per training row so that later visits only need the K draft-vocabulary columns."""
    lse, arg = [], []
    with torch.no_grad():
        for s in range(0, final_hidden.shape[0], chunk):
            logits = target.logits(final_hidden[s:s + chunk]).float()  # (c, V)
            lse.append(torch.logsumexp(logits, dim=-1))
            arg.append(logits.argmax(-1))
    if not lse:
        return final_hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    return torch.cat(lse), torch.cat(arg)


def teacher_probs(draft, target, fh: torch.Tensor, lse: torch.Tensor | None, argmax: torch.Tensor | None):
    """The target's distribution restricted to the draft's K tokens, NOT renormalised (mass outside K is mass
    the draft can never win): fh (M, d) -> probs (M, K) fp32, outside-K flag of the target argmax (M,).

    ``lse``/``argmax`` (M,) from ``teacher_stats`` let a reduced vocabulary skip the full-vocabulary matmul;
    positions with lse = +inf get an all-zero distribution (never supervised)."""
    with torch.no_grad():
        if not draft.reduced_vocab or lse is None:  # no memo: one full-vocabulary matmul, then the K columns
            logits = target.logits(fh).float()  # (M, V)
            p = torch.softmax(logits, dim=-1)
            if not draft.reduced_vocab:
                return p, torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            return p[:, draft.draft_to_target], draft.target_to_draft[logits.argmax(-1)] < 0
        logp = draft.teacher_logits(fh) - lse.unsqueeze(-1)  # (M, K)
        return logp.exp(), draft.target_to_draft[argmax] < 0


def _chunk_terms(draft, h, prev, labels, mask, w, t_prob):
    """Loss sums for one chunk of n blocks (M = n*G positions, masks applied by multiplication: no syncs).

    h (n, G, d) draft states, prev/labels (n, G) target ids, mask (n, G) 0/1 supervision, w (G,) position
    weights, t_prob (M, K) teacher probabilities over the draft vocabulary (``teacher_probs``, no grad).
    Returns sums [w*ce, w*l1, w*bce] (3,) with grad, and detached metric sums
    [per-slot 1-TV (G,), per-slot top-1 hits (G,), bce (1,), CE weight (1,)].
    """
    n, G = mask.shape
    d_logits = draft.logits(h, prev).reshape(n * G, -1)  # (M, K) fp32
    m = mask.reshape(-1).float()  # (M,)
    y = draft.target_to_draft[labels.reshape(-1)] if draft.reduced_vocab else labels.reshape(-1)  # (M,)
    in_vocab = (y >= 0).float()  # a data token outside K has no CE term
    wk = (mask * w).reshape(-1)  # (M,)
    logq = torch.log_softmax(d_logits, dim=-1)
    ce = -logq.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)  # (M,)
    # ||q - p||_1 over K, plus the target mass outside K (where q = 0): 2 TV against the full distribution
    l1 = (logq.exp() - t_prob).abs().sum(-1) + (1.0 - t_prob.sum(-1)).clamp(min=0.0)  # (M,)
    c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)  # = sum over K of min(p, q)
    conf = draft.confidence_logits(h, prev)
    if conf is not None:
        bce = F.binary_cross_entropy_with_logits(conf.reshape(-1).float(), c_star, reduction="none")
    else:
        bce = torch.zeros_like(ce)
    sums = torch.stack([(wk * in_vocab * ce).sum(), (wk * l1).sum(), (wk * bce).sum()])  # (3,)
    with torch.no_grad():
        slot = torch.arange(G, device=h.device).repeat(n)  # (M,)
        accept = torch.zeros(G, device=h.device).index_add_(0, slot, m * c_star)  # (G,) sum of 1 - TV
        hit = (d_logits.argmax(-1) == y).float() * m
        hits = torch.zeros(G, device=h.device).index_add_(0, slot, hit)
        extra = torch.cat([accept, hits, (m * bce.detach()).sum().reshape(1), (wk * in_vocab).sum().reshape(1)])
    return sums, extra


def _select_blocks(h, input_ids, anchors, mask, final_hidden, draft, lse=None, argmax=None):
    """Flatten (B, A) blocks: states, previous tokens, labels, mask, target states at p+k (+ their teacher
    stats when given). Blocks without a supervised slot stay in with a zero mask: no data-dependent shapes."""
    B, A, G, d = h.shape
    prev, labels, _ = draft.block_inputs(input_ids, anchors)  # (B, A, G) each
    pos = (anchors.unsqueeze(-1) + torch.arange(G, device=h.device)).clamp(max=final_hidden.shape[1] - 1)
    row = torch.arange(B, device=h.device)[:, None, None]
    fh = final_hidden[row, pos].reshape(B * A, G, -1)  # (N, G, d)
    stats = None if lse is None else (lse[row, pos].reshape(B * A, G), argmax[row, pos].reshape(B * A, G))
    return (h.reshape(B * A, G, d), prev.reshape(B * A, G), labels.reshape(B * A, G), mask.reshape(B * A, G),
            fh, stats)


def draft_loss(draft, target, h, final_hidden, input_ids, anchors, mask, weights: LossWeights,
               chunk_size: int = 1024, recompute: bool = True, teacher_lse: torch.Tensor | None = None,
               teacher_argmax: torch.Tensor | None = None):
    """Chunked DSpark loss.

    h (B, A, G, d) draft block states (``draft.forward_train``); final_hidden (B, T, d) target states after
    the final norm; input_ids (B, T); anchors (B, A); mask (B, A, G) supervised slots (``anchors.slot_mask``).
    teacher_lse/teacher_argmax (B, T): the target's log-normaliser and argmax per position
    (``train.teacher.TeacherMemo``); with a reduced draft vocabulary they spare the full-vocabulary matmul.
    chunk_size: block positions per chunk (rounded down to whole blocks; <= 0 means one chunk). Teacher
    probabilities are computed without autograd and outside the recomputed chunks.
    Returns (loss scalar, metrics dict of detached tensors).
    """
    G = h.shape[2]
    hb, prev, labels, m, fh, stats = _select_blocks(h, input_ids, anchors, mask, final_hidden, draft,
                                                    teacher_lse, teacher_argmax)
    w = position_weights(G, weights.position_decay, device=h.device)  # (G,)
    step = hb.shape[0] if chunk_size <= 0 else max(1, chunk_size // G)
    sums, extra, outside = 0.0, 0.0, 0.0
    for s in range(0, hb.shape[0], step):
        sl = slice(s, s + step)
        lse, arg = (None, None) if stats is None else (stats[0][sl].reshape(-1), stats[1][sl].reshape(-1))
        t_prob, out_k = teacher_probs(draft, target, fh[sl].reshape(-1, fh.shape[-1]), lse, arg)
        outside = outside + (out_k.float() * m[sl].reshape(-1)).sum()
        args = (hb[sl], prev[sl], labels[sl], m[sl], w, t_prob)
        if recompute and torch.is_grad_enabled():
            cs, ce = checkpoint(_chunk_terms, draft, *args, use_reentrant=False)
        else:
            cs, ce = _chunk_terms(draft, *args)
        sums, extra = sums + cs, extra + ce
    return _combine(sums, extra, m, w, weights, outside)


def naive_draft_loss(draft, target, h, final_hidden, input_ids, anchors, mask, weights: LossWeights):
    """Reference implementation: full-vocabulary target distributions over the whole batch (restricted to the
    draft vocabulary afterwards), draft logits for all blocks at once, boolean selections."""
    B, A, G, d = h.shape
    t_full = torch.softmax(target.logits(final_hidden).float(), -1)  # (B, T, V): what the chunked loss avoids
    prev, labels, _ = draft.block_inputs(input_ids, anchors)
    pos = (anchors.unsqueeze(-1) + torch.arange(G, device=h.device)).clamp(max=input_ids.shape[1] - 1)
    t_block = t_full[torch.arange(B, device=h.device)[:, None, None], pos]  # (B, A, G, V)
    outside_k = torch.zeros(B, A, G, dtype=torch.bool, device=h.device)
    y = labels
    if draft.reduced_vocab:
        outside_k = draft.target_to_draft[t_block.argmax(-1)] < 0
        t_block = t_block[..., draft.draft_to_target]  # (B, A, G, K), not renormalised
        y = draft.target_to_draft[labels]
    d_logits = draft.logits(h.reshape(B * A, G, d), prev.reshape(B * A, G)).reshape(B, A, G, -1)
    w = position_weights(G, weights.position_decay, device=h.device)
    in_vocab = (y >= 0).float()
    ce = F.cross_entropy(d_logits.flatten(0, 2), y.clamp(min=0).flatten(), reduction="none").view(B, A, G)
    q = torch.softmax(d_logits, -1)
    l1 = (q - t_block).abs().sum(-1) + (1 - t_block.sum(-1)).clamp(min=0)  # (B, A, G)
    c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    conf = draft.confidence_logits(h.reshape(B * A, G, d), prev.reshape(B * A, G))
    bce = (F.binary_cross_entropy_with_logits(conf.view(B, A, G).float(), c_star, reduction="none")
           if conf is not None else torch.zeros_like(ce))
    wm = mask * w  # (B, A, G)
    sums = torch.stack([(wm * in_vocab * ce).sum(), (wm * l1).sum(), (wm * bce).sum()])
    with torch.no_grad():
        accept = (mask * c_star).sum((0, 1))  # (G,)
        hits = (mask * (d_logits.argmax(-1) == y).float()).sum((0, 1))
        extra = torch.cat([accept, hits, (mask * bce).sum().reshape(1), (wm * in_vocab).sum().reshape(1)])
    return _combine(sums, extra, mask.reshape(-1, G), w, weights, (mask * outside_k.float()).sum())


def _combine(sums, extra, mask, w, weights: LossWeights, outside):
    """Weighted means and the metrics dict from the summed chunk terms. mask (N, G), w (G,)."""
    G = w.numel()
    denom = (mask * w).sum().clamp_min(1e-8)
    ce, l1, bce = sums[0] / extra[2 * G + 1].clamp_min(1e-8), sums[1] / denom, sums[2] / denom
    loss = weights.alpha_ce * ce + weights.alpha_tv * l1 + weights.alpha_conf * bce
    per_slot = mask.sum(0).detach()  # (G,) supervised pairs per slot
    n = per_slot.sum().clamp_min(1.0)
    accept = extra[:G] / per_slot.clamp_min(1.0)
    metrics = {
        "loss": loss.detach(), "ce": ce.detach(), "l1": l1.detach(), "conf_bce_weighted": bce.detach(),
        "conf_bce": extra[2 * G] / n, "expected_accept": extra[:G].sum() / n, "top1": extra[G:2 * G].sum() / n,
        "accept_per_slot": accept, "supervised": per_slot.sum(),
        # supervised positions whose target argmax lies outside the draft vocabulary (never acceptable at T=0)
        "argmax_outside_vocab": torch.as_tensor(outside, dtype=torch.float32).detach() / n,
    }
    return loss, metrics
