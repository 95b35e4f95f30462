"""Batched live decoding (eval/live.py) stays lossless per request: greedy identity for Algorithm 1 and fixed
lengths, the same draws as decoding alone at T=1, the T=1 output distribution (chi-square), and the runner."""

from __future__ import annotations

import json

import pytest
import torch

import eval.live as live
from eval.baselines import hf_generate
from eval.live import algorithm1_policy, fixed_policy, measure_scheduler_live
from eval.live_batch import BatchRun, PackedContext, batched_speculative_generate, check_window
from eval.speculative import speculative_generate
from tests.eval.test_speculative import (  # noqa: F401  (small_vocab_pair is a fixture)
    N_SAMPLES,
    V_SMALL,
    _draft,
    _prompts,
    _target,
    chi2_by_position,
    small_vocab_pair,
)


def sps_power(alpha: float):
    """SPS(B) = B^-alpha: a smooth, decreasing step rate."""
    return lambda batch: float(batch) ** -alpha


def sps_cap(max_batch: int):
    """A flat SPS up to ``max_batch`` tokens and a cliff after it: Algorithm 1 then verifies the
    ``max_batch - R`` draft tokens of highest survival over all requests, so the lengths differ between
    requests (whenever R does not divide that count) and follow the drafted tokens' confidences."""
    return lambda batch: 1.0 if batch <= max_batch else 1e-3


def _policies(gamma: int):
    return {"algorithm1": algorithm1_policy([1.0] * gamma, sps_cap(14)),
            **{f"fixed_{n}": fixed_policy(n) for n in (0, 1, 3, gamma)}}


# ----------------------------------------------------------------------------------------------------
# Greedy: each request of the batch equals plain greedy decoding of its prompt alone
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,init,family", [(1, 0.02, "llama"), (2, 0.3, "qwen3")])
def test_batched_greedy_equals_plain_greedy_per_request(seed, init, family):
    target = _target(seed, init=init, family=family)
    draft = _draft(target, seed=seed)
    prompts = _prompts(6, seed=seed)  # ragged: 3..19 tokens
    max_new = [18, 5, 13, 18, 1, 9]  # requests leave the batch at different rounds
    expected = [hf_generate(target, p, n, 0.0, eos_token_ids=[256]) for p, n in zip(prompts, max_new)]
    chosen = set()
    for name, policy in _policies(draft.block_size).items():
        out = batched_speculative_generate(target, draft, prompts, max_new, policy, 0.0, eos_token_ids=[256])
        assert [o.tokens for o in out.outputs] == expected, name
        assert out.rounds == max(len(o.rounds) for o in out.outputs)
        assert [len(v) for v in out.verified] == sorted((len(v) for v in out.verified), reverse=True)
        assert out.batch_tokens == [sum(1 + n for n in v) for v in out.verified]
        if name == "algorithm1":
            chosen = {n for v in out.verified for n in v}
        if name == "fixed_7" and init == 0.02:  # random drafts get through: rollbacks are exercised
            assert sum(r["accepted"] for o in out.outputs for r in o.rounds) > 0
    assert len(chosen) >= 2, f"Algorithm 1 chose a single length {chosen}: the test would not exercise it"


def test_interleaved_runs_of_every_policy_equal_each_run_alone_at_t1():
    # the live measurement steps all policies' runs in turn; each run keeps its own cache, context and
    # generators, so interleaving changes nothing but which round runs when
    target = _target(1, init=0.3)
    draft = _draft(target, block_size=4)
    prompts, max_new = _prompts(4, seed=5), [10, 3, 8, 10]
    policies = _policies(4)
    together = live._lockstep(target, draft, prompts, max_new, policies, 1.0, 4, seed=3, eos=[], repeat=1)
    assert list(together) == list(policies)
    for name, policy in policies.items():
        generators = [torch.Generator().manual_seed(3 * 1_000_003 + i) for i in range(len(prompts))]
        alone = batched_speculative_generate(target, draft, prompts, max_new, policy, 1.0, 4, generators)
        assert [o.tokens for o in together[name].outputs] == [o.tokens for o in alone.outputs], name
        assert together[name].verified == alone.verified and together[name].rounds == alone.rounds
        assert together[name].decode_s > together[name].draft_s > 0 and together[name].prefill_s > 0
    run = BatchRun(target, draft, prompts[:1], 2, fixed_policy(2), 0.0)
    while run.step():
        pass
    assert run.done and not run.step() and run.output.rounds == len(run.output.verified) >= 1


