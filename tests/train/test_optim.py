"""train.optimizer=muon (Muon + AdamW as one optimizer) and train.feature_noise."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_model.draft import build_draft_for
from dspark_model.target import load_target
from tests.conftest import tiny_draft_config, tiny_spec
from tests.train.test_checkpointing import _job, _losses
from train.checkpointing import list_checkpoints, optimizer_from_files, optimizer_to_files
from train.loop import noisy_taps, train
from train.optim import MuonAdamW, make_optimizer
from train.schema import OptimConfig, TrainConfigError, validate


def _draft(seed=0):
    torch.manual_seed(seed)
    return build_draft_for(load_target(tiny_spec()), tiny_draft_config())


def _step(draft, opt):
    loss = sum((p.float() ** 2).sum() * 1e-3 for p in draft.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_muon_takes_hidden_matrices_adamw_the_rest():
    draft = _draft()
    opt, _ = make_optimizer(draft, OptimConfig(optimizer="muon", lr=1e-3))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in draft.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert muon | adamw == trainable and not muon & adamw
    assert any(".q_proj." in n for n in muon) and "fc.weight" in muon
    assert not any("markov_w" in n or "lm_head" in n for n in muon)  # token tables and heads stay on AdamW
    assert all(draft.get_parameter(n).ndim == 2 for n in muon)
    before = {n: p.detach().clone() for n, p in draft.named_parameters() if p.requires_grad and p.any()}
    _step(draft, opt)  # (an all-zero bias has a zero gradient here: left out)
    assert all(not torch.equal(before[n], draft.get_parameter(n)) for n in before)
    assert all(draft.get_parameter(n) in opt.state for n in trainable)  # optimizer.state sees both halves, live


def test_muon_state_round_trips_through_checkpoint_files(tmp_path):
    """Saved as safetensors + JSON like AdamW's; a fresh optimizer loaded from it takes the identical step."""
    a, b = _draft(), _draft()
    cfg = OptimConfig(optimizer="muon", lr=1e-2)
    opt_a, sched_a = make_optimizer(a, cfg)
    _step(a, opt_a)
    sched_a.step()
    tensors, meta = optimizer_to_files(opt_a.state_dict())
    save_file(tensors, tmp_path / "optimizer.safetensors")  # through disk, as a checkpoint does
    tensors = load_file(tmp_path / "optimizer.safetensors")
    b.load_state_dict(a.state_dict())
    opt_b, _ = make_optimizer(b, cfg)
    opt_b.load_state_dict(optimizer_from_files(tensors, json.loads(json.dumps(meta))))
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    _step(a, opt_a)
    _step(b, opt_b)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_muon_refuses_adamw_state():
    draft = _draft()
    adamw, _ = make_optimizer(draft, OptimConfig(optimizer="adamw"))
    _step(draft, adamw)
    muon, _ = make_optimizer(draft, OptimConfig(optimizer="muon"))
    with pytest.raises(ValueError, match="train.optimizer"):
        muon.load_state_dict(adamw.state_dict())


def test_noise_is_relative_to_each_tap():
    torch.manual_seed(0)
    scales = torch.tensor([1.0, 1e4])  # a shallow and a deep tap of very different magnitude
    taps = (torch.randn(2, 500, 2, 64) * scales[:, None]).flatten(-2)
    assert torch.equal(noisy_taps(taps, 0.0, 2), taps)
    diff = (noisy_taps(taps, 0.1, 2) - taps).unflatten(-1, (2, 64))
    rel = diff.pow(2).mean((0, 1, 3)).sqrt() / taps.unflatten(-1, (2, 64)).pow(2).mean((0, 1, 3)).sqrt()
    assert torch.allclose(rel, torch.full((2,), 0.1), rtol=0.05), rel


def test_validation():
    job = _job(Path("unused"))
    for bad, match in [(dict(optimizer="sgd"), "adamw|muon"), (dict(feature_noise=-1.0), "feature_noise")]:
        with pytest.raises(TrainConfigError, match=match):
            validate(dataclasses.replace(job, train=dataclasses.replace(job.train, **bad)))
    zero = dataclasses.replace(job, train=dataclasses.replace(job.train, optimizer="muon"),
                               deepspeed=dataclasses.replace(job.deepspeed, stage="2"))
    with pytest.raises(TrainConfigError, match="DeepSpeed"):
        validate(zero)


def test_muon_and_noise_resume_exactly(tmp_path):
    def job():
        j = _job(tmp_path)
        return dataclasses.replace(j, train=dataclasses.replace(j.train, optimizer="muon", feature_noise=0.05))

    train(job())
    want = _losses(tmp_path)
    shutil.rmtree(list_checkpoints(tmp_path / "checkpoints")[-1])
    shutil.rmtree(tmp_path / "final")
    train(job())
    got = _losses(tmp_path)
    assert got[3] == want[3] and got[4] == want[4]


def test_precision_native_follows_the_cpu(monkeypatch):
    import train.loop as loop

    assert isinstance(loop.cpu_has_native_bf16(), bool)  # the probe itself runs on this machine
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for has, want in ((True, True), (False, False)):
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda has=has: has)
        assert loop.uses_bf16(cpu, "native") is want
        assert loop.uses_bf16(cpu, "auto") is False and loop.uses_bf16(gpu, "auto") is True
        assert loop.uses_bf16(gpu, "native") is True and loop.uses_bf16(cpu, "bf16") is True
        assert loop.uses_bf16(gpu, "fp32") is False
