"""benchmarks/heldout_tau.py replays greedy speculative decoding exactly: same rounds as the real loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dspark_model.config import DraftConfig
from dspark_model.draft import build_draft_for
from eval.baselines import hf_generate
from eval.speculative import speculative_generate
from tests.eval.test_speculative import _prompts, _target

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import heldout_tau  # noqa: E402


@pytest.mark.parametrize("vocab", [None, 40])
def test_replayed_rounds_equal_the_decoding_loop(vocab):
    target = _target(1)
    torch.manual_seed(0)
    draft = build_draft_for(target, DraftConfig(num_layers=2, block_size=4, markov_rank=16,
                                                draft_vocab_size=vocab)).eval()
    if vocab:
        draft.set_draft_vocab(torch.arange(vocab))
    n_new = 24
    for prompt in _prompts(4, seed=3):
        answer = hf_generate(target, prompt, n_new, 0.0)
        ids = torch.tensor(prompt + answer)
        lm = torch.tensor([0] * len(prompt) + [1] * len(answer))
        runs, _, _ = heldout_tau._accept_runs(draft, target, ids, lm)
        spec = speculative_generate(target, draft, prompt, n_new, 0.0, 4)
        p = len(prompt)  # the first answer token comes from the prefill and is the first anchor
        for r in spec.rounds:
            if p + r["accepted"] + 1 >= len(ids) - 1:
                break  # the last round runs past the row's end, where the replay stops counting
            assert runs[p] == r["accepted"], (prompt, p)
            p += r["accepted"] + 1
    result = heldout_tau.evaluate(draft, target, [(ids, lm)])
    assert result["tau"] >= 1.0 and result["rounds"] > 0 and "by_source" not in result
    split = heldout_tau.evaluate(draft, target, [(ids, lm), (ids, lm)], ["a", "b"])  # per source: each row alone
    assert split["by_source"]["a"] == split["by_source"]["b"] and split["by_source"]["a"]["rounds"] == result["rounds"]
    assert split["by_source"]["a"]["tau"] == pytest.approx(result["tau"]) and split["rounds"] == 2 * result["rounds"]
    if vocab:
        assert 0.0 < result["vocab_mass_in_draft"] <= 1.0
