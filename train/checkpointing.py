"""Resumable training checkpoints: atomic, keep-last-K, exact resume.

Layout of ``<output_dir>/checkpoints/step-00000100/``::

    trainer_state.json       step, data position (epoch, offset), LR schedule, fingerprint (written last)
    draft.safetensors        draft weights                      (plain / DDP training)
    optimizer.safetensors    AdamW moments and step counters    (plain / DDP training)
    optimizer.json           optimizer param groups (lr, betas, ...) and the tensor-key map
    deepspeed/               DeepSpeed's own checkpoint (engine.save_checkpoint) under ZeRO-2 / ZeRO-3
    rng-rank<r>.json         python / numpy RNG state of rank r; rng-rank<r>.safetensors: torch (+cuda) state

    files.json               byte size and sha256 of every other file (written last)

Non-tensor state is JSON, tensors are safetensors: nothing is unpickled on resume, except that DeepSpeed's
own checkpoint format (used under ZeRO, the standard way to save sharded optimizer state) is torch.save
based. A checkpoint is written into ``.tmp-step-*``, fsynced, and renamed into place, so a crash while saving
leaves the previous checkpoints intact; a folder without ``trainer_state.json`` is never resumed from.
``resume=auto`` checks the newest checkpoint against its ``files.json`` before loading anything and falls
back to the previous intact one with a warning (a truncated or damaged file never blocks a resume); a run
first removes the temporary folders a crash or a full disk left behind.

Run id: the first run in an output folder records a random id in ``<output_dir>/run.json`` (``start_run``);
every checkpoint's ``trainer_state.json`` carries it, and a checkpoint whose id differs (copied from another
run folder, or named with ``train.resume=<path>``) is refused before anything in it is loaded, so DeepSpeed
never unpickles files this run folder did not write. (This guards against foreign checkpoints, not against
someone who can write into the output folder itself.)
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dspark_model.atomic import atomic_write_json, file_sha256, replace_dir

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
FILES_NAME = "files.json"  # {"files": {relative path: {"bytes": n, "sha256": hex}}}
RUN_NAME = "run.json"  # in the output folder, beside checkpoints/: {"run_id": ...}


class CheckpointRunError(ValueError):
    """A checkpoint was not written by this output folder's run; the message names both and the fix."""


