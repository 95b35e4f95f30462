"""chat_template= (a file, Jinja text, plain continuation) for targets without a template, and the
answer-token counts written for the draft vocabulary."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import dspark_model.tiny as tiny
from data_prep.chat import build_messages, generation_prompt_ids
from data_prep.errors import DataPrepError, TemplateError
from data_prep.pipeline import run
from data_prep.store import TOKEN_COUNTS_FILE, load_token_counts, load_tokenized
from dspark_model.chat_template import plain_template
from dspark_model.config import TargetSpec
from dspark_model.target import load_tokenizer
from dspark_model.tiny import TINY_VOCAB_SIZE
from eval.speculative import chat_prompt_ids

from .conftest import TINY, make_cfg

SAYS_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' says\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant says\n' }}{% endif %}"
)


@pytest.fixture
def no_template(monkeypatch):
    """The tiny tokenizer as a GGUF file often ships: no chat template."""
    build = tiny.build_tiny_tokenizer

    def without():
        tok = build()
        tok.chat_template = None
        return tok

    monkeypatch.setattr(tiny, "build_tiny_tokenizer", without)


def _records(out_dir) -> dict[str, dict]:
    return {r["row_id"]: r for r in map(json.loads, (out_dir / "generations.jsonl").read_text().splitlines())}


def test_missing_template_names_the_setting(prompt_file, tmp_path, no_template):
    with pytest.raises(TemplateError, match=r"has no chat template; set chat_template=.*chat_template=plain"):
        run(make_cfg(prompt_file, tmp_path / "x"))


def test_plain_mode_trains_on_the_continuation_of_the_raw_text(prompt_file, tmp_path, no_template):
    cfg = make_cfg(prompt_file, tmp_path / "plain", temperature=1.0)
    cfg.chat_template = "plain"
    manifest = run(cfg)
    assert manifest.generation["chat_template"] == "plain" and manifest.counts["rows"] == 5
    tok = load_tokenizer(TargetSpec(random=dict(TINY), chat_template="plain"))
    records = _records(tmp_path / "plain")
    ds, _ = load_tokenized(tmp_path / "plain")
    for row in ds:
        rec = records[row["row_id"]]
        ends = ["<|im_end|>" if f == "stop" else "" for f in rec["finish_reasons"]]
        # no markup: the text, its continuation, EOS (masked only where the target produced it), blank lines
        text = (rec["system"] + "\n\n" if rec["system"] else "") + "\n\n".join(
            t + r + "<|im_end|>" for t, r in zip(rec["turns"], rec["responses"]))
        assert tok.decode(row["input_ids"]) == text
        assert tok.decode([i for i, m in zip(row["input_ids"], row["loss_mask"]) if m]) == \
            "".join(r + e for r, e in zip(rec["responses"], ends))
    # The target was asked to continue the raw prompt text, and eval renders the same prompt.
    messages = build_messages(None, ["Say hello."], [])
    assert generation_prompt_ids(tok, messages) == tok("Say hello.", add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids is generation_prompt_ids  # eval's prompts: the one function


def test_template_from_a_file(prompt_file, tmp_path, no_template):
    path = tmp_path / "says.jinja"
    path.write_text(SAYS_TEMPLATE)
    cfg = make_cfg(prompt_file, tmp_path / "file")
    cfg.chat_template = str(path)
    manifest = run(cfg)
    assert manifest.generation["chat_template"] == str(path)
    assert manifest.target["chat_template_sha256"] == hashlib.sha256(SAYS_TEMPLATE.encode()).hexdigest()
    ds, _ = load_tokenized(tmp_path / "file")
    tok = tiny.build_tiny_tokenizer()
    records = _records(tmp_path / "file")
    for row in ds:
        rec = records[row["row_id"]]
        assert tok.decode(row["input_ids"]).startswith("<|im_start|>" + ("system" if rec["system"] else "user"))
        assert "<|im_start|>assistant says\n" in tok.decode(row["input_ids"])
        masked = tok.decode([i for i, m in zip(row["input_ids"], row["loss_mask"]) if m])
        assert masked.replace("<|im_end|>", "") == "".join(rec["responses"])


def test_bad_template_setting_and_plain_with_a_server_are_refused(prompt_file, tmp_path):
    cfg = make_cfg(prompt_file, tmp_path / "bad")
    cfg.chat_template = "no/such/template.jinja"
    with pytest.raises(TemplateError, match="neither a file nor a Jinja template"):
        run(cfg)
    cfg = make_cfg(prompt_file, tmp_path / "srv", backend="openai")
    cfg.chat_template = "plain"
    with pytest.raises(DataPrepError, match="chat_template=plain needs generation.backend=local"):
        run(cfg)


def test_plain_template_starts_with_bos_only_when_the_tokenizer_adds_one():
    from tokenizers import processors

    tok = tiny.build_tiny_tokenizer()
    assert not plain_template(tok).startswith("{{ bos_token }}")
    tok.bos_token = "<|endoftext|>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))])
    assert plain_template(tok).startswith("{{ bos_token }}")


def test_token_counts_are_the_answer_token_bincount(prompt_file, tmp_path):
    manifest = run(make_cfg(prompt_file, tmp_path / "c", temperature=1.0))
    assert manifest.token_counts["file"] == TOKEN_COUNTS_FILE
    assert (tmp_path / "c" / TOKEN_COUNTS_FILE).is_file()
    ds, _ = load_tokenized(tmp_path / "c")
    ids = np.concatenate([np.asarray(r) for r in ds["input_ids"]])
    mask = np.concatenate([np.asarray(m) for m in ds["loss_mask"]]).astype(bool)
    want = torch.from_numpy(np.bincount(ids[mask], minlength=TINY_VOCAB_SIZE))
    counts = load_token_counts(tmp_path / "c")
    assert counts.dtype == torch.int64 and counts.shape == (TINY_VOCAB_SIZE,)
    assert torch.equal(counts, want) and int(counts.sum()) == manifest.tokens["loss"]
    assert manifest.token_counts["vocab_size"] == TINY_VOCAB_SIZE
    padded = load_token_counts(tmp_path / "c", vocab_size=TINY_VOCAB_SIZE + 8)
    assert torch.equal(padded[:TINY_VOCAB_SIZE], counts) and not padded[TINY_VOCAB_SIZE:].any()
    with pytest.raises(DataPrepError, match="beyond the target vocabulary"):
        load_token_counts(tmp_path / "c", vocab_size=int(counts.nonzero().max()))
    with pytest.raises(DataPrepError, match="token_counts.safetensors is missing"):
        load_token_counts(tmp_path)
