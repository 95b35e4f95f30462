"""The training objective and anchor sampling: invariants and chunked == naive (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dspark_model.draft import build_draft_for, position_weights
from tests.conftest import tiny_draft_config
from train.anchors import anchor_candidates, anchor_count, batch_anchors, slot_mask
from train.loss import LossWeights, draft_loss, naive_draft_loss


def _batch(target, B=2, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    loss_mask = torch.zeros(B, T, dtype=torch.long)
    loss_mask[0, 8:30] = 1
    loss_mask[1, 5:] = 1
    loss_mask[1, 20] = 0  # a hole: blocks over it keep only their prefix
    return ids, loss_mask


def _setup(target, draft_cfg=None, A=6):
    torch.manual_seed(0)
    draft = build_draft_for(target, draft_cfg or tiny_draft_config())
    ids, lm = _batch(target)
    out = target.forward(ids)
    anchors, valid = batch_anchors(list(lm), [0, 1], epoch=0, seed=0, anchors_per_4096=0, min_anchors=A,
                                   max_anchors=A)
    mask = slot_mask(lm, anchors, valid, draft.block_size)
    return draft, ids, out, anchors, mask


def loss_and_grads(fn, draft, target, ids, out, anchors, mask, **kw):
    """One forward + loss ``fn`` + backward: (loss, metrics, gradient of every draft parameter)."""
    draft.zero_grad()
    h = draft.forward_train(out.tap_hidden, ids, anchors)
    loss, metrics = fn(draft, target, h, out.final_hidden, ids, anchors, mask, LossWeights(), **kw)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in draft.named_parameters()}


def test_slot_mask_is_contiguous_prefix():
    lm = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 1]])
    anchors = torch.tensor([[1, 2, 6, 8]])
    valid = torch.tensor([[True, True, True, False]])
    m = slot_mask(lm, anchors, valid, block_size=3)
    expected = torch.tensor([[[1, 1, 0],  # labels at 2, 3, 4: position 4 is a hole, so slot 2 is cut
                              [1, 0, 0],  # labels at 3, 4, 5: the hole cuts slot 1 and all after it
                              [1, 1, 1],  # labels at 7, 8, 9: all supervised
                              [0, 0, 0]]], dtype=torch.float)  # a padding anchor supervises nothing
    assert torch.equal(m, expected)
    m2 = slot_mask(lm, torch.tensor([[8]]), torch.tensor([[True]]), block_size=3)
    assert m2.tolist() == [[[1.0, 0.0, 0.0]]]  # label 9 inside, 10 and 11 outside the sequence


def test_anchor_candidates_and_counts():
    lm = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 0, 1])
    assert anchor_candidates(lm).tolist() == [2, 3, 6]  # needs mask[p] and mask[p+1]
    assert anchor_count(4096, 512, 1, 10_000) == 512
    assert anchor_count(1024, 512, 1, 10_000) == 128  # scales with length
    assert anchor_count(100, 512, 8, 64) == 12
    assert anchor_count(10, 512, 8, 64) == 8 and anchor_count(100_000, 512, 8, 64) == 64


def test_anchor_sampling_is_per_row_and_batch_independent():
    g = torch.Generator().manual_seed(1)
    masks = [(torch.rand(300, generator=g) > 0.2).long() for _ in range(3)]
    a_all, v_all = batch_anchors(masks, [10, 11, 12], 0, 5, 512, 4, 16)
    a_one, v_one = batch_anchors(masks[1:2], [11], 0, 5, 512, 4, 16)
    n = int(v_one.sum())
    assert torch.equal(a_all[1, :n], a_one[0, :n])  # same row, same anchors, whatever the batch
    for mask, a, v in zip(masks, a_all, v_all):
        p = a[v]
        assert len(set(p.tolist())) == p.numel()  # without replacement
        assert bool((mask[p] == 1).all() and (mask[p + 1] == 1).all())
    a_next, _ = batch_anchors(masks, [10, 11, 12], 1, 5, 512, 4, 16)
    assert not torch.equal(a_all, a_next)  # a new epoch draws new anchors


def test_position_weights():
    w = position_weights(7, 4.0)
    assert w[0].item() == 1.0
    assert torch.allclose(w, torch.tensor([math.exp(-k / 4) for k in range(7)]))
    assert torch.allclose(position_weights(7, 7.0)[1:] / position_weights(7, 7.0)[:-1],
                          torch.full((6,), math.exp(-1 / 7)))


def test_tv_zero_and_target_confidence_one_when_draft_equals_target(tiny_target):
    draft, ids, out, anchors, mask = _setup(tiny_target)
    torch.nn.init.zeros_(draft.markov_head.markov_w2.weight)  # no sequential bias: draft logits = lm_head(h)
    G = draft.block_size
    pos = (anchors.unsqueeze(-1) + torch.arange(G)).clamp(max=ids.shape[1] - 1)
    h = out.final_hidden[torch.arange(2)[:, None, None], pos]  # the target's own states at p + k
    loss, m = draft_loss(draft, tiny_target, h, out.final_hidden, ids, anchors, mask, LossWeights(), 8)
    assert m["l1"].item() < 1e-6
    assert m["expected_accept"].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(m["accept_per_slot"][mask.sum((0, 1)) > 0], torch.tensor(1.0))
    # c* = 1 exactly, so the confidence term is BCE(c, 1) = softplus(-logit), weighted.
    prev, labels, _ = draft.block_inputs(ids, anchors)
    conf = draft.confidence_logits(h.flatten(0, 1), prev.flatten(0, 1)).view_as(mask)
    wm = mask * position_weights(G, 4.0)
    want = (wm * F.softplus(-conf)).sum() / wm.sum()
    assert m["conf_bce_weighted"].item() == pytest.approx(want.item(), rel=1e-5)


def test_ce_term_is_position_weighted_mean(tiny_target):
    draft, ids, out, anchors, mask = _setup(tiny_target)
    h = draft.forward_train(out.tap_hidden, ids, anchors)
    _, m = draft_loss(draft, tiny_target, h, out.final_hidden, ids, anchors, mask, LossWeights(), 0)
    prev, labels, _ = draft.block_inputs(ids, anchors)
    B, A, G = mask.shape
    num = den = 0.0
    for b in range(B):
        for a in range(A):
            logits = draft.logits(h[b, a][None], prev[b, a][None])[0]  # (G, V)
            for k in range(G):
                if mask[b, a, k]:
                    wk = math.exp(-k / 4.0)
                    num += wk * F.cross_entropy(logits[k], labels[b, a, k]).item()
                    den += wk
    assert m["ce"].item() == pytest.approx(num / den, rel=1e-5)


@pytest.mark.parametrize("head", ["markov", "rnn", "none"])
@pytest.mark.parametrize("chunk,recompute", [(4, True), (12, False), (0, True)])
def test_chunked_equals_naive_with_gradients(tiny_target, head, chunk, recompute):
    cfg = tiny_draft_config(sequential_head=head, confidence_head=head != "none")
    draft, ids, out, anchors, mask = _setup(tiny_target, cfg)

    l_ref, m_ref, g_ref = loss_and_grads(naive_draft_loss, draft, tiny_target, ids, out, anchors, mask)
    l_chk, m_chk, g_chk = loss_and_grads(draft_loss, draft, tiny_target, ids, out, anchors, mask,
                                         chunk_size=chunk, recompute=recompute)
    assert l_chk.item() == pytest.approx(l_ref.item(), rel=1e-5)
    assert torch.allclose(m_chk["accept_per_slot"], m_ref["accept_per_slot"], atol=1e-5)
    for name, g in g_ref.items():
        assert torch.allclose(g_chk[name], g, rtol=1e-4, atol=1e-7), name
