"""The stage entry points' error path: one `error:` line for user errors, a full disk and Ctrl-C; bugs keep
their traceback."""

from __future__ import annotations

import errno

import pytest

from dspark_model.cli_errors import INTERRUPTED, run_stage


class UserError(ValueError):
    pass


def _run(exc: BaseException, tmp_path, **kw):
    def body():
        raise exc

    return run_stage(body, (UserError,), folder=tmp_path, resume="rerun to resume", **kw)


def _exit(exc, tmp_path, capsys, **kw) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stop:
        _run(exc, tmp_path, **kw)
    return stop.value.code, capsys.readouterr().err.splitlines()


def test_user_errors_become_one_line(tmp_path, capsys):
    code, err = _exit(UserError("bad value\n  for x"), tmp_path, capsys)
    assert (code, err) == (2, ["error: bad value for x"])


def test_ctrl_c_says_how_to_resume(tmp_path, capsys):
    assert _exit(KeyboardInterrupt(), tmp_path, capsys) == (INTERRUPTED, ["error: interrupted; rerun to resume"])


def test_a_full_disk_names_the_path_even_when_a_library_wraps_it(tmp_path, capsys):
    target = tmp_path / "ckpt" / "draft.safetensors"
    code, err = _exit(OSError(errno.ENOSPC, "No space left on device", str(target)), tmp_path, capsys,
                      space_needed=lambda: "a checkpoint here takes about 2.0 MiB")
    assert code == 2 and len(err) == 1
    assert f"while writing {target} (" in err[0] and "MiB free there; a checkpoint here takes about 2.0 MiB" in err[0]
    try:  # safetensors reports ENOSPC as its own error type, quoting the OS message
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")
    except RuntimeError as exc:
        code, err = _exit(exc, tmp_path, capsys)
    assert code == 2 and err[0].startswith(f"error: no space left on the device while writing {tmp_path} (")


def test_other_errors_keep_their_traceback(tmp_path):
    with pytest.raises(ZeroDivisionError):
        _run(ZeroDivisionError("a bug"), tmp_path)
