"""Offline mode (data_prep's target cache) trains exactly like online mode; a mismatched cache is refused."""

from __future__ import annotations

import json

import pytest

from data_prep.cache import write_cache
from data_prep.errors import CacheMismatchError
from data_prep.manifest import DataManifest
from data_prep.pipeline import TRUNCATION_POLICY
from data_prep.store import dataset_fingerprint, save_tokenized
from dspark_model.config import DraftConfig
from dspark_model.target import load_target
from tests.conftest import tiny_spec
from train.data import synthesize
from train.loop import train
from train.schema import DataConfig, LoggerConfig, OptimConfig, TrainJob


def _job(data_dir, out, mode, target_id):
    spec = tiny_spec()
    spec.id = target_id
    return TrainJob(
        target=spec, draft=DraftConfig(num_layers=1, block_size=4, markov_rank=16),
        data=DataConfig(path=str(data_dir), mode=mode),
        train=OptimConfig(max_steps=3, global_batch_size=4, micro_batch_size=2, warmup_steps=1, lr=1e-3,
                          min_anchors=4, max_anchors=8, save_every=10, output_dir=str(out), device="cpu"),
        logger=LoggerConfig(tensorboard=False, progress_bar=False))


def save_synthetic(root, cols: dict, target: dict | None = None) -> str:
    """Rows sampled from the tiny target saved as data_prep saves its output (dataset + DataManifest record);
    returns the fingerprint."""
    fingerprint = dataset_fingerprint(cols)
    tokens = {"total": sum(map(len, cols["input_ids"])), "loss": sum(map(sum, cols["loss_mask"])), "generated": 0}
    save_tokenized(root, cols, DataManifest(
        name="synthetic", target=target or {"id": "tiny-llama", "revision": None}, sources=[], prompts_config=None,
        generation={}, max_length=4096, min_loss_tokens=2, truncation_policy=TRUNCATION_POLICY,
        counts={"rows": len(cols["input_ids"])}, tokens=tokens, fingerprint=fingerprint))
    return fingerprint


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_prep-style folder (dataset + manifest) with a float32 target cache."""
    root = tmp_path_factory.mktemp("data")
    target = load_target(tiny_spec())
    rows = synthesize(target, rows=8, response_tokens=24, seed=3)
    cols = {"input_ids": [r.tolist() for r in rows.input_ids], "loss_mask": [m.tolist() for m in rows.loss_mask],
            "source": ["t"] * len(rows), "row_id": [str(i) for i in range(len(rows))]}
    fingerprint = save_synthetic(root, cols)
    write_cache(target, cols["input_ids"], root / "cache", dtype="float32", target_id="tiny-llama",
                dataset_fingerprint=fingerprint)
    return root


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_offline_cache_gives_online_losses(prepared, tmp_path):
    train(_job(prepared, tmp_path / "online", "online", "tiny-llama"))
    train(_job(prepared, tmp_path / "offline", "offline", "tiny-llama"))
    online, offline = _losses(tmp_path / "online"), _losses(tmp_path / "offline")
    assert len(online) == 3
    assert offline == pytest.approx(online, rel=1e-5)
    final = json.loads((tmp_path / "offline" / "final" / "config.json").read_text())
    assert final["data_fingerprint"] == json.loads((prepared / "manifest.json").read_text())["fingerprint"]


def test_cache_for_another_target_is_refused(prepared, tmp_path):
    job = _job(prepared, tmp_path / "bad", "offline", "some-other-model")
    job.data.allow_target_mismatch = True  # past the data manifest's own target check, to the cache's
    with pytest.raises(CacheMismatchError, match="target"):
        train(job)


def test_long_rows_keep_their_answer_and_cache_alignment(prepared):
    """A row longer than data.max_length loses its prompt's start, not its answer; the cached target states
    of the kept tokens are the ones collated."""
    import torch

    from data_prep.cache import TargetCache
    from train.data import collate, load_data_dir

    full = load_data_dir(prepared, 10_000, None)
    cut = load_data_dir(prepared, 20, None)
    cut.cache = TargetCache(prepared / "cache")
    assert len(cut) == len(full) and any(cut.starts)
    for i in range(len(full)):
        n = cut.input_ids[i].numel()
        assert n == min(20, full.input_ids[i].numel())
        assert torch.equal(cut.input_ids[i], full.input_ids[i][-n:])
        assert torch.equal(cut.loss_mask[i], full.loss_mask[i][-n:])
        assert cut.loss_mask[i].sum() == min(n, int(full.loss_mask[i].sum()))  # answers survive
    batch = collate(cut, [0, 1], pad_id=0)
    for b, i in enumerate([0, 1]):
        row, s, n = cut.cache[cut.rows[i]], cut.starts[i], cut.input_ids[i].numel()
        assert torch.equal(batch.final_hidden[b, :n], row["final_hidden"][s: s + n].to(batch.final_hidden.dtype))


def test_collate_keeps_the_cache_storage_dtype(tmp_path, prepared):
    """A bfloat16 cache is collated as bfloat16 (half the bytes to move); the values are the cached ones."""
    import torch

    from data_prep.cache import TargetCache, write_cache
    from data_prep.store import load_tokenized
    from train.data import collate, load_data_dir

    ds, manifest = load_tokenized(prepared)
    write_cache(load_target(tiny_spec()), ds["input_ids"], tmp_path / "cache", dtype="bfloat16",
                target_id="tiny-llama", dataset_fingerprint=manifest.fingerprint)
    data = load_data_dir(prepared, 10_000, None)
    data.cache = TargetCache(tmp_path / "cache")
    batch = collate(data, [0], pad_id=0)
    n = data.input_ids[0].numel()
    assert batch.tap_hidden.dtype == batch.final_hidden.dtype == torch.bfloat16
    assert torch.equal(batch.final_hidden[0, :n].float(), data.cache[data.rows[0]]["final_hidden"])
