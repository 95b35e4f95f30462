"""DraftArch: the one record behind the draft constructor, config.json and the export converters.

``data/draft_config_v1.json`` is a config.json written by save_pretrained before the record existed (a gated
head, reduced vocabulary with a trained head: every optional field set); it is version 1 of the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dspark_model.arch import ARCH_VERSION, DraftArch, DraftArchError
from dspark_model.checkpoint import CheckpointMismatchError, load_draft, read_draft_arch, save_pretrained
from dspark_model.draft import DSparkDraft, build_draft_for
from dspark_model.export import export_draft
from dspark_model.export_schema import native_config, read_config
from tests.conftest import tiny_draft_config

V1 = Path(__file__).with_name("data") / "draft_config_v1.json"


def _gated(tiny_target):
    torch.manual_seed(0)
    return build_draft_for(tiny_target, tiny_draft_config(sequential_head="gated", draft_vocab_size=64,
                                                          train_draft_head=True))


def test_a_config_written_before_the_record_reads_and_is_written_the_same_today(tmp_path, tiny_target):
    old = json.loads(V1.read_text())
    arch = DraftArch.from_config(old, V1)
    draft = _gated(tiny_target)
    assert arch == draft.arch  # the same architecture the same config builds today
    shapes = {k: v.shape for k, v in DSparkDraft(arch).state_dict().items()}
    assert shapes == {k: v.shape for k, v in draft.state_dict().items()}
    new = json.loads((save_pretrained(draft, tmp_path / "ckpt") / "config.json").read_text())
    same = {k for k in old if k not in ("target", "toolkit_version", "tap_layer_convention")}
    assert {k: new[k] for k in same} == {k: old[k] for k in same}  # arch, summary keys, format_version 1
    assert new["tap_layer_convention"] == "decoder_layer"  # the one statement (target.TAP_CONVENTION)


@pytest.mark.parametrize("version, fix", [(3, "upgrade dspark-toolkit"), (None, "re-save it"), (0, "re-save it")])
def test_another_version_is_refused_in_one_line_naming_file_and_fix(tmp_path, tiny_target, version, fix):
    ckpt = save_pretrained(_gated(tiny_target), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["format_version"] = version
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as err:
        load_draft(ckpt, tiny_target)
    message = str(err.value)
    assert "\n" not in message and str(ckpt / "config.json") in message and fix in message
    assert f"reads versions 1, {ARCH_VERSION}" in message


def test_unknown_or_missing_arch_fields_are_refused_with_the_file_named(tmp_path, tiny_target):
    ckpt = save_pretrained(_gated(tiny_target), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    for change in ({"arch": dict(config["arch"], extra=1)},
                   {"arch": {k: v for k, v in config["arch"].items() if k != "head_dim"}}):
        (ckpt / "config.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(CheckpointMismatchError, match="config.json: 'arch' does not match"):
            read_draft_arch(ckpt)
    with pytest.raises(DraftArchError, match="x.json"):
        DraftArch.from_config(dict(config, arch=dict(config["arch"], block_size=0)), "x.json")


@pytest.mark.parametrize("fmt", ["deepspec", "speculators"])
def test_public_formats_convert_back_to_the_same_record(tmp_path, tiny_target, fmt):
    draft = build_draft_for(tiny_target, tiny_draft_config(sequential_head="rnn"))
    ckpt = save_pretrained(draft, tmp_path / "ckpt")
    out = export_draft(ckpt, tmp_path / fmt, fmt, "fp32", target=tiny_target)
    back = native_config(fmt, read_config(out))["arch"]
    assert back == load_draft(ckpt).arch
    assert native_config(fmt, read_config(out))["tap_layer_ids"] == draft.tap_layer_ids