def test_waiting_requests_take_the_places_of_finished_ones_and_stay_lossless():
    target = _target(2, init=0.3)
    draft = _draft(target, block_size=4)
    prompts, max_new = _prompts(6, seed=11), [9, 2, 14, 1, 6, 11]  # request 3 is done at its prefill
    expected = [hf_generate(target, p, n, 0.0) for p, n in zip(prompts, max_new)]
    for policy in (fixed_policy(2), algorithm1_policy([1.0] * 4, sps_power(0.2))):
        run = BatchRun(target, draft, prompts, max_new, policy, 0.0, concurrency=2)
        assert len(run.requests) == 2 and run.output.outputs[2:] == [None] * 4  # the rest wait
        while run.step():
            assert sum(not r.done for r in run.requests) <= 2
        assert [o.tokens for o in run.output.outputs] == expected
        assert max(len(v) for v in run.output.verified) == 2 and len(run.requests) == 6
        assert run.packed.length == 0  # every column left with its request
    assert run.output.full_batch_rounds < run.output.rounds  # the last requests drain with a slot free
    # at T = 1 each request still draws exactly what it draws alone
    generators = [torch.Generator().manual_seed(i) for i in range(6)]
    out = batched_speculative_generate(target, draft, prompts, max_new, fixed_policy(4), 1.0, 4, generators,
                                       concurrency=3)
    for i, (prompt, n) in enumerate(zip(prompts, max_new)):
        assert out.outputs[i].tokens == speculative_generate(target, draft, prompt, n, 1.0, 4,
                                                             torch.Generator().manual_seed(i)).tokens


@pytest.mark.parametrize("concurrency", [None, 1, 2, 3])
def test_full_batch_accounting_counts_the_rounds_run_with_every_slot_busy(concurrency):
    target = _target(2, init=0.3)
    draft = _draft(target, block_size=3)
    prompts, max_new = _prompts(5, seed=4), [7, 3, 12, 5, 9]
    run = BatchRun(target, draft, prompts, max_new, fixed_policy(2), 0.0, concurrency=concurrency)
    slots = concurrency or len(prompts)
    rounds = tokens = 0
    while not run.done:
        active = [r for r in run.requests if not r.done]
        before = sum(len(r.out.tokens) for r in active)
        run.step()
        if len(active) == slots:
            rounds += 1
            tokens += sum(len(r.out.tokens) for r in active) - before
    out = run.output
    assert (out.full_batch_rounds, out.full_batch_tokens) == (rounds, tokens) and rounds >= 1
    assert 0 < out.full_batch_s <= out.decode_s
    if concurrency == 1:  # one slot is busy in every round
        assert (out.full_batch_rounds, out.full_batch_tokens) == (out.rounds, out.decode_tokens)
    else:
        assert out.full_batch_rounds < out.rounds and out.full_batch_tokens < out.decode_tokens


def test_an_eos_ends_its_request_and_the_others_continue():
    target = _target(2, init=0.3)
    draft = _draft(target)
    prompts = _prompts(4, seed=7)
    free = [hf_generate(target, p, 16, 0.0) for p in prompts]
    # an EOS that first appears at index >= 2 of request 0's output (and maybe in others)
    eos = next(t for i, t in enumerate(free[0]) if i >= 2 and free[0].index(t) == i)
    expected = [hf_generate(target, p, 16, 0.0, eos_token_ids=[eos]) for p in prompts]
    for policy in (fixed_policy(3), algorithm1_policy([1.0] * 7, sps_power(0.2))):
        out = batched_speculative_generate(target, draft, prompts, 16, policy, 0.0, eos_token_ids=[eos])
        assert [o.tokens for o in out.outputs] == expected
        assert out.outputs[0].stopped_by_eos and out.outputs[0].tokens[-1] == eos
        assert any(not o.stopped_by_eos for o in out.outputs)  # the batch went on without request 0
        assert len(out.verified[-1]) < len(prompts)


# ----------------------------------------------------------------------------------------------------
# T = 1: the same draws as alone (fixed gamma), and the target's distribution under Algorithm 1
# ----------------------------------------------------------------------------------------------------

def test_fixed_gamma_at_t1_draws_exactly_what_each_request_draws_alone():
    target = _target(1, init=0.3)
    draft = _draft(target, block_size=4)
    prompts, max_new = _prompts(5, seed=3), [12, 4, 9, 12, 7]
    out = batched_speculative_generate(target, draft, prompts, max_new, fixed_policy(4), 1.0,
                                       generators=[torch.Generator().manual_seed(i) for i in range(5)])
    for i, (prompt, n) in enumerate(zip(prompts, max_new)):
        alone = speculative_generate(target, draft, prompt, n, 1.0, 4, torch.Generator().manual_seed(i))
        assert out.outputs[i].tokens == alone.tokens
        assert [r["accepted"] for r in out.outputs[i].rounds] == [r["accepted"] for r in alone.rounds]


