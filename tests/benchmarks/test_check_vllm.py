"""Speculators exports against vLLM's DSpark and EAGLE-3 loaders, statically: the rules read from vLLM's source
(dspark_model/vllm_layout.json) applied to tiny exports by benchmarks/check_vllm.py."""

from __future__ import annotations

import copy
import json
import re

import pytest

from benchmarks.check_vllm import CASES, check_export, check_layout, export_case, map_name, rules
from dspark_model.export_schema import read_weights_header


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    work, targets = tmp_path_factory.mktemp("vllm"), {}
    names = ("qwen3-markov", "qwen3-markov-reduced-40", "qwen3-dflash", "qwen3-gated", "llama-eagle3",
             "qwen3-eagle3-reduced-40")
    return {n: export_case(n, work, targets) for n in names}


def _layout(export):
    out, vocab = export
    return json.loads((out / "config.json").read_text()), read_weights_header(out / "model.safetensors"), vocab


def test_rules_name_the_vllm_files_they_were_read_from():
    r = rules()
    assert r["source"] == "https://github.com/vllm-project/vllm"
    commits = [v for v in r["files"].values() if re.fullmatch(r"[0-9a-f]{40}", v)]
    assert len(commits) >= 6 and "vllm/model_executor/models/qwen3_dspark.py" in r["files"]
    assert "#48639" in r["files"]["vllm/transformers_utils/configs/speculators/algos.py"]


def test_name_mapping_follows_vllm():
    r = rules()
    assert map_name("layers.1.self_attn.k_proj.weight", r) == ("model.layers.1.self_attn.qkv_proj.weight", "k")
    assert map_name("layers.0.mlp.up_proj.weight", r) == ("model.layers.0.mlp.gate_up_proj.weight", "1")
    assert map_name("layers.0.mlp.down_proj.weight", r) == ("model.layers.0.mlp.down_proj.weight", None)
    assert map_name("lm_head.weight", r) == ("lm_head.weight", None)
    assert map_name("d2t", r) == ("draft_id_to_target_id", None)
    assert map_name("t2d", r) == (None, None)
    assert map_name("markov_head.markov_w2.weight", r) == ("model.markov_head.markov_w2.weight", None)


