"""Target adapter: tap layers, features from one forward, KV cache, shared head, clear load errors."""

from __future__ import annotations

import pytest
import torch

from dspark_model.config import TargetSpec
from dspark_model.target import (
    Target,
    TargetNotFoundError,
    crop_cache,
    default_tap_layer_ids,
    load_target,
    resolve_weights,
)
from tests.conftest import tiny_spec


@pytest.mark.parametrize("layers, expected", [(36, [1, 9, 17, 25, 33]), (40, [1, 10, 19, 28, 37]),
                                              (28, [1, 7, 13, 19, 25]), (30, [1, 8, 14, 21, 27])])
def test_default_tap_layers_spread_from_1_to_L_minus_3(layers, expected):
    assert default_tap_layer_ids(layers) == expected


def test_shallow_targets_never_tap_the_last_layer():
    assert default_tap_layer_ids(2) == [0]
    assert default_tap_layer_ids(4) == [0, 1, 2]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_taps_and_final_hidden_match_transformers(family):
    target = load_target(tiny_spec(family, layers=4))
    ids = torch.randint(0, 259, (2, 11), generator=torch.Generator().manual_seed(1))
    out = target.forward(ids)
    ref = target.model(ids, output_hidden_states=True)
    expected_taps = torch.cat([ref.hidden_states[i + 1] for i in target.tap_layer_ids], dim=-1)
    assert out.tap_hidden.shape == (2, 11, len(target.tap_layer_ids) * target.hidden_size)
    torch.testing.assert_close(out.tap_hidden, expected_taps)
    torch.testing.assert_close(target.logits(out.final_hidden), ref.logits)


def test_incremental_forward_with_cache_and_rollback(tiny_target):
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(2))
    full = tiny_target.forward(ids)
    cache = tiny_target.new_cache()
    tiny_target.forward(ids[:, :7], past_key_values=cache, use_cache=True)
    junk = torch.randint(0, 259, (1, 3))
    tiny_target.forward(junk, past_key_values=cache, use_cache=True)  # a rejected draft
    crop_cache(cache, 7)
    assert cache.get_seq_length() == 7
    step = tiny_target.forward(ids[:, 7:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(step.tap_hidden, full.tap_hidden[:, 7:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.final_hidden, full.final_hidden[:, 7:], atol=1e-5, rtol=1e-5)


def test_target_is_frozen_and_exposes_facts(tiny_target):
    assert not any(p.requires_grad for p in tiny_target.model.parameters())
    assert not tiny_target.model.training
    assert tiny_target.num_layers == 4 and tiny_target.hidden_size == 64 and tiny_target.vocab_size == 272
    assert tiny_target.tied_embeddings


def test_final_logit_softcap_comes_from_the_family_config():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    target = Target(model, tokenizer=None, name_or_path="tiny-gemma2")
    ids = torch.randint(0, 96, (1, 6))
    logits = target.logits(target.forward(ids).final_hidden)
    torch.testing.assert_close(logits, model(ids).logits)
    assert logits.abs().max() <= 2.0


def test_bad_tap_ids_are_rejected(tiny_target):
    with pytest.raises(ValueError, match="last"):
        Target(tiny_target.model, tiny_target.tokenizer, tap_layer_ids=[0, 3])


def test_missing_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TargetNotFoundError, match="not in the local Hugging Face cache.*target.path"):
        resolve_weights(TargetSpec(id="Qwen/Qwen2.5-7B-Instruct", path=None))
    with pytest.raises(TargetNotFoundError, match="does not exist"):
        resolve_weights(TargetSpec(path=str(tmp_path / "nope")))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(TargetNotFoundError, match="not a .gguf"):
        resolve_weights(TargetSpec(path=str(tmp_path / "weights.bin")))
    with pytest.raises(TargetNotFoundError, match="not installed"):
        resolve_weights(TargetSpec(path="pkg://no_such_package_xyz/model.gguf"))


def test_local_folder_target_loads(tmp_path):
    """A model folder saved by transformers loads through the same path as a Hub snapshot."""
    src = load_target(tiny_spec("qwen2", layers=3))
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    target = load_target(TargetSpec(id="local-qwen2", path=str(tmp_path / "m")))
    ids = torch.randint(0, 259, (1, 5))
    torch.testing.assert_close(target.forward(ids).tap_hidden, src.forward(ids).tap_hidden)


@pytest.mark.slow
def test_smollm2_gguf_default_target_loads_with_tap_features():
    target = load_target(TargetSpec())
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (30, 576, 49152)
    assert target.tap_layer_ids == [1, 8, 14, 21, 27]
    ids = target.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = target.forward(ids)
    assert out.tap_hidden.shape == (1, ids.shape[1], 5 * 576)
    assert target.tokenizer.decode(target.logits(out.final_hidden[:, -1]).argmax(-1)).strip() == "Paris"


def test_accelerator_targets_load_straight_onto_their_device(tmp_path, monkeypatch):
    """On a GPU rank the weights are materialised on that rank's device by ``from_pretrained`` (device_map),
    never first in host memory; the CPU load passes no device_map. Checked on CPU by recording the kwargs."""
    import transformers

    from dspark_model.target import placement_kwargs

    assert placement_kwargs("cpu") == {} and placement_kwargs(torch.device("cpu")) == {}
    assert placement_kwargs("cuda:3") == {"device_map": {"": "cuda:3"}}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert placement_kwargs("cuda") == {"device_map": {"": "cuda:5"}}  # the rank's current GPU

    src = load_target(tiny_spec("qwen2", layers=3))
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recording(folder, **kwargs):
        seen.append(kwargs)
        return real(folder, **{k: v for k, v in kwargs.items() if k != "device_map"})  # no GPU here

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    load_target(TargetSpec(id="local-qwen2", path=str(tmp_path / "m")), device="cuda:1")
    load_target(TargetSpec(id="local-qwen2", path=str(tmp_path / "m")), device="cpu")
    assert seen[0]["device_map"] == {"": "cuda:1"}
    assert "device_map" not in seen[1]


def test_device_map_load_matches_the_plain_load(tmp_path):
    """The device_map path of from_pretrained (what a GPU rank takes) gives the plain load's weights."""
    from transformers import AutoModelForCausalLM

    src = load_target(tiny_spec("llama", layers=3))
    src.model.save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map={"": "cpu"})
    a, b = plain.state_dict(), mapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_smollm2_gguf_loads_through_device_map():
    """GGUF weights (dequantised by transformers) go through the same device_map path a GPU rank uses."""
    from transformers import AutoModelForCausalLM

    from dspark_model.target import resolve_weights

    folder, gguf = resolve_weights(TargetSpec())
    plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    mapped = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, device_map={"": "cpu"})
    a, b = plain.state_dict(), mapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_stage_resolves_its_device_with_one_helper(monkeypatch):
    from data_prep.errors import DataPrepError
    from dspark_model.target import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DataPrepError, match=r"^train.device=cuda:1 but no GPU is visible; use train.device=cpu"):
        resolve_device("cuda:1", "train.device", DataPrepError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
