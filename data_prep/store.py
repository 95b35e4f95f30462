"""On-disk layout of a data_prep run, with atomic writes and an append-only, resumable generation log.

```
<out_dir>/
  generation_settings.json   what produced generations.jsonl (a resumed run must match it)
  generations.jsonl          one generated conversation per line, appended per batch (flush + fsync)
  dataset/                   datasets.save_to_disk: input_ids, loss_mask, source, row_id
  token_counts.safetensors   "counts": int64 (vocab_size,), how often each target token id is an answer
                             (loss-masked) token; read with load_token_counts (the draft vocabulary)
  manifest.json              DataManifest (data_prep/manifest.py): sources + hashes, target, generation
                             settings, counts, tokens, fingerprint
  cache/                     optional target cache (see data_prep.cache)
  run.lock, run.lock.json    held while a run writes here (dspark_model/output_lock.py): one run at a time
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError, GenerationError
from data_prep.manifest import DataManifest
from dspark_model.atomic import atomic_write_json, replace_dir
from dspark_model.record import RecordError

log = logging.getLogger(__name__)


def default_data_dir(prompts_name: str, target_id: str | None) -> Path:
    """The one naming rule for a data folder nobody named: ``runs/data/<prompts>-<last part of the target id,
    lowercased>``, relative to the working directory. data_prep writes there for ``prompts=<name>`` and train
    reads from there for ``data.prompts=<name>`` (same target), so the two commands need no path between them."""
    tail = (target_id or "target").rstrip("/").split("/")[-1].lower()
    return Path("runs") / "data" / re.sub(r"[^a-z0-9._-]+", "-", f"{prompts_name}-{tail}")


TOKEN_COUNTS_FILE = "token_counts.safetensors"


def read_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def valid_record(rec) -> bool:
    """Whether a decoded log line has the shape of a generated conversation (see data_prep/generate.py):
    string ids, one response, finish reason and token count per user turn."""
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("row_id", "source", "prompt_sha")):
        return False
    turns, responses = rec.get("turns"), rec.get("responses")
    lists = [turns, responses, rec.get("finish_reasons"), rec.get("num_tokens")]
    if not all(isinstance(x, list) for x in lists) or len({len(x) for x in lists}) != 1:
        return False
    return (all(isinstance(t, str) for t in turns + responses) and isinstance(rec.get("system"), (str, type(None)))
            and all(isinstance(n, int) for n in rec["num_tokens"]))


class GenerationLog:
    """Append-only JSONL of generated conversations keyed by ``row_id``.

    Each batch is appended, flushed and fsynced. ``load`` skips and counts lines that are not JSON or not a
    conversation wherever they are (their rows are generated again); only a torn last line — the write a
    crash interrupted, with no final newline — is cut from the file, so later appends start on a clean line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        *lines, torn = data.split(b"\n")  # torn: whatever follows the last newline (b"" when none)
        done, bad, first_bad = {}, Counter(), None
        for n, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
            except ValueError:  # also invalid UTF-8
                reason = "not JSON"
            else:
                reason = None if valid_record(rec) else "not a conversation record"
            if reason is None:
                done[rec["row_id"]] = rec
            else:
                bad[reason] += 1
                first_bad = first_bad or n
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (%s; first at line %d); their rows are generated again",
                        self.path, sum(bad.values()), ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())),
                        first_bad)
        if torn:
            self._cut_torn_last_line(len(data) - len(torn), torn, done)
        return done

    def _cut_torn_last_line(self, end: int, torn: bytes, done: dict[str, dict]) -> None:
        """Cut the bytes after the last newline; a complete record there (only its newline lost) is kept."""
        try:
            rec = json.loads(torn)
        except ValueError:
            rec = None
        with open(self.path, "r+b") as f:
            if valid_record(rec):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                done[rec["row_id"]] = rec
            else:
                f.truncate(end)
                log.warning("%s: cut %d bytes of a torn last line (a write that was interrupted)", self.path,
                            len(torn))
            f.flush()
            os.fsync(f.fileno())

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


# Settings recorded only since a later version: a run that started before does not say, and may resume.
SETTINGS_ADDED_LATER = frozenset({"target_dtype"})


