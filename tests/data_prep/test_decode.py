"""The local decoding loop: plain greedy (nothing from the model's generation_config), the preallocated
KV cache and length-grouped prefill against a hand-written loop, dropping stopped rows, top-p, batch plans."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig

import data_prep.decode as decode
import dspark_model.tiny as tiny
from data_prep.chat import build_messages, generation_prompt_ids, stop_token_ids
from data_prep.decode import generate_ids, pick_next
from data_prep.generate import plan_batches
from data_prep.pipeline import run
from dspark_model.tiny import build_tiny_model

from .conftest import make_cfg

LENGTHS = (3, 17, 9, 40, 5, 33)


def hand_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding the slow, obvious way: one full forward per token, no cache, argmax."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stop_ids:
                break
    return out


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _stop_that_fires(model, prompts, n) -> set[int]:
    """A stop id that the target produces mid-answer in some rows (so stopping and dropping rows is exercised)."""
    first = hand_greedy(model, prompts[0], n, set())
    return {first[n // 3]}


@pytest.fixture(scope="module")
def penalised():
    """A tiny model whose generation_config asks for a repetition penalty and sampling."""
    model = build_tiny_model("llama", num_hidden_layers=2)
    model.generation_config.repetition_penalty = 50.0  # strong enough to move a random model
    return model


def test_greedy_ignores_generation_config_and_equals_a_hand_written_loop(penalised):
    prompts = _prompts()
    stop = _stop_that_fires(penalised, prompts, 16)
    want = [hand_greedy(penalised, p, 16, stop) for p in prompts]
    got = generate_ids(penalised, prompts, 257, stop, 16)
    assert [t for t, _ in got] == want
    assert [f for _, f in got] == ["stop" if w[-1] in stop else "length" for w in want]
    assert any(f == "stop" for _, f in got) and any(f == "length" for _, f in got)
    # The setting would have mattered: transformers' generate merges it into a plain greedy request.
    config = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=257, eos_token_id=sorted(stop))
    with torch.no_grad():
        merged = penalised.generate(input_ids=torch.tensor([prompts[3]]), generation_config=config)
    assert merged[0, len(prompts[3]):].tolist()[: len(want[3])] != want[3]


def test_pipeline_greedy_rows_equal_hand_greedy_and_manifest_records_sampling(prompt_file, tmp_path, monkeypatch):
    def build(*args, **kwargs):
        model = build_tiny_model(*args, **kwargs)
        model.generation_config.repetition_penalty = 50.0  # strong enough to move a random model
        model.generation_config.update(do_sample=True, top_k=3, temperature=0.7)
        return model

    monkeypatch.setattr(tiny, "build_tiny_model", build)
    manifest = run(make_cfg(prompt_file, tmp_path / "g", max_new_tokens=8, batch_size=3))
    assert manifest.generation["sampling"] == {
        "decoding": "greedy", "temperature": 0.0, "top_p": None, "top_k": None, "repetition_penalty": None,
        "model_generation_config": "not applied"}
    model = build(**make_cfg(prompt_file, tmp_path).target.random)
    tok = tiny.build_tiny_tokenizer()
    for line in (tmp_path / "g" / "generations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ids = generation_prompt_ids(tok, build_messages(rec["system"], rec["turns"][:1], []))
        want = hand_greedy(model, ids, 8, stop_token_ids(tok))
        assert rec["num_tokens"][0] == len(want)
        assert rec["responses"][0] == tok.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_slot_cache_and_grouped_prefill_equal_a_dynamic_cache(family, monkeypatch):
    model = build_tiny_model(family, num_hidden_layers=2)
    prompts = _prompts(1)
    stop = _stop_that_fires(model, prompts, 20)
    assert isinstance(decode.slot_cache(model, 2, 8).layers[0], decode.SlotLayer)
    monkeypatch.setattr(decode, "PREFILL_TOKENS", 48)  # several prefill groups of different widths
    grouped = generate_ids(model, prompts, 257, stop, 20)
    monkeypatch.setattr(decode, "slot_cache", lambda *a: None)  # transformers' DynamicCache, one prefill
    assert generate_ids(model, prompts, 257, stop, 20) == grouped
    assert [t for t, _ in grouped] == [hand_greedy(model, p, 20, stop) for p in prompts]


def test_sliding_window_model_falls_back_and_stays_exact():
    model = build_tiny_model("mistral", num_hidden_layers=2, sliding_window=8)
    assert decode.slot_cache(model, 2, 8) is None
    prompts = _prompts(2)
    assert [t for t, _ in generate_ids(model, prompts, 257, {256}, 12)] == \
        [hand_greedy(model, p, 12, {256}) for p in prompts]


def test_stopped_rows_keep_nothing_after_their_stop_token():
    model = build_tiny_model("llama", num_hidden_layers=2)
    prompts = _prompts(3)
    stop = _stop_that_fires(model, prompts, 24)
    batched = generate_ids(model, prompts, 257, stop, 24)
    alone = [generate_ids(model, [p], 257, stop, 24)[0] for p in prompts]
    assert batched == alone
    for tokens, finish in batched:
        assert all(t not in stop for t in tokens[:-1]) and (finish == "stop") == (tokens[-1] in stop)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.40, 0.35, 0.25], [0.60, 0.30, 0.10]])).repeat(2000, 1)  # (4000, 3)
    torch.manual_seed(0)
    draws = pick_next(logits, temperature=1.0, top_p=0.5).view(2000, 2)
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {0}
    share = (draws[:, 0] == 0).float().mean().item()
    assert abs(share - 0.40 / 0.75) < 0.04  # renormalised over the kept tokens
    assert torch.equal(pick_next(logits, 0.0, 0.5), logits.argmax(-1))


def test_batch_plan_respects_rows_and_tokens():
    lengths = [50, 10, 30, 20, 40, 60]
    assert plan_batches(lengths, 4) == [[1, 3, 2, 4], [0, 5]]
    # at most 200 tokens of (longest prompt + 30 new) per batch: 40+30 fits twice, 60+30 once...
    plan = plan_batches(lengths, 4, max_new_tokens=30, max_batch_tokens=200)
    assert plan == [[1, 3, 2], [4, 0], [5]]
    for batch in plan:
        assert len(batch) * (max(lengths[i] for i in batch) + 30) <= 200
    assert plan_batches([500], 4, 30, 200) == [[0]]  # a row longer than the budget still gets a batch
