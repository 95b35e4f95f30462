"""Offline mode (data_prep's target cache) trains exactly like online mode; a mismatched cache is refused."""

from __future__ import annotations

import json

import pytest

from data_prep.cache import write_cache
from data_prep.errors import CacheMismatchError
from data_prep.store import MANIFEST_FORMAT, dataset_fingerprint, save_tokenized
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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_prep-style folder (dataset + manifest) with a float32 target cache."""
    root = tmp_path_factory.mktemp("data")
    target = load_target(tiny_spec())
    rows = synthesize(target, rows=8, response_tokens=24, seed=3)
    cols = {"input_ids": [r.tolist() for r in rows.input_ids], "loss_mask": [m.tolist() for m in rows.loss_mask],
            "source": ["t"] * len(rows), "row_id": [str(i) for i in range(len(rows))]}
    fingerprint = dataset_fingerprint(cols)
    save_tokenized(root, cols, {"format": MANIFEST_FORMAT, "fingerprint": fingerprint})
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
    with pytest.raises(CacheMismatchError, match="target"):
        train(_job(prepared, tmp_path / "bad", "offline", "some-other-model"))
