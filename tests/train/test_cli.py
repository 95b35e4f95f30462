"""The real ``python -m train`` CLI: golden loss, outputs, clear failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import losses, run_train

# `python -m train target=tiny data=synthetic train.max_steps=4` with the shipped defaults (tiny target, dspark
# draft, train/default.yaml, data sampled from the target). Update only for an intended numerical change.
GOLDEN_LOSSES = [1.4536569118499756, 1.4611830711364746, 1.4461779594421387, 1.4318397045135498]


def test_tiny_run_matches_golden_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_train(["target=tiny", "data=synthetic", "train.max_steps=4", f"train.output_dir={out}",
                      "logger=jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step, want in enumerate(GOLDEN_LOSSES, start=1):
        assert got[step] == pytest.approx(want, rel=1e-4), (step, got)
    # final draft: save_pretrained layout + resolved config; the checkpoint of the last step exists.
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "dspark" and config["block_size"] == 7
    assert config["resolved_config"]["train"]["max_steps"] == 4
    assert len(config["data_fingerprint"]) == 64
    assert (out / "final" / "resolved_config.yaml").is_file()
    weights = load_file(str(out / "final" / "model.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "step-00000004" / "draft.safetensors"))
    assert weights.keys() == ckpt.keys() and all((weights[k] == ckpt[k]).all() for k in weights)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"expected_accept", "accept_k1", "accept_k7", "conf_bce", "tokens_per_s", "lr"} <= record.keys()


def test_missing_target_weights_fail_with_one_line(tmp_path):
    proc = run_train(["target=qwen2.5-7b", f"train.output_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: weights for target 'Qwen/Qwen2.5-7B-Instruct'")
    assert "Traceback" not in proc.stderr


def test_missing_data_fails_with_data_prep_hint(tmp_path):
    proc = run_train(["target=smollm2-135m", f"data.path={tmp_path / 'nothing'}", f"train.output_dir={tmp_path}",
                      "train.device=cpu"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "python -m data_prep" in proc.stderr.strip().splitlines()[-1]


def test_cfg_job_prints_the_composed_config():
    proc = run_train(["--cfg", "job", "target=tiny", "deepspeed=zero2", "train=demo"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage: '2'" in proc.stdout and "tiny-random-llama" in proc.stdout


def test_reduced_vocabulary_run_stores_its_map_and_reports_outside_argmax(tmp_path):
    from dspark_model.checkpoint import load_draft
    from dspark_model.config import TargetSpec
    from dspark_model.target import load_target
    from tests.train.helpers import FAST

    out = tmp_path / "run"
    proc = run_train(FAST + ["train.max_steps=3", "draft.draft_vocab_size=48", f"train.output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "draft vocabulary: 48 of" in proc.stderr + proc.stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["argmax_outside_vocab"] <= 1.0
    config = json.loads((out / "final" / "config.json").read_text())
    target = load_target(TargetSpec(**{k: v for k, v in config["resolved_config"]["target"].items()
                                       if k in {"id", "path", "random", "tap_layer_ids", "num_tap_layers"}}))
    draft = load_draft(out / "final", target)
    ids = draft.draft_to_target
    assert ids.numel() == 48 and torch.equal(ids, ids.sort().values) and ids.unique().numel() == 48
    assert draft.markov_head.markov_w2.weight.shape == (48, 16)
