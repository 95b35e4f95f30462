"""EAGLE-3 training: supervision masks, chunked == whole loss (values and gradients), the real CLI with exact
resume, and the trained checkpoint evaluated by the real eval CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dspark_model.draft import build_draft_for
from dspark_model.vocab import top_k_vocab
from tests.dspark_model.test_eagle3 import eagle3_config
from tests.train.helpers import FAST, REPO, losses, run_train
from tests.train.test_offline import _job, _losses, prepared  # noqa: F401  (fixture)
from train.eagle3_loss import eagle3_loss, step_masks
from train.teacher import TeacherMemo


def test_step_masks_need_the_anchor_token_and_every_label_up_to_the_step():
    lm = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1]])
    m = step_masks(lm, 3)  # index i: x_{i+1} and x_{i+2} .. x_{i+k+2} answer tokens
    assert m[0, 0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert m[1, 0].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert m[2, 0].tolist() == [0, 0, 0, 0, 0, 0, 0, 0]


def _loss_and_grads(draft, target, ids, lm, **kw):
    draft.zero_grad()
    out = target.forward(ids)
    states = draft.forward_steps(out.tap_hidden, ids, steps=3)
    loss, metrics = eagle3_loss(draft, target, states, out.final_hidden, lm, 0.8, **kw)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [None, 48])
def test_chunked_recomputed_and_memoised_loss_equals_the_whole_one(tiny_target, k):
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, eagle3_config(draft_vocab_size=k, initializer_range=0.1))
    if draft.reduced_vocab:
        draft.set_draft_vocab(top_k_vocab(torch.arange(tiny_target.vocab_size).flip(0), k))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    lm = torch.zeros(2, 24, dtype=torch.long)
    lm[0, 5:20], lm[1, 3:] = 1, 1
    whole, metrics, g_whole = _loss_and_grads(draft, tiny_target, ids, lm, chunk_size=0, recompute=False)
    chunked, _, g_chunked = _loss_and_grads(draft, tiny_target, ids, lm, chunk_size=7, recompute=True)
    torch.testing.assert_close(chunked, whole)
    for name in g_whole:
        torch.testing.assert_close(g_chunked[name], g_whole[name], rtol=1e-4, atol=1e-6)
    if k:
        fin = tiny_target.forward(ids).final_hidden
        lse, arg = TeacherMemo().lookup(tiny_target, [0, 1], fin, lm, [24, 24])
        memo, _, _ = _loss_and_grads(draft, tiny_target, ids, lm, chunk_size=7, teacher_lse=lse, teacher_argmax=arg)
        torch.testing.assert_close(memo, whole)
    assert metrics["accept_per_slot"].shape == (3,) and 0 <= float(metrics["expected_accept"]) <= 1
    assert float(whole) > 0 and float(metrics["kl"]) > 0  # s * KL(p_K / s || q): zero only when q = p_K / s
    assert metrics["supervised"] == step_masks(lm, 3).sum()


def _naive_loss(draft, target, states, final_hidden, lm, weight):
    """The loss written out over every position, masks applied by multiplication (the definition)."""
    masks = step_masks(lm, len(states))
    T = lm.shape[1]
    total = 0.0
    for k, h in enumerate(states):
        pos = (torch.arange(T) + k + 1).clamp(max=T - 1)
        p = torch.softmax(target.logits(final_hidden[:, pos]).float(), -1)[..., draft.draft_to_target]
        logq = torch.log_softmax(draft.logits(h), -1)
        s = p.sum(-1)
        kl = (torch.xlogy(p, p) - p * logq).sum(-1) - torch.xlogy(s, s)
        total = total + weight ** k * (masks[k] * kl).sum() / masks[k].sum().clamp_min(1.0)
    return total


def test_the_loss_skips_unsupervised_positions_without_changing_value_or_gradient(tiny_target):
    """Teacher and head run only where supervised; prompt rows and an all-prompt row change nothing."""
    torch.manual_seed(1)
    draft = build_draft_for(tiny_target, eagle3_config(draft_vocab_size=48, initializer_range=0.1))
    draft.set_draft_vocab(top_k_vocab(torch.arange(tiny_target.vocab_size).flip(0), 48))
    ids = torch.randint(0, 250, (3, 20), generator=torch.Generator().manual_seed(1))
    lm = torch.zeros(3, 20, dtype=torch.long)
    lm[0, 12:], lm[1, 4:9] = 1, 1  # row 2: prompt only
    got, _, g_got = _loss_and_grads(draft, tiny_target, ids, lm, chunk_size=5, recompute=True)
    draft.zero_grad()
    out = tiny_target.forward(ids)
    ref = _naive_loss(draft, tiny_target, draft.forward_steps(out.tap_hidden, ids, steps=3), out.final_hidden,
                      lm, 0.8)
    ref.backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    for name, p in draft.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_got[name], p.grad, rtol=1e-4, atol=1e-6)
    none, metrics, _ = _loss_and_grads(draft, tiny_target, ids, torch.zeros_like(lm), chunk_size=5)
    assert float(none) == 0.0 and float(metrics["supervised"]) == 0.0


def test_offline_cache_trains_eagle3_like_online_mode(prepared, tmp_path):  # noqa: F811
    """The cache holds the target's 5-tap features (DSpark's); the EAGLE-3 draft picks low / mid / high of them."""
    from train.loop import train

    for mode in ("online", "offline"):
        job = _job(prepared, tmp_path / mode, mode, "tiny-llama")
        job.draft = eagle3_config(draft_vocab_size=64)
        last = train(job)
        assert {"kl", "accept_k4", "expected_accept"} <= set(last)
    online, offline = _losses(tmp_path / "online"), _losses(tmp_path / "offline")
    assert len(online) == 3 and offline == pytest.approx(online, rel=1e-5)


EAGLE3 = [a for a in FAST if not a.startswith("draft.")] + ["draft=eagle3", "draft.draft_vocab_size=64"]


@pytest.mark.slow  # three CLI runs, ~75 s on a busy 2-core CPU
def test_cli_trains_resumes_exactly_and_eval_reads_the_draft(tmp_path):
    out = tmp_path / "run"
    job = EAGLE3 + ["train.max_steps=4", "train.save_every=2", "train.keep_last=2", f"train.output_dir={out}"]
    first = run_train(job)
    assert first.returncode == 0, first.stderr[-3000:]
    want = losses(out)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "kl", "expected_accept", "top1", "accept_k7", "grad_norm"} <= set(record)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["arch"]["architecture"] == "eagle3" and config["arch"]["draft_vocab_size"] == 64
    assert config["model_type"] == "eagle3" and config["format_version"] == 2  # never read as a DSpark draft
    # exact resume: drop the last checkpoint and the final draft, run again from step 2
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "final")
    again = run_train(job)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stdout + again.stderr
    got = losses(out)
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), step
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "eval", f"draft={out / 'final'}", "target=tiny", "num_prompts=2",
                           "max_new_tokens=12", "progress=false", "baselines.prompt_lookup=false",
                           f"out_dir={tmp_path / 'eval'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["greedy_match_rate"] == 1.0 and report["tau"] >= 1.0
    assert len(report["conditional_acceptance"]["pooled"]) == 7  # gamma = the draft's 7 trained steps


def test_a_few_steps_on_one_batch_lower_the_kl_and_raise_every_step_s_acceptance():
    from tests.eval.test_speculative import _target

    tiny_target = _target(2, init=0.3)  # peaked next-token distributions: acceptance has room to grow
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, eagle3_config(draft_vocab_size=64))
    draft.set_draft_vocab(top_k_vocab(torch.arange(tiny_target.vocab_size).flip(0), 64))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(5))
    lm = torch.ones(2, 24, dtype=torch.long)
    out = tiny_target.forward(ids)
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss, metrics = eagle3_loss(draft, tiny_target, draft.forward_steps(out.tap_hidden, ids, 3), out.final_hidden,
                                    lm, 0.8, chunk_size=0, recompute=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or (float(loss.detach()), metrics["accept_per_slot"].clone())
    assert float(loss.detach()) < 0.7 * first[0]
    assert bool((metrics["accept_per_slot"] > first[1]).all())


def test_the_memory_estimate_refuses_an_eagle3_job_instead_of_tracing_dspark_s_step():
    import dataclasses

    from tests.train.test_memory import _job as memory_job
    from train.memory import estimate_memory
    from train.schema import TrainConfigError

    job = memory_job()
    job = dataclasses.replace(job, draft=eagle3_config(draft_vocab_size=64))
    with pytest.raises(TrainConfigError, match="draft.architecture=eagle3 is not estimated"):
        estimate_memory(job, world=1)
