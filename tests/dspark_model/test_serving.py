"""Engine calibration / cost files: converted from eval's calibration.json, checked against the schemas recorded
from SGLang's and TensorRT-LLM's source (dspark_model/engine_schemas.json), written beside public exports."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import export_draft
from dspark_model.export_schema import ExportSchemaError, validate_export
from dspark_model.serving import (
    MANIFEST_NAME,
    SERVING_DIR,
    engine_files,
    schemas,
    validate_engine_file,
    write_engine_files,
)
from tests.calibrated import fitted_calibration
from tests.conftest import tiny_draft_config, tiny_spec

ROOT = Path(__file__).resolve().parents[2]
GAMMA = 4
ENGINE_FILES = ["sglang_sps.json", "sglang_sts.json", "trtllm_cost_table.json", "trtllm_sts.json"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """What eval writes beside a draft, made by eval's own calibration stage (not a hand-written dict); its SPS
    table is not monotone: the envelope lifts B=1 to 44."""
    return fitted_calibration(tmp_path_factory.mktemp("calib"), GAMMA)


def test_files_carry_our_temperatures_and_sps_table_in_each_engines_schema(calibration):
    files, skipped = engine_files(calibration, GAMMA, confidence_head=True)
    assert sorted(files) == ENGINE_FILES and skipped == {}
    for name, content in files.items():
        assert validate_engine_file(name, content, GAMMA) == [], name
    temps = calibration.temperatures
    assert files["sglang_sts.json"]["temperatures"] == temps == files["trtllm_sts.json"]["sts_temperatures"]
    assert files["trtllm_sts.json"]["max_draft_len"] == GAMMA
    assert files["sglang_sts.json"]["num_samples"] == calibration.split["n_calib_rounds"]
    assert files["sglang_sts.json"]["ece_after"] == calibration.metrics["after"]["per_position"]["ece"]
    sglang, trt = files["sglang_sps.json"], files["trtllm_cost_table.json"]
    assert sglang["sample_batch_tokens"] == trt["token_counts"] == [1, 4, 16, 64]
    assert sglang["sample_steps_per_sec"] == [44.0, 44.0, 30.0, 12.0]  # the envelope Algorithm 1 is costed with
    assert sglang["max_batch_tokens"] == 64
    assert trt["step_time_ms"] == pytest.approx([1000 / 44.0, 1000 / 44.0, 1000 / 30.0, 1000 / 12.0])
    assert trt["fixed_overhead_ms"] == 0.0


def test_nothing_is_converted_that_an_engine_would_refuse(calibration):
    files, skipped = engine_files(calibration, GAMMA + 1, confidence_head=True)  # one temperature short
    assert sorted(files) == ["sglang_sps.json", "trtllm_cost_table.json"] and "5" in skipped["sts"]
    files, skipped = engine_files(dataclasses.replace(calibration, sps=None), GAMMA, confidence_head=True)
    assert sorted(files) == ["sglang_sts.json", "trtllm_sts.json"] and "SPS" in skipped["sps"]
    files, skipped = engine_files(calibration, GAMMA, confidence_head=False)
    assert files == {} and "confidence head" in skipped["all"]
    nan_ece = copy.deepcopy(calibration)
    nan_ece.metrics["before"]["per_position"]["ece"][1] = None  # eval writes NaN as null
    sts = engine_files(nan_ece, GAMMA, confidence_head=True)[0]["sglang_sts.json"]
    assert "ece_before" not in sts and "ece_after" not in sts  # msgspec would reject a null in list[float]


@pytest.mark.parametrize("name, edit, needle", [
    ("sglang_sts.json", lambda c: c.pop("temperatures"), "temperatures is required"),
    ("sglang_sts.json", lambda c: c.update(temperatures=[1.0, 2.0]), "one value per draft position (4), has 2"),
    ("sglang_sts.json", lambda c: c["temperatures"].__setitem__(0, 0.0), "temperatures must be > 0"),
    ("sglang_sts.json", lambda c: c.update(num_samples=True), "num_samples must be int"),
    ("sglang_sps.json", lambda c: c.update(sample_batch_tokens=[1, 4, 4, 64]), "strictly increasing"),
    ("sglang_sps.json", lambda c: c.update(sample_steps_per_sec=[1.0, 2.0]), "as many values as"),
    ("sglang_sps.json", lambda c: c.update(max_batch_tokens=16), "must be >= the last sample_batch_tokens"),
    ("trtllm_sts.json", lambda c: c.update(max_draft_len=7), "must equal the draft's block_size 4"),
    ("trtllm_cost_table.json", lambda c: c["step_time_ms"].__setitem__(2, float("inf")), "must be list[float]"),
    ("trtllm_cost_table.json", lambda c: c.update(schema_version=2), "schema_version must not appear"),
])
def test_schema_check_catches_what_the_engines_reject(calibration, name, edit, needle):
    content = engine_files(calibration, GAMMA, confidence_head=True)[0][name]
    edit(content)
    problems = validate_engine_file(name, content, GAMMA)
    assert any(needle in p for p in problems), problems


def test_recorded_schemas_name_their_sources_and_use_only_known_rules():
    recorded = schemas()
    known_rules = {"positive", "nonnegative", "min1", "increasing", "len_gamma", "len_as", "ge_last", "eq_gamma"}
    for name, schema in recorded["files"].items():
        assert schema["engine"] in ("SGLang", "TensorRT-LLM") and schema["option"], name
        assert schema["source"]["repository"].startswith("https://github.com/")
        assert all(re.fullmatch(r"[0-9a-f]{40}", c) for c in schema["source"]["files"].values()), name
        assert any(f["required"] for f in schema["fields"].values()), name
        for field in schema["fields"].values():
            assert field["type"] in ("int", "float", "str", "list[int]", "list[float]", "list[str]")
            assert {r.partition(":")[0] for r in field["rules"]} <= known_rules
    assert set(recorded["reads_no_file"]) == {"vLLM"}


def test_readme_shows_the_engine_options():
    readme = (ROOT / "README.md").read_text()
    for option in ("--speculative-dspark-confidence-sts-path", "--speculative-dspark-sps-table-path",
                   "enable_adaptive_verification", "SGLANG_RAGGED_VERIFY_MODE"):
        assert option in readme, option
    for name in ENGINE_FILES:
        assert f"{SERVING_DIR}/{name}" in readme, name


def _ckpt(path: Path, target, calibration, head: str = "markov"):
    """A saved draft with eval's ``calibration`` record beside it, bound to the saved weights."""
    torch.manual_seed(0)
    draft = build_draft_for(target, tiny_draft_config(sequential_head=head, confidence_head=head != "none"))
    ckpt = save_pretrained(draft, path, target_spec=tiny_spec("llama"))
    if calibration is not None:
        calibration.bound_to(ckpt / "model.safetensors").write(ckpt / "calibration.json")
    return ckpt


