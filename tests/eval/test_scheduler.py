"""Algorithm 1 and its variants, the SPS table, and SPS profiling."""


import numpy as np
import pytest

from eval.scheduler import (
    SpsTable,
    expected_throughput,
    make_target_step_fn,
    profile_sps,
    schedule_algorithm1,
    schedule_global,
    schedule_practical,
    with_draft_cost,
)

APPENDIX_SPS = SpsTable({1: 1.0, 2: 0.5, 3: 0.45})


# ----------------------------------------------------------------------------------------------------
# Appendix A counterexample
# ----------------------------------------------------------------------------------------------------

def _first_token_distribution(scheduler):
    """Exact law of the first output token for R=1, gamma=2, vocabulary {A, B} (paper Appendix A).

    The draft samples x1 ~ p_d; x1 = A makes the confidence head say c2 = 0.9, x1 = B makes it say 0.
    If the scheduler verifies x1 it is accepted with prob min(1, p_t/p_d), else the correction is drawn
    from normalize(max(p_t - p_d, 0)); if x1 is not verified the target samples from p_t.
    """
    p_t, p_d = np.array([0.7, 0.3]), np.array([0.5, 0.5])
    residual = np.maximum(p_t - p_d, 0.0) / np.maximum(p_t - p_d, 0.0).sum()
    out = np.zeros(2)
    for x1, c2 in ((0, 0.9), (1, 0.0)):
        length = scheduler([[0.8, 0.8 * c2]])[0]
        if length >= 1:
            accept = min(1.0, p_t[x1] / p_d[x1])
            out[x1] += p_d[x1] * accept
            out += p_d[x1] * (1.0 - accept) * residual
        else:
            out += p_d[x1] * p_t
    return out


@pytest.mark.parametrize("c2", [0.0, 0.5, 0.9, 1.0])
def test_appendix_a_algorithm1_never_verifies_regardless_of_c2(c2):
    assert schedule_algorithm1([[0.8, 0.8 * c2]], APPENDIX_SPS).tolist() == [0]


def test_appendix_a_global_search_depends_on_the_sampled_token():
    assert schedule_global([[0.8, 0.72]], APPENDIX_SPS).tolist() == [2]
    assert schedule_global([[0.8, 0.0]], APPENDIX_SPS).tolist() == [0]
    tau, theta = expected_throughput([[0.8, 0.72]], [2], APPENDIX_SPS)
    assert tau == pytest.approx(2.52) and theta == pytest.approx(1.134)


def test_appendix_a_output_distribution_exact():
    assert np.allclose(_first_token_distribution(lambda s: schedule_algorithm1(s, APPENDIX_SPS)), [0.7, 0.3])
    assert np.allclose(_first_token_distribution(lambda s: schedule_global(s, APPENDIX_SPS)), [0.85, 0.15])
    # The enumerator itself is lossless when verification never depends on x1.
    assert np.allclose(_first_token_distribution(lambda s: [2]), [0.7, 0.3])


# ----------------------------------------------------------------------------------------------------
# Properties on random inputs
# ----------------------------------------------------------------------------------------------------

def _algorithm1_literal(survival, sps):
    """Line-by-line transcription of Algorithm 1 (lines 4-16), as a reference."""
    n_requests = len(survival)
    cands = [(a, r, j + 1) for r, row in enumerate(survival) for j, a in enumerate(row) if a > 0]
    cands.sort(key=lambda c: -c[0])  # Python's sort is stable
    lengths, best_lengths = [0] * n_requests, [0] * n_requests
    batch, tau, best = n_requests, float(n_requests), n_requests * sps(n_requests)
    for a, r, j in cands:
        lengths[r], batch, tau = j, batch + 1, tau + a
        theta = tau * sps(batch)
        if theta > best:
            best, best_lengths = theta, list(lengths)
        else:
            break
    return best_lengths


def _random_case(rng, jagged=False):
    n_requests, gamma = int(rng.integers(1, 9)), int(rng.integers(1, 7))
    conf = rng.random((n_requests, gamma)) ** 0.5
    conf[rng.random((n_requests, gamma)) < 0.1] = 0.0  # some zero survivals
    survival = np.cumprod(conf, axis=1)  # (R, gamma), non-increasing
    batch = np.arange(1, n_requests * (gamma + 1) + 1)
    steps = 100.0 / (1.0 + 0.05 * rng.random() * batch)
    if jagged:  # a non-monotone cost, passed as a plain callable (an SpsTable would smooth it into its envelope)
        steps = steps * (1.0 - 0.3 * (batch % 4 == 0))
        return survival, lambda b: float(steps[int(b) - 1])
    return survival, SpsTable(dict(zip(batch.tolist(), steps.tolist())))


