"""file_sha256 reads a file once per process while it is unchanged: export and eval check a calibrated
checkpoint's weights (calibration binding, then loading) without hashing the multi-GB file twice."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from dspark_model import atomic
from dspark_model.atomic import file_sha256
from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import export_draft
from tests.calibrated import calibrate_checkpoint
from tests.conftest import tiny_draft_config, tiny_spec


@pytest.fixture()
def reads(monkeypatch):
    """Counter of the files file_sha256 actually reads (memo cleared first)."""
    counted: Counter = Counter()
    real = atomic._hash_file

    def counting(path, chunk):
        counted[os.path.realpath(path)] += 1
        return real(path, chunk)

    monkeypatch.setattr(atomic, "_SHA256_MEMO", {})
    monkeypatch.setattr(atomic, "_hash_file", counting)
    return counted


def test_an_unchanged_file_is_read_once_and_a_changed_one_again(tmp_path, reads):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    assert file_sha256(path) == first and reads[str(path.resolve())] == 1
    stat = path.stat()
    with open(path, "r+b") as f:  # same size, same inode, modification time put back: content still differs
        f.write(b"b")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) != first and reads[str(path.resolve())] == 2
    path.write_bytes(b"c" * 1000)
    os.replace(path, tmp_path / "moved.bin")
    (tmp_path / "moved.bin").rename(path)
    assert file_sha256(path) == file_sha256(path, memo=False)
    assert reads[str(path.resolve())] == 4  # the new bytes once, then the memo=False read


@pytest.fixture()
def calibrated(tmp_path, tiny_target):
    torch.manual_seed(0)
    ckpt = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), tmp_path / "final", tiny_spec())
    calibrate_checkpoint(ckpt, tmp_path / "calibration")
    return ckpt


def test_export_of_a_calibrated_checkpoint_reads_its_weights_once(calibrated, tiny_target, tmp_path, reads):
    out = export_draft(calibrated, tmp_path / "out", "speculators", target=tiny_target)
    assert (out / "calibration.json").is_file()
    assert reads[os.path.realpath(calibrated / "model.safetensors")] == 1


def test_eval_of_a_calibrated_checkpoint_reads_its_weights_once(calibrated, tmp_path, reads):
    from data_prep.sources import PromptsConfig, PromptSource
    from eval.__main__ import run
    from eval.schema import EvalConfig

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello!"}) + "\n")
    cfg = EvalConfig(draft_checkpoint=str(calibrated), out_dir=str(tmp_path / "eval"), max_new_tokens=4,
                     progress=False, prompts=PromptsConfig(sources=[PromptSource(name="p", path=str(prompts))]))
    cfg.calibration.enabled = False
    cfg.baselines.prompt_lookup = False
    run(cfg)
    assert reads[os.path.realpath(calibrated / "model.safetensors")] == 1
