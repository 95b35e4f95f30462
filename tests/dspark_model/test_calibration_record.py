"""calibration.json as one typed record, bound to the weights it was fitted on, and the model card's Hub metadata.

Everything here starts from real writer output: ``eval`` runs on a saved tiny draft (in this process, about
two seconds), writes its report and the calibration beside the checkpoint, and the tests read those files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file, save_file

from data_prep.sources import PromptsConfig, PromptSource
from dspark_model import hub
from dspark_model.atomic import file_sha256
from dspark_model.calibration import SCHEMA_VERSION, Calibration, CalibrationError
from dspark_model.card import TAU_METRIC, CardError, CardSources, context_from_export
from dspark_model.checkpoint import CheckpointMismatchError, load_draft, save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import ExportError, export_draft, load_export
from dspark_model.export import main as export_main
from eval.__main__ import run
from eval.schema import EvalConfig
from tests.conftest import tiny_draft_config, tiny_spec

SETS = {"arith": ["What is 2 + 2?", "What is 7 * 6?", "Halve 90.", "Count to five."],
        "chat": ["Hello! Who are you?", "Write a haiku.", "Name a colour.", "Say something kind."]}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_target):
    """(checkpoint, eval output folder): ``python -m eval draft=<checkpoint>`` on two prompt sets."""
    root = tmp_path_factory.mktemp("evaluated")
    torch.manual_seed(0)
    ckpt = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), root / "final", tiny_spec("llama"))
    sources = []
    for name, prompts in SETS.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        sources.append(PromptSource(name=name, path=str(path)))
    cfg = EvalConfig(draft_checkpoint=str(ckpt), out_dir=str(root / "eval"), max_new_tokens=12, progress=False,
                     prompts=PromptsConfig(sources=sources))
    cfg.calibration.sps_batch_sizes = [1, 4]
    cfg.baselines.prompt_lookup = False
    out = Path(run(cfg))
    assert (ckpt / "calibration.json").is_file(), json.loads((out / "report.json").read_text()).get(
        "calibration_error")
    return ckpt, out


def _with_other_weights(ckpt: Path, dest: Path, tiny_target) -> Path:
    """A copy of ``ckpt`` whose weights file was replaced by another draft's, its calibration.json kept."""
    shutil.copytree(ckpt, dest)
    torch.manual_seed(1)
    other = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), dest.with_name(dest.name + "-w"))
    shutil.copy(other / "model.safetensors", dest / "model.safetensors")
    return dest


def _one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_eval_writes_one_record_bound_to_the_weights_it_measured(evaluated, tiny_target):
    ckpt, out = evaluated
    record = Calibration.read(ckpt / "calibration.json")
    assert record.schema_version == SCHEMA_VERSION
    assert record.weights_sha256 == file_sha256(ckpt / "model.safetensors")
    assert record == Calibration.read(out / "calibration" / "calibration.json")  # the same record, twice
    assert len(record.temperatures) == record.gamma == 4 and record.target["id"] == "tiny-llama"
    assert load_draft(ckpt, tiny_target).calibration == record


def test_loading_drops_a_calibration_fitted_on_other_weights(evaluated, tiny_target, tmp_path, caplog):
    stale = _with_other_weights(evaluated[0], tmp_path / "stale", tiny_target)
    with caplog.at_level("WARNING"):
        assert load_draft(stale, tiny_target).calibration is None
    assert "fitted on other weights" in caplog.text and f"python -m eval draft={stale}" in caplog.text


def test_export_refuses_a_calibration_fitted_on_other_weights(evaluated, tiny_target, tmp_path, capsys):
    stale = _with_other_weights(evaluated[0], tmp_path / "stale", tiny_target)
    with pytest.raises(ExportError, match="fitted on other weights") as err:
        export_draft(stale, tmp_path / "out", "speculators", target=tiny_target)
    _one_line(str(err.value), str(stale / "calibration.json"), f"python -m eval draft={stale}")
    assert not (tmp_path / "out").exists()
    assert export_main([str(stale), "--out", str(tmp_path / "cli")]) == 2  # the command line: one error line
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: not exporting") and "Traceback" not in err_lines[0]


