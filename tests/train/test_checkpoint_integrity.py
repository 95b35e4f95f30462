"""A damaged newest checkpoint never blocks a resume; temporary folders of a crash are cleaned up."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.train.test_checkpointing import _job, _losses
from train.checkpointing import (
    FILES_NAME,
    STATE_NAME,
    CheckpointCorruptError,
    list_checkpoints,
    resolve_resume,
    verify_checkpoint,
)
from train.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies."""
    out = tmp_path_factory.mktemp("trained")
    train(_job(out))
    return out


def _truncate(path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_save_records_every_file_and_verify_catches_truncation(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    files = json.loads((ckpt / FILES_NAME).read_text())["files"]
    assert {STATE_NAME, "draft.safetensors", "optimizer.safetensors", "rng-rank0.json"} <= set(files)
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())
    assert verify_checkpoint(ckpt) is None
    _truncate(ckpt / "optimizer.safetensors")
    assert "optimizer.safetensors has 100 bytes" in verify_checkpoint(ckpt)


def test_resume_falls_back_from_a_truncated_newest_checkpoint_and_cleans_up(trained, tmp_path, caplog):
    run = shutil.copytree(trained, tmp_path / "run")
    want = _losses(trained)
    _truncate(run / "checkpoints" / "step-00000004" / "draft.safetensors")
    shutil.rmtree(run / "final")
    leftovers = [run / "checkpoints" / ".tmp-step-00000006", run / "checkpoints" / ".step-00000002.old-123",
                 run / ".final.tmp-abc"]  # what a crash or a full disk leaves
    for p in leftovers:
        p.mkdir()
    with caplog.at_level(logging.WARNING):
        train(_job(run))  # resume=auto: step 4 is damaged, so step 2
    assert "step-00000004 is damaged (draft.safetensors has 100 bytes" in caplog.text
    assert "removed 3 temporary folder(s)" in caplog.text and not any(p.exists() for p in leftovers)
    got = _losses(run)
    assert sorted(got) == [1, 2, 3, 4] and got[3] == want[3] and got[4] == want[4]
    assert verify_checkpoint(run / "checkpoints" / "step-00000004") is None  # re-saved whole


def test_a_truncated_trainer_state_is_skipped_and_a_named_damaged_checkpoint_refused(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    root = run / "checkpoints"
    _truncate(root / "step-00000004" / STATE_NAME, keep=20)
    assert resolve_resume(root, "auto").name == "step-00000002"
    with pytest.raises(CheckpointCorruptError, match=r"step-00000004 is damaged \(trainer_state.json unreadable"):
        resolve_resume(root, str(root / "step-00000004"))
    _truncate(root / "step-00000002" / "draft.safetensors")
    with pytest.raises(CheckpointCorruptError, match="every checkpoint .* is damaged.*train.resume=never"):
        resolve_resume(root, "auto")
