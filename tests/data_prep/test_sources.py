"""Prompt sources: every row shape, bad-row accounting, strict mode, seeded subsets, clear errors."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import BadRowError, SourceError
from data_prep.sources import PromptSource, load_prompts, seeded_subset


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


SHAPES = [
    {"turns": ["first", "second"]},
    {"turns": ["with system"], "system": "be brief"},
    {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
                  {"role": "assistant", "content": "OLD ANSWER"}, {"role": "user", "content": "u2"}]},
    {"conversations": [{"from": "human", "value": "sharegpt q"}, {"from": "gpt", "value": "OLD"}]},
    {"prompt": "plain prompt"},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part a "}, {"type": "text", "text": "b"}]}]},
]


def test_every_row_shape_parses(tmp_path):
    path = _write_jsonl(tmp_path / "shapes.jsonl", SHAPES)
    ps = load_prompts([PromptSource(path=path)])
    got = [(p.row_id, p.turns, p.system) for p in ps.prompts]
    assert got == [
        ("shapes:1", ["first", "second"], None),
        ("shapes:2", ["with system"], "be brief"),
        ("shapes:3", ["u1", "u2"], "sys"),  # system kept, the source's assistant turn dropped
        ("shapes:4", ["sharegpt q"], None),
        ("shapes:5", ["plain prompt"], None),
        ("shapes:6", ["part a b"], None),
    ]
    assert ps.skipped == {}
    assert all("OLD" not in t for p in ps.prompts for t in p.turns)


def test_parquet_and_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"question": ["q one", "q two", ""], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "p.parquet")
    ps = load_prompts([PromptSource(name="pq", path=str(tmp_path / "p.parquet"), field="question")])
    assert [(p.row_id, p.turns) for p in ps.prompts] == [("pq:1", ["q one"]), ("pq:2", ["q two"])]
    assert ps.skipped == {"empty": 1}


def test_local_hf_dataset_folder(tmp_path):
    folder = tmp_path / "hfset"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"turns": ["c", "d"]}])
    ps = load_prompts([PromptSource(name="hf", hf_name=str(folder), split="train")])
    assert [(p.row_id, p.turns) for p in ps.prompts] == [("hf:0", ["a"]), ("hf:1", ["b"]), ("hf:2", ["c", "d"])]


BAD = [
    {"turns": ["good 1"]},
    "",  # blank line -> empty
    "{not json",  # invalid_json
    {"weird": 1},  # unknown_shape
    {"turns": ["   "]},  # empty
    {"prompt": "x" * 500},  # too_long (max_chars=100)
    {"messages": [{"role": "assistant", "content": "only an answer"}]},  # empty after dropping
    {"turns": ["good 2"]},
]


def test_bad_rows_are_counted_by_reason(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD)
    ps = load_prompts([PromptSource(path=path)], max_chars=100)
    assert [p.row_id for p in ps.prompts] == ["bad:1", "bad:8"]
    assert ps.skipped == {"empty": 3, "invalid_json": 1, "unknown_shape": 1, "too_long": 1}
    assert sum(ps.skipped.values()) + len(ps.prompts) == len(BAD)  # nothing silently dropped
    assert ps.sources[0]["rows_read"] == len(BAD)


def test_strict_fails_on_first_bad_row_with_line_number(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(BadRowError, match=r"bad\.jsonl line 2: empty"):
        load_prompts([PromptSource(path=path)], strict=True)
    path = _write_jsonl(tmp_path / "bad2.jsonl", [BAD[0], BAD[2]])
    with pytest.raises(BadRowError, match=r"line 2: invalid_json"):
        load_prompts([PromptSource(path=path)], strict=True)


def test_mix_with_per_source_counts_is_seeded_and_nested(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(20)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(20)])
    srcs = [PromptSource(path=a, num_samples=5), PromptSource(path=b, num_samples=3)]
    ps1 = load_prompts(srcs, seed=1)
    ps1_again = load_prompts(srcs, seed=1)
    ps2 = load_prompts(srcs, seed=2)
    ids1 = [p.row_id for p in ps1.prompts]
    assert ids1 == [p.row_id for p in ps1_again.prompts]
    assert ids1 != [p.row_id for p in ps2.prompts]
    assert sum(i.startswith("a:") for i in ids1) == 5 and sum(i.startswith("b:") for i in ids1) == 3
    # A larger subset extends a smaller one, so raising num_prompts reuses finished generations.
    small, large = seeded_subset(list(range(50)), 10, "s"), seeded_subset(list(range(50)), 20, "s")
    assert set(small) <= set(large) and small == sorted(small)
    capped = load_prompts(srcs, seed=1, num_prompts=4)
    assert len(capped.prompts) == 4 and {p.row_id for p in capped.prompts} <= set(ids1)


def test_missing_file_and_unknown_dataset_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="does not exist") as err:
        load_prompts([PromptSource(path=str(tmp_path / "nope.jsonl"))])
    assert "\n" not in str(err.value)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="cannot load Hugging Face dataset 'nobody/no-such-set'") as err:
        load_prompts([PromptSource(hf_name="nobody/no-such-set")])
    assert "\n" not in str(err.value)
    with pytest.raises(SourceError, match="share the name"):
        load_prompts([PromptSource(name="x", path="a.jsonl"), PromptSource(name="x", path="b.jsonl")])


def test_packaged_demo_set_loads_without_bad_rows():
    ps = load_prompts([PromptSource(name="demo", path="pkg://data_prep/prompts/demo.jsonl")])
    assert 200 <= len(ps.prompts) <= 400 and ps.skipped == {}
    assert any(len(p.turns) > 1 for p in ps.prompts) and any(p.system for p in ps.prompts)
