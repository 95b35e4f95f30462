"""generations.jsonl: a bad line anywhere is skipped and counted, only a torn last line is cut."""

from __future__ import annotations

import json
import logging

from data_prep.store import GenerationLog


def _record(i: int) -> dict:
    return {"row_id": f"p:{i}", "source": "p", "prompt_sha": f"{i:016x}", "system": None, "turns": [f"q{i}"],
            "responses": [f"a{i}"], "finish_reasons": ["stop"], "num_tokens": [3]}


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def test_bad_lines_in_the_middle_are_skipped_and_counted_and_only_a_torn_end_is_cut(tmp_path, caplog):
    path = tmp_path / "generations.jsonl"
    middle = [b"{not json\n", b"\xff\xfe garbage\n", _line({"row_id": "p:9"}), _line([1, 2]),
              _line({**_record(8), "responses": []})]  # JSON, but not a conversation: counted, no KeyError
    torn = _line(_record(4))[:25]
    path.write_bytes(_line(_record(0)) + _line(_record(1)) + b"".join(middle) + _line(_record(2))
                     + _line(_record(3)) + torn)
    with caplog.at_level(logging.WARNING):
        done = GenerationLog(path).load()
    assert sorted(done) == ["p:0", "p:1", "p:2", "p:3"]  # records after the bad lines survive
    assert "skipped 5 unreadable line(s) (not JSON: 2, not a conversation record: 3; first at line 3)" in caplog.text
    assert "cut 25 bytes of a torn last line" in caplog.text
    data = path.read_bytes()
    assert data.endswith(_line(_record(3))) and b"{not json" in data  # only the torn end was removed
    GenerationLog(path).append([_record(4)])
    assert sorted(GenerationLog(path).load()) == ["p:0", "p:1", "p:2", "p:3", "p:4"]


def test_a_complete_last_record_that_only_lost_its_newline_is_kept(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_bytes(_line(_record(0)) + _line(_record(1))[:-1])
    assert sorted(GenerationLog(path).load()) == ["p:0", "p:1"]
    assert path.read_bytes() == _line(_record(0)) + _line(_record(1))
