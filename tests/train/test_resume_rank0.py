"""Resume check on several processes: rank 0 alone hashes the checkpoint, every rank gets its decision.

Two CPU processes over gloo call ``resolve_resume`` on the same run folder; ``file_sha256`` is counted per
rank. An intact checkpoint: both ranks return the same folder and only rank 0 hashed. Only damaged
checkpoints: both ranks raise the same error (nobody waits forever for a broadcast that never comes).
"""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from train import checkpointing
from train.checkpointing import FILES_NAME, RUN_NAME, STATE_NAME, record_files


def _run_folder(root: Path, steps: tuple[int, ...], damage: tuple[int, ...] = ()) -> Path:
    """``root``/checkpoints with a step folder per step (state, a weight file, files.json) of run ``r1``."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True)
    (root / RUN_NAME).write_text(json.dumps({"run_id": "r1"}))
    for step in steps:
        d = ckpts / f"step-{step:08d}"
        d.mkdir()
        (d / STATE_NAME).write_text(json.dumps({"step": step, "run_id": "r1"}))
        (d / "draft.safetensors").write_bytes(bytes(range(256)) * 64)
        (d / FILES_NAME).write_text(json.dumps({"files": record_files(d)}))
        if step in damage:
            (d / "draft.safetensors").write_bytes(bytes(255 - b for b in range(256)) * 64)  # same size
    return ckpts


def _worker(rank: int, port: int, ckpts: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    hashed = []
    real = checkpointing.file_sha256

    def counting(path, **kwargs):
        hashed.append(str(path))
        return real(path, **kwargs)

    checkpointing.file_sha256 = counting
    try:
        result = {"path": str(checkpointing.resolve_resume(Path(ckpts), "auto"))}
    except Exception as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({**result, "hashed": len(hashed)}))


def _both_ranks(ckpts: Path, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir()
    mp.spawn(_worker, args=(port, str(ckpts), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_only_rank0_hashes_and_both_resume_from_the_same_checkpoint(tmp_path):
    ckpts = _run_folder(tmp_path / "run", (2, 4), damage=(4,))
    r0, r1 = _both_ranks(ckpts, tmp_path / "out")
    assert r0["path"] == r1["path"] == str(ckpts / "step-00000002")  # step 4 is damaged: both fall back
    assert r0["hashed"] >= 1 and r1["hashed"] == 0


def test_a_refusal_on_rank0_stops_every_rank_with_the_same_line(tmp_path):
    ckpts = _run_folder(tmp_path / "run", (2,), damage=(2,))
    r0, r1 = _both_ranks(ckpts, tmp_path / "out")
    assert r0["error"] == r1["error"] == "CheckpointCorruptError"
    assert r0["message"] == r1["message"] and "does not match its recorded sha256" in r0["message"]
    assert r1["hashed"] == 0
