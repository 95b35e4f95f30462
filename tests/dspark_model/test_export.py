"""Exports: every format loads back to the native draft's exact logits; the schemas catch broken exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_prep.pipeline import run as run_data_prep
from dspark_model.card import CardSources
from dspark_model.checkpoint import load_draft, save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import ExportError, export_draft, load_export
from dspark_model.export_schema import ExportSchemaError, validate_export
from dspark_model.target import load_target
from eval.report import EvalReport
from tests.calibrated import calibrate_checkpoint
from tests.conftest import tiny_draft_config, tiny_spec
from tests.data_prep.conftest import PROMPT_ROWS, make_cfg


@pytest.fixture(scope="module")
def targets(tiny_target):
    torch.manual_seed(0)
    return {"llama": tiny_target, "qwen3": load_target(tiny_spec("qwen3"))}


def make_ckpt(path: Path, target, family: str, head: str = "markov", seed: int = 0, calibrated: bool = False):
    """A draft with random (not default-initialised) weights, saved natively (``calibrated``: with eval's
    calibration of those weights beside them, in ``<path>-calibration``)."""
    torch.manual_seed(seed)
    cfg = tiny_draft_config(sequential_head=head, confidence_head=head != "none")
    draft = build_draft_for(target, cfg).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0.0, 0.3)
    ckpt = save_pretrained(draft, path, target_spec=tiny_spec(family))
    if calibrated:
        calibrate_checkpoint(ckpt, path.with_name(f"{path.name}-calibration"))
    return ckpt


def outputs(draft, target):
    """Teacher-forced logits + confidences, and a greedy proposal through the inference cache."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    taps = target.forward(ids).tap_hidden
    anchors = torch.tensor([[3, 9], [5, 12]])
    with torch.no_grad():
        h = draft.forward_train(taps, ids, anchors)
        prev, _, _ = draft.block_inputs(ids, anchors)
        h, prev = h.flatten(0, 1), prev.flatten(0, 1)
        conf = draft.confidence_logits(h, prev)
        cache = draft.new_cache()
        draft.extend_context(cache, taps[:, :7])
        prop = draft.propose(cache, ids[:, 7], temperature=0.0)
    return [draft.logits(h, prev), conf, prop.tokens, prop.confidences]


def assert_same(a_list, b_list):
    for a, b in zip(a_list, b_list):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


CASES = [("llama", "markov"), ("qwen3", "gated"), ("qwen3", "rnn"), ("llama", "none")]


@pytest.mark.parametrize("family,head", CASES)
def test_every_format_reproduces_native_logits_at_fp32(tmp_path, targets, family, head):
    target = targets[family]
    ckpt = make_ckpt(tmp_path / "ckpt", target, family, head)
    reference = outputs(load_draft(ckpt, target), target)
    for fmt in ("native", "deepspec", "speculators"):
        out = export_draft(ckpt, tmp_path / fmt, fmt, "fp32", target=target)
        loaded = load_export(out, target)
        assert loaded.sequential_head == head and next(loaded.parameters()).dtype == torch.float32
        assert_same(outputs(loaded, target), reference)


@pytest.mark.parametrize("fmt,dtype,torch_dtype,tag", [("deepspec", "bf16", torch.bfloat16, "BF16"),
                                                      ("speculators", "bf16", torch.bfloat16, "BF16"),
                                                      ("native", "fp16", torch.float16, "F16")])
def test_reduced_dtype_export_equals_native_cast(tmp_path, targets, fmt, dtype, torch_dtype, tag):
    from dspark_model.export_schema import read_weights_header

    target = targets["qwen3"]
    ckpt = make_ckpt(tmp_path / "ckpt", target, "qwen3")
    out = export_draft(ckpt, tmp_path / "out", fmt, dtype, target=target)
    assert {dt for _, dt in read_weights_header(out / "model.safetensors").values()} == {tag}
    native = load_draft(ckpt, target)
    full = outputs(native, target)
    cast = outputs(native.to(torch_dtype), target)
    assert_same(outputs(load_export(out, target), target), cast)
    assert not torch.equal(full[0], cast[0])  # the dtype really changed the numbers


