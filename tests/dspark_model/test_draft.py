"""DSpark draft: shapes, causality, train/inference agreement, head equivalences, sizing."""

from __future__ import annotations

import pytest
import torch

from dspark_model.config import DraftConfig
from dspark_model.draft import build_draft, build_draft_for, choose_mask_token_id, count_parameters
from tests.conftest import tiny_draft_config

HEADS = ["none", "markov", "gated", "rnn"]


def _draft(target, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_draft_for(target, tiny_draft_config(**overrides)).eval()


def _inputs(target, T=24, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    return ids, target.forward(ids).tap_hidden


@pytest.mark.parametrize("head", HEADS)
def test_shapes_for_every_head(tiny_target, head):
    draft = _draft(tiny_target, sequential_head=head, confidence_head=head != "none")
    ids, taps = _inputs(tiny_target)
    anchors = torch.tensor([[2, 9, 15], [1, 5, 20]])
    h = draft.forward_train(taps, ids, anchors)
    assert h.shape == (2, 3, 4, 64)
    prev, labels, in_range = draft.block_inputs(ids, anchors)
    assert prev[0, 1].tolist() == ids[0, 9:13].tolist() and labels[0, 1].tolist() == ids[0, 10:14].tolist()
    assert in_range[1, 2].tolist() == [True, True, True, False]  # p=20: labels 21, 22, 23, (24 is outside)
    logits = draft.logits(h.flatten(0, 1), prev.flatten(0, 1))
    assert logits.shape == (6, 4, 272) and logits.dtype == torch.float32
    conf = draft.confidence_logits(h.flatten(0, 1), prev.flatten(0, 1))
    assert (conf is None) == (head == "none") and (conf is None or conf.shape == (6, 4))


def test_markov_with_zero_w2_equals_dflash_logits(tiny_target):
    markov = _draft(tiny_target, sequential_head="markov")
    dflash = _draft(tiny_target, seed=5, sequential_head="none", confidence_head=False)
    dflash.load_state_dict({k: v for k, v in markov.state_dict().items() if k in dflash.state_dict()})
    torch.nn.init.zeros_(markov.markov_head.markov_w2.weight)
    ids, taps = _inputs(tiny_target)
    anchors = torch.tensor([[3, 10], [4, 12]])
    prev, _, _ = markov.block_inputs(ids, anchors)
    a = markov.logits(markov.forward_train(taps, ids, anchors).flatten(0, 1), prev.flatten(0, 1))
    b = dflash.logits(dflash.forward_train(taps, ids, anchors).flatten(0, 1), prev.flatten(0, 1))
    assert torch.equal(a, b)


def test_block_sees_only_context_strictly_before_its_anchor(tiny_target):
    draft = _draft(tiny_target)
    ids, taps = _inputs(tiny_target, B=1)
    anchors = torch.tensor([[6, 14]])
    base = draft.forward_train(taps, ids, anchors)
    later = taps.clone()
    later[:, 14:] += torch.randn_like(later[:, 14:])  # at and after the second anchor
    out = draft.forward_train(later, ids, anchors)
    torch.testing.assert_close(out[:, 1], base[:, 1], rtol=0, atol=0)
    earlier = taps.clone()
    earlier[:, 13] += 1.0  # just before the anchor: must matter
    assert not torch.allclose(draft.forward_train(earlier, ids, anchors)[:, 1], base[:, 1])


def test_blocks_do_not_see_each_other(tiny_target):
    draft = _draft(tiny_target)
    ids, taps = _inputs(tiny_target, B=1)
    anchors = torch.tensor([[6, 14]])
    base = draft.forward_train(taps, ids, anchors)
    other = ids.clone()
    other[0, 14] = (other[0, 14] + 1) % 256  # second block's anchor token
    out = draft.forward_train(taps, other, anchors)
    torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1], base[:, 1])


