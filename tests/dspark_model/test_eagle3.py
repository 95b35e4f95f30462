"""The EAGLE-3 draft: training-time test == chain decoding, taps, vocabulary, checkpoints, lossless decoding."""

from __future__ import annotations

import json

import pytest
import torch

from dspark_model.arch import DraftArch
from dspark_model.checkpoint import CheckpointMismatchError, load_draft, read_draft_arch, save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.eagle3 import Eagle3Draft, eagle3_tap_layer_ids
from dspark_model.target import Target
from dspark_model.tiny import build_tiny_model
from dspark_model.vocab import top_k_vocab
from eval.baselines import hf_generate
from eval.speculative import speculative_generate
from tests.conftest import tiny_draft_config
from tests.eval.test_speculative import V_SMALL, _prompts, _target, chi2_by_position


def eagle3_config(**kw):
    fields = dict(architecture="eagle3", num_layers=1, block_size=4, sequential_head="none", confidence_head=False)
    return tiny_draft_config(**{**fields, **kw})


def _eagle3(target, seed=0, k=None, init=0.02, **kw) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = build_draft_for(target, eagle3_config(draft_vocab_size=k, initializer_range=init, **kw))
    if draft.reduced_vocab:
        draft.set_draft_vocab(top_k_vocab(torch.arange(target.vocab_size).flip(0), k))  # low ids most frequent
    return draft.eval()


def test_taps_are_low_mid_high_of_the_targets_and_weight_names_are_eagle3s(tiny_target):
    assert eagle3_tap_layer_ids([1, 8, 14, 21, 27]) == [1, 14, 27]
    draft = _eagle3(tiny_target)
    assert draft.tap_layer_ids == eagle3_tap_layer_ids(tiny_target.tap_layer_ids)
    d = tiny_target.hidden_size
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert shapes["fc.weight"] == (d, 3 * d)
    assert shapes["layers.0.self_attn.q_proj.weight"][1] == 2 * d  # q/k/v read [embedding ; feature]
    assert shapes["layers.0.self_attn.o_proj.weight"][0] == d
    for name in ("layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "norm.weight",
                 "layers.0.post_attention_layernorm.weight", "layers.0.mlp.down_proj.weight"):
        assert name in shapes
    assert shapes["lm_head.weight"] == (tiny_target.vocab_size, d)
    assert not any("embed" in k or "q_norm" in k for k in shapes)  # the target's embedding; Llama: no q/k norm


@torch.no_grad()
def test_training_time_test_equals_chain_decoding_with_gold_tokens(tiny_target):
    """Step k of the unrolled training forward at index i is exactly chain step k run from the pair
    (h_i, x_{i+1}) with the draft's KV cache, fed the gold tokens: the TTT mask and positions are the chain's."""
    draft = _eagle3(tiny_target, seed=1, init=0.2)
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    taps = tiny_target.forward(ids).tap_hidden
    states = draft.forward_steps(taps, ids, steps=4)
    for i in (0, 5, 9):
        cache = draft.new_cache()
        draft.extend_context(cache, taps[:, :3], ids[:, :3])  # the context arrives in two pieces
        draft.extend_context(cache, taps[:, 3: i + 1], ids[:, 3: i + 1]) if i >= 3 else None
        if i < 3:
            cache = draft.new_cache()
            draft.extend_context(cache, taps[:, : i + 1], ids[:, : i + 1])
        s = draft._commit(cache, ids[:, i + 1])
        torch.testing.assert_close(draft.norm(s), states[0][:, i], rtol=1e-5, atol=1e-5)
        past_k, past_v = cache.k, cache.v
        for k in range(1, 4):
            pos = torch.tensor([[i + k]])
            out, kk, vv = draft._step(draft._embed(ids[:, i + k + 1: i + k + 2]), s[:, None], pos, past_k, past_v)
            past_k, past_v, s = torch.cat([past_k, kk], 2), torch.cat([past_v, vv], 2), out[:, 0]
            torch.testing.assert_close(draft.norm(s), states[k][:, i], rtol=1e-5, atol=1e-5)


