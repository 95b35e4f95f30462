"""Reduced draft vocabulary: the mapping, the draft's distributions, lossless decoding, the loss, warm start."""

from __future__ import annotations

import pytest
import torch

from dspark_model.checkpoint import load_draft, save_pretrained
from dspark_model.config import DraftConfig
from dspark_model.draft import build_draft_for, init_layers_from_target, warm_start_layers
from dspark_model.vocab import answer_token_counts, d2t_t2d, rank_prior, top_k_vocab
from eval.baselines import hf_generate
from eval.speculative import speculative_generate
from tests.conftest import tiny_draft_config
from tests.eval.test_speculative import (
    V_SMALL,
    _chi2_on_speculative_tokens,
    _prompts,
    _target,
    small_vocab_pair,  # noqa: F401  (fixture)
)
from tests.train.test_loss import _setup, loss_and_grads
from train.loss import LossWeights, draft_loss, naive_draft_loss, teacher_stats
from train.teacher import TeacherMemo


def test_top_k_is_by_count_with_smaller_id_first_on_ties_and_sorted():
    counts = torch.tensor([5, 0, 7, 5, 1, 7, 0])
    assert top_k_vocab(counts, 3).tolist() == [0, 2, 5]  # 7, 7, then the first of the two 5s
    assert top_k_vocab(counts, 4).tolist() == [0, 2, 3, 5]
    assert top_k_vocab(counts, 6).tolist() == [0, 1, 2, 3, 4, 5]  # zero counts: smaller id first
    with pytest.raises(ValueError, match="draft_vocab_size"):
        top_k_vocab(counts, 8)


def test_rank_prior_lets_common_low_ids_beat_one_off_tokens_but_not_real_counts():
    V = 5000
    counts = torch.zeros(V, dtype=torch.long)
    counts[4000:4003] = 1  # one-off tokens with high (rare) ids
    counts[10] = 50_000  # tokens seen often
    counts[3000] = 40_000
    assert top_k_vocab(counts, 3).tolist() == [10, 3000, 4000]  # counts alone: a one-off beats every unseen id
    with_prior = top_k_vocab(counts, 3, prior=0.3)
    assert with_prior.tolist() == [0, 10, 3000]  # the lowest unseen id now outranks the one-offs
    assert top_k_vocab(counts, 2, prior=0.3).tolist() == [10, 3000]  # real counts still come first
    prior = rank_prior(V)
    assert torch.isclose(prior.sum(), torch.tensor(1.0, dtype=torch.float64)) and bool((prior.diff() < 0).all())
    with pytest.raises(ValueError, match="draft_vocab_prior"):
        top_k_vocab(counts, 3, prior=-1.0)


def test_answer_counts_and_d2t_t2d_tables():
    ids = [torch.tensor([3, 4, 4, 9]), torch.tensor([4, 1])]
    mask = [torch.tensor([0, 1, 1, 1]), torch.tensor([1, 0])]
    assert answer_token_counts(ids, mask, 10).tolist() == [0, 0, 0, 0, 3, 0, 0, 0, 0, 1]
    d2t, t2d = d2t_t2d(torch.tensor([2, 5, 6, 9]), 12)
    assert d2t.dtype == torch.long and (torch.arange(4) + d2t).tolist() == [2, 5, 6, 9]
    assert t2d.dtype == torch.bool and t2d.nonzero().squeeze(-1).tolist() == [2, 5, 6, 9]


def _reduced(target, k, seed=0, **kw):
    torch.manual_seed(seed)
    draft = build_draft_for(target, tiny_draft_config(draft_vocab_size=k, **kw))
    counts = torch.arange(target.vocab_size).flip(0)  # lower ids are "more frequent"
    draft.set_draft_vocab(top_k_vocab(counts, k))
    return draft