@pytest.mark.parametrize("head", HEADS)
def test_training_forward_and_inference_step_agree(tiny_target, head):
    """The draft distribution an inference round samples from equals the teacher-forced training logits."""
    draft = _draft(tiny_target, sequential_head=head, confidence_head=head != "none")
    ids, taps = _inputs(tiny_target, B=1, T=20)
    p = 9
    cache = draft.new_cache()
    draft.extend_context(cache, taps[:, :4])  # context arrives in two rounds, as in decoding
    draft.extend_context(cache, taps[:, 4:p])
    prop = draft.propose(cache, ids[:, p], temperature=1.0, generator=torch.Generator().manual_seed(3))
    forced = ids.clone()
    forced[0, p + 1: p + 4] = prop.tokens[0, :3]  # slot k's previous token is the sampled x_{p+k}
    forced_taps = taps.clone()  # positions >= p are invisible to this block anyway
    h = draft.forward_train(forced_taps, forced, torch.tensor([[p]]))
    prev, _, _ = draft.block_inputs(forced, torch.tensor([[p]]))
    probs = torch.softmax(draft.logits(h[0], prev[0]), dim=-1)
    torch.testing.assert_close(probs, prop.probs[0:1].reshape(1, 4, -1), atol=1e-5, rtol=1e-4)
    conf = draft.confidence_logits(h[0], prev[0])
    if conf is not None:
        torch.testing.assert_close(torch.sigmoid(conf), prop.confidences, atol=1e-5, rtol=1e-4)


def test_greedy_proposal_is_one_hot_argmax(tiny_target):
    draft = _draft(tiny_target)
    ids, taps = _inputs(tiny_target, B=1)
    cache = draft.new_cache()
    draft.extend_context(cache, taps[:, :8])
    prop = draft.propose(cache, ids[:, 8], temperature=0.0, gamma=3)
    assert prop.tokens.shape == (1, 3) and torch.equal(prop.probs.argmax(-1), prop.tokens)
    assert torch.equal(prop.probs.sum(-1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="exceeds the trained block size"):
        draft.propose(cache, ids[:, 8], gamma=5)


@pytest.mark.parametrize("head,temperature", [("markov", 0.0), ("gated", 1.0), ("none", 1.0)])
def test_batched_proposals_equal_one_proposal_per_context(tiny_target, head, temperature):
    """propose_batch over contexts of different lengths = propose on each alone: the padding is masked out
    and each request draws from its own generator as it would alone (a reduced vocabulary included)."""
    draft = _draft(tiny_target, sequential_head=head, confidence_head=head != "none", draft_vocab_size=40)
    draft.set_draft_vocab(torch.arange(0, 200, 5))
    ids, taps = _inputs(tiny_target, B=3)
    caches = []
    for r, n in enumerate((5, 11, 8)):
        caches.append(draft.new_cache())
        draft.extend_context(caches[-1], taps[r:r + 1, :n])
    anchors = ids[[0, 1, 2], [5, 11, 8]]
    seeded = lambda: [torch.Generator().manual_seed(10 + r) for r in range(3)]  # noqa: E731
    batch = draft.propose_batch(caches, anchors, temperature, seeded(), gamma=3)
    alone = [draft.propose(c, anchors[r:r + 1], temperature, g, gamma=3)
             for r, (c, g) in enumerate(zip(caches, seeded()))]
    assert torch.equal(batch.tokens, torch.cat([a.tokens for a in alone]))
    torch.testing.assert_close(batch.probs, torch.cat([a.probs for a in alone]), atol=1e-5, rtol=1e-4)
    if head != "none":
        torch.testing.assert_close(batch.confidences, torch.cat([a.confidences for a in alone]),
                                   atol=1e-5, rtol=1e-4)
    assert [c.length for c in caches] == [5, 11, 8]  # the callers' caches are untouched
    with pytest.raises(ValueError, match="3 anchors, 2 caches"):
        draft.propose_batch(caches[:2], anchors, temperature, None, gamma=3)


def test_target_embedding_and_head_are_not_draft_parameters(tiny_target):
    draft = _draft(tiny_target)
    names = set(draft.state_dict())
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert all(p.data_ptr() != tiny_target.embed.weight.data_ptr() for p in draft.parameters())


def test_mask_token_choice_order(tiny_target):
    tok = tiny_target.tokenizer
    assert choose_mask_token_id(tok, 272) == len(tok)  # first spare embedding row (259)
    assert choose_mask_token_id(tok, len(tok)) == tok.pad_token_id  # no spare row: pad


QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)


def test_qwen25_7b_draft_builds_on_meta_and_has_the_expected_size():
    from transformers import Qwen2Config

    cfg = Qwen2Config(**QWEN25_7B)
    with torch.device("meta"):
        draft = build_draft(DraftConfig(), cfg, mask_token_id=151669)
    d, kv, ff, V, r = 3584, 4 * 128, 18944, 152064, 256
    layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * 128 + 2 * d
    expected = 5 * layer + 5 * d * d + 2 * d + 2 * V * r + (d + r + 1)
    assert draft.tap_layer_ids == [1, 7, 13, 19, 25]
    assert count_parameters(draft) == expected == 1_307_360_257  # about 1.31 B trainable parameters
