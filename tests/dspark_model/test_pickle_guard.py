"""Exports and uploads hold no pickle, whatever a file is called: the guard reads the bytes, not the name."""

from __future__ import annotations

import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import export_draft, load_export
from dspark_model.export_schema import ExportSchemaError, pickle_files, validate_export
from dspark_model.hub import push
from tests.conftest import tiny_draft_config, tiny_spec


@pytest.fixture(scope="module")
def clean_export(tmp_path_factory, tiny_target):
    root = tmp_path_factory.mktemp("pickle-guard")
    torch.manual_seed(0)
    ckpt = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), root / "ckpt", tiny_spec())
    return export_draft(ckpt, root / "export", "native", target=tiny_target)


def _pickle(protocol: int) -> bytes:
    return pickle.dumps({"not": "weights"}, protocol=protocol)


def _torch_zip(path) -> bytes:
    torch.save({"w": torch.zeros(2)}, path)
    return path.read_bytes()


def _torch_legacy(path) -> bytes:
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def _npy(path) -> bytes:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path.read_bytes()


CASES = {
    "notes.txt": lambda tmp: _pickle(2),
    "weights.bin": lambda tmp: _pickle(4),  # a pickle suffix and pickle bytes
    "extra.json": lambda tmp: _pickle(5),
    "sub/readme.md": lambda tmp: _pickle(3),  # uploads include sub-folders
    "tensors.data": lambda tmp: _torch_zip(tmp / "t.pt"),
    "legacy.dat": lambda tmp: _torch_legacy(tmp / "l.pt"),
    "array.txt": lambda tmp: _npy(tmp / "a.npy"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_pickle_under_any_name_is_refused_by_validation_loading_and_upload(tmp_path, clean_export, tiny_target,
                                                                            name):
    export = tmp_path / "export"
    shutil.copytree(clean_export, export)
    payload = export / name
    payload.parent.mkdir(parents=True, exist_ok=True)
    payload.write_bytes(CASES[name](tmp_path))
    with pytest.raises(ExportSchemaError, match=f"file {name}: .*pickle-based files are not allowed"):
        validate_export(export)
    with pytest.raises(ExportSchemaError, match=name):
        load_export(export, tiny_target)
    with pytest.raises(ExportSchemaError, match=name):
        push(export, "someone/draft", dry_run=True, echo=lambda *a: None)


def test_safetensors_whose_header_length_looks_like_a_pickle_marker_is_accepted(tmp_path, clean_export):
    """A safetensors file starts with its header length; 640 = bytes 80 02, the marker of a protocol-2 pickle."""
    path = tmp_path / "odd.safetensors"
    for pad in range(700):
        save_file({"w": torch.zeros(3)}, str(path), metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == 640:
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert pickle_files(tmp_path) == []
    assert pickle_files(clean_export) == []
