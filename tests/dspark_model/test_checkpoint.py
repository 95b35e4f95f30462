"""Native checkpoints: bit-identical round trip, calibration pick-up, and one clear error per mismatch."""

from __future__ import annotations

import pytest
import torch

from dspark_model.checkpoint import (
    CheckpointMismatchError,
    load_draft,
    read_draft_config,
    save_pretrained,
    target_spec_from_checkpoint,
)
from dspark_model.draft import build_draft_for
from dspark_model.target import Target, load_target
from tests.calibrated import calibrate_checkpoint
from tests.conftest import tiny_draft_config, tiny_spec


@pytest.fixture()
def saved(tmp_path, tiny_target):
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, tiny_draft_config(sequential_head="rnn")).eval()
    path = save_pretrained(draft, tmp_path / "ckpt", target_spec=tiny_spec("llama"))
    return draft, path


def _outputs(draft, target):
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    taps = target.forward(ids).tap_hidden
    anchors = torch.tensor([[3, 9]])
    h = draft.forward_train(taps, ids, anchors)
    prev, _, _ = draft.block_inputs(ids, anchors)
    return draft.logits(h[0], prev[0]), draft.confidence_logits(h[0], prev[0])


def test_round_trip_is_bit_identical(saved, tiny_target):
    draft, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_draft(path, tiny_target)
    for a, b in zip(_outputs(draft, tiny_target), _outputs(loaded, tiny_target)):
        assert torch.equal(a, b)


def test_config_records_target_taps_and_convention(saved):
    _, path = saved
    cfg = read_draft_config(path)
    assert cfg["tap_layer_ids"] == [0, 1, 2] and cfg["tap_layer_convention"].startswith("decoder_layer")
    assert cfg["target"]["id"] == "tiny-llama" and cfg["target"]["hidden_size"] == 64
    assert (cfg["block_size"], cfg["sequential_head"], cfg["markov_rank"]) == (4, "rnn", 16)
    assert cfg["mask_token_id"] == 259 and cfg["confidence_head_with_markov"] is True
    spec = target_spec_from_checkpoint(path)
    assert spec.random["family"] == "llama" and spec.tap_layer_ids == [0, 1, 2]


def test_calibration_json_is_loaded_when_it_belongs_to_the_weights(saved, tiny_target, tmp_path_factory):
    _, path = saved
    record = calibrate_checkpoint(path, tmp_path_factory.mktemp("calibration"))
    assert load_draft(path, tiny_target).calibration == record


def test_overwriting_drops_a_stale_calibration_and_leaves_no_temp_dirs(saved, tiny_target, tmp_path_factory):
    """A calibration belongs to the weights it was fitted on: the same weights saved again keep it; other
    weights saved into the folder remove it, even when the draft being saved still carries it."""
    draft, path = saved
    calibrate_checkpoint(path, tmp_path_factory.mktemp("calibration"))
    loaded = load_draft(path, tiny_target)
    save_pretrained(loaded, path)  # the very same bytes
    assert load_draft(path, tiny_target).calibration == loaded.calibration is not None
    with torch.no_grad():
        next(loaded.parameters()).add_(0.01)  # trained further
    save_pretrained(loaded, path)
    assert not (path / "calibration.json").exists()
    assert load_draft(path, tiny_target).calibration is None
    calibrate_checkpoint(path, tmp_path_factory.mktemp("calibration"))
    save_pretrained(draft, path)  # an uncalibrated draft replaces calibrated weights
    assert not (path / "calibration.json").exists()
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("other, message", [
    (dict(hidden_size=32), "width: draft 64 vs target 32"),
    (dict(vocab_size=300), "vocab size: draft 272 vs target 300"),
    (dict(num_hidden_layers=5), "depth"),
])
def test_each_mismatch_names_itself(saved, other, message):
    _, path = saved
    target = load_target(tiny_spec("llama", layers=other.pop("num_hidden_layers", 4), **other))
    with pytest.raises(CheckpointMismatchError, match=message):
        load_draft(path, target)


def test_tap_mismatch_says_how_to_fix(saved, tiny_target):
    _, path = saved
    other = Target(tiny_target.model, tiny_target.tokenizer, tap_layer_ids=[1, 2])
    with pytest.raises(CheckpointMismatchError, match=r"tap layer ids.*tap_layer_ids=\[0, 1, 2\]"):
        load_draft(path, other)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="config.json is missing"):
        load_draft(tmp_path)