def test_reduced_draft_emits_only_its_tokens_and_round_trips(tiny_target, tmp_path):
    draft = _reduced(tiny_target, 40).eval()
    assert draft.markov_head.markov_w2.weight.shape[0] == 40
    assert draft.markov_head.markov_w1.weight.shape[0] == tiny_target.vocab_size  # any previous token
    cache = draft.new_cache()
    ids = torch.randint(0, 200, (1, 12))
    draft.extend_context(cache, tiny_target.forward(ids).tap_hidden)
    prop = draft.propose(cache, torch.tensor([150]), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert prop.probs.shape[-1] == tiny_target.vocab_size
    assert torch.all(prop.probs[..., 40:] == 0) and torch.allclose(prop.probs.sum(-1), torch.ones(1, 4))
    assert bool((prop.tokens < 40).all())
    save_pretrained(draft, tmp_path / "d")
    again = load_draft(tmp_path / "d", tiny_target)
    assert torch.equal(again.draft_to_target, draft.draft_to_target)
    cache2 = again.new_cache()
    again.extend_context(cache2, tiny_target.forward(ids).tap_hidden)
    prop2 = again.propose(cache2, torch.tensor([150]), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(prop2.tokens, prop.tokens) and torch.equal(prop2.probs, prop.probs)


def test_trainable_head_starts_at_the_target_rows(tiny_target):
    draft = _reduced(tiny_target, 30, train_draft_head=True)
    rows = tiny_target.lm_head.weight[draft.draft_to_target]
    assert torch.equal(draft.lm_head.weight.detach(), rows)
    assert draft.lm_head.weight.requires_grad
    h = torch.randn(3, 64)
    assert torch.allclose(draft.base_logits(h), draft.teacher_logits(h))


def test_greedy_identity_with_a_reduced_vocabulary_and_outside_argmax_never_accepted():
    target = _target(1)
    torch.manual_seed(1)
    for k in (3, 64):
        cfg = DraftConfig(num_layers=2, block_size=5, sequential_head="markov", markov_rank=16, draft_vocab_size=k)
        draft = build_draft_for(target, cfg).eval()
        plain = [t for p in _prompts(4, 7) for t in hf_generate(target, p, 16, 0.0)]
        draft.set_draft_vocab(top_k_vocab(torch.bincount(torch.tensor(plain), minlength=target.vocab_size), k))
        allowed = set(draft.draft_to_target.tolist())
        outside_seen = 0
        for prompt in _prompts(4, seed=7):
            out = speculative_generate(target, draft, prompt, 16, 0.0, 5)
            assert out.tokens == hf_generate(target, prompt, 16, 0.0)
            pos = 1  # out.tokens[0] comes from the prefill; each round then emits accepted + 1 tokens
            for r in out.rounds:
                accepted = r["proposed"][: r["accepted"]]
                assert set(accepted) <= allowed
                assert accepted[: len(out.tokens) - pos] == out.tokens[pos: pos + r["accepted"]]  # last may be cut
                nxt = out.tokens[pos + r["accepted"]: pos + r["accepted"] + 1]
                outside_seen += sum(t not in allowed for t in nxt)  # produced by the target, never drafted
                pos += r["emitted"]
        if k == 3:
            assert outside_seen > 0  # the case the property is about actually happened


def test_t1_output_distribution_is_the_targets_with_a_reduced_vocabulary(small_vocab_pair):  # noqa: F811
    target, _, prompt, marginals = small_vocab_pair
    torch.manual_seed(0)
    draft = build_draft_for(target, DraftConfig(num_layers=1, block_size=2, markov_rank=8, draft_vocab_size=5,
                                                mask_token_id=V_SMALL - 1, initializer_range=0.6)).eval()
    draft.set_draft_vocab(torch.tensor([0, 2, 3, 5, 7]))
    for position, (stat, critical) in _chi2_on_speculative_tokens(target, draft, prompt, marginals).items():
        assert stat < critical, f"token {position + 1}: chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.parametrize("head,chunk,recompute,memo", [("markov", 4, True, True), ("rnn", 12, False, True),
                                                       ("none", 0, False, False), ("markov", 8, True, False)])
def test_reduced_loss_chunked_with_memo_equals_naive(tiny_target, head, chunk, recompute, memo):
    cfg = tiny_draft_config(sequential_head=head, confidence_head=head != "none", draft_vocab_size=48)
    draft, ids, out, anchors, mask = _setup(tiny_target, cfg)
    draft.set_draft_vocab(top_k_vocab(torch.bincount(ids.flatten(), minlength=tiny_target.vocab_size), 48))
    lm = torch.zeros_like(ids)
    lm[:, 1:] = (mask.sum((1, 2)) > 0)[:, None].long()  # every position of both rows may be supervised
    stats = TeacherMemo().lookup(tiny_target, [0, 1], out.final_hidden, lm, [ids.shape[1]] * 2) if memo else (None,) * 2

    l_ref, m_ref, g_ref = loss_and_grads(naive_draft_loss, draft, tiny_target, ids, out, anchors, mask)
    l_chk, m_chk, g_chk = loss_and_grads(draft_loss, draft, tiny_target, ids, out, anchors, mask, chunk_size=chunk,
                                         recompute=recompute, teacher_lse=stats[0], teacher_argmax=stats[1])
    assert l_chk.item() == pytest.approx(l_ref.item(), rel=1e-5)
    assert torch.allclose(m_chk["accept_per_slot"], m_ref["accept_per_slot"], atol=1e-5)
    assert m_chk["argmax_outside_vocab"].item() == pytest.approx(m_ref["argmax_outside_vocab"].item())
    for name, g in g_ref.items():
        assert torch.allclose(g_chk[name], g, rtol=1e-4, atol=1e-7), name


