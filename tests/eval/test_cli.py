"""The real CLI: `python -m eval ...` on the tiny target, in a subprocess, into a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.target import load_target
from eval.__main__ import cli_args
from tests.conftest import tiny_draft_config, tiny_spec

ROOT = Path(__file__).resolve().parents[2]
REPORT_KEYS = {"tau", "tau_by_dataset", "conditional_acceptance", "prefix_survival", "tokens_per_s",
               "speedup_vs_generate", "speedup_vs_prompt_lookup", "greedy_match_rate",
               "accepted_length_histogram", "settings"}


def _prompt_file(tmp_path: Path) -> str:
    rows = [{"turns": ["Hello! Who are you?"]}, {"turns": ["Write a haiku.", "Now make it shorter."]},
            {"prompt": "What is 2 + 2?"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(*args: str, timeout: int = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sources(path: str) -> str:
    return f"prompts.sources=[{{name: smoke, path: '{path}'}}]"


def test_cli_aliases_keep_other_arguments():
    assert cli_args(["eval", "draft=/a/b", "draft_config=dflash", "target=tiny", "gamma=3"]) == [
        "eval", "draft_checkpoint=/a/b", "draft@draft_config=dflash", "target=tiny", "gamma=3"]


def test_cli_smoke_random_draft_is_lossless_and_writes_the_report(tmp_path):
    # the brief's smoke command, on the default prompt set (demo), run from another folder: like data_prep
    # and train, eval writes under the working directory (runs/eval/<name>), never into the package
    proc = _run("draft=random", "target=tiny", "num_prompts=2", "max_new_tokens=16",
                "calibration.sps_batch_sizes=[1,4,16]", "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "runs" / "eval").iterdir()
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["greedy_match_rate"] == 1.0
    assert set(report["tokens_per_s"]) == {"spec", "generate", "prompt_lookup"}
    rounds = (out / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == report["num_rounds"] > 0
    assert report["tau"] == sum(json.loads(r)["emitted"] for r in rounds) / len(rounds)
    for name in ("report.md", "acceptance_by_position.png", "accepted_length_histogram.png", "prompts.jsonl"):
        assert (out / name).is_file(), name
    if "ece_before" in report:  # the calibration stage ran (drafts with a confidence head)
        assert (out / "calibration" / "calibration.json").is_file()


def _checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    spec = tiny_spec("llama")
    target = load_target(spec)
    return save_pretrained(build_draft_for(target, tiny_draft_config()), tmp_path / "run" / "final", spec)


def test_cli_checkpoint_at_t1_takes_the_target_from_it_and_writes_calibration_beside_it(tmp_path):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out"
    proc = _run(f"draft={ckpt}", "temperature=1.0", "gamma=3", f"out_dir={out}", "prompts=shared-eval",
                _sources(_prompt_file(tmp_path)), "num_prompts=3", "max_new_tokens=12",
                "calibration.sps_batch_sizes=[1,4]", "progress=false", "baselines.prompt_lookup=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["target"] == tiny_spec("llama").id and report["settings"]["gamma"] == 3
    assert report["greedy_match_rate"] is None and "prompt_lookup" not in report["tokens_per_s"]
    assert len(report["conditional_acceptance"]["pooled"]) == 3
    assert report["settings"]["prompts_by_dataset"] == {"smoke": 3}
    if "ece_before" in report:  # the calibration beside the weights names the target it was fitted with
        fitted = json.loads((ckpt / "calibration.json").read_text())["target"]
        assert fitted["id"] == tiny_spec("llama").id and fitted["fingerprint"]["embedding_shape"] == [272, 64]


def test_gamma_beyond_the_trained_block_size_is_one_clear_error(tmp_path):
    from data_prep.sources import PromptsConfig, PromptSource
    from eval.__main__ import run
    from eval.schema import EvalConfig, EvalConfigError

    cfg = EvalConfig(draft_checkpoint=str(_checkpoint(tmp_path)), gamma=9, out_dir=str(tmp_path / "out"),
                     prompts=PromptsConfig(sources=[PromptSource(path=_prompt_file(tmp_path))]))
    with pytest.raises(EvalConfigError, match=r"gamma=9 must lie in 1\.\.4 .*set gamma<=4"):
        run(cfg)


def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = _run("draft=random", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "draft=random needs a target" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reduced_vocabulary_checkpoint_is_lossless_and_calibrates(tmp_path):
    torch.manual_seed(0)
    spec = tiny_spec("llama")
    target = load_target(spec)
    draft = build_draft_for(target, tiny_draft_config(draft_vocab_size=48))
    draft.set_draft_vocab(torch.arange(0, 96, 2))
    ckpt = save_pretrained(draft, tmp_path / "run" / "final", spec)
    out = tmp_path / "out"
    proc = _run(f"draft={ckpt}", f"out_dir={out}", "num_prompts=2", "max_new_tokens=16",
                "calibration.sps_batch_sizes=[1,4]", "progress=false", "baselines.prompt_lookup=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["greedy_match_rate"] == 1.0
    allowed = set(range(0, 96, 2))
    for line in (out / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert set(r["proposed"]) <= allowed  # the draft only ever proposes its own tokens