def test_reduced_vocabulary_proposes_only_its_tokens_and_round_trips(tiny_target, tmp_path):
    draft = _eagle3(tiny_target, k=40, init=0.2)
    assert draft.lm_head.weight.shape[0] == 40
    torch.testing.assert_close(draft.lm_head.weight, tiny_target.lm_head.weight[draft.draft_to_target])
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = draft.new_cache()
    draft.extend_context(cache, tiny_target.forward(ids).tap_hidden, ids)
    prop = draft.propose(cache, torch.tensor([150]), 1.0, torch.Generator().manual_seed(0))
    assert prop.tokens.shape == (1, 4) and bool((prop.tokens < 40).all())
    assert prop.probs.shape[-1] == tiny_target.vocab_size and float(prop.probs[..., 40:].abs().sum()) == 0
    save_pretrained(draft, tmp_path / "ck")
    again = load_draft(tmp_path / "ck", tiny_target)
    assert isinstance(again, Eagle3Draft) and again.draft_to_target.tolist() == draft.draft_to_target.tolist()
    cache2 = again.new_cache()
    again.extend_context(cache2, tiny_target.forward(ids).tap_hidden, ids)
    prop2 = again.propose(cache2, torch.tensor([150]), 1.0, torch.Generator().manual_seed(0))
    assert prop2.tokens.tolist() == prop.tokens.tolist()
    torch.testing.assert_close(prop2.probs, prop.probs)


def test_config_json_names_the_architecture_and_dspark_configs_stay_version_1(tiny_target, tmp_path):
    """One DraftArch record for both drafts: an EAGLE-3 config.json says model_type / arch.architecture
    "eagle3" at format_version 2 (an older toolkit refuses it instead of building a DSpark draft); a DSpark
    config.json is unchanged (version 1, no architecture field)."""
    draft = _eagle3(tiny_target, k=40)
    assert isinstance(draft.arch, DraftArch) and draft.arch.architecture == "eagle3"
    assert draft.arch.num_layers == 1 and draft.arch.mask_token_id is None and draft.arch.train_draft_head
    config = json.loads((save_pretrained(draft, tmp_path / "e3") / "config.json").read_text())
    assert config["model_type"] == "eagle3" and config["format_version"] == 2
    assert config["architecture"] == config["arch"]["architecture"] == "eagle3"
    assert read_draft_arch(tmp_path / "e3")[1] == draft.arch
    dspark = json.loads((save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), tmp_path / "ds")
                         / "config.json").read_text())
    assert dspark["model_type"] == "dspark" and dspark["format_version"] == 1
    assert "architecture" not in dspark and "architecture" not in dspark["arch"]
    with pytest.raises(CheckpointMismatchError, match="describes a 'eagle3' draft"):  # the two must agree
        (tmp_path / "e3" / "config.json").write_text(json.dumps(dict(config, model_type="dspark")))
        read_draft_arch(tmp_path / "e3")
    with pytest.raises(ValueError, match="sequential_head='markov'"):
        build_draft_for(tiny_target, eagle3_config(sequential_head="markov"))


def test_a_target_loaded_with_only_the_three_taps_serves_the_same_draft(tiny_target):
    draft = _eagle3(tiny_target, init=0.2)
    three = Target(tiny_target.model, tiny_target.tokenizer, tap_layer_ids=draft.tap_layer_ids)
    ids = torch.randint(0, 250, (1, 10), generator=torch.Generator().manual_seed(2))
    full = draft.forward_steps(tiny_target.forward(ids).tap_hidden, ids, steps=2)
    draft.attach_target(three)
    torch.testing.assert_close(draft.forward_steps(three.forward(ids).tap_hidden, ids, steps=2)[1], full[1])
    with pytest.raises(ValueError, match="does not tap layers"):
        draft.attach_target(Target(tiny_target.model, tiny_target.tokenizer, tap_layer_ids=[0]))


@pytest.mark.parametrize("seed,init,family,k", [(1, 0.02, "llama", None), (2, 0.3, "qwen3", 64)])
def test_eagle3_speculative_decoding_is_greedy_identical(seed, init, family, k):
    target = _target(seed, init=init, family=family)
    draft = _eagle3(target, seed=seed, k=k, init=0.2)
    accepted = 0
    for gamma in (1, 4):
        for prompt in _prompts(3, seed=10 * seed + gamma):
            out = speculative_generate(target, draft, prompt, 20, 0.0, gamma, eos_token_ids=[256])
            assert out.tokens == hf_generate(target, prompt, 20, 0.0, eos_token_ids=[256]), (gamma, prompt)
            assert out.target_forwards == len(out.rounds) + 1
            accepted += sum(r["accepted"] for r in out.rounds)
    if init == 0.02:  # the degenerate tiny target lets drafts through: the cache rollback paths run
        assert accepted > 0


N_T1 = 600


