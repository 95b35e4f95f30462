"""One run per output folder: a held folder is refused with a line naming its holder; a stale record is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from dspark_model.output_lock import HOLDER_NAME, OutputLockedError, output_lock, read_holder


def test_a_held_folder_is_refused_naming_the_holder_and_the_fix(tmp_path):
    with output_lock(tmp_path / "out", "train", "train.output_dir=<another folder>"):
        holder = read_holder(tmp_path / "out")
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["stage"] == "train" and holder["started"]
        with pytest.raises(OutputLockedError) as err:
            with output_lock(tmp_path / "out", "train", "train.output_dir=<another folder>"):
                pass
    message = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()} (train, started" in message
    assert "train.output_dir=<another folder>" in message and "\n" not in message
    assert not (tmp_path / "out" / HOLDER_NAME).exists()  # released: the record goes with the lock
    with output_lock(tmp_path / "out", "train", "x"):  # and the folder can be taken again
        pass


def test_the_record_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has ended: its lock went with it, its record stayed (as after SIGKILL)
    (tmp_path / HOLDER_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "stage": "data_prep",
                                                     "started": "2025-01-01 00:00:00 +0000"}))
    with caplog.at_level(logging.WARNING), output_lock(tmp_path, "data_prep", "out_dir=<another folder>"):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert f"stale lock of pid {pid}" in caplog.text and "that process is gone" in caplog.text


def test_data_prep_refuses_a_folder_in_use_before_loading_anything(tmp_path, prompt_file_path):
    from data_prep.pipeline import run
    from tests.data_prep.conftest import make_cfg

    out = tmp_path / "data"
    with output_lock(out, "data_prep", "out_dir=<another folder>"):
        with pytest.raises(OutputLockedError, match=r"in use by pid \d+ .*out_dir=<another folder> or name="):
            run(make_cfg(prompt_file_path, out))
    assert not (out / "generations.jsonl").exists()


@pytest.fixture
def prompt_file_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    return str(path)
