"""Atomic file and folder writes shared by every stage: readers never see half a file or half a folder.

A file is written to a temporary name in its destination folder, flushed to disk, then renamed over the
destination (``os.replace`` is atomic on one filesystem). A folder is built under a temporary name and
swapped into place the same way, the previous copy removed only after the swap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | Path, obj, **json_kwargs) -> None:
    """JSON with two-space indent and a final newline; extra kwargs go to ``json.dumps``."""
    json_kwargs.setdefault("indent", 2)
    json_kwargs.setdefault("default", str)
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Swap the finished folder ``tmp`` into ``final``, removing any previous ``final`` after the swap."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# file_sha256 results of this process, keyed by what changes whenever the bytes can have changed: the file
# (device, inode: an atomic replace makes a new one), its size, and its modification and status-change times
# (st_ctime_ns moves on every write and cannot be set back by a program, unlike st_mtime_ns).
_SHA256_MEMO: dict[tuple, str] = {}
_SHA256_MEMO_SIZE = 64
_SHA256_LOCK = threading.Lock()


def _file_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_file(path: str | Path, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 24, memo: bool = True) -> str:
    """Hex sha256 of a file's bytes, read in chunks (any size). A file this process has hashed before and that
    has not changed since (same inode, size, mtime and ctime) is not read again: loading, exporting and
    calibrating a draft all check the same multi-GB weights file. ``memo=False`` always reads the bytes (damage
    checks: a change within the filesystem's timestamp granularity would not show in the key)."""
    key = _file_key(path)
    with _SHA256_LOCK:
        found = _SHA256_MEMO.get(key) if memo else None
    if found is not None:
        return found
    digest = _hash_file(path, chunk)
    if _file_key(path) == key:  # unchanged while it was read: safe to remember
        with _SHA256_LOCK:
            if len(_SHA256_MEMO) >= _SHA256_MEMO_SIZE:
                _SHA256_MEMO.pop(next(iter(_SHA256_MEMO)))
            _SHA256_MEMO[key] = digest
    return digest
