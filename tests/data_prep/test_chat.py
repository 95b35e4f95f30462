"""Chat template -> input_ids + loss_mask, checked token by token on two template styles."""

from __future__ import annotations

import pytest

from data_prep.chat import (
    apply_max_length,
    build_messages,
    stop_token_ids,
    tokenize_conversation,
    tokenize_records,
)
from data_prep.errors import TemplateError
from dspark_model.tiny import build_tiny_tokenizer

LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
THINK_SWITCH = (  # Qwen3-like: an empty reasoning block when thinking is switched off
    "{% set off = enable_thinking is defined and not enable_thinking %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + ('<think>\n\n</think>\n\n' if off else '') + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' + ('<think>\n\n</think>\n\n' if off else '') }}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def chatml():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_style():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_STYLE
    tok.eos_token = "<|eot_id|>"
    return tok


def _expected(tok, segments):
    """Reference ids / mask from (text, label) pieces encoded one by one (byte-level: no merges)."""
    ids, mask = [], []
    for text, label in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [label] * len(piece)
    return ids, mask


MESSAGES = build_messages("Be kind.", ["Hi there", "And again?"], ["Hello!", "Yes, again."])


def test_chatml_mask_token_by_token(chatml):
    ids, mask = tokenize_conversation(chatml, MESSAGES, stop_token_ids(chatml))
    want_ids, want_mask = _expected(chatml, [
        ("<|im_start|>system\nBe kind.<|im_end|>\n", 0),
        ("<|im_start|>user\nHi there<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0), ("Hello!<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>user\nAnd again?<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0), ("Yes, again.<|im_end|>", 1), ("\n", 0),
    ])
    assert ids == want_ids
    assert mask == want_mask
    masked = [i for i, m in zip(ids, mask) if m]
    assert chatml.decode(masked) == "Hello!<|im_end|>Yes, again.<|im_end|>"
    assert masked.count(chatml.convert_tokens_to_ids("<|im_start|>")) == 0


def test_llama3_style_mask_token_by_token(llama_style):
    tok = llama_style
    ids, mask = tokenize_conversation(tok, MESSAGES, stop_token_ids(tok))
    hdr = "<|start_header_id|>{}<|end_header_id|>\n\n"
    want_ids, want_mask = _expected(tok, [
        ("<|begin_of_text|>", 0),
        (hdr.format("system") + "Be kind.<|eot_id|>", 0),
        (hdr.format("user") + "Hi there<|eot_id|>", 0),
        (hdr.format("assistant"), 0), ("Hello!<|eot_id|>", 1),
        (hdr.format("user") + "And again?<|eot_id|>", 0),
        (hdr.format("assistant"), 0), ("Yes, again.<|eot_id|>", 1),
    ])
    assert ids == want_ids
    assert mask == want_mask


def test_cut_response_gets_no_end_token(chatml):
    ids, mask = tokenize_conversation(chatml, MESSAGES, stop_token_ids(chatml), stopped=[True, False])
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|im_end|>Yes, again."


def test_thinking_switch_reaches_template_and_scaffold_is_masked_out(chatml):
    tok = build_tiny_tokenizer()
    tok.chat_template = THINK_SWITCH
    msgs = build_messages(None, ["Q?"], ["A."])
    on_ids, on_mask = tokenize_conversation(tok, msgs, stop_token_ids(tok))
    off_ids, off_mask = tokenize_conversation(tok, msgs, stop_token_ids(tok),
                                              chat_template_kwargs={"enable_thinking": False})
    assert "<think>" in tok.decode(off_ids) and "<think>" not in tok.decode(on_ids)
    assert tok.decode([i for i, m in zip(off_ids, off_mask) if m]) == "A.<|im_end|>"
    assert tok.decode([i for i, m in zip(on_ids, on_mask) if m]) == "A.<|im_end|>"


def test_template_that_is_not_prefix_stable_fails_clearly():
    tok = build_tiny_tokenizer()
    # Generation prompt and assistant header disagree.
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>model\n'")
    with pytest.raises(TemplateError, match="not prefix-stable at message 1"):
        tokenize_conversation(tok, build_messages(None, ["Q"], ["A"]), stop_token_ids(tok))
    # Earlier assistant turns rewritten when a later turn follows (reasoning dropped from history).
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n' + m['content'][:1] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(TemplateError, match="rewrites an earlier turn"):
        tokenize_conversation(tok, build_messages(None, ["Q", "R"], ["AB", "CD"]), stop_token_ids(tok))


def _answer(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_end_cut_policy():
    ids, mask = list(range(10)), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert apply_max_length(ids, mask, 20)[2] == "ok"
    cut_ids, cut_mask, status = apply_max_length(ids, mask, 7)
    assert status == "truncated" and cut_ids == ids[:7] and cut_mask == mask[:7]
    assert apply_max_length(ids, mask, 5)[2] == "too_long"  # one assistant token would remain


def _record(i, turns, responses, system=None):
    return {"row_id": f"s:{i}", "source": "s", "system": system, "turns": turns, "responses": responses,
            "finish_reasons": ["stop"] * len(responses)}


def test_long_row_loses_the_start_of_its_prompt_not_its_answer(chatml):
    records = [_record(0, ["q" * 5], ["a" * 30]), _record(1, ["x" * 30 + "q" * 60], ["a" * 30]),
               _record(2, ["q" * 200], ["a" * 30])]
    cols, stats = tokenize_records(records, chatml, stop_token_ids(chatml), max_length=100)
    assert cols["row_id"] == ["s:0", "s:1", "s:2"]
    assert stats == {"ok": 1, "prompt_cut": 2}
    for ids, mask in zip(cols["input_ids"], cols["loss_mask"]):
        assert _answer(chatml, ids, mask) == "a" * 30 + "<|im_end|>"  # every answer token kept, still masked
    for ids in cols["input_ids"][1:]:
        # byte-level tokens: the cut keeps exactly max_length tokens, markup whole, the prompt's end kept
        assert len(ids) == 100
        text = chatml.decode(ids)
        assert text.startswith("<|im_start|>user\nq") and "x" not in text
        assert text.endswith("q<|im_end|>\n<|im_start|>assistant\n" + "a" * 30 + "<|im_end|>\n")


def test_prompt_cut_takes_the_system_message_first_and_starts_at_a_word(chatml):
    stop = stop_token_ids(chatml)
    words = " ".join(f"w{i:02d}" for i in range(40))  # 159 characters
    cols, stats = tokenize_records([_record(0, ["Keep me."], ["a" * 20], system=words)], chatml, stop, 100)
    text = chatml.decode(cols["input_ids"][0])
    system = text.split("<|im_start|>system\n")[1].split("<|im_end|>")[0]
    assert stats == {"prompt_cut": 1} and "<|im_start|>user\nKeep me.<|im_end|>" in text
    assert system and words.endswith(system) and system.startswith("w")  # a whole word first
    assert len(cols["input_ids"][0]) <= 100


def test_rows_whose_answers_alone_do_not_fit_are_cut_at_the_end_or_dropped(chatml):
    stop = stop_token_ids(chatml)
    multi = _record(0, ["q1", "q2"], ["a" * 60, "b" * 60])  # both answers cannot fit in 100 tokens
    cols, stats = tokenize_records([multi], chatml, stop, max_length=100)
    assert stats == {"truncated": 1} and len(cols["input_ids"][0]) == 100
    assert chatml.decode(cols["input_ids"][0]).startswith("<|im_start|>user\nq1<|im_end|>")  # prompt kept
    # An empty prompt still leaves room for a single answer token: dropped.
    cols, stats = tokenize_records([_record(1, ["q"], ["a" * 30])], chatml, stop, max_length=20)
    assert stats == {"too_long": 1} and not cols["row_id"]
