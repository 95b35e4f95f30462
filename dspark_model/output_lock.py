"""An exclusive lock on a stage's output folder: two runs never write into one folder at the same time.

The lock is ``filelock.FileLock`` on ``<folder>/run.lock``, an operating-system lock that the kernel drops when
its process ends, however it ends (local disks and NFSv4 honour it). Beside it, ``<folder>/run.lock.json``
records who holds the folder — pid, host, start time, stage — so that a refused run can name the other one.

A record whose lock is free was left by a run that ended without cleaning up (SIGKILL, power loss): it is
stale, and the new run takes the folder over with a warning that says whether the old pid is gone (checked
when it ran on this host). A held lock is never broken: the message names its holder and how to proceed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dspark_model.atomic import atomic_write_json

log = logging.getLogger(__name__)

LOCK_NAME, HOLDER_NAME = "run.lock", "run.lock.json"


class OutputLockedError(RuntimeError):
    """Another run holds the output folder; the message names it and how to proceed."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(folder: str | Path) -> dict | None:
    """The holder record of ``folder``'s lock, or None when there is none (or it is unreadable)."""
    try:
        holder = json.loads((Path(folder) / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict | None) -> str:
    """'pid 123 on host gpu7 (train, started 2025-01-01 12:00:00)', or a note that nobody is recorded."""
    if not holder:
        return "a run that has not recorded itself yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('stage', 'run')}, started "
            f"{holder.get('started', '?')})")


def _stale_note(holder: dict) -> str:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return "that process is gone" if not pid_alive(holder["pid"]) else "it no longer holds the lock"
    return "it no longer holds the lock"


@contextlib.contextmanager
def output_lock(folder: str | Path, stage: str, other_folder_hint: str) -> Iterator[Path]:
    """Hold ``folder`` (created if needed) exclusively for the body; raise OutputLockedError if it is taken.

    ``other_folder_hint``: how this stage's user picks another folder (``train.output_dir=...``)."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(folder)
        orphan = bool(holder) and _stale_note(holder) == "that process is gone"
        raise OutputLockedError(
            f"output folder {folder} is in use by {describe(holder)} (lock {folder / LOCK_NAME}"
            f"{'; that pid is gone, so a process it started still holds the lock' if orphan else ''}); wait "
            f"for that run to finish or stop it, or write elsewhere with {other_folder_hint}") from None
    try:
        stale = read_holder(folder)
        if stale and stale.get("pid") != os.getpid():
            log.warning("%s: taking over the stale lock of %s: %s", folder, describe(stale), _stale_note(stale))
        atomic_write_json(folder / HOLDER_NAME, {
            "pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        yield folder
    finally:
        with contextlib.suppress(OSError):
            (folder / HOLDER_NAME).unlink()
        lock.release()
