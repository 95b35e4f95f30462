"""How a stage's command line ends on a problem the user can fix: one ``error: ...`` line on stderr.

``run_stage(body, user_errors, folder=..., resume=...)`` runs a stage and turns into one line, with no
traceback:

* the stage's own error classes (a missing file, a bad setting, a folder in use): exit status 2;
* a full disk (ENOSPC, also when a library wraps it, as safetensors does): the path being written, the space
  left there and the fix; exit status 2;
* Ctrl-C: that the run stopped and how to resume it; exit status 130 (128 + SIGINT, what a shell expects of
  an interrupted command, so a loop around it stops too).

Anything else is a bug and keeps its traceback. ``fail`` prints the same line for checks made before a stage
starts.
"""

from __future__ import annotations

import errno
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

T = TypeVar("T")
INTERRUPTED = 130


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def fail(message: object, status: int = 2) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(status)


def disk_full(exc: BaseException) -> OSError | Exception | None:
    """The ENOSPC error in ``exc``'s chain (an OSError, or a library error that quotes one), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        if "No space left on device" in str(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def free_space(path: Path) -> str:
    """Free space on the filesystem holding ``path`` (its nearest existing parent), e.g. '12.3 MiB'."""
    for p in [path, *path.parents]:
        if p.exists():
            return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB"
    return "unknown space"


def disk_full_message(exc: BaseException, folder: Path, needed: str | None = None) -> str:
    path = Path(getattr(exc, "filename", None) or folder)
    need = f"; {needed}" if needed else ""
    return (f"no space left on the device while writing {path} ({free_space(path)} free there{need}); free "
            f"space or point the output elsewhere, then rerun the same command: finished work in {folder} is kept")


def run_stage(body: Callable[[], T], user_errors: tuple[type[BaseException], ...], *, folder: str | Path,
              resume: str, space_needed: Callable[[], str | None] | None = None) -> T:
    """``body()``, with user errors, a full disk and Ctrl-C each ended as one line (module docstring).

    ``folder``: the stage's output folder (named when a full disk gives no path); ``resume``: what an
    interrupted run kept and how to continue, e.g. 'rerun the same command to continue from the newest
    checkpoint';
    ``space_needed``: an estimate of the space the stage still needs, for the full-disk line."""
    folder = Path(folder)
    try:
        return body()
    except KeyboardInterrupt:
        fail(f"interrupted; {resume}", INTERRUPTED)
    except user_errors as exc:
        fail(exc)
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        fail(disk_full_message(full, folder, space_needed() if space_needed else None))
