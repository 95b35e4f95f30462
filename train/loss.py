"""The DSpark training objective (paper section 3.3, DESIGN.md), as pure functions of tensors.

    L = a_ce * CE + a_tv * L1 + a_conf * BCE(c_k, c*_k)

over supervised (anchor, slot) pairs, each term a weighted mean sum(w m l) / sum(w m) with position weights
w_k = exp(-(k-1)/gamma_w). CE is against the data token; L1 = ||p_d - p_t||_1 = 2 TV, in fp32 at T=1;
c*_k = clamp(1 - L1/2, 0, 1), detached, is the probability the target accepts slot k's token.

Full-vocabulary logits are the memory hog: B*A*G block positions times V. ``draft_loss`` therefore walks the
blocks in chunks of about ``chunk_size`` positions, computes target logits only at the supervised positions
of the chunk, and (``recompute=True``) wraps each chunk in activation checkpointing, so that the logits of
a single chunk are alive at any time, in the forward and in the backward pass. ``naive_draft_loss`` is the
plain reference: target logits for the whole batch, draft logits for every block at once.
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


def _chunk_terms(draft, target, h, prev, labels, mask, w, fh):
    """Loss sums for one chunk of n blocks.

    h (n, G, d) draft states, prev/labels (n, G) ids, mask (n, G) 0/1 supervision, w (G,) position
    weights, fh (n, G, d) target final hidden states at the block positions p+k (only supervised ones used).
    Returns stacked sums: [sum w*ce, sum w*l1, sum w*bce] (3,) with grad, and detached metric sums:
    [per-slot sum of 1-TV (G,), per-slot top-1 hits (G,), sum bce (1,)] concatenated.
    """
    n, G = mask.shape
    sel = mask.reshape(-1) > 0  # (n*G,)
    d_logits = draft.logits(h, prev).reshape(n * G, -1)[sel]  # (M, V) fp32
    y = labels.reshape(-1)[sel]  # (M,)
    wk = (mask * w).reshape(-1)[sel]  # (M,)
    slot = torch.arange(G, device=h.device).repeat(n)[sel]  # (M,)
    with torch.no_grad():
        t_prob = torch.softmax(target.logits(fh.reshape(n * G, -1)[sel]).float(), dim=-1)  # (M, V)
    ce = F.cross_entropy(d_logits, y, reduction="none")  # (M,)
    l1 = (torch.softmax(d_logits, dim=-1) - t_prob).abs().sum(-1)  # (M,) = 2 TV
    c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    conf = draft.confidence_logits(h, prev)
    if conf is not None:
        bce = F.binary_cross_entropy_with_logits(conf.reshape(-1)[sel].float(), c_star, reduction="none")
    else:
        bce = torch.zeros_like(ce)
    sums = torch.stack([(wk * ce).sum(), (wk * l1).sum(), (wk * bce).sum()])  # (3,)
    with torch.no_grad():
        accept = torch.zeros(G, device=h.device).index_add_(0, slot, c_star)  # (G,) sum of 1 - TV
        hits = torch.zeros(G, device=h.device).index_add_(0, slot, (d_logits.argmax(-1) == y).float())
        extra = torch.cat([accept, hits, bce.detach().sum().reshape(1)])  # (2G + 1,)
    return sums, extra


def _select_blocks(h, input_ids, anchors, mask, final_hidden, draft):
    """Flatten (B, A) blocks and keep those with at least one supervised slot (else block 0, zero mask,
    so every parameter stays in the graph and data-parallel reducers see a gradient)."""
    B, A, G, d = h.shape
    prev, labels, _ = draft.block_inputs(input_ids, anchors)  # (B, A, G) each
    mask = mask.reshape(B * A, G)
    keep = (mask.sum(-1) > 0).nonzero().squeeze(-1)  # (N,)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=h.device)
    pos = (anchors.unsqueeze(-1) + torch.arange(G, device=h.device)).reshape(B * A, G)[keep]  # (N, G) = p+k
    row = torch.arange(B, device=h.device).repeat_interleave(A)[keep]  # (N,)
    fh = final_hidden[row[:, None], pos.clamp(max=final_hidden.shape[1] - 1)]  # (N, G, d)
    return (h.reshape(B * A, G, d)[keep], prev.reshape(B * A, G)[keep], labels.reshape(B * A, G)[keep],
            mask[keep], fh)


def draft_loss(draft, target, h, final_hidden, input_ids, anchors, mask, weights: LossWeights,
               chunk_size: int = 1024, recompute: bool = True):
    """Chunked DSpark loss.

    h (B, A, G, d) draft block states (``draft.forward_train``); final_hidden (B, T, d) target states after
    the final norm; input_ids (B, T); anchors (B, A); mask (B, A, G) supervised slots (``anchors.slot_mask``).
    chunk_size: block positions per chunk (rounded down to whole blocks; <= 0 means one chunk).
    Returns (loss scalar, metrics dict of detached tensors).
    """
    G = h.shape[2]
    hb, prev, labels, m, fh = _select_blocks(h, input_ids, anchors, mask, final_hidden, draft)
    w = position_weights(G, weights.position_decay, device=h.device)  # (G,)
    step = hb.shape[0] if chunk_size <= 0 else max(1, chunk_size // G)
    sums, extra = 0.0, 0.0
    for s in range(0, hb.shape[0], step):
        args = (hb[s:s + step], prev[s:s + step], labels[s:s + step], m[s:s + step], w, fh[s:s + step])
        if recompute and torch.is_grad_enabled():
            cs, ce = checkpoint(_chunk_terms, draft, target, *args, use_reentrant=False)
        else:
            cs, ce = _chunk_terms(draft, target, *args)
        sums, extra = sums + cs, extra + ce
    return _combine(sums, extra, m, w, weights)


def naive_draft_loss(draft, target, h, final_hidden, input_ids, anchors, mask, weights: LossWeights):
    """Reference implementation: target logits over the whole batch, draft logits for all blocks at once."""
    B, A, G, d = h.shape
    t_logits = target.logits(final_hidden).float()  # (B, T, V): the memory the chunked loss avoids
    prev, labels, _ = draft.block_inputs(input_ids, anchors)
    pos = (anchors.unsqueeze(-1) + torch.arange(G, device=h.device)).clamp(max=input_ids.shape[1] - 1)
    t_block = t_logits[torch.arange(B, device=h.device)[:, None, None], pos]  # (B, A, G, V)
    d_logits = draft.logits(h.reshape(B * A, G, d), prev.reshape(B * A, G)).reshape(B, A, G, -1)
    w = position_weights(G, weights.position_decay, device=h.device)
    ce = F.cross_entropy(d_logits.flatten(0, 2), labels.flatten(), reduction="none").view(B, A, G)
    l1 = (torch.softmax(d_logits, -1) - torch.softmax(t_block, -1).detach()).abs().sum(-1)  # (B, A, G)
    c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    conf = draft.confidence_logits(h.reshape(B * A, G, d), prev.reshape(B * A, G))
    bce = (F.binary_cross_entropy_with_logits(conf.view(B, A, G).float(), c_star, reduction="none")
           if conf is not None else torch.zeros_like(ce))
    wm = mask * w  # (B, A, G)
    sums = torch.stack([(wm * ce).sum(), (wm * l1).sum(), (wm * bce).sum()])
    with torch.no_grad():
        accept = (mask * c_star).sum((0, 1))  # (G,)
        hits = (mask * (d_logits.argmax(-1) == labels).float()).sum((0, 1))
        extra = torch.cat([accept, hits, (mask * bce).sum().reshape(1)])
    return _combine(sums, extra, mask.reshape(-1, G), w, weights)


def _combine(sums, extra, mask, w, weights: LossWeights):
    """Weighted means and the metrics dict from the summed chunk terms. mask (N, G), w (G,)."""
    G = w.numel()
    denom = (mask * w).sum().clamp_min(1e-8)
    ce, l1, bce = sums[0] / denom, sums[1] / denom, sums[2] / denom
    loss = weights.alpha_ce * ce + weights.alpha_tv * l1 + weights.alpha_conf * bce
    per_slot = mask.sum(0).detach()  # (G,) supervised pairs per slot
    n = per_slot.sum().clamp_min(1.0)
    accept = extra[:G] / per_slot.clamp_min(1.0)
    metrics = {
        "loss": loss.detach(), "ce": ce.detach(), "l1": l1.detach(), "conf_bce_weighted": bce.detach(),
        "conf_bce": extra[2 * G] / n, "expected_accept": extra[:G].sum() / n, "top1": extra[G:2 * G].sum() / n,
        "accept_per_slot": accept, "supervised": per_slot.sum(),
    }
    return loss, metrics