class CheckpointCorruptError(ValueError):
    """No intact checkpoint to resume from (a named one is damaged, or every one is); the message says why."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(root: Path, resume: str) -> Path | None:
    """``auto``: the newest intact checkpoint (damaged newer ones are skipped with a warning) or None;
    ``never``: None; else the given folder (must exist and be intact). The checkpoint is checked to come
    from this run folder (``check_run``) before it is returned.

    Collective when a process group with several ranks is up: only rank 0 reads and hashes the checkpoint
    files (a ZeRO checkpoint of a 7B draft is gigabytes; eight ranks hashing it on one shared filesystem is
    eight times the reads) and every rank gets its decision, an error included."""
    return _decided_on_rank0(lambda: _resolve_resume(root, resume))


def _decided_on_rank0(decide: Callable[[], object]):
    """``decide()`` run on rank 0 only, its result (or the exception it raised) broadcast to every rank, so
    all ranks continue alike or fail alike with the same message. A single process just calls it."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return decide()
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", decide())
        except Exception as exc:  # every rank raises it below, rank 0 included
            outcome[0] = ("error", exc)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _resolve_resume(root: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        path, newest_damage = None, None
        for candidate in reversed(list_checkpoints(root)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                path = candidate
                break
            newest_damage = newest_damage or f"{candidate.name}: {problem}"
            log.warning("checkpoint %s is damaged (%s); falling back to the one before it (the damaged one "
                        "stays on disk until this run saves that step again)", candidate, problem)
        if newest_damage and path is None:
            raise CheckpointCorruptError(f"every checkpoint in {root} is damaged ({newest_damage}); start over "
                                         f"with train.resume=never")
    else:
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint ({STATE_NAME} "
                                    f"missing); use train.resume=auto, never, or a {root}/step-* folder")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointCorruptError(f"train.resume={resume} is damaged ({problem}); use train.resume=auto "
                                         f"to take the newest intact checkpoint, or name an older one")
    if path is not None:
        check_run(root, path)
    return path


# ---- integrity: sizes and hashes recorded at save, checked before a resume ---------------------------------
def record_files(folder: Path) -> dict:
    """{relative path: {bytes, sha256}} for every file under ``folder`` (except files.json itself)."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FILES_NAME}


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a short phrase), or None when it is intact.

    trainer_state.json must parse; every file in files.json must have its recorded size and sha256.
    Checkpoints saved before files.json existed are checked on trainer_state.json only."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE_NAME} holds no step"
    except (OSError, ValueError) as exc:
        return f"{STATE_NAME} unreadable: {type(exc).__name__}"
    if not (path / FILES_NAME).is_file():
        return None
    try:
        files = json.loads((path / FILES_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{FILES_NAME} unreadable: {type(exc).__name__}"
    for name, want in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, {want['bytes']} were written"
        if file_sha256(p, memo=False) != want["sha256"]:  # a damage check reads the bytes
            return f"{name} does not match its recorded sha256"
    return None


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete the temporary folders that a crash or a full disk left in output folder ``out`` (unfinished
    checkpoints ``.tmp-step-*``, swapped-out copies ``.*.old-*``, unfinished final drafts ``.final.tmp-*``).
    Safe only while the folder is locked by this run. Returns the names removed."""
    root = out / "checkpoints"
    found = [*root.glob(".tmp-step-*"), *root.glob(".step-*.old-*"), *out.glob(".final.tmp-*"),
             *out.glob(".final.old-*")]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if found:
        log.warning("removed %d temporary folder(s) left by an interrupted run in %s: %s", len(found), out,
                    ", ".join(sorted(p.name for p in found)))
    return [p.name for p in found]


def checkpoint_size_hint(root: Path) -> str | None:
    """'a checkpoint here takes about N MiB' from the newest checkpoint (what a full disk message needs)."""
    found = list_checkpoints(root)
    if not found:
        return None
    size = sum(p.stat().st_size for p in found[-1].rglob("*") if p.is_file())
    return f"a checkpoint here takes about {size / 2**20:.1f} MiB"


# ---- run id: only checkpoints this run folder wrote are resumed from -----------------------------------------
def start_run(root: Path, *, rank: int, barrier: Callable[[], None]) -> str:
    """The run id of the output folder holding ``root`` (the checkpoints folder): read from its run.json, or
    drawn at random and written there (atomically, by rank 0) when the folder is new. Rank 0 also removes
    temporary folders an interrupted run left there. Collective."""
    path = root.parent / RUN_NAME
    if rank == 0:
        remove_stale_temporaries(root.parent)
    if rank == 0 and not path.is_file():
        atomic_write_json(path, {"run_id": uuid.uuid4().hex, "note": "checkpoints under checkpoints/ carry "
                                 "this id; only they are resumed from"})
    barrier()
    return run_id(root)


def run_id(root: Path) -> str | None:
    """The run id recorded beside ``root`` (None when the folder has no run.json)."""
    try:
        return json.loads((root.parent / RUN_NAME).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_run(root: Path, ckpt: Path) -> None:
    """Raise CheckpointRunError unless checkpoint ``ckpt`` was written by the run that owns ``root``."""
    try:
        theirs = json.loads((ckpt / STATE_NAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        theirs = None
    ours = run_id(root)
    if ours is None or theirs != ours:
        recorded = f"run id {theirs}" if theirs else "no run id"
        raise CheckpointRunError(
            f"refusing to resume from {ckpt}: it records {recorded}, but the output folder {root.parent} "
            f"belongs to run {ours or '(none: run.json missing)'}, so this folder did not write it (and under "
            f"DeepSpeed its .pt files would be unpickled). Fix: start fresh with train.resume=never or a new "
            f"train.output_dir; to continue another run, train in that run's own output folder")


# ---- optimizer and RNG state as safetensors + JSON ---------------------------------------------------------
def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, per_param in state["state"].items():
        for name, value in per_param.items():
            key = f"state.{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ---- atomic folder writes ---------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (files first, the folder itself last)."""
    for p in sorted(path.rglob("*"), reverse=True) + [path]:
        _fsync_dir(p)


def save_checkpoint(root: Path, step: int, trainer_state: dict, *, rank: int, barrier: Callable[[], None],
                    draft=None, optimizer=None, engine=None, keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it). Returns the final folder."""
    final, tmp = step_dir(root, step), root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    elif rank == 0:
        state = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()}
        save_file(state, str(tmp / "draft.safetensors"))
        tensors, meta = optimizer_to_files(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    rng_meta, rng_tensors = capture_rng()
    _write_json(tmp / f"rng-rank{rank}.json", rng_meta)
    save_file(rng_tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    barrier()
    if rank == 0:
        _write_json(tmp / STATE_NAME, {**trainer_state, "run_id": run_id(root)})
        _write_json(tmp / FILES_NAME, {"files": record_files(tmp)})
        _fsync_tree(tmp)
        replace_dir(tmp, final)  # re-saving a step after a resume swaps the old copy out
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, *, rank: int, draft=None, optimizer=None, engine=None) -> dict:
    """Restore model / optimizer (or the DeepSpeed engine) and this rank's RNG; returns trainer_state."""
    state = json.loads((path / STATE_NAME).read_text())
    if engine is not None:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=False, load_module_strict=True)
    else:
        missing, unexpected = draft.load_state_dict(load_file(str(path / "draft.safetensors")), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not fit the draft (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); was the draft config changed?")
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta))
    rng_json = path / f"rng-rank{rank}.json"
    if rng_json.is_file():
        restore_rng(json.loads(rng_json.read_text()), load_file(str(path / f"rng-rank{rank}.safetensors")))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); continuing with the current RNG",
                    path, rank)
    return state
