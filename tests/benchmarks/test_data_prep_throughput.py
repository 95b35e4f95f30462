"""The data_prep benchmark's "before" path is the greedy decoding the new loop replaced, row for row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from data_prep.decode import generate_ids
from dspark_model.tiny import build_tiny_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data_prep_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("data_prep_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_legacy_path_and_new_loop_agree_on_plain_greedy():
    bench = _load()
    model = build_tiny_model("qwen2", num_hidden_layers=2)  # its generation_config asks for nothing
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 19, 11, 27)]
    new = generate_ids(model, prompts, 257, {256}, 14)
    assert bench.legacy_generate_ids(model, prompts, 257, {256}, 14) == new
    assert bench.agreement([{"responses": ["abcd"]}], [{"responses": ["abxy"]}]) == {
        "identical_answers": 0, "answers": 1, "mean_shared_prefix": 0.5}


def test_after_is_measured_with_the_defaults_users_get():
    from hydra import compose, initialize_config_dir

    from data_prep.schema import register

    bench = _load()
    register()
    with initialize_config_dir(config_dir=str(SCRIPT.parents[1] / "conf"), version_base="1.3"):
        cfg = compose("data_prep")
    assert bench.NEW_DEFAULTS["batch_size"] == cfg.generation.batch_size
    assert bench.NEW_DEFAULTS["max_batch_tokens"] == cfg.generation.max_batch_tokens
    assert bench.NEW_DEFAULTS["threads"] == cfg.num_threads


def test_cache_compute_comparison_reads_what_a_bf16_forward_changes(tiny_target, tmp_path):
    import argparse
    import copy

    from data_prep.cache import TargetCache

    bench = _load()
    bf16 = copy.copy(tiny_target)
    bf16.model = copy.deepcopy(tiny_target.model).to(torch.bfloat16)
    records = [{"row_id": str(i), "source": "t", "turns": [f"question {i} " * 3], "responses": [f"answer {i} " * 5],
                "finish_reasons": ["stop"]} for i in range(3)]
    args = argparse.Namespace(compute_rows=3)
    out = bench.compare_cache_compute({"float32": tiny_target}, records, args, tmp_path / "same")
    same = out["compute"]["float32"]
    assert same["relative_rms_error_vs_float32"] < 5e-3  # float32 forward, bf16 storage: rounding only
    assert same["teacher_argmax_agreement"] > 0.9 and "ratio" not in out
    out = bench.compare_cache_compute({"float32": tiny_target, "bfloat16": bf16}, records, args, tmp_path / "both")
    assert out["answer_tokens"] > 0 and out["order"] == ["float32", "bfloat16", "bfloat16", "float32"]
    assert out["compute"]["bfloat16"]["relative_rms_error_vs_float32"] > same["relative_rms_error_vs_float32"]
    assert 0 < out["compute"]["bfloat16"]["teacher_mean_tv"] < 0.5 and out["ratio"] > 0
    assert TargetCache(tmp_path / "both" / "compute-bfloat16-0").manifest.compute_dtype == "bfloat16"
    assert TargetCache(tmp_path / "both" / "compute-float32-1").manifest.compute_dtype == "float32"