def test_deepspec_layout(tmp_path, targets):
    for family, arch in (("qwen3", "Qwen3DSparkModel"), ("llama", "LlamaDSparkModel")):
        target = targets[family]
        ckpt = make_ckpt(tmp_path / f"ckpt-{family}", target, family, "rnn")
        out = export_draft(ckpt, tmp_path / f"ds-{family}", "deepspec", target=target)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == [arch] and cfg["model_type"] == family
        assert cfg["num_hidden_layers"] == 2 and cfg["target_layer_ids"] == target.tap_layer_ids == [0, 1, 2]
        assert (cfg["markov_rank"], cfg["markov_head_type"], cfg["block_size"]) == (16, "rnn", 4)
        assert cfg["enable_confidence_head"] and cfg["confidence_head_with_markov"]
        assert "_name_or_path" not in cfg and len(cfg.get("layer_types", [0, 0])) == 2
        w = load_file(str(out / "model.safetensors"))
        assert torch.equal(w["embed_tokens.weight"], target.embed.weight)
        assert torch.equal(w["lm_head.weight"], target.lm_head.weight)
        assert w["markov_head.markov_w1.weight"].shape == (272, 16)
        assert w["layers.1.mlp.gate_proj.weight"].shape == (128, 64)
        card = (out / "README.md").read_text()
        assert ("cannot evaluate" in card) == (family == "llama")
    bare = export_draft(tmp_path / "ckpt-qwen3", tmp_path / "bare", "deepspec", include_embeddings=False,
                        target=targets["qwen3"])
    assert "embed_tokens.weight" not in load_file(str(bare / "model.safetensors"))
    assert "RANDOM embeddings" in (bare / "README.md").read_text()


def test_dflash_and_speculators_layout(tmp_path, targets):
    target = targets["llama"]
    ckpt = make_ckpt(tmp_path / "ckpt", target, "llama", "none")
    out = export_draft(ckpt, tmp_path / "spec", "speculators", target=target)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["aux_hidden_state_layer_ids"] == [i + 1 for i in target.tap_layer_ids] == [1, 2, 3]
    assert cfg["speculators_model_type"] == "dspark" and cfg["sample_from_anchor"] is True
    assert (cfg["markov_rank"], cfg["enable_confidence_head"], cfg["confidence_head_with_markov"]) == (0, False,
                                                                                                      False)
    assert cfg["draft_vocab_size"] == 272 and cfg["target_hidden_size"] == 64
    sc = cfg["speculators_config"]
    assert sc["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 4, "accept_tolerance": 0.0,
                                       "verifier_accept_k": 1}]
    assert sc["verifier"]["name_or_path"] == "tiny-llama"
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 2
    names = set(load_file(str(out / "model.safetensors")))
    assert not names & {"embed_tokens.weight", "lm_head.weight"}
    assert not any(n.startswith(("markov_head", "confidence_head")) for n in names)
    with pytest.raises(ExportError, match="never carries"):
        export_draft(ckpt, tmp_path / "x", "speculators", include_embeddings=True, target=target)


def _break_config(out: Path, edit) -> None:
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))