def test_export_binds_its_copy_and_card_and_hub_refuse_one_that_is_not_bound(evaluated, tiny_target, tmp_path):
    ckpt, _ = evaluated
    out = export_draft(ckpt, tmp_path / "out", "deepspec", "bf16", target=tiny_target)
    copy = Calibration.read(out / "calibration.json")
    assert copy.weights_sha256 == file_sha256(out / "model.safetensors")  # converted weights, bound copy
    assert copy.temperatures == Calibration.read(ckpt / "calibration.json").temperatures
    assert load_export(out, tiny_target).calibration == copy
    tensors = load_file(out / "model.safetensors")  # the weights edited after the export
    tensors["fc.weight"] += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CardError, match="not publishing the calibration") as err:
        context_from_export(out)
    _one_line(str(err.value), str(out / "calibration.json"), "python -m eval", "export it again")
    with pytest.raises(hub.HubError, match="fitted on other weights.*export it again"):
        hub.push(out, "me/tiny-draft", dry_run=True)  # the upload refuses it too (no network in a dry run)


@pytest.mark.parametrize("rewrite, age", [
    # what the toolkit wrote before the record had a schema version: "version": 1 and no weights hash
    (lambda d: {**{k: v for k, v in d.items() if k not in ("schema_version", "weights_sha256")}, "version": 1},
     "an older"),
    (lambda d: dict(d, schema_version=SCHEMA_VERSION + 1), "an unknown"),
])
def test_another_schema_version_fails_with_one_line_naming_file_and_fix(evaluated, tiny_target, tmp_path, rewrite,
                                                                       age):
    folder = tmp_path / "ckpt"
    shutil.copytree(evaluated[0], folder)
    path = folder / "calibration.json"
    path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
    for call, error in ((lambda: Calibration.read(path), CalibrationError),
                        (lambda: load_draft(folder, tiny_target), CheckpointMismatchError),
                        (lambda: export_draft(folder, tmp_path / "out", target=tiny_target), ExportError)):
        with pytest.raises(error) as err:
            call()
        _one_line(str(err.value), str(path), f"{age} calibration schema", "delete it", f"python -m eval draft={folder}")


def test_card_from_a_real_eval_report_carries_tau_per_eval_set_as_model_index(evaluated, tiny_target, tmp_path):
    ckpt, out = evaluated
    report = json.loads((out / "report.json").read_text())
    sources = CardSources(report=str(out / "report.json"), repo_id="me/tiny-draft")
    exported = export_draft(ckpt, tmp_path / "out", "speculators", target=tiny_target, card_sources=sources)
    card = ModelCard.load(exported / "README.md")
    data = card.data
    assert isinstance(data, ModelCardData)
    assert data.base_model == "tiny-llama" and data.library_name == "speculators"
    assert {"speculative-decoding", "dspark", "speculators-format"} <= set(data.tags)
    assert data.model_name == "me/tiny-draft" and data.pipeline_tag == "text-generation"
    measured = {r.dataset_name: r.metric_value for r in data.eval_results if r.metric_type == TAU_METRIC}
    assert measured == pytest.approx(report["tau_by_dataset"]) and set(measured) == set(SETS)
    assert all(r.metric_args == {"temperature": 0.0, "gamma": 4, "max_new_tokens": 12} for r in data.eval_results)
    assert "model-index" in data.to_dict()  # what the Hub reads to show the results
    for name, tau in report["tau_by_dataset"].items():  # the body's table says the same
        assert f"| {name} | {tau:.3f} |" in card.text
    temps = Calibration.read(ckpt / "calibration.json").temperatures
    assert ", ".join(f"{t:.3f}" for t in temps) in card.text


def test_an_old_calibration_outside_a_checkpoint_does_not_name_its_folder_as_the_draft(tmp_path):
    """An eval report's calibration folder is not a checkpoint: the fix must not say draft=<that folder>."""
    path = tmp_path / "calibration" / "calibration.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"schema_version": 1, "gamma": 2, "temperatures": [1.0, 1.0]}))
    with pytest.raises(CalibrationError) as err:
        Calibration.read(path)
    assert f"draft={path.parent}`" not in str(err.value)
    _one_line(str(err.value), str(path), "an older calibration schema", "<the draft checkpoint")