@pytest.mark.parametrize("jagged", [False, True])
def test_algorithm1_matches_literal_transcription(jagged):
    rng = np.random.default_rng(0)
    for _ in range(300):
        survival, sps = _random_case(rng, jagged)
        assert schedule_algorithm1(survival, sps).tolist() == _algorithm1_literal(survival.tolist(), sps)


@pytest.mark.parametrize("scheduler", ["algorithm1", "global", "practical"])
def test_lengths_are_prefixes_within_gamma_and_admit_the_most_likely_tokens(scheduler):
    """Admitted set = {(r, j): j <= l_r}: every admitted survival is > 0 and >= every non-admitted one."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        survival, sps = _random_case(rng, jagged=True)
        if scheduler == "algorithm1":
            lengths = schedule_algorithm1(survival, sps)
        elif scheduler == "global":
            lengths = schedule_global(survival, sps)
        else:
            stale = np.cumprod(rng.random(survival.shape), axis=1)
            lengths = schedule_practical(survival, stale, sps)
        gamma = survival.shape[1]
        assert np.all((lengths >= 0) & (lengths <= gamma))
        admitted = np.arange(1, gamma + 1)[None, :] <= lengths[:, None]  # (R, gamma)
        assert np.all(survival[admitted] > 0)
        rest = survival[~admitted]
        if admitted.any() and rest.size:
            assert survival[admitted].min() >= rest.max()


def test_global_reaches_at_least_algorithm1_expected_throughput():
    rng = np.random.default_rng(2)
    for _ in range(200):
        survival, sps = _random_case(rng, jagged=True)
        _, theta_alg1 = expected_throughput(survival, schedule_algorithm1(survival, sps), sps)
        _, theta_global = expected_throughput(survival, schedule_global(survival, sps), sps)
        assert theta_global >= theta_alg1 - 1e-12


def test_flattening_the_sps_curve_never_shortens_any_request():
    """Monotonicity in load cost: with SPS non-increasing, replacing SPS(B) by SPS(B)**p for p in (0, 1)
    raises every ratio SPS(B+1)/SPS(B), which only loosens each admission test on the same sorted path.
    So no request's Algorithm-1 length may decrease."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        survival, sps = _random_case(rng)
        flatter = SpsTable(dict(zip(sps.batch_tokens.tolist(), (sps.steps_per_s ** 0.5).tolist())))
        assert np.all(schedule_algorithm1(survival, flatter) >= schedule_algorithm1(survival, sps))


def test_algorithm1_is_not_monotone_in_a_request_own_survival():
    """Documented caveat: raising a_1 makes tau* larger, so the SPS drop of the next admission weighs more
    and the early stop can come sooner. Raising survival can therefore shorten a request."""
    sps = SpsTable({1: 1.0, 2: 0.9, 3: 0.7})
    assert schedule_algorithm1([[0.5, 0.45]], sps).tolist() == [2]
    assert schedule_algorithm1([[0.9, 0.45]], sps).tolist() == [1]


def test_edge_cases_one_request_zero_survival_and_flat_sps():
    assert schedule_algorithm1([[0.0, 0.0, 0.0]], APPENDIX_SPS).tolist() == [0]
    assert schedule_algorithm1(np.zeros((3, 4)), APPENDIX_SPS).tolist() == [0, 0, 0]
    flat = SpsTable({1: 5.0})
    survival = np.array([[0.9, 0.3, 0.0], [0.2, 0.01, 0.001], [0.0, 0.0, 0.0]])
    assert schedule_algorithm1(survival, flat).tolist() == [2, 3, 0]
    assert schedule_algorithm1([[0.6, 0.2]], lambda b: 1.0).tolist() == [2]  # plain callable SPS
    assert schedule_algorithm1([[0.6, 0.2]], {1: 1.0, 9: 1.0}).tolist() == [2]  # plain mapping SPS


def test_practical_uses_stale_capacity_and_current_ranking():
    rng = np.random.default_rng(4)
    for _ in range(100):
        survival, sps = _random_case(rng, jagged=True)
        assert np.array_equal(schedule_practical(survival, survival, sps), schedule_global(survival, sps))
    current = np.array([[0.9, 0.8], [0.5, 0.1]])
    stale = np.array([[0.99, 0.0], [0.0, 0.0]])  # capacity 1 under a flat SPS
    assert schedule_practical(current, stale, SpsTable({1: 1.0})).tolist() == [1, 0]
    assert schedule_practical(current, np.zeros((2, 2)), SpsTable({1: 1.0})).tolist() == [0, 0]