BREAKS = [
    ("deepspec", lambda c: c.pop("mask_token_id"), "mask_token_id"),
    ("speculators", lambda c: c.pop("block_size"), "block_size"),
    ("speculators", lambda c: c.update(aux_hidden_state_layer_ids=[0, 1, 2]), "off by one"),
    ("speculators", lambda c: c.update(aux_hidden_state_layer_ids=[2, 3, 4]), "aux_hidden_state_layer_ids"),
    ("deepspec", lambda c: c.update(target_layer_ids=[1, 2, 3]), "target_layer_ids"),
    ("deepspec", lambda c: c.update(architectures=["Qwen3ForCausalLM"]), "Qwen3DSparkModel"),
    ("deepspec", lambda c: c.update(block_size="4"), "block_size"),
    ("deepspec", lambda c: c.update(intermediate_size=96), "shape"),
    ("speculators", lambda c: c.update(sample_from_anchor=False), "sample_from_anchor"),
    ("speculators", lambda c: c["speculators_config"]["proposal_methods"][0].update(speculative_tokens=3),
     "speculative_tokens"),
    ("speculators", lambda c: c["transformer_layer_config"].pop("head_dim"), "head_dim"),
    ("native", lambda c: c.update(tap_layer_ids=[1, 2, 3]), "tap_layer_ids"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, targets):
    root = tmp_path_factory.mktemp("exports")
    ckpt = make_ckpt(root / "ckpt", targets["qwen3"], "qwen3")
    return {fmt: export_draft(ckpt, root / fmt, fmt, target=targets["qwen3"]) for fmt in
            ("native", "deepspec", "speculators")}


@pytest.mark.parametrize("fmt,edit,needle", BREAKS)
def test_schema_catches_broken_config(tmp_path, targets, exports, fmt, edit, needle):
    import shutil

    out = Path(shutil.copytree(exports[fmt], tmp_path / "broken"))
    validate_export(out, targets["qwen3"])  # the intact copy passes
    _break_config(out, edit)
    with pytest.raises(ExportSchemaError, match=needle):
        validate_export(out, targets["qwen3"])
    with pytest.raises(ExportSchemaError):
        load_export(out, targets["qwen3"])


def test_off_by_one_is_caught_without_the_target(tmp_path, exports):
    import shutil

    for fmt, key, shifted in (("deepspec", "target_layer_ids", [1, 2, 3]),
                              ("speculators", "aux_hidden_state_layer_ids", [0, 1, 2])):
        out = Path(shutil.copytree(exports[fmt], tmp_path / fmt))
        _break_config(out, lambda c, key=key, shifted=shifted: c.update({key: shifted}))
        with pytest.raises(ExportSchemaError, match="off by one"):
            validate_export(out)


def test_schema_catches_wrong_shapes_missing_weights_and_pickles(tmp_path, targets, exports):
    import shutil

    out = Path(shutil.copytree(exports["deepspec"], tmp_path / "w"))
    w = load_file(str(out / "model.safetensors"))
    w["fc.weight"] = w["fc.weight"][:, :-1].contiguous()
    save_file(w, str(out / "model.safetensors"))
    with pytest.raises(ExportSchemaError, match=r"fc.weight has shape \(64, 191\)"):
        validate_export(out, targets["qwen3"])
    del w["lm_head.weight"]
    w["fc.weight"] = torch.zeros(64, 192)
    save_file(w, str(out / "model.safetensors"))
    with pytest.raises(ExportSchemaError, match="RANDOM embeddings"):
        validate_export(out)
    out2 = Path(shutil.copytree(exports["speculators"], tmp_path / "p"))
    (out2 / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ExportSchemaError, match="pickle"):
        validate_export(out2)


def test_files_are_safetensors_only_and_written_atomically(tmp_path, targets):
    target = targets["qwen3"]
    ckpt = make_ckpt(tmp_path / "ckpt", target, "qwen3", calibrated=True)
    temps = json.loads((ckpt / "calibration.json").read_text())["temperatures"]
    for fmt in ("native", "deepspec", "speculators"):
        out = export_draft(ckpt, tmp_path / "exp" / fmt, fmt, target=target)
        serving = [] if fmt == "native" else ["serving"]  # engine calibration files (test_serving.py)
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "calibration.json", "config.json",
                                                         "model.safetensors", *serving]
        assert load_export(out, target).calibration.temperatures == temps
        assert ", ".join(f"{t:.3f}" for t in temps) in (out / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["deepspec", "native", "speculators"]
    before = (tmp_path / "exp" / "native" / "config.json").read_text()
    with pytest.raises(ExportError, match="--overwrite"):
        export_draft(ckpt, tmp_path / "exp" / "native", "native", "bf16", target=target)
    assert (tmp_path / "exp" / "native" / "config.json").read_text() == before
    export_draft(ckpt, tmp_path / "exp" / "native", "native", "bf16", target=target, overwrite=True)
    assert json.loads((tmp_path / "exp" / "native" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export_draft(ckpt, ckpt, "native", target=target, overwrite=True)


def test_card_metadata_report_provenance_and_redaction(tmp_path, targets):
    target = targets["qwen3"]
    ckpt = make_ckpt(tmp_path / "ckpt", target, "qwen3")
    EvalReport(tau=3.21, tau_by_dataset={"gsm8k": 3.5, "mt-bench": 2.9},
               conditional_acceptance={"pooled": [0.9, 0.8, 0.7, 0.6], "by_dataset": {}},
               prefix_survival={"pooled": [0.9, 0.72, 0.5, 0.3], "by_dataset": {}},
               accepted_length_histogram={"pooled": [1, 1, 1, 1, 1], "by_dataset": {}}, num_rounds=5,
               num_rounds_by_dataset={}, settings={"temperature": 0.0, "gamma": 4},
               tokens_per_s={"spec": 30.0, "generate": 12.0, "prompt_lookup": 15.0}, timing_totals={},
               speedup_vs_generate=2.5, speedup_vs_prompt_lookup=2.0, greedy_match_rate=1.0,
               prompt_lookup_match_rate=None).write(tmp_path / "report.json")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    data = run_data_prep(make_cfg(str(prompts), tmp_path / "data", max_new_tokens=4))  # the manifest it writes
    (source,) = data.sources
    (tmp_path / "train.yaml").write_text("train:\n  lr: 0.0006\n  wandb_api_key: SECRET2\n")
    sources = CardSources(report=str(tmp_path / "report.json"), data_manifest=str(tmp_path / "data" / "manifest.json"),
                          train_config=str(tmp_path / "train.yaml"), repo_id="me/draft")
    out = export_draft(ckpt, tmp_path / "out", "speculators", target=target, card_sources=sources)
    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    assert "base_model: tiny-qwen3" in meta and "library_name: speculators" in meta
    assert "license: apache-2.0" in meta and "- speculative-decoding" in meta and "- dspark" in meta
    assert "| gsm8k | 3.500 |" in card and "**3.210**" in card and "2.00x" in card  # 30 / 15 vs prompt lookup
    assert "0.900, 0.800, 0.700, 0.600" in card and "temperature = 0.0" in card
    assert source["sha256"] in card and data.fingerprint in card and "train.lr: 0.0006" in card
    assert f"| p | {source['location']} | {source['rows_used']} of {source['rows_read']} |" in card
    assert "SECRET" not in card and "<redacted>" in card
    assert "[1, 2, 3]" in card and "[0, 1, 2]" in card  # both layer-id conventions stated
    assert "vllm serve me/draft" in card


def test_embedded_train_config_reaches_card_without_credentials(tmp_path, targets):
    target = targets["llama"]
    torch.manual_seed(0)
    draft = build_draft_for(target, tiny_draft_config())
    train = {"train": {"lr": 0.001, "max_steps": 7}, "data": {"openai_api_key": "sk-LEAK", "pad_token": "<pad>"}}
    ckpt = save_pretrained(draft, tmp_path / "ckpt", target_spec=tiny_spec("llama"), extra={"train_config": train})
    out = export_draft(ckpt, tmp_path / "out", "native", target=target)
    card, config = (out / "README.md").read_text(), (out / "config.json").read_text()
    assert "train.max_steps: 7" in card and "data.pad_token: <pad>" in card
    assert "sk-LEAK" not in card + config and json.loads(config)["mask_token_id"] == 259


def test_license_map():
    from dspark_model.card import license_for

    assert license_for("Qwen/Qwen3-8B")[0] == "apache-2.0"
    assert license_for("meta-llama/Llama-3.1-8B-Instruct")[0] == "llama3.1"
    assert license_for("Qwen/Qwen2.5-72B-Instruct")[0] == "other"
    lic, note = license_for("someone/unknown-model")
    assert lic == "other" and "target's license" in note


def test_cli_exports_and_fails_cleanly(tmp_path, targets, capsys):
    from dspark_model.export import main

    ckpt = make_ckpt(tmp_path / "ckpt", targets["llama"], "llama")
    out = tmp_path / "out"
    assert main([str(ckpt), "--format", "deepspec", "--out", str(out), "--dtype", "bf16"]) == 0
    assert validate_export(out, targets["llama"]) == "deepspec"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([str(ckpt), "--format", "deepspec", "--out", str(out)]) == 2  # exists, no --overwrite
    assert main([str(tmp_path / "missing"), "--format", "native", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("error:") and "--overwrite" in err[-2]
    assert err[-1].startswith("error:") and "config.json is missing" in err[-1]


@pytest.mark.parametrize("trainable", [False, True])
def test_reduced_vocabulary_exports(tmp_path, targets, trainable):
    """speculators carries d2t/t2d and the K-row heads and loads back to the same logits; deepspec refuses."""
    from dspark_model.export_schema import read_weights_header

    target = targets["llama"]
    torch.manual_seed(0)
    draft = build_draft_for(target, tiny_draft_config(draft_vocab_size=40, train_draft_head=trainable)).eval()
    draft.set_draft_vocab(torch.arange(0, 200, 5))  # 40 ids, not a prefix: d2t offsets are not all zero
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = save_pretrained(draft, tmp_path / "ckpt", target_spec=tiny_spec("llama"))
    reference = outputs(load_draft(ckpt, target), target)
    for fmt in ("native", "speculators"):
        out = export_draft(ckpt, tmp_path / fmt, fmt, "fp32", target=target)
        assert_same(outputs(load_export(out, target), target), reference)
    header = read_weights_header(tmp_path / "speculators" / "model.safetensors")
    assert header["d2t"] == ((40,), "I64") and header["t2d"] == ((target.vocab_size,), "BOOL")
    assert header["lm_head.weight"][0] == (40, 64) and header["markov_head.markov_w2.weight"][0] == (40, 16)
    assert header["markov_head.markov_w1.weight"][0] == (target.vocab_size, 16)
    assert "draft_to_target" not in header
    tables = load_file(str(tmp_path / "speculators" / "model.safetensors"))
    assert (torch.arange(40) + tables["d2t"]).tolist() == list(range(0, 200, 5))
    assert torch.equal(tables["lm_head.weight"], (draft.lm_head.weight if trainable
                                                  else target.lm_head.weight[torch.arange(0, 200, 5)]).detach())
    cfg = json.loads((tmp_path / "speculators" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 40 and cfg["transformer_layer_config"]["vocab_size"] == target.vocab_size
    with pytest.raises(ExportError, match="reduced vocabulary of 40 tokens.*--format speculators"):
        export_draft(ckpt, tmp_path / "ds", "deepspec", "fp32", target=target)
    bad = Path(tmp_path / "bad")
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    tables["t2d"][1] = True  # a target id the draft cannot emit, claimed by t2d
    save_file(tables, str(bad / "model.safetensors"))
    with pytest.raises(ExportSchemaError, match="d2t and t2d disagree"):
        load_export(bad, target)