def test_restricted_teacher_is_not_renormalised(tiny_target):
    """A draft that equals the target on its K tokens has TV = the target mass outside K, and c* = mass in K."""
    draft, ids, out, anchors, mask = _setup(tiny_target, tiny_draft_config(draft_vocab_size=20))
    draft.set_draft_vocab(torch.arange(20))
    torch.nn.init.zeros_(draft.markov_head.markov_w2.weight)
    G = draft.block_size
    pos = (anchors.unsqueeze(-1) + torch.arange(G)).clamp(max=ids.shape[1] - 1)
    h = out.final_hidden[torch.arange(2)[:, None, None], pos]
    _, m = draft_loss(draft, tiny_target, h, out.final_hidden, ids, anchors, mask, LossWeights(), 0)
    p = torch.softmax(tiny_target.logits(h).float(), -1)  # (B, A, G, V)
    inside = p[..., :20].sum(-1)
    q = p[..., :20] / inside.unsqueeze(-1)  # the draft's distribution: the target's, renormalised on K
    l1 = (q - p[..., :20]).abs().sum(-1) + (1 - inside)
    c_star = 1 - l1 / 2
    assert m["expected_accept"].item() == pytest.approx(((mask * c_star).sum() / mask.sum()).item(), rel=1e-5)
    outside = (p.argmax(-1) >= 20).float()
    assert m["argmax_outside_vocab"].item() == pytest.approx(((mask * outside).sum() / mask.sum()).item())


def test_teacher_memo_computes_a_row_once_and_matches_the_direct_statistics(tiny_target, monkeypatch):
    ids = torch.randint(0, 200, (2, 10))
    fh = tiny_target.forward(ids).final_hidden
    lm = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    memo = TeacherMemo()
    lse, arg = memo.lookup(tiny_target, [5, 6], fh, lm, [8, 10])
    want_lse, want_arg = teacher_stats(tiny_target, fh.reshape(20, -1))
    for b, row in enumerate(lm):
        q = (row[1:] > 0).nonzero().squeeze(-1)
        assert torch.allclose(lse[b, q], want_lse.view(2, 10)[b, q], atol=1e-6)
        assert torch.equal(arg[b, q], want_arg.view(2, 10)[b, q])
        rest = torch.ones(10, dtype=torch.bool)
        rest[q] = False
        assert torch.isinf(lse[b, rest]).all()
    calls = []
    monkeypatch.setattr("train.teacher.teacher_stats", lambda *a, **k: calls.append(1) or teacher_stats(*a, **k))
    again = memo.lookup(tiny_target, [6, 5], fh.flip(0), lm.flip(0), [10, 8])
    assert not calls and torch.equal(again[0], lse.flip(0))


def test_warm_start_copies_the_chosen_target_layers():
    target = _target(2, layers=3)
    target.model.float()
    draft = build_draft_for(target, DraftConfig(num_layers=2, block_size=3, markov_rank=8,
                                                init_from_target="-1,0"))
    assert warm_start_layers("last", 2) == [-2, -1] and warm_start_layers("none", 2) == []
    with pytest.raises(ValueError, match="none, last or comma-separated"):
        warm_start_layers("top", 2)
    layers = target.model.get_decoder().layers
    for j, i in enumerate([2, 0]):
        assert torch.equal(draft.layers[j].self_attn.q_proj.weight, layers[i].self_attn.q_proj.weight)
        assert torch.equal(draft.layers[j].mlp["down_proj"].weight, layers[i].mlp.down_proj.weight)
        assert torch.equal(draft.layers[j].input_layernorm.weight, layers[i].input_layernorm.weight)
    with pytest.raises(ValueError, match="one target layer per draft layer"):
        init_layers_from_target(draft, target, [0])
    with pytest.raises(ValueError, match="layers 0..2"):
        init_layers_from_target(draft, target, [0, 5])
    narrow = build_draft_for(target, DraftConfig(num_layers=1, block_size=3, markov_rank=8, intermediate_size=32))
    with pytest.raises(ValueError, match="sizes must equal"):
        init_layers_from_target(narrow, target, [0])
