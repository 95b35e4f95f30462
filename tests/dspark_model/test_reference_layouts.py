"""Exports against what the reference implementations read (recorded from their code in
dspark_model/reference_layouts.json): weight names and shapes, the keys DeepSpec asserts, the config
speculators' own save writes, and the verifier a speculators export names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_model import reference
from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import DEFAULT_NUM_ANCHORS, ExportError, export_draft, verifier_source
from dspark_model.export_schema import (
    SCHEMAS,
    ExportSchemaError,
    native_config,
    read_weights_header,
    validate_export,
)
from dspark_model.target import load_target
from tests.conftest import tiny_draft_config, tiny_spec
from tests.dspark_model.test_export import make_ckpt


@pytest.fixture(scope="module")
def qwen3():
    return load_target(tiny_spec("qwen3"))


def test_recorded_references_name_their_versions():
    data = reference.layouts()
    assert len(data["deepspec"]["commit"]) == 40 and data["speculators"]["version"] == "0.9.0"
    assert reference.reference_name("deepspec") == "DeepSpec afdfa7c"


@pytest.mark.parametrize("head", ["markov", "gated", "rnn", "none"])
@pytest.mark.parametrize("fmt", ["deepspec", "speculators"])
def test_export_weights_are_exactly_what_the_reference_reads(tmp_path, qwen3, head, fmt):
    ckpt = make_ckpt(tmp_path / "ckpt", qwen3, "qwen3", head)
    out = export_draft(ckpt, tmp_path / fmt, fmt, target=qwen3)
    header = read_weights_header(out / "model.safetensors")
    arch = native_config(fmt, json.loads((out / "config.json").read_text()))["arch"]
    want = reference.expected_file_weights(fmt, arch)
    assert {k: v[0] for k, v in header.items()} == want
    if head == "gated":
        assert want["markov_head.gate_proj.weight"] == (16, 64 + 16)
    if head == "rnn":
        assert want["markov_head.joint_proj.weight"] == (48, 2 * 16 + 64)


def test_reduced_vocabulary_speculators_export_matches_the_reference(tmp_path, tiny_target):
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, tiny_draft_config(sequential_head="gated", draft_vocab_size=40))
    draft.set_draft_vocab(torch.arange(0, 200, 5))
    ckpt = save_pretrained(draft, tmp_path / "ckpt", target_spec=tiny_spec("llama"))
    out = export_draft(ckpt, tmp_path / "spec", "speculators", target=tiny_target)
    header = read_weights_header(out / "model.safetensors")
    assert {"d2t", "t2d", "lm_head.weight"} <= set(header) and header["markov_head.markov_w2.weight"][0] == (40, 16)
    assert reference.reference_weight_problems("speculators", draft.arch, header) == []


def test_self_check_catches_a_name_the_reference_does_not_know(tmp_path, qwen3, monkeypatch):
    """Our own module loads its own names back; the recorded reference layout is what catches a rename."""
    ckpt = make_ckpt(tmp_path / "ckpt", qwen3, "qwen3", "gated")
    data = json.loads(reference.LAYOUTS_PATH.read_text())
    gated = data["deepspec"]["weights"]["sequential_head"]["gated"]
    gated["markov_head.gate_linear.weight"] = gated.pop("markov_head.gate_proj.weight")
    monkeypatch.setattr(reference, "layouts", lambda: data)
    with pytest.raises(ExportSchemaError, match=r"DeepSpec afdfa7c reads \['markov_head.gate_linear.weight'\].*"
                                                r"does not know \['markov_head.gate_proj.weight'\]"):
        export_draft(ckpt, tmp_path / "ds", "deepspec", target=qwen3)
    assert not (tmp_path / "ds").exists()


def test_exports_from_older_toolkits_are_named_as_such(tmp_path, qwen3):
    ckpt = make_ckpt(tmp_path / "ckpt", qwen3, "qwen3", "rnn")
    out = export_draft(ckpt, tmp_path / "spec", "speculators", target=qwen3)
    state = load_file(str(out / "model.safetensors"))
    save_file({k.replace("joint_proj", "rnn_proj"): v for k, v in state.items()}, str(out / "model.safetensors"))
    with pytest.raises(ExportSchemaError, match="rnn_proj.*older toolkit.*export the checkpoint again"):
        validate_export(out)


def test_deepspec_config_has_every_key_deepspec_asserts(tmp_path, qwen3):
    from train.schema import OptimConfig

    trained = make_ckpt(tmp_path / "ckpt", qwen3, "qwen3", "rnn")
    cfg = json.loads((trained / "config.json").read_text())
    cfg["resolved_config"] = {"train": {"max_anchors": 24}}  # what train/loop.py saves with the final draft
    (trained / "config.json").write_text(json.dumps(cfg))
    out = export_draft(trained, tmp_path / "ds", "deepspec", target=qwen3)
    config = json.loads((out / "config.json").read_text())
    required = reference.required_config_keys("deepspec", config)
    assert {"num_anchors", "markov_head_type", "confidence_head_with_markov"} <= set(required) <= set(config)
    schema = {key.name for key in SCHEMAS["deepspec"]}  # the written schema lists what DeepSpec always asserts
    assert set(reference.layouts()["deepspec"]["config"]["required"]) <= schema
    assert config["num_anchors"] == 24 and config["num_target_layers"] == 4
    assert qwen3.tied_embeddings and config["tie_word_embeddings"] is False  # DeepSpec's builder writes false
    bare = export_draft(make_ckpt(tmp_path / "c2", qwen3, "qwen3"), tmp_path / "ds2", "deepspec", target=qwen3)
    assert json.loads((bare / "config.json").read_text())["num_anchors"] == DEFAULT_NUM_ANCHORS
    assert DEFAULT_NUM_ANCHORS == OptimConfig().max_anchors
    for edit, needle in ((lambda c: c.pop("num_anchors"), "num_anchors"),
                         (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings must be false"),
                         (lambda c: c.pop("markov_head_type"), "markov_head_type")):
        broken = dict(config)
        edit(broken)
        (out / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ExportSchemaError, match=needle):
            validate_export(out)


def test_speculators_config_is_keyed_as_speculators_saves_it(tmp_path, qwen3):
    saved = reference.layouts()["speculators"]["saved_config"]
    out = export_draft(make_ckpt(tmp_path / "ckpt", qwen3, "qwen3", "gated"), tmp_path / "s", "speculators",
                       target=qwen3)
    config = json.loads((out / "config.json").read_text())
    not_written = {"auto_map", "transformers_version"}  # auto_map names a config.py we do not ship (no code)
    assert set(saved["keys"]) - not_written <= set(config)
    assert {k: config[k] for k in saved["values"]} == saved["values"]
    method = config["speculators_config"]["proposal_methods"][0]
    assert sorted(method) == saved["proposal_method_keys"]
    assert {k: method[k] for k in saved["proposal_method_values"]} == saved["proposal_method_values"]
    layer = config["transformer_layer_config"]
    assert layer["tie_word_embeddings"] is True and layer["num_hidden_layers"] == 2  # the target's / the draft's
    assert layer["architectures"] == ["Qwen3ForCausalLM"] and layer["dtype"] == "float32"


def test_verifier_names_something_that_loads(tmp_path, qwen3, monkeypatch):
    assert verifier_source(qwen3) == ("tiny-qwen3", "the target's Hub id")
    monkeypatch.setattr(qwen3, "weights_path", str(tmp_path))
    name, why = verifier_source(qwen3)
    assert name == str(tmp_path.resolve()) and "local folder" in why
    monkeypatch.setattr(qwen3, "weights_path", str(tmp_path / "model.Q4_1.gguf"))
    name, why = verifier_source(qwen3)
    assert name == "tiny-qwen3" and "GGUF" in why
    ckpt = make_ckpt(tmp_path / "ckpt", qwen3, "qwen3")
    out = export_draft(ckpt, tmp_path / "s", "speculators", target=qwen3, verifier_path="Qwen/Qwen3-0.6B")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "Qwen/Qwen3-0.6B"
    card = (out / "README.md").read_text()
    assert "`Qwen/Qwen3-0.6B` (given with --verifier-path)" in card and "base_model: tiny-qwen3" in card
    with pytest.raises(ExportError, match="verifier-path"):
        export_draft(ckpt, tmp_path / "d", "deepspec", target=qwen3, verifier_path="x")


def test_cli_verifier_path(tmp_path, qwen3):
    from dspark_model.export import main

    ckpt = make_ckpt(tmp_path / "ckpt", qwen3, "qwen3")
    # the checkpoint names a random target; the CLI rebuilds it from the recipe
    assert main([str(ckpt), "--format", "speculators", "--out", str(tmp_path / "o"),
                 "--verifier-path", "/srv/models/qwen3"]) == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "/srv/models/qwen3"
