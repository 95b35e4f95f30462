"""Prompts written by the target (data_prep/synthesize.py): the template prefix, seeded sampling, the source file
it writes and resumes, and the pipeline reading it like any prompt file."""

from __future__ import annotations

import dataclasses
import json

import pytest

import data_prep.synthesize as synth
from data_prep.chat import render
from data_prep.errors import DataPrepError
from data_prep.pipeline import run
from data_prep.schema import validate
from data_prep.sources import PromptsConfig, PromptSource, load_prompts
from dspark_model.target import load_target
from tests.data_prep.conftest import make_cfg, tiny_spec


@pytest.fixture(scope="module")
def tiny():
    return load_target(tiny_spec(), "cpu")


def test_the_prefix_is_the_rendered_text_before_the_user_message(tiny):
    prefix = synth.user_turn_prefix(tiny.tokenizer)
    text = render(tiny.tokenizer, [{"role": "user", "content": "Hi there"}])
    assert prefix.endswith("user\n") and text.startswith(prefix) and text[len(prefix):].startswith("Hi there")


def test_sampling_is_seeded_per_batch_and_keeps_only_samples_that_closed_their_turn(tiny):
    tok = tiny.tokenizer
    prefix_ids = tok(synth.user_turn_prefix(tok), add_special_tokens=False)["input_ids"]
    stop_ids = set(range(0, tiny.vocab_size, 2))  # every other id closes the turn: a mix of both outcomes
    two = synth.sample_prompts(tiny.model, tok, prefix_ids, stop_ids, 2, 8, 3, 1.0, 1.0, seed=5)
    second = synth.sample_prompts(tiny.model, tok, prefix_ids, stop_ids, 1, 8, 3, 1.0, 1.0, seed=5, first_batch=1)
    assert second == two[1:] and two[0] != two[1]  # batch i depends on (seed, i) only
    assert synth.sample_prompts(tiny.model, tok, prefix_ids, stop_ids, 2, 8, 3, 1.0, 1.0, seed=5, workers=2) == two
    texts = [t for batch in two for t in batch]
    assert "" in texts and any(texts)  # unfinished samples are '' and the others decoded
    other = synth.sample_prompts(tiny.model, tok, prefix_ids, stop_ids, 1, 8, 3, 1.0, 1.0, seed=6)
    assert other != two[:1]


def _fake_sampler(calls):
    """Batch i holds 'q<i>-<j>' for j < 3, one duplicate of the batch's first text and one unfinished sample."""
    def sample(model, tokenizer, prefix_ids, stop_ids, count, batch_size, max_new, temperature, top_p, seed,
               first_batch=0, workers=1):
        calls.append(first_batch)
        return [[f"q{i}-0", f"q{i}-1", f" Q{i}-0 ", "", f"q{i}-2"] for i in range(first_batch, first_batch + count)]
    return sample


def _synthetic_cfg(tmp_path, n, **source):
    cfg = make_cfg("unused", tmp_path / "out")
    cfg.prompts = PromptsConfig(name="s", sources=[PromptSource(name="self", synthesize=n, **source)])
    return cfg


def test_the_source_file_is_written_resumed_extended_and_refused_on_other_settings(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synth, "sample_prompts", _fake_sampler(calls))
    src = PromptSource(name="self", synthesize=5, synthesize_batch_size=5)
    args = (tiny.model, tiny.tokenizer, {0}, tmp_path, 0, None, "tiny")
    out = synth.synthesize_source(src, *args)
    assert out.synthesize is None and out.path == str(tmp_path / "synthesized" / "self.jsonl")
    rows = [json.loads(line) for line in open(out.path)]
    assert [r["turns"][0] for r in rows] == ["q0-0", "q0-1", "q0-2", "q1-0", "q1-1"]  # duplicate, unfinished dropped
    assert calls == [0, 1]
    synth.synthesize_source(src, *args)  # rerun: read back, nothing sampled
    assert calls == [0, 1]
    synth.synthesize_source(dataclasses.replace(src, synthesize=7), *args)  # more: the batches after those drawn
    assert calls == [0, 1, 2] and len(open(out.path).readlines()) == 7
    assert [json.loads(line)["turns"][0] for line in open(out.path)][:5] == [r["turns"][0] for r in rows]
    with pytest.raises(DataPrepError, match="temperature differ.*overwrite=true"):
        synth.synthesize_source(dataclasses.replace(src, synthesize_temperature=0.7), *args)
    prompts = load_prompts([out]).prompts  # the file reads as any prompt source
    assert prompts[0].row_id == "self:1" and prompts[0].turns == ["q0-0"]


def test_a_sampler_that_never_closes_a_turn_stops_after_its_budget_with_a_warning(tiny, tmp_path, monkeypatch,
                                                                                 caplog):
    calls = []
    monkeypatch.setattr(synth, "sample_prompts", lambda *a, first_batch=0, **k: calls.append(1) or [[""] * 4])
    src = PromptSource(name="self", synthesize=8, synthesize_batch_size=4)
    out = synth.synthesize_source(src, tiny.model, tiny.tokenizer, {0}, tmp_path, 0, None, "tiny")
    assert len(calls) == 8 and open(out.path).read() == ""  # 4 x the 2 batches 8 prompts need
    assert "0 of the 8 asked for" in caplog.text and "synthesize_max_tokens" in caplog.text


def test_data_prep_answers_synthesized_prompts(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "sample_prompts", _fake_sampler([]))
    manifest = run(_synthetic_cfg(tmp_path, 4))
    assert manifest.counts["rows"] == 4
    assert manifest.sources[0]["location"].endswith("synthesized/self.jsonl")
    generations = [json.loads(line) for line in open(tmp_path / "out" / "generations.jsonl")]
    assert sorted(g["turns"][0] for g in generations) == ["q0-0", "q0-1", "q0-2", "q1-0"]


@pytest.mark.parametrize("change,message", [
    (dict(name=None), "needs a name"),
    (dict(path="x.jsonl"), "also sets path"),
    (dict(synthesize_temperature=0.0), "greedy would write the same prompt"),
    (dict(synthesize=0), "synthesize must be >= 1"),
])
def test_bad_synthesized_sources_are_refused_before_anything_loads(tmp_path, change, message):
    cfg = _synthetic_cfg(tmp_path, 4)
    cfg.prompts.sources = [dataclasses.replace(cfg.prompts.sources[0], **change)]
    with pytest.raises(DataPrepError, match=message):
        validate(cfg)


def test_synthesized_sources_need_the_local_backend_and_a_template(tmp_path):
    cfg = _synthetic_cfg(tmp_path, 4)
    cfg.generation.backend = "openai"
    with pytest.raises(DataPrepError, match="generation.backend=local"):
        validate(cfg)
    cfg = _synthetic_cfg(tmp_path, 4)
    cfg.chat_template = "plain"
    with pytest.raises(DataPrepError, match="needs a chat template"):
        validate(cfg)