@pytest.mark.slow  # ~25 s on a busy 2-core CPU (600 sampled generations)
def test_eagle3_t1_output_distribution_equals_the_target():
    """Chi-square on tokens 2 and 3 (the first two drafted positions) of 600 sampled generations."""
    model = build_tiny_model("llama", seed=3, vocab_size=V_SMALL, num_hidden_layers=4, hidden_size=32,
                             intermediate_size=64, initializer_range=0.15, eos_token_id=None, pad_token_id=None)
    target = Target(model.double(), tokenizer=None)
    torch.manual_seed(0)
    draft = build_draft_for(target, eagle3_config(block_size=2, initializer_range=0.6)).double().eval()
    prompt = [1, 2, 3, 4, 5]

    def next_dist(prefixes):
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        return torch.softmax(target.logits(target.forward(ids).final_hidden[:, -1]).double(), -1)

    p1 = next_dist([()])[0]
    joint12 = p1[:, None] * next_dist([(a,) for a in range(V_SMALL)])
    p3 = next_dist([(a, b) for a in range(V_SMALL) for b in range(V_SMALL)]).view(V_SMALL, V_SMALL, V_SMALL)
    marginals = {1: joint12.sum(0), 2: (joint12[:, :, None] * p3).sum((0, 1))}
    counts = {1: torch.zeros(V_SMALL), 2: torch.zeros(V_SMALL)}
    accepted = 0
    for seed in range(N_T1):
        out = speculative_generate(target, draft, prompt, 3, 1.0, 2, torch.Generator().manual_seed(seed))
        accepted += sum(r["accepted"] for r in out.rounds)
        for i in counts:
            counts[i][out.tokens[i]] += 1
    assert accepted > 0  # drafted tokens were accepted: the test is not only about resampling
    for position, (stat, critical) in chi2_by_position(counts, marginals).items():
        assert stat < critical, f"token {position + 1}: chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.parametrize("fmt,k", [("speculators", 48), ("sglang", 48), ("speculators", None)])
def test_engine_exports_round_trip_with_their_names_and_layer_ids(tiny_target, tmp_path, fmt, k):
    import json

    from safetensors.torch import load_file

    from dspark_model.export import export_draft
    from dspark_model.export_eagle3 import load_eagle3_export

    draft = _eagle3(tiny_target, k=k, init=0.2)
    save_pretrained(draft, tmp_path / "ck")
    out = export_draft(tmp_path / "ck", tmp_path / fmt, "speculators" if fmt == "speculators" else "deepspec",
                       target=tiny_target)
    config, tensors = json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))
    layer = "layers.0." if fmt == "speculators" else "midlayer."
    assert tensors[layer + "self_attn.q_proj.weight"].shape[1] == 2 * tiny_target.hidden_size
    assert {"fc.weight", "norm.weight", "lm_head.weight", layer + "hidden_norm.weight"} <= set(tensors)
    assert not any(n.startswith("layers.0.") for n in tensors) or fmt == "speculators"
    assert "embed_tokens.weight" not in tensors and "draft_to_target" not in tensors
    if fmt == "speculators":
        assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == (k or tiny_target.vocab_size)
        assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in draft.tap_layer_ids]
    else:
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["tie_word_embeddings"] is False
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == draft.tap_layer_ids
    if k:
        assert tensors["d2t"].dtype == torch.long and tensors["t2d"].dtype == torch.bool
        assert (torch.arange(k) + tensors["d2t"]).tolist() == draft.draft_to_target.tolist()
    from dspark_model.export_schema import validate_export

    assert validate_export(out) == f"{fmt}-eagle3"  # what hub push checks, without the target
    back = load_eagle3_export(out, tiny_target)
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(4))
    taps = tiny_target.forward(ids).tap_hidden
    for a, b in zip(back.forward_steps(taps, ids, 3), draft.forward_steps(taps, ids, 3)):
        torch.testing.assert_close(back.logits(a), draft.logits(b))


