"""eval refuses bad settings before loading anything, and a target other than the one the draft was trained for."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from data_prep.sources import PromptsConfig, PromptSource
from dspark_model.checkpoint import CheckpointMismatchError
from dspark_model.identity import fingerprint_problem, weights_fingerprint
from dspark_model.target import load_target
from eval.__main__ import load_models, run
from eval.schema import EvalConfig, EvalConfigError
from tests.conftest import tiny_spec
from tests.eval.test_cli import _checkpoint, _prompt_file, _run


@pytest.mark.parametrize("setting, message", [
    ({"gamma": 0}, "gamma=0 must be >= 1"),
    ({"temperature": -0.5}, "temperature=-0.5 must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be >= 1"),
    ({"scheduler_live": {"min_requests": -1}}, "scheduler_live.min_requests=-1 must be >= 0"),
])
def test_bad_settings_fail_before_any_model_loads(tmp_path, setting, message):
    from eval.schema import SchedulerLiveConfig

    if "scheduler_live" in setting:
        setting = {"scheduler_live": SchedulerLiveConfig(enabled=True, **setting["scheduler_live"])}
    cfg = EvalConfig(draft_checkpoint=str(tmp_path / "no-draft"), out_dir=str(tmp_path / "out"), **setting)
    with pytest.raises(EvalConfigError, match=message):  # not "no draft checkpoint there": checked first
        run(cfg)


def test_cli_gamma_zero_is_one_line(tmp_path):
    proc = _run("draft=random", "target=tiny", "gamma=0", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: gamma=0 must be >= 1")


def test_fingerprint_survives_dtype_and_tells_models_apart():
    a, other = load_target(tiny_spec(seed=0)), load_target(tiny_spec(seed=1))
    recorded = weights_fingerprint(a)
    a.model.to(torch.bfloat16)
    assert fingerprint_problem(recorded, weights_fingerprint(a)) is None
    assert "embedding weights differ" in fingerprint_problem(recorded, weights_fingerprint(other))


def _cfg(ckpt, tmp_path, target=None, **kw) -> EvalConfig:
    return EvalConfig(draft_checkpoint=str(ckpt), target=target, device="cpu", out_dir=str(tmp_path / "out"),
                      prompts=PromptsConfig(sources=[PromptSource(path=_prompt_file(tmp_path))]), **kw)


def test_a_target_other_than_the_trained_one_is_refused(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path)  # trained for tiny_spec("llama"), seed 0; config.json records its fingerprint
    assert json.loads((ckpt / "config.json").read_text())["target"]["fingerprint"]["method"] == "strided-256"
    load_models(_cfg(ckpt, tmp_path), torch.device("cpu"))  # its own target (named by the checkpoint) passes
    same_shape = tiny_spec(seed=1)  # same id and shapes, other weights
    with pytest.raises(CheckpointMismatchError, match=r"trained for another target: embedding weights differ"):
        load_models(_cfg(ckpt, tmp_path, same_shape), torch.device("cpu"))
    renamed = dataclasses.replace(tiny_spec(), id="someone/else")
    with pytest.raises(CheckpointMismatchError, match=r"id 'tiny-llama' recorded, 'someone/else' loaded.*"
                                                       r"allow_target_mismatch=true"):
        load_models(_cfg(ckpt, tmp_path, renamed), torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        load_models(_cfg(ckpt, tmp_path, same_shape, allow_target_mismatch=True), torch.device("cpu"))
    assert "continuing: allow_target_mismatch=true" in caplog.text
