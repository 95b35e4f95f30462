"""Speculative decoding is lossless: greedy equality, the T=1 output distribution, tau extremes, accounting."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import eval.speculative as spec
from dspark_model.config import DraftConfig, TargetSpec
from dspark_model.draft import DraftProposal, build_draft_for
from dspark_model.target import Target, load_target
from dspark_model.tiny import build_tiny_model
from eval.baselines import hf_generate
from eval.speculative import residual_distribution, speculative_generate, verify_block


def _target(seed: int, layers: int = 3, init: float = 0.02, family: str = "llama") -> Target:
    """A tiny random target in float64, so near-ties cannot flip an argmax between code paths."""
    target = load_target(TargetSpec(id=f"tiny-{family}", path=None, random={
        "family": family, "num_hidden_layers": layers, "seed": seed, "initializer_range": init}))
    target.model.double()
    return target


def _draft(target, block_size: int = 7, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = DraftConfig(num_layers=2, block_size=block_size, sequential_head="markov", markov_rank=16, **kw)
    return build_draft_for(target, cfg).eval()


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@torch.no_grad()
def plain_greedy(target, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding, one token per forward with a KV cache, no EOS."""
    cache, ids, out = target.new_cache(), torch.tensor([prompt]), []
    for _ in range(n):
        hidden = target.forward(ids, past_key_values=cache, use_cache=True).final_hidden
        out.append(int(target.logits(hidden[0, -1]).argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


# ----------------------------------------------------------------------------------------------------
# Greedy: any draft, even a random one, reproduces plain greedy decoding token for token
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,init,family", [(1, 0.02, "llama"), (2, 0.3, "qwen3")])
def test_random_draft_is_lossless_at_t0(seed, init, family):
    target = _target(seed, init=init, family=family)
    draft = _draft(target, seed=seed)
    accepted = 0
    for gamma in (1, 3, 7):
        for prompt in _prompts(3, seed=10 * seed + gamma):
            out = speculative_generate(target, draft, prompt, 20, 0.0, gamma, eos_token_ids=[256])
            reference = hf_generate(target, prompt, 20, 0.0, eos_token_ids=[256])
            assert out.tokens == reference, f"gamma={gamma} prompt={prompt}"
            assert out.target_forwards == len(out.rounds) + 1
            accepted += sum(r["accepted"] for r in out.rounds)
    if init == 0.02:  # the degenerate tiny model lets random drafts through: rollback paths get exercised
        assert accepted > 0


class ScriptedDraft:
    """Proposes a known continuation (optionally corrupted), with one-hot probabilities."""

    def __init__(self, prompt_len: int, continuation: list[int], vocab: int, block_size: int, wrong=None):
        self.prompt_len, self.continuation, self.vocab = prompt_len, continuation, vocab
        self.block_size, self.wrong = block_size, wrong or (lambda k, tok: tok)

    def new_cache(self):
        return SimpleNamespace(length=0)

    def extend_context(self, cache, tap_hidden):
        cache.length += tap_hidden.shape[1]

    def propose(self, cache, anchor, temperature, generator=None, gamma=None):
        start = cache.length - self.prompt_len + 1  # continuation index of the first drafted token
        toks = [self.wrong(k, t) for k, t in enumerate(self.continuation[start:start + gamma])]
        tokens = torch.tensor([toks])  # (1, G)
        return DraftProposal(tokens, torch.nn.functional.one_hot(tokens, self.vocab).double(), None)


@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_perfect_draft_gives_tau_gamma_plus_one_and_wrong_draft_tau_one(gamma):
    target = _target(4, init=0.3)
    prompt, n = [5, 6, 7, 8, 9], 25
    continuation = plain_greedy(target, prompt, n + gamma + 2)
    perfect = ScriptedDraft(len(prompt), continuation, target.vocab_size, gamma)
    out = speculative_generate(target, perfect, prompt, n, 0.0, gamma)
    assert out.tokens == continuation[:n]
    assert all(r["accepted"] == gamma and r["emitted"] == gamma + 1 for r in out.rounds)
    assert len(out.rounds) == math.ceil((n - 1) / (gamma + 1))
    wrong = ScriptedDraft(len(prompt), continuation, target.vocab_size, gamma,
                          wrong=lambda k, tok: (tok + 1) % target.vocab_size)
    out = speculative_generate(target, wrong, prompt, n, 0.0, gamma)
    assert out.tokens == continuation[:n]
    assert all(r["accepted"] == 0 and r["emitted"] == 1 for r in out.rounds) and len(out.rounds) == n - 1


def test_partially_right_draft_rolls_back_correctly():
    """Drafts right for a varying prefix (wrong at position round % gamma): output still equals greedy."""
    target, gamma = _target(5, init=0.3), 4
    prompt = [3, 1, 4, 1, 5]
    continuation = plain_greedy(target, prompt, 40 + gamma + 2)
    rounds = iter(range(10_000))
    bad = {}

    def wrong_at(k, tok):  # corrupt slot (round index % (gamma + 1)); slot gamma means "no error"
        if k == 0:
            bad["slot"] = next(rounds) % (gamma + 1)
        return (tok + 1) % target.vocab_size if k == bad["slot"] else tok

    draft = ScriptedDraft(len(prompt), continuation, target.vocab_size, gamma, wrong=wrong_at)
    out = speculative_generate(target, draft, prompt, 40, 0.0, gamma)
    assert out.tokens == continuation[:40]
    assert sorted({r["accepted"] for r in out.rounds}) == list(range(gamma + 1))


def test_draft_context_cache_matches_a_fresh_prefill():
    """After generation the incrementally grown draft context equals the one built from a single forward."""
    target = _target(1)
    draft = _draft(target, block_size=4)
    caches = []
    new_cache = draft.new_cache
    draft.new_cache = lambda: caches.append(new_cache()) or caches[-1]
    prompt = [10, 20, 30, 40, 50, 60]
    out = speculative_generate(target, draft, prompt, 30, 0.0, 4)
    full = torch.tensor([prompt + out.tokens])
    fresh = new_cache()
    draft.extend_context(fresh, target.forward(full[:, : caches[0].length]).tap_hidden)
    assert caches[0].length == len(prompt) + sum(r["accepted"] + 1 for r in out.rounds[:-1])
    torch.testing.assert_close(caches[0].k[0], fresh.k[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(caches[0].v[-1], fresh.v[-1], rtol=1e-4, atol=1e-5)


def test_eos_and_max_new_tokens_stop_like_generate():
    target = _target(2, init=0.3)
    draft = _draft(target)
    prompt = [72, 105]
    free = plain_greedy(target, prompt, 12)
    # pretend a token that first appears at index >= 3 is EOS: generation must stop right after it
    eos = next(t for i, t in enumerate(free) if i >= 3 and free.index(t) == i)
    out = speculative_generate(target, draft, prompt, 12, 0.0, 3, eos_token_ids=[eos])
    cut = free.index(eos) + 1
    assert out.tokens == free[:cut] and out.stopped_by_eos and out.rounds[-1]["eos"]
    out = speculative_generate(target, draft, prompt, 7, 0.0, 7)
    assert out.tokens == free[:7] and not out.stopped_by_eos


def test_gamma_beyond_block_size_is_a_clear_error():
    target = _target(1)
    with pytest.raises(ValueError, match="exceeds the draft's trained block size 4"):
        speculative_generate(target, _draft(target, block_size=4), [1, 2], 5, 0.0, gamma=5)


# ----------------------------------------------------------------------------------------------------
# Hand-built rounds: acceptance accounting
# ----------------------------------------------------------------------------------------------------

P_T = torch.tensor([[0.1, 0.6, 0.2, 0.1],   # judges d_1 = 1: p_t 0.6 >= p_d 0.3 -> always accepted
                    [0.5, 0.1, 0.2, 0.2],   # judges d_2 = 1: ratio 0.1 / 0.4 = 0.25
                    [0.0, 0.0, 1.0, 0.0],   # judges d_3 = 2: certain
                    [0.0, 0.0, 0.0, 1.0]])  # bonus position: token 3
P_D = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])


def test_hand_built_round_rejection_resamples_from_the_residual():
    v = verify_block(P_T, [1, 1, 2], P_D, 1.0, uniforms=torch.tensor([0.99, 0.30, 0.0]))
    # d_2 rejected (0.30 > 0.25); residual max(p_t - p_d, 0) = [0.4, 0, 0, 0] -> token 0 for sure
    assert (v.accepted, v.next_token, v.accepted_mask, v.eos) == (1, 0, [True, False, False], False)
    torch.testing.assert_close(residual_distribution(P_T[1], P_D[1]), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_hand_built_round_all_accepted_takes_the_bonus_and_eos_stops_it():
    v = verify_block(P_T, [1, 1, 2], P_D, 1.0, uniforms=torch.tensor([0.5, 0.20, 0.9]))
    assert (v.accepted, v.next_token, v.accepted_mask) == (3, 3, [True, True, True])
    v = verify_block(P_T, [1, 1, 2], P_D, 1.0, uniforms=torch.tensor([0.5, 0.20, 0.9]), eos_token_ids=[1])
    assert (v.accepted, v.next_token, v.eos, v.accepted_mask) == (1, None, True, [True, False, False])


def test_hand_built_round_greedy_is_exact_match():
    one_hot = spec.target_distribution(P_T.log(), 0.0)
    assert one_hot.argmax(-1).tolist() == [1, 0, 2, 3]
    v = verify_block(one_hot, [1, 0, 0], torch.eye(4)[[1, 0, 0]], 0.0)
    assert (v.accepted, v.next_token, v.accepted_mask) == (2, 2, [True, True, False])


# ----------------------------------------------------------------------------------------------------
# T = 1: the output distribution is the target's (chi-square), and a broken residual step is caught
# ----------------------------------------------------------------------------------------------------

V_SMALL, N_SAMPLES = 8, 600


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper critical value of chi-square(df) at alpha = 0.001 (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson statistic with cells of expected count < 5 pooled; returns (statistic, degrees of freedom)."""
    expected = probs * n
    keep = expected >= 5
    cells = list(zip(counts[keep].tolist(), expected[keep].tolist()))
    if (~keep).any():
        cells.append((counts[~keep].sum().item(), expected[~keep].sum().item()))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


@pytest.fixture(scope="module")
def small_vocab_pair():
    """A target over 8 tokens with spread-out distributions and a peaky random draft that disagrees."""
    model = build_tiny_model("llama", seed=3, vocab_size=V_SMALL, num_hidden_layers=2, hidden_size=32,
                             intermediate_size=64, initializer_range=0.15, eos_token_id=None, pad_token_id=None)
    target = Target(model.double(), tokenizer=None)
    torch.manual_seed(0)
    draft = build_draft_for(target, DraftConfig(num_layers=1, block_size=2, markov_rank=8,
                                                mask_token_id=V_SMALL - 1, initializer_range=0.6)).eval()
    prompt = [1, 2, 3, 4, 5]

    def next_dist(prefixes):  # exact target next-token distributions after prompt + prefix
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        return torch.softmax(target.logits(target.forward(ids).final_hidden[:, -1]).double(), -1)

    p1 = next_dist([()])[0]
    joint12 = p1[:, None] * next_dist([(a,) for a in range(V_SMALL)])  # (V, V)
    p3 = next_dist([(a, b) for a in range(V_SMALL) for b in range(V_SMALL)]).view(V_SMALL, V_SMALL, V_SMALL)
    marginals = {1: joint12.sum(0), 2: (joint12[:, :, None] * p3).sum((0, 1))}
    return target, draft, prompt, marginals


def _chi2_on_speculative_tokens(target, draft, prompt, marginals) -> dict[int, tuple[float, float]]:
    """Sample N generations of 3 tokens; chi-square of tokens 2 and 3 (the first two drafted positions)."""
    counts = {1: torch.zeros(V_SMALL), 2: torch.zeros(V_SMALL)}
    for seed in range(N_SAMPLES):
        out = speculative_generate(target, draft, prompt, 3, 1.0, 2, torch.Generator().manual_seed(seed))
        for i in counts:
            counts[i][out.tokens[i]] += 1
    return chi2_by_position(counts, marginals)


def chi2_by_position(counts: dict, marginals: dict) -> dict[int, tuple[float, float]]:
    """{position: (chi-square statistic of its N_SAMPLES token counts, critical value)}."""
    result = {}
    for i in counts:
        stat, df = chi2_statistic(counts[i], marginals[i], N_SAMPLES)
        result[i] = (stat, chi2_critical(df))
    return result


def test_t1_output_distribution_equals_the_target(small_vocab_pair):
    for position, (stat, critical) in _chi2_on_speculative_tokens(*small_vocab_pair).items():
        assert stat < critical, f"token {position + 1}: chi2 {stat:.1f} >= {critical:.1f}"


def test_t1_chi_square_catches_a_broken_residual_step(small_vocab_pair, monkeypatch):
    monkeypatch.setattr(spec, "residual_distribution", lambda p_t, p_d: p_t)  # resample from p_t: biased
    results = _chi2_on_speculative_tokens(*small_vocab_pair)
    assert any(stat > critical for stat, critical in results.values()), results