BATCH = 20  # requests per batched call: N_SAMPLES / BATCH calls


def _chi2_batched(target, draft, prompt, marginals, policy):
    counts = {1: torch.zeros(V_SMALL), 2: torch.zeros(V_SMALL)}
    lengths = []
    for call in range(N_SAMPLES // BATCH):
        generators = [torch.Generator().manual_seed(call * BATCH + i) for i in range(BATCH)]
        out = batched_speculative_generate(target, draft, [prompt] * BATCH, 3, policy, 1.0, 2, generators)
        lengths += [n for v in out.verified for n in v]
        for o in out.outputs:
            for i in counts:
                counts[i][o.tokens[i]] += 1
    return chi2_by_position(counts, marginals), lengths


def test_t1_algorithm1_batched_output_distribution_equals_the_target(small_vocab_pair):  # noqa: F811
    target, draft, prompt, marginals = small_vocab_pair
    policy = algorithm1_policy([1.0, 1.0], sps_cap(2 * BATCH))  # about one draft token per request
    results, lengths = _chi2_batched(target, draft, prompt, marginals, policy)
    assert len(set(lengths)) >= 2, "Algorithm 1 must pick several lengths for the test to mean something"
    for position, (stat, critical) in results.items():
        assert stat < critical, f"token {position + 1}: chi2 {stat:.1f} >= {critical:.1f}"
    # (the statistic's power on this fixture and sample size: test_speculative's broken-residual test)


# ----------------------------------------------------------------------------------------------------
# The packed cache and the runner
# ----------------------------------------------------------------------------------------------------

def test_packed_mask_sees_only_its_own_request_at_earlier_positions():
    packed = PackedContext(torch.device("cpu"))
    packed.owner, packed.position = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2])
    mask = packed.mask(torch.tensor([1, 0, 0]), torch.tensor([3, 2, 3]), torch.float32)[0, 0] == 0  # (3, 8)
    assert mask.tolist() == [[False, False, True, True, True, True, False, False],
                             [True, True, False, False, False, False, True, False],
                             [True, True, False, False, False, False, True, True]]


def test_sliding_window_targets_are_refused_beyond_the_window():
    from dspark_model.tiny import tiny_config

    check_window(tiny_config("llama"), 10_000)  # no sliding window: anything goes
    check_window(tiny_config("mistral", sliding_window=64), 64)
    with pytest.raises(ValueError, match="sliding-window layers"):
        check_window(tiny_config("mistral", sliding_window=64), 65)


def test_measure_scheduler_live_record_and_plot(tmp_path):
    target = _target(1)
    draft = _draft(target, block_size=4)
    prompts = _prompts(3, seed=5)

    def greedy(ids):
        return hf_generate(target, ids, 6, 0.0, eos_token_ids=[256])

    record = measure_scheduler_live(target, draft, prompts, [1.0] * 4, sps_power(0.2), requests=(1, 2, 4),
                                    max_new_tokens=6, eos_token_ids=[256], reference=greedy, draft_cost=False)
    assert record["requests"] == [1, 2, 4]
    assert record["greedy_match_rate"] == 1.0
    assert set(record["fixed_tokens_per_s"]) == {"1", "2", "3", "4"}
    for i, best in enumerate(record["best_fixed_length"]):
        assert record["best_fixed_tokens_per_s"][i] == max(v[i] for v in record["fixed_tokens_per_s"].values())
        assert record["fixed_tokens_per_s"][str(best)][i] == record["best_fixed_tokens_per_s"][i]
        assert record["algorithm1_vs_best_fixed"][i] == pytest.approx(
            record["algorithm1_tokens_per_s"][i] / record["best_fixed_tokens_per_s"][i])
    assert record["details"][2]["fixed_4"]["mean_verified"] == 4
    assert record["algorithm1_vs_best_fixed_heldout"] == [None] * 3  # one repeat: nothing held out
    full = record["full_batch"]  # N = 1, one request: its every round has the batch full
    assert full["algorithm1_tokens_per_s"][0] == record["algorithm1_tokens_per_s"][0]
    assert full["fixed_tokens_per_s"]["2"][0] == record["fixed_tokens_per_s"]["2"][0]
    assert all(d[name]["full_batch_rounds"] <= d[name]["rounds"] for d in record["details"] for name in d
               if name != "requests")
    json.dumps(record)  # strict-JSON ready
    path = live.plot_live(record, str(tmp_path / "live.png"))
    assert (tmp_path / "live.png").stat().st_size > 0 and path.endswith("live.png")


