"""The real CLI in a subprocess, config composition, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.manifest import CacheManifest
from data_prep.schema import DataPrepConfig, register
from data_prep.store import load_tokenized

ROOT = Path(__file__).resolve().parents[2]


def _cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_smoke_tiny_demo(tmp_path):
    out = tmp_path / "out"
    proc = _cli(["target=tiny", "prompts=demo", "num_prompts=4", "generation.max_new_tokens=8",
                 "generation.batch_size=4", "num_threads=1", "cache.enabled=true", "cache.dtype=int8", f"out_dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds, manifest = load_tokenized(out)
    assert len(ds) == manifest.counts["rows"] == manifest.counts["prompts"] == 4
    assert manifest.tokens["total"] == sum(len(r) for r in ds["input_ids"])
    assert len(manifest.target["tokenizer_sha256"]) == 64  # what train compares with its own tokenizer
    cache_manifest = CacheManifest.read(out / "cache" / "manifest.json")
    assert cache_manifest.complete and cache_manifest.rows == 4 and cache_manifest.dtype == "int8"
    assert cache_manifest.dataset_fingerprint == manifest.fingerprint
    assert manifest.cache == {"dir": str(out / "cache"), "dtype": "int8",
                              "bytes_per_token": cache_manifest.bytes_per_token, "shards": 1}
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("*.log"))  # hydra leaves nothing


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    proc = _cli(["target=tiny", "prompts.sources=[{name: x, path: missing.jsonl}]", f"out_dir={tmp_path}/o"],
                tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "does not exist" in line]
    assert len(errors) == 1 and "missing.jsonl" in errors[0]


@pytest.mark.parametrize("prompts", sorted(p.stem for p in (ROOT / "conf" / "prompts").glob("*.yaml")))
def test_every_prompts_config_composes_and_loads(prompts, monkeypatch):
    register()
    monkeypatch.chdir(ROOT)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("data_prep", overrides=[f"prompts={prompts}", "target=tiny"])
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, DataPrepConfig) and obj.prompts.name == prompts and obj.target.random
    from data_prep.sources import load_prompts

    if all(s.path and (s.path.startswith("pkg://") or Path(s.path).exists()) for s in obj.prompts.sources):
        assert load_prompts(obj.prompts.sources, num_prompts=3).prompts
