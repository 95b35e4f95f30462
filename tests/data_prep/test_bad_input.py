"""data_prep stops on unreadable prompt files and impossible settings with one line naming the file / field."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import DataPrepError, SourceError
from data_prep.pipeline import run
from data_prep.sources import PromptSource, load_prompts

from .conftest import make_cfg
from .test_cli import _cli


def _latin1_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "fine"}).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    return path


def test_a_non_utf8_prompt_file_names_the_file_and_line(tmp_path):
    path = _latin1_file(tmp_path)
    with pytest.raises(SourceError, match=rf"prompt file '{path}' line 2 is not UTF-8 \(byte 0xe9 at column 16\)"):
        load_prompts([PromptSource(path=str(path))])


def test_a_corrupt_parquet_file_is_one_clear_error(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=rf"prompt file '{path}' is not a readable Parquet file"):
        load_prompts([PromptSource(path=str(path))])


@pytest.mark.parametrize("setting, message", [
    ({"temperature": -1.0}, "generation.temperature must be >= 0"),
    ({"max_new_tokens": 0}, "generation.max_new_tokens must be >= 1"),
])
def test_impossible_generation_settings_fail_before_anything_is_written(prompt_file, tmp_path, setting, message):
    with pytest.raises(DataPrepError, match=message):
        run(make_cfg(prompt_file, tmp_path / "out", **setting))
    assert not (tmp_path / "out").exists()


def test_cli_non_utf8_prompts_exit_2_with_one_error_line(tmp_path):
    path = _latin1_file(tmp_path)
    proc = _cli(["target=tiny", f"prompts.sources=[{{name: x, path: '{path}'}}]", f"out_dir={tmp_path}/o"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "line 2 is not UTF-8" in errors[0]