def test_rejects_survival_that_is_not_a_prefix_product():
    with pytest.raises(ValueError, match="non-increasing"):
        schedule_algorithm1([[0.3, 0.6]], APPENDIX_SPS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule_algorithm1([[1.3, 0.6]], APPENDIX_SPS)


# ----------------------------------------------------------------------------------------------------
# SPS table and profiling
# ----------------------------------------------------------------------------------------------------

def test_sps_table_interpolates_inside_and_holds_ends_outside():
    table = SpsTable([(3, 6.0), (1, 10.0), (7, 2.0)])
    assert table(2) == pytest.approx(8.0)
    assert table(5) == pytest.approx(4.0)
    assert table(0) == 10.0 and table(100) == 2.0
    assert np.allclose(table(np.array([1, 2, 3])), [10.0, 8.0, 6.0])
    again = SpsTable.from_dict(table.to_dict())
    assert again.batch_tokens.tolist() == [1, 3, 7] and again.steps_per_s.tolist() == [10.0, 6.0, 2.0]
    assert SpsTable.from_dict({"1": 4.0, "2": 3.0})(2) == 3.0  # JSON-style string keys
    with pytest.raises(ValueError):
        SpsTable({1: 0.0})
    with pytest.raises(ValueError):
        SpsTable([(2, 1.0), (2, 3.0)])


def test_sps_table_uses_the_padding_envelope_of_a_non_monotone_profile():
    measured = {1: 15.6, 2: 8.8, 4: 7.4, 8: 9.0, 16: 7.4}  # 4 tokens slower than 8 (a CPU kernel switch)
    table = SpsTable(measured)
    assert table.measured_steps_per_s.tolist() == [15.6, 8.8, 7.4, 9.0, 7.4]
    assert table.steps_per_s.tolist() == [15.6, 9.0, 9.0, 9.0, 7.4]  # pad 2..8 tokens up to the 8-token shape
    assert table(4) == 9.0 and table(3) == 9.0 and table(12) == pytest.approx(8.2)
    assert all(table(b) >= table(b + 1) for b in range(1, 20))
    again = SpsTable.from_dict(table.to_dict())
    assert again.measured_steps_per_s.tolist() == table.measured_steps_per_s.tolist()
    assert again.steps_per_s.tolist() == table.steps_per_s.tolist()


def test_profile_sps_orders_batches_by_step_duration_and_skips_warmup():
    """Timed with a simulated clock that each step advances: real sleeps of a few milliseconds reorder under
    a loaded CPU (this test once failed that way while other jobs shared the machine)."""
    calls, now = [], [0.0]

    def step_fn(batch):
        calls.append(batch)
        first = calls.count(batch) == 1
        now[0] += 0.05 if first else 0.002 * batch  # the first (warm-up) call of each size is slow

    table = profile_sps(step_fn, [4, 1, 2], warmup=1, repeats=3, clock=lambda: now[0])
    assert len(calls) == 3 * (1 + 3)
    assert table.batch_tokens.tolist() == [1, 2, 4]
    assert table(1) > table(2) > table(4)
    assert table(1) > 1.0 / 0.05  # the slow warm-up call did not enter the median


def test_target_step_fn_keeps_the_context_length_fixed():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    step_fn = make_target_step_fn(model, context_len=16)
    assert step_fn.cache.get_seq_length() == 16
    for batch in (1, 5, 3):
        assert tuple(step_fn(batch)) == (1, batch, 64)
        assert step_fn.cache.get_seq_length() == 16
    table = profile_sps(step_fn, [1, 4], warmup=1, repeats=2)
    assert np.all(table.steps_per_s > 0)


# ----------------------------------------------------------------------------------------------------
# The round's drafting time in the objective (eval/live_cost.py)
# ----------------------------------------------------------------------------------------------------

def test_draft_cost_makes_algorithm1_verify_longer_in_a_hand_computed_case():
    """One request, survival (0.9, 0.5, 0.2), SPS {1: 10, 2: 9, 3: 8, 4: 7} steps/s.

    Paper objective tau* x SPS(B): 10, 1.9 x 9 = 17.1, 2.4 x 8 = 19.2, 2.6 x 7 = 18.2 -> stop, l = 2.
    With 0.1 s of drafting per round, rounds/s = 1 / (1/SPS + 0.1) = 5, 4.737, 4.444, 4.118 and
    Theta = 5, 9.0, 10.667, 10.706 -> the third token still pays, l = 3."""
    sps = SpsTable({1: 10.0, 2: 9.0, 3: 8.0, 4: 7.0})
    survival = [[0.9, 0.5, 0.2]]
    assert schedule_algorithm1(survival, sps).tolist() == [2]
    rate = with_draft_cost(sps, 0.1)
    assert rate(3) == pytest.approx(1 / (1 / 8 + 0.1)) and rate(np.array([1, 4])) == pytest.approx([5.0, 1 / (1 / 7 + 0.1)])
    assert expected_throughput(survival, [3], rate)[1] == pytest.approx(2.6 / (1 / 7 + 0.1))
    assert schedule_algorithm1(survival, rate).tolist() == [3]
    assert with_draft_cost(sps, 0.0) is sps  # no drafting time: the paper's objective, unchanged