def test_public_exports_of_a_calibrated_draft_carry_the_engine_files(tmp_path, tiny_target, calibration):
    ckpt = _ckpt(tmp_path / "ckpt", tiny_target, calibration)
    for fmt in ("deepspec", "speculators"):
        out = export_draft(ckpt, tmp_path / fmt, fmt, target=tiny_target)
        written = sorted(p.name for p in (out / SERVING_DIR).iterdir())
        assert written == sorted([*ENGINE_FILES, MANIFEST_NAME])
        manifest = json.loads((out / SERVING_DIR / MANIFEST_NAME).read_text())
        assert manifest["written"]["sglang_sts.json"]["option"] == "--speculative-dspark-confidence-sts-path"
        assert "vLLM" in manifest["reads_no_file"] and manifest["not_written"] == {}
        for name in ENGINE_FILES:
            content = json.loads((out / SERVING_DIR / name).read_text())
            assert validate_engine_file(name, content, 4) == []
        assert "--speculative-dspark-confidence-sts-path" in (out / "README.md").read_text()  # the card says so
    native = export_draft(ckpt, tmp_path / "native", "native", target=tiny_target)
    assert not (native / SERVING_DIR).exists()  # no engine reads the native format


def test_uncalibrated_and_confidence_free_drafts(tmp_path, tiny_target, calibration):
    plain = _ckpt(tmp_path / "plain", tiny_target, None)
    assert not (export_draft(plain, tmp_path / "p", "speculators", target=tiny_target) / SERVING_DIR).exists()
    dflash = _ckpt(tmp_path / "dflash", tiny_target, calibration, head="none")
    out = export_draft(dflash, tmp_path / "d", "speculators", target=tiny_target)
    assert sorted(p.name for p in (out / SERVING_DIR).iterdir()) == [MANIFEST_NAME]
    assert "confidence head" in json.loads((out / SERVING_DIR / MANIFEST_NAME).read_text())["not_written"]["all"]


def test_validate_export_checks_the_engine_files(tmp_path, tiny_target, calibration):
    ckpt = _ckpt(tmp_path / "ckpt", tiny_target, calibration)
    out = export_draft(ckpt, tmp_path / "out", "deepspec", target=tiny_target)
    path = out / SERVING_DIR / "sglang_sts.json"
    path.write_text(json.dumps({"temperatures": [1.0]}))
    with pytest.raises(ExportSchemaError, match=r"serving/sglang_sts.json: temperatures needs one value per"):
        validate_export(out)
    write_engine_files(out, calibration, 4, confidence_head=True)  # rewriting repairs it
    assert validate_export(out) == "deepspec"