def test_a_damaged_eagle3_export_is_refused_and_an_intact_one_is_pushed(tiny_target, tmp_path):
    from safetensors.torch import load_file, save_file

    from dspark_model.export_eagle3 import write_eagle3_export
    from dspark_model.export_schema import ExportSchemaError, validate_export
    from dspark_model.hub import push

    out = write_eagle3_export(_eagle3(tiny_target, k=48), tiny_target, tmp_path / "exp", "speculators", torch.float32)
    plan = push(out, "me/draft", dry_run=True, echo=lambda *a: None)
    assert plan["format"] == "speculators-eagle3" and plan["message"].startswith("Upload EAGLE-3 draft (speculators")
    assert "model.safetensors" in plan["files"]
    tensors = load_file(str(out / "model.safetensors"))
    for name, damage in (("d2t", lambda t: t[:-1]), ("fc.weight", None)):
        bad = dict(tensors)
        if damage is None:
            del bad[name]
        else:
            bad[name] = damage(bad[name])
        save_file(bad, str(out / "model.safetensors"))
        with pytest.raises(ExportSchemaError, match="d2t has shape" if damage else r"missing weights \['fc.weight'\]"):
            validate_export(out)
    config = json.loads((out / "config.json").read_text())
    del config["speculators_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportSchemaError, match="not a complete speculators EAGLE-3 config"):
        validate_export(out)


@pytest.mark.parametrize("k", [48, None])
def test_speculators_eagle3_loads_the_export_and_computes_our_training_time_test(tiny_target, tmp_path, k):
    """speculators' own Eagle3DraftModel (0.9.0: `pip install --no-deps --target DIR speculators==0.9.0 ...`,
    DIR on PYTHONPATH; skipped without it) reads the export with no unexpected key and nothing missing but the
    verifier's tensors; fed the same features and tokens, its 3-step training-time-test forward gives our logits
    at every step, and a reduced vocabulary's d2t / t2d / head are ours (verify_eagle3.py, behind --verify)."""
    pytest.importorskip("speculators.models.eagle3.core")
    from dspark_model.export_eagle3 import write_eagle3_export
    from dspark_model.verify import verify_export

    draft = _eagle3(tiny_target, k=k, init=0.2, block_size=3)
    out = write_eagle3_export(draft, tiny_target, tmp_path / "exp", "speculators", torch.bfloat16)
    result = verify_export(out, tiny_target)
    diff = result.row["diff"]
    assert result.ok and not result.load_problems, result.lines()
    assert [key for key in diff if key.startswith("logits")] == ["logits_1", "logits_2", "logits_3"]
    assert max(diff[f"logits_{s}"] for s in (1, 2, 3)) < 1e-5 and diff["aux_hidden"] == 0  # taps: ids + 1
    if k:
        assert diff["d2t"] == diff["t2d"] == diff["lm_head"] == 0
    else:
        assert "d2t" not in diff
    assert "3 training-time-test steps" in result.lines()[-1]


def _write_report(path) -> None:
    from eval.report import EvalReport

    EvalReport(tau=2.41, tau_by_dataset={"gsm8k": 2.5}, conditional_acceptance={"pooled": [0.8, 0.6], "by_dataset": {}},
               prefix_survival={"pooled": [0.8, 0.48], "by_dataset": {}},
               accepted_length_histogram={"pooled": [1, 1, 1], "by_dataset": {}}, num_rounds=3,
               num_rounds_by_dataset={}, settings={"temperature": 0.0, "gamma": 3}, tokens_per_s={},
               timing_totals={}, speedup_vs_generate=None, speedup_vs_prompt_lookup=None, greedy_match_rate=1.0,
               prompt_lookup_match_rate=None).write(path)


@pytest.mark.parametrize("fmt", ["speculators", "deepspec"])
def test_engine_exports_carry_a_card_with_the_serving_flags(tiny_target, tmp_path, fmt):
    """Both EAGLE-3 exports get the toolkit's card: target, draft vocabulary, taps in the engine's count, the
    vLLM / SGLang serving flags, and the eval / training documents found beside the checkpoint."""
    from dspark_model.export import export_draft

    draft = _eagle3(tiny_target, k=48, block_size=3)
    ckpt = save_pretrained(draft, tmp_path / "ck", extra={"train_config": {"train": {"lr": 0.0003}}})
    _write_report(ckpt / "report.json")
    card = (export_draft(ckpt, tmp_path / fmt, fmt, target=tiny_target) / "README.md").read_text()
    meta = card.split("---")[1]
    assert "base_model: tiny-llama" in meta and "- eagle3" in meta and "- dflash" not in meta
    assert "# EAGLE-3 draft for tiny-llama" in card and "48 of the target's 272 tokens" in card
    taps = draft.tap_layer_ids
    stored = [i + 1 for i in taps] if fmt == "speculators" else taps
    assert f"decoder layers {taps}" in card and f"stores them as {stored}" in card
    assert '"method": "eagle3"' in card and '"num_speculative_tokens": 3' in card
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path" in card
    assert "--speculative-num-steps 3" in card and "--speculative-num-draft-tokens 4" in card
    assert "| gsm8k | 2.500 |" in card and "train.lr: 0.0003" in card
    assert "mask token" not in card and "confidence" not in card.lower()


def test_flex_kernel_merges_the_causal_block_and_the_diagonals_like_the_dense_one():
    """The GPU kernel (flex_attention's causal output + log-sum-exp, merged with the diagonal scores) equals the
    dense one; checked with eager flex, which runs forward on the CPU (its backward needs CUDA)."""
    from dspark_model.eagle3 import ttt_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 20, 8, generator=g)
    keys = [torch.randn(2, 3, 20, 8, generator=g) for _ in range(3)]
    values = [torch.randn(2, 3, 20, 8, generator=g) for _ in range(3)]
    for k in (2, 3):
        dense = ttt_attention(q, keys[:k], values[:k], "sdpa")
        torch.testing.assert_close(ttt_attention(q, keys[:k], values[:k], "flex"), dense, rtol=1e-4, atol=1e-5)
