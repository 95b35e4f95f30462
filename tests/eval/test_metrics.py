"""Acceptance metrics on hand-made round records; throughput summary; report rendering."""

from __future__ import annotations

import json

import pytest

from eval.metrics import (
    acceptance_summary,
    accepted_length_histogram,
    conditional_acceptance,
    prefix_survival,
    tau,
    throughput_summary,
)
from eval.report import EvalReport, build_report, write_outputs


def _rec(accepted: int, dataset: str = "a", gamma: int = 3, eos: bool = False, emitted: int | None = None) -> dict:
    return {"dataset": dataset, "prompt_id": 0, "gamma": gamma, "accepted": accepted, "eos": eos,
            "emitted": accepted + 1 if emitted is None else emitted}


RECORDS = [_rec(a) for a in (0, 1, 3, 2, 3, 1)]


def test_conditional_acceptance_and_prefix_survival_are_different_things():
    cond = conditional_acceptance(RECORDS)
    surv = prefix_survival(RECORDS)
    assert cond == pytest.approx([5 / 6, 3 / 5, 2 / 3])
    assert surv == pytest.approx([5 / 6, 3 / 6, 2 / 6])  # = P(accepted >= k) without EOS rounds
    assert surv == pytest.approx([sum(r["accepted"] >= k for r in RECORDS) / 6 for k in (1, 2, 3)])


def test_tau_and_histogram():
    assert tau(RECORDS) == pytest.approx(16 / 6)
    assert accepted_length_histogram(RECORDS) == [1, 2, 1, 2]
    assert tau([]) is None


def test_a_round_ending_at_an_accepted_eos_is_not_at_risk_afterwards():
    # EOS accepted at position 1: emitted = accepted (no bonus); position 2 was never judged
    records = RECORDS + [_rec(1, eos=True, emitted=1)]
    assert conditional_acceptance(records) == pytest.approx([6 / 7, 3 / 5, 2 / 3])
    assert prefix_survival(records)[1] == pytest.approx(6 / 7 * 3 / 5)
    assert tau(records) == pytest.approx(17 / 7)
    # an EOS that is the correction token ends the round after a rejection: position 1 was at risk
    records = RECORDS + [_rec(0, eos=True, emitted=1)]
    assert conditional_acceptance(records)[0] == pytest.approx(5 / 7)


def test_positions_nobody_reached_are_none_not_zero():
    records = [_rec(0), _rec(0)]
    assert conditional_acceptance(records) == [0.0, None, None]
    assert prefix_survival(records) == [0.0, None, None]


def test_summary_is_split_by_dataset():
    records = [_rec(3, "gsm8k"), _rec(3, "gsm8k"), _rec(0, "mt-bench"), _rec(1, "mt-bench")]
    s = acceptance_summary(records, 3)
    assert s["tau_by_dataset"] == {"gsm8k": 4.0, "mt-bench": 1.5} and s["tau"] == pytest.approx(11 / 4)
    assert s["conditional_acceptance"]["by_dataset"]["gsm8k"] == [1.0, 1.0, 1.0]
    assert s["conditional_acceptance"]["by_dataset"]["mt-bench"] == [0.5, 0.0, None]
    assert s["accepted_length_histogram"]["pooled"] == [1, 1, 0, 2]


def test_throughput_summary():
    rows = [{"spec_tokens": 100, "spec_s": 1.0, "generate_tokens": 100, "generate_s": 2.0,
             "prompt_lookup_tokens": 100, "prompt_lookup_s": 1.5, "greedy_match": True, "prompt_lookup_match": True},
            {"spec_tokens": 50, "spec_s": 1.0, "generate_tokens": 50, "generate_s": 1.0,
             "prompt_lookup_tokens": 50, "prompt_lookup_s": 0.5, "greedy_match": False, "prompt_lookup_match": None}]
    t = throughput_summary(rows)
    assert t["tokens_per_s"] == pytest.approx({"spec": 75.0, "generate": 50.0, "prompt_lookup": 75.0})
    assert t["speedup_vs_generate"] == pytest.approx(1.5) and t["speedup_vs_prompt_lookup"] == pytest.approx(1.0)
    assert t["greedy_match_rate"] == 0.5 and t["prompt_lookup_match_rate"] == 1.0
    assert t["speedup_vs_generate_by_dataset"] == {"all": pytest.approx(1.5)}
    rows[0]["dataset"], rows[1]["dataset"] = "gsm8k", "mt-bench"
    rows.append({"dataset": "mt-bench", "spec_tokens": 50, "spec_s": 1.0})  # no generate timing: left out
    assert throughput_summary(rows)["speedup_vs_generate_by_dataset"] == {"gsm8k": pytest.approx(2.0),
                                                                          "mt-bench": pytest.approx(1.0)}


def test_report_files_are_strict_json_and_readable_markdown(tmp_path):
    report = build_report(acceptance_summary(RECORDS, 3), throughput_summary([]),
                          {"draft": "d", "target": "t", "temperature": 0.0, "gamma": 3})
    report.ece_after = float("nan")
    paths = write_outputs(str(tmp_path), report, records=RECORDS, rows=[], outputs=[])
    data = json.loads((tmp_path / "report.json").read_text())  # allow_nan=False upstream: NaN became null
    assert data["format"] == EvalReport.FORMAT and EvalReport.read(tmp_path / "report.json").ece_after is None
    assert data["ece_after"] is None and data["prefix_survival"]["pooled"] == pytest.approx([5 / 6, 0.5, 1 / 3])
    md = (tmp_path / "report.md").read_text()
    assert "| pooled | 0.833 | 0.600 | 0.667 |" in md and "| pooled | 0.833 | 0.500 | 0.333 |" in md
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == len(RECORDS)
    for key in ("acceptance_plot", "histogram_plot"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