def test_packed_profile_runs_the_live_layout_and_leaves_the_cache_as_it_was(monkeypatch):
    from eval import live_cost

    target = _target(1)
    calls = []
    forward = PackedContext.forward

    def spy(self, target_, ids, owner, position):
        calls.append((ids.numel(), self.length, owner.tolist(), position.tolist()))
        return forward(self, target_, ids, owner, position)

    monkeypatch.setattr(PackedContext, "forward", spy)
    step = live_cost.packed_step_fn(target, requests=3, context_len=5)
    for batch in (7, 2, 7):
        step(batch)
    assert calls[0][:2] == (15, 0)  # the prefill: 3 contexts of 5 tokens
    assert calls[1] == (7, 15, [0, 0, 0, 1, 1, 2, 2], [5, 6, 7, 5, 6, 5, 6])  # own positions, packed
    assert calls[2][:3] == (2, 15, [0, 1]) and calls[3][1] == 15  # the new columns were dropped each time
    assert live_cost.live_batch_sizes(2, 3) == [2, 4, 6, 8]
    assert live_cost.live_batch_sizes(16, 7) == [16, 32, 48, 64, 80, 96, 112, 128]


def test_algorithm1_with_profiled_costs_stays_greedy_identical_per_request():
    target = _target(2, init=0.3)
    draft = _draft(target, block_size=4)
    prompts = _prompts(3, seed=4)

    def greedy(ids):
        return hf_generate(target, ids, 6, 0.0, eos_token_ids=[256])

    record = measure_scheduler_live(target, draft, prompts, [1.0] * 4, requests=(2, 3), max_new_tokens=6,
                                    eos_token_ids=[256], reference=greedy, profile_repeats=1, requests_per_slot=2)
    assert record["greedy_match_rate"] == 1.0
    assert record["settings"]["objective"].startswith("tau* / (D(R) + 1 / SPS(B))")
    assert set(record["settings"]["round_costs"]) == {"2", "3"} and record["settings"]["requests_per_slot"] == 2
    # each N decoded 2N requests, at most N per round; the costs are profiled for N requests
    assert len(record["settings"]["round_costs"]["3"]["draft_seconds_per_round"]) == 3
    for detail in record["details"]:
        assert detail["algorithm1"]["tokens"] <= 2 * detail["requests"] * 5
        assert detail["algorithm1"]["requests_decoded"] == detail["fixed_1"]["requests_decoded"] == 2 * detail["requests"]


def test_min_requests_raises_the_requests_decoded_at_small_n_only():
    target = _target(2, init=0.3)
    draft = _draft(target, block_size=3)
    prompts = _prompts(3, seed=5)
    record = measure_scheduler_live(target, draft, prompts, [1.0] * 3, requests=(1, 3), max_new_tokens=4,
                                    eos_token_ids=[256], profile_repeats=1, requests_per_slot=2, min_requests=5,
                                    reference=lambda ids: hf_generate(target, ids, 4, 0.0, eos_token_ids=[256]))
    decoded = {d["requests"]: {p["requests_decoded"] for name, p in d.items() if isinstance(p, dict)}
               for d in record["details"]}
    assert decoded == {1: {5}, 3: {6}} and record["settings"]["min_requests"] == 5
    assert record["greedy_match_rate"] == 1.0