@pytest.mark.parametrize("name", ["qwen3-markov", "qwen3-markov-reduced-40", "qwen3-dflash"])
def test_supported_exports_load_in_vllm(exports, name):
    out, vocab = exports[name]
    res = check_export(out, vocab)
    assert res.ok, res.problems
    assert CASES[name][2] is True
    assert res.config["architectures"] == ["Qwen3DSparkModel"] and res.config["dspark_bonus_anchor"] is False
    cfg = json.loads((out / "config.json").read_text())
    assert res.config["target_layer_ids"] == cfg["dspark_toolkit"]["tap_layer_ids"]  # decoder-layer ids again
    assert res.mapping["layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.qkv_proj.weight [shard q]"
    if name.endswith("reduced-40"):
        assert res.mapping["d2t"] == "draft_id_to_target_id" and res.mapping["t2d"] == "(skipped)"
        assert res.mapping["lm_head.weight"] == "lm_head.weight"
        assert "lm_head: shared from the target" not in res.notes
    else:
        assert "d2t" not in res.mapping and "lm_head: shared from the target" in res.notes


def test_other_sequential_heads_are_refused(exports):
    res = check_export(*exports["qwen3-gated"])
    assert not res.ok and CASES["qwen3-gated"][2] is False
    assert any("markov_head_type 'gated'" in p for p in res.problems)
    assert any("markov_head.gate_proj.weight" in p and "no such parameter" in p for p in res.problems)


def _edit(cfg, path, value):
    cur = cfg
    for k in path[:-1]:
        cur = cur[k]
    if value is None:
        cur.pop(path[-1])
    else:
        cur[path[-1]] = value


@pytest.mark.parametrize("path, value, needle", [
    (("sample_from_anchor",), False, "1+N block"),
    (("speculators_model_type",), "dflash", "speculators_model_type"),
    (("mask_token_id",), None, "mask_token_id"),
    (("speculators_config", "proposal_methods", 0, "speculative_tokens"), 3, "speculative_tokens 3"),
    (("transformer_layer_config", "hidden_act"), "gelu_pytorch_tanh", "hidden_act"),
    (("transformer_layer_config", "rope_parameters"), {"full_attention": {"rope_theta": 1e4}}, "flat RoPE"),
    (("transformer_layer_config", "layer_types"), ["sliding_attention", "full_attention"], "sliding window"),
    (("aux_hidden_state_layer_ids",), [0, 1, 2], "aux_hidden_state_layer_ids"),
])
def test_config_vllm_cannot_run_is_caught(exports, path, value, needle):
    cfg, header, vocab = _layout(exports["qwen3-markov"])
    cfg = copy.deepcopy(cfg)
    _edit(cfg, path, value)
    res = check_layout(cfg, header, target_vocab_size=vocab)
    assert any(needle in p for p in res.problems), res.problems


def _problems_after(export):
    """edit(header) -> the problems check_layout finds in ``export`` with its weight header so edited."""
    cfg, header, vocab = _layout(export)

    def problems(edit):
        h = dict(header)
        edit(h)
        return check_layout(cfg, h, target_vocab_size=vocab).problems
    return problems


def test_weights_vllm_cannot_load_are_caught(exports):
    cfg, header, vocab = _layout(exports["qwen3-markov-reduced-40"])
    problems = _problems_after(exports["qwen3-markov-reduced-40"])

    def rename(h):
        h["layers.0.self_attn.qkv.weight"] = h.pop("layers.0.self_attn.q_proj.weight")

    assert any("qkv.weight" in p and "no such parameter" in p for p in problems(rename))
    assert any("shard q" in p and "unloaded" in p for p in problems(rename))
    assert any("int64" in p for p in problems(lambda h: h.update(d2t=(h["d2t"][0], "F32"))))
    assert any("lm_head.weight" in p and "unloaded" in p for p in problems(lambda h: h.pop("lm_head.weight")))
    assert any("draft_id_to_target_id" in p and "unloaded" in p for p in problems(lambda h: h.pop("d2t")))
    assert any("markov_w2" in p and "expects (40, 16)" in p
               for p in problems(lambda h: h.update({"markov_head.markov_w2.weight": ((vocab, 16), "F32")})))
    assert any("layers.2" in p for p in problems(lambda h: h.update({"layers.2.norm.weight": ((64,), "F32")})))
    # a full-vocabulary draft must not carry d2t: vLLM builds no parameter for it and stops on the name
    full_cfg = dict(cfg, draft_vocab_size=vocab)
    res = check_layout(full_cfg, dict(header, d2t=((vocab,), "I64")), target_vocab_size=vocab)
    assert any("d2t" in p and "does not build it" in p for p in res.problems)


def test_export_warns_when_vllm_cannot_load_the_head(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dspark_model.export"):
        export_case("qwen3-rnn", tmp_path, {})
    assert any("rnn Markov head" in r.message and "vLLM" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dspark_model.export"):
        export_case("qwen3-markov", tmp_path, {})
    assert not any("vLLM" in r.message for r in caplog.records)


# ---- EAGLE-3 exports against llama_eagle3.py -------------------------------------------------------------
def test_eagle3_rules_name_the_loader_the_exporter_was_checked_against():
    from dspark_model.export_eagle3 import SOURCES_CHECKED

    files = rules()["eagle3"]["files"]
    loader = files["vllm/model_executor/models/llama_eagle3.py"]
    assert re.fullmatch(r"[0-9a-f]{40}", loader) and loader[:12] in SOURCES_CHECKED["vllm"]
    assert map_name("layers.0.self_attn.q_proj.weight", rules()["eagle3"]) == (
        "model.layers.0.self_attn.qkv_proj.weight", "q")
    assert map_name("d2t", rules()["eagle3"]) == ("draft_id_to_target_id", None)


@pytest.mark.parametrize("name", ["llama-eagle3", "qwen3-eagle3-reduced-40"])
def test_eagle3_exports_load_in_vllm(exports, name):
    out, vocab = exports[name]
    res = check_export(out, vocab)
    assert res.ok, res.problems
    assert res.config["architectures"] == ["Eagle3LlamaForCausalLM"] and res.config["norm_before_residual"] is False
    cfg = json.loads((out / "config.json").read_text())
    assert res.config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in cfg["dspark_toolkit"]["tap_layer_ids"]]
    assert res.mapping["layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.qkv_proj.weight [shard k]"
    assert res.mapping["lm_head.weight"] == "lm_head.weight" and "embed_tokens: shared from the target" in res.notes
    if name.endswith("reduced-40"):
        assert res.mapping["d2t"] == "draft_id_to_target_id" and res.mapping["t2d"] == "(skipped)"
    else:
        assert "d2t" not in res.mapping and any("identity map" in n for n in res.notes)


@pytest.mark.parametrize("path, value, needle", [
    (("norm_before_residual",), None, "norm_before_residual"),  # absent: vLLM's default is true
    (("transformer_layer_config", "model_type"), "qwen2", "model_type 'qwen2'"),
    (("transformer_layer_config", "num_hidden_layers"), 2, "num_hidden_layers 2"),
    (("transformer_layer_config", "hidden_act"), "gelu", "hidden_act"),
    (("eagle_aux_hidden_state_layer_ids",), [1, 2], "fc reads 3 tapped states"),
    (("eagle_aux_hidden_state_layer_ids",), [0, 1, 2], "(>= 1)"),
    (("fc_norm",), True, "fc_norm"),
    (("speculators_config", "verifier", "name_or_path"), None, "vLLM needs"),
])
def test_eagle3_config_vllm_cannot_run_is_caught(exports, path, value, needle):
    cfg, header, vocab = _layout(exports["llama-eagle3"])
    cfg = copy.deepcopy(cfg)
    _edit(cfg, path, value)  # None removes the key
    res = check_layout(cfg, header, target_vocab_size=vocab)
    assert any(needle in p for p in res.problems), res.problems


def test_eagle3_weights_vllm_cannot_load_are_caught(exports):
    cfg, header, vocab = _layout(exports["qwen3-eagle3-reduced-40"])
    problems = _problems_after(exports["qwen3-eagle3-reduced-40"])

    d = header["norm.weight"][0][0]
    assert any("draft_id_to_target_id" in p and "unloaded" in p for p in problems(lambda h: h.pop("d2t")))
    assert any("lm_head.weight" in p and "unloaded" in p for p in problems(lambda h: h.pop("lm_head.weight")))
    assert any("q_norm" in p and "no such parameter" in p
               for p in problems(lambda h: h.update({"layers.0.self_attn.q_norm.weight": ((16,), "F32")})))
    q_rows = header["layers.0.self_attn.q_proj.weight"][0][0]  # a q projection over d inputs, not [e ; g]
    assert any(f"expects ({q_rows}, {2 * d})" in p
               for p in problems(lambda h: h.update({"layers.0.self_attn.q_proj.weight": ((q_rows, d), "F32")})))