def check_settings(out_dir: Path, settings: dict, overwrite: bool = False) -> None:
    """Record generation settings, or check that a run being resumed used the same ones."""
    path = out_dir / "generation_settings.json"
    if overwrite:
        for name in ("generations.jsonl", "generation_settings.json"):
            (out_dir / name).unlink(missing_ok=True)
    if path.exists():
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k)
                      and not (k in SETTINGS_ADDED_LATER and k not in old))
        if diff:
            k = diff[0]
            raise GenerationError(
                f"{out_dir} holds generations made with other settings ({k}: {old.get(k)!r} there, "
                f"{settings.get(k)!r} now); use another name=/out_dir=, or overwrite=true to start over")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def dataset_fingerprint(cols: dict[str, list]) -> str:
    """sha256 over every row's row_id, source, input_ids and loss_mask, in dataset order."""
    h = hashlib.sha256()
    for rid, src, ids, mask in zip(cols["row_id"], cols["source"], cols["input_ids"], cols["loss_mask"]):
        h.update(f"{rid}\x00{src}\x00{len(ids)}\x00".encode())
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(mask, dtype=np.int8).tobytes())
    return h.hexdigest()


def save_tokenized(out_dir: Path, cols: dict[str, list], manifest: DataManifest) -> None:
    """Write ``dataset/`` (Arrow, atomically swapped in) and ``manifest.json``."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "source": datasets.Value("string"),
        "row_id": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict(cols, features=features)
    final, tmp = out_dir / "dataset", out_dir / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    replace_dir(tmp, final)
    manifest.write(out_dir / "manifest.json")


def load_tokenized(data_dir: str | Path):
    """(datasets.Dataset, DataManifest) of a data_prep output folder; what the train stage reads."""
    import datasets

    data_dir = Path(data_dir)
    manifest_path, ds_path = data_dir / "manifest.json", data_dir / "dataset"
    if not manifest_path.is_file() or not ds_path.is_dir():
        raise DataPrepError(f"{data_dir} is not a data_prep output (needs manifest.json and dataset/); run "
                            f"`python -m data_prep` first or fix the path")
    try:
        manifest = DataManifest.read(manifest_path)
    except RecordError as exc:
        raise DataPrepError(str(exc)) from None
    return datasets.load_from_disk(str(ds_path)), manifest


def save_token_counts(out_dir: Path, input_ids: list[list[int]], loss_mask: list[list[int]],
                      vocab_size: int) -> dict:
    """Count target token ids over the loss-masked tokens, write ``token_counts.safetensors`` atomically;
    returns the manifest entry."""
    from safetensors.numpy import save_file

    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in input_ids] + [np.zeros(0, np.int64)])
    mask = np.concatenate([np.asarray(m, dtype=bool) for m in loss_mask] + [np.zeros(0, bool)])
    answer = ids[mask]  # (loss tokens,)
    if answer.size and (answer.min() < 0 or answer.max() >= vocab_size):
        raise DataPrepError(f"answer token id {int(answer.max())} lies outside the target vocabulary of "
                            f"{vocab_size}; the tokenizer does not match the target")
    counts = np.bincount(answer, minlength=vocab_size).astype(np.int64)  # (V,)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKEN_COUNTS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"counts": counts}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": TOKEN_COUNTS_FILE, "vocab_size": vocab_size, "answer_tokens": int(counts.sum()),
            "distinct_ids": int(np.count_nonzero(counts))}


def load_token_counts(data_dir: str | Path, vocab_size: int | None = None):
    """The answer-token counts of a data_prep output folder: int64 tensor (vocab_size,).

    ``vocab_size``: the target's embedding rows, when known; shorter counts (a run whose target was not
    loaded counts over the tokenizer's ids) are padded with zeros.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(data_dir) / TOKEN_COUNTS_FILE
    if not path.is_file():
        raise DataPrepError(f"{path} is missing; run `python -m data_prep` again on this output (same settings: "
                            f"it resumes without regenerating) to write the answer-token counts")
    counts = load_file(str(path))["counts"]
    if counts.dtype != torch.int64 or counts.dim() != 1:
        raise DataPrepError(f"{path} holds {counts.dtype} {tuple(counts.shape)}, expected one int64 vector; "
                            f"rewrite it with this version of data_prep")
    if vocab_size is not None and counts.numel() != vocab_size:
        if counts.numel() > vocab_size and counts[vocab_size:].any():
            raise DataPrepError(f"{path} counts ids up to {counts.numel() - 1}, beyond the target vocabulary of "
                                f"{vocab_size}; the data was prepared for another target")
        counts = torch.nn.functional.pad(counts[:vocab_size], (0, max(0, vocab_size - counts.numel())))
    return counts
