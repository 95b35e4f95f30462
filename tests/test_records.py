"""The hand-off records (dspark_model/record.py): each writer's real output reads back as its record, and a
file of another version fails in one line naming the file and the fix."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import DataPrepError
from data_prep.manifest import DataManifest
from data_prep.pipeline import run as run_data_prep
from data_prep.store import load_tokenized
from dspark_model.record import RecordError
from eval.metrics import acceptance_summary, throughput_summary
from eval.report import EvalReport, build_report, write_outputs
from tests.data_prep.conftest import PROMPT_ROWS, make_cfg
from tests.eval.test_metrics import RECORDS


def _other_version(path, version="x/9") -> None:
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(dict(doc, format=version)))


def test_data_manifest_round_trips_and_another_version_is_one_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    written = run_data_prep(make_cfg(str(prompts), tmp_path / "d", max_new_tokens=4))
    path = tmp_path / "d" / "manifest.json"
    assert DataManifest.read(path) == written == load_tokenized(tmp_path / "d")[1]
    _other_version(path)
    with pytest.raises(DataPrepError) as err:
        load_tokenized(tmp_path / "d")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "regenerate the data" in message


def test_eval_report_round_trips_reads_unversioned_reports_and_refuses_others(tmp_path):
    records = RECORDS  # rounds as eval records them
    report = build_report(acceptance_summary(records, 3), throughput_summary([]), {"gamma": 3})
    path = write_outputs(str(tmp_path), report, records=records)["report_json"]
    assert EvalReport.read(path) == report
    doc = json.loads(open(path).read())
    doc.pop("format")  # as eval wrote report.json before the record existed
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert EvalReport.read(tmp_path / "old.json") == report
    (tmp_path / "extra.json").write_text(json.dumps(dict(doc, surprise=1)))
    with pytest.raises(RecordError, match=r"unknown fields \['surprise'\].*re-run eval"):
        EvalReport.read(tmp_path / "extra.json")
    _other_version(tmp_path / "old.json", "dspark-eval-report/2")
    with pytest.raises(RecordError) as err:
        EvalReport.read(tmp_path / "old.json")
    assert "\n" not in str(err.value) and "old.json" in str(err.value) and "re-run eval" in str(err.value)
