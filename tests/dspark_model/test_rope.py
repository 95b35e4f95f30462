"""RoPE with per-layer-type parameters (Gemma 3): the draft's full-attention layers rotate like the target's
full-attention layers in training, in drafting, and in every export, whichever way a reader takes the config."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dspark_model.arch import DraftArch
from dspark_model.draft import DSparkDraft, build_draft_for
from dspark_model.export import export_draft, load_export
from dspark_model.rope import target_rope_parameters
from dspark_model.target import load_target
from tests.conftest import tiny_draft_config, tiny_spec
from tests.dspark_model.test_export import make_ckpt

FULL = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}  # as in Gemma 3 4B+
SLIDING = {"rope_type": "default", "rope_theta": 10_000.0}


@pytest.fixture(scope="module")
def gemma3():
    return load_target(tiny_spec("gemma3", rope_parameters={"full_attention": FULL, "sliding_attention": SLIDING},
                                 layer_types=["sliding_attention", "full_attention"] * 2))


def _target_cos_sin(target, positions):
    x = torch.zeros(1, 1, 16)
    return target.model.get_decoder().rotary_emb(x, positions, layer_type="full_attention")


def assert_rotates_like_full_attention(draft, target):
    positions = torch.arange(0, 3000, 7)[None]
    want = _target_cos_sin(target, positions)
    got = draft.rotary(torch.zeros(1, 1, 16), positions)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_draft_takes_the_full_attention_set_explicitly(gemma3, caplog):
    assert gemma3.config.rope_parameters["sliding_attention"] == SLIDING  # the target really has two sets
    with caplog.at_level(logging.WARNING):
        draft = build_draft_for(gemma3, tiny_draft_config())
    assert draft.arch.rope_config["rope_parameters"] == FULL
    assert not [r for r in caplog.records if "rope" in r.getMessage().lower()]
    assert_rotates_like_full_attention(draft, gemma3)


def test_training_and_drafting_agree_on_gemma3(gemma3):
    """The teacher-forced training logits equal what a drafting round samples from (same RoPE on both paths)."""
    torch.manual_seed(0)
    draft = build_draft_for(gemma3, tiny_draft_config(sequential_head="gated")).eval()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    taps, p = gemma3.forward(ids).tap_hidden, 9
    cache = draft.new_cache()
    draft.extend_context(cache, taps[:, :p])
    prop = draft.propose(cache, ids[:, p], temperature=0.0)
    forced = ids.clone()
    forced[0, p + 1: p + 4] = prop.tokens[0, :3]
    with torch.no_grad():
        h = draft.forward_train(gemma3.forward(forced).tap_hidden, forced, torch.tensor([[p]]))[0]
        prev = draft.block_inputs(forced, torch.tensor([[p]]))[0][0]
        assert torch.equal(draft.logits(h, prev).argmax(-1)[0], prop.tokens[0])
        torch.testing.assert_close(torch.sigmoid(draft.confidence_logits(h, prev)), prop.confidences,
                                   atol=1e-5, rtol=1e-4)


def test_every_export_states_the_same_rope(tmp_path, gemma3):
    """Flat parameters for flat readers; the per-type entries repeat them, so transformers' Gemma3 config class
    (which fills a missing entry with its defaults) and speculators (which takes ``sliding_attention``) agree."""
    from transformers import Gemma3TextConfig

    ckpt = make_ckpt(tmp_path / "ckpt", gemma3, "gemma3", "rnn")
    for fmt in ("native", "deepspec", "speculators"):
        out = export_draft(ckpt, tmp_path / fmt, fmt, "fp32", target=gemma3)
        assert_rotates_like_full_attention(load_export(out, gemma3), gemma3)
        config = json.loads((out / "config.json").read_text())
        if fmt == "native":
            assert config["arch"]["rope_config"]["rope_parameters"] == FULL
            continue
        layer = config["transformer_layer_config"] if fmt == "speculators" else config
        rope = layer["rope_parameters"]
        assert {k: v for k, v in rope.items() if not isinstance(v, dict)} == FULL and layer["rope_theta"] == 1e6
        assert rope["full_attention"] == rope["sliding_attention"] == FULL
        assert layer["layer_types"] == ["full_attention"] * 2
        read = Gemma3TextConfig(**{k: v for k, v in layer.items() if k not in ("architectures", "model_type")})
        assert read.rope_parameters["full_attention"] == read.rope_parameters["sliding_attention"] == FULL


def test_target_without_a_full_attention_set_is_refused():
    from types import SimpleNamespace

    cfg = SimpleNamespace(rope_parameters={"sliding_attention": SLIDING, "chunked_attention": SLIDING})
    with pytest.raises(ValueError, match="full_attention"):
        target_rope_parameters(cfg)


def test_draft_config_from_before_the_fix_keeps_the_rope_it_was_trained_with(gemma3, caplog):
    """Older drafts stored the target's per-type dict and trained with transformers' fallback (default θ)."""
    arch = build_draft_for(gemma3, tiny_draft_config()).arch.to_dict()
    arch["rope_config"] = dict(arch["rope_config"], rope_parameters=dict(gemma3.config.rope_parameters))
    with caplog.at_level(logging.WARNING):
        old = DSparkDraft(DraftArch.from_config({"format_version": 1, "arch": arch}, "config.json"))
    assert old.arch.rope_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert any("per-layer-type RoPE" in r.getMessage() for r in caplog.records)


def test_exported_draft_decodes_gemma3_losslessly(tmp_path, gemma3):
    from eval.baselines import hf_generate
    from eval.speculative import speculative_generate

    out = export_draft(make_ckpt(tmp_path / "ckpt", gemma3, "gemma3", "gated"), tmp_path / "s", "speculators",
                       "fp32", target=gemma3)
    draft, prompt = load_export(out, gemma3), [5, 17, 99, 3, 42, 7]
    spec = speculative_generate(gemma3, draft, prompt, 16, 0.0, eos_token_ids=[256])
    assert spec.tokens == hf_generate(gemma3, prompt, 16, 0.0, eos_token_ids=[256])
