"""train refuses data that data_prep made for another target (id, revision, tokenizer) unless told otherwise."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from data_prep.chat import tokenizer_sha256
from data_prep.store import load_tokenized
from dspark_model.target import load_target
from tests.conftest import tiny_spec
from tests.train.test_offline import _job, save_synthetic
from train.data import DataError, check_data_target, synthesize
from train.loop import train


@pytest.fixture(scope="module")
def target():
    return load_target(tiny_spec())


def _target_fields(target, **fields) -> dict:
    return {"id": "tiny-llama", "revision": None, "tokenizer_sha256": tokenizer_sha256(target.tokenizer), **fields}


def _cols(target) -> dict:
    rows = synthesize(target, rows=4, response_tokens=16, seed=0)
    return {"input_ids": [r.tolist() for r in rows.input_ids], "loss_mask": [m.tolist() for m in rows.loss_mask],
            "source": ["t"] * len(rows), "row_id": [str(i) for i in range(len(rows))]}


def test_data_for_the_same_target_passes_and_another_is_refused(target, tmp_path, caplog):
    spec, cols, n = tiny_spec(), _cols(target), iter(range(100))

    def _made_for(target, **fields):  # the manifest data_prep writes, read back as train reads it
        folder = tmp_path / f"data{next(n)}"
        save_synthetic(folder, cols, _target_fields(target, **fields))
        return load_tokenized(folder)[1]

    check_data_target(_made_for(target), tmp_path, spec, target, False)
    with pytest.raises(DataError, match=r"prepared for another target: id 'qwen' there, 'tiny-llama' here\. "
                                        r"Fix: .*data_prep target=<this target>.*data.allow_target_mismatch=true"):
        check_data_target(_made_for(target, id="qwen"), tmp_path, spec, target, False)
    with pytest.raises(DataError, match=r"revision abc there, def here"):
        check_data_target(_made_for(target, revision="abc"), tmp_path, dataclasses.replace(spec, revision="def"),
                          target, False)
    with pytest.raises(DataError, match=r"a different tokenizer"):  # same id, other token ids
        check_data_target(_made_for(target, tokenizer_sha256="0" * 64), tmp_path, spec, target, False)
    with caplog.at_level(logging.WARNING):
        check_data_target(_made_for(target, id="qwen"), tmp_path, spec, target, True)
    assert "continuing: data.allow_target_mismatch=true" in caplog.text


def test_train_checks_the_manifest_before_training(target, tmp_path):
    save_synthetic(tmp_path / "data", _cols(target), _target_fields(target, id="other"))
    with pytest.raises(DataError, match="id 'other' there, 'tiny-llama' here"):
        train(_job(tmp_path / "data", tmp_path / "out", "online", "tiny-llama"))
    assert not (tmp_path / "out" / "checkpoints").exists()