def test_live_stage_uses_the_calibration_beside_the_draft_and_takes_prompts_round_robin(tmp_path):
    from types import SimpleNamespace

    from dspark_model.calibration import Calibration
    from eval.baselines import RunSettings
    from eval.scheduler import SpsTable
    from eval.schema import SchedulerLiveConfig

    target = _target(1)
    draft = _draft(target, block_size=3)
    prompts = [SimpleNamespace(source=s, turns=[f"{s} question {i}"], system=None)
               for s in ("a", "b") for i in range(3)]
    assert [p.turns[0] for p in live.interleave_by_source(prompts, 3)] == ["a question 0", "b question 0",
                                                                          "a question 1"]
    settings = RunSettings(max_new_tokens=5, gamma=3, eos_token_ids=[256], chat_template_kwargs={}, warmup=False)
    cfg = SchedulerLiveConfig(enabled=True, requests=[1, 3], num_prompts=2)
    assert "no calibration" in live.run_live_stage(target, draft, prompts, cfg, settings, str(tmp_path), None)["error"]
    sps = SpsTable({b: b ** -0.2 for b in (1, 4, 16)})
    draft.calibration = Calibration(gamma=3, temperatures=[1.0, 2.0, 1.5], weights_sha256=None, sps=sps.to_dict())
    record = live.run_live_stage(target, draft, prompts, cfg, settings, str(tmp_path), None)
    assert record["requests"] == [1, 3] and record["greedy_match_rate"] == 1.0
    assert record["settings"]["distinct_prompts"] == 2 and record["settings"]["sts_temperatures"] == [1.0, 2.0, 1.5]
    costs = record["settings"]["round_costs"]  # profiled in the packed layout per N, not the calibration's table
    assert costs["3"]["sps"]["batch_tokens"] == [3, 6, 9, 12] and len(costs["3"]["draft_seconds_per_round"]) == 3
    assert min(costs["3"]["draft_seconds_per_round"]) > 0
    assert costs["1"]["sps"]["batch_tokens"] == [1, 2, 3, 4]
    assert (tmp_path / record["figure"]).is_file()


def test_eval_cli_runs_the_live_stage_into_the_report(tmp_path):
    from tests.eval.test_cli import _prompt_file, _run, _sources

    out = tmp_path / "out"
    proc = _run("draft=random", "target=tiny", _sources(_prompt_file(tmp_path)), "num_prompts=2", "max_new_tokens=8",
                "baselines.generate=false", "baselines.prompt_lookup=false", "calibration.sps_batch_sizes=[1,4,16]",
                "scheduler_live.enabled=true", "scheduler_live.requests=[1,2]", "progress=false", f"out_dir={out}",
                timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    record = report["scheduler_live"]
    assert record["requests"] == [1, 2] and record["greedy_match_rate"] == 1.0
    assert len(record["best_fixed_length"]) == 2 and (out / "scheduler_live.png").is_file()
    assert "## Algorithm 1 live" in (out / "report.md").read_text()
    proc = _run("draft=random", "target=tiny", "draft_config=dflash", "scheduler_live.enabled=true", f"out_dir={out}")
    assert proc.returncode == 2 and "no confidence head" in proc.stderr + proc.stdout


def test_best_fixed_is_also_picked_on_half_the_repeats_and_measured_on_the_other_half():
    def runs(values, full=None):  # policy -> tokens/s of each repeat (1 s of decoding each), and with the batch full
        full = full or values
        return {name: [{"tokens": v, "decode_s": 1.0, "rounds": 1, "full_batch_tokens": f, "full_batch_s": 0.5}
                       for v, f in zip(vs, full[name])] for name, vs in values.items()}

    # fixed_1 wins the even repeats by luck, fixed_2 the odd ones: the in-sample best (12) overstates both
    row = live._row(2, runs({"algorithm1": [10, 10, 10, 10], "fixed_1": [14, 8, 14, 8], "fixed_2": [9, 13, 9, 13]}))
    assert row["best_fixed_length"] == 1 and row["best_fixed_tokens_per_s"] == 11
    assert row["best_fixed_heldout_tokens_per_s"] == (8 + 9) / 2  # each half's pick, measured on the other
    assert row["spread"]["fixed_1"] == pytest.approx(6 / 11) and row["spread"]["algorithm1"] == 0
    steady = live._row(2, runs({"algorithm1": [10, 10], "fixed_1": [12, 12], "fixed_2": [9, 9]}))
    assert steady["best_fixed_heldout_tokens_per_s"] == steady["best_fixed_tokens_per_s"] == 12
    # the same comparison on the rounds with every slot busy, from their own tokens and seconds
    drain = live._row(2, runs({"algorithm1": [10, 10], "fixed_1": [12, 12], "fixed_2": [9, 9]},
                              {"algorithm1": [7, 7], "fixed_1": [5, 5], "fixed_2": [6, 6]}))
    assert drain["best_fixed_length"] == 1 and drain["full_batch"]["best_fixed_length"] == 2
    assert drain["full_batch"]["tokens_per_s"]["algorithm1"] == 14
    assert drain["full_batch"]["best_fixed_heldout_tokens_per_s"] == 12
    summary = live._summary([drain], 2, 8, 0.0, 2, 1, [1.0, 1.0], {}, True, 1.0)
    assert summary["full_batch"]["algorithm1_vs_best_fixed_heldout"] == [14 / 12]
    assert summary["algorithm1_vs_best_fixed_heldout"] == [10 / 12]
