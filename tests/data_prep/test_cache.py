"""Target cache: round trip per storage dtype, sizes, resume shard by shard, disk check, mismatch errors.

float8 bound: e4m3 keeps 3 mantissa bits, so round to nearest is off by at most half a step, 2^-4 of the
value, in the normal range; below 2^-6 the step is the subnormal 2^-9, so at most 2^-10 absolute. Values are
divided by absmax / 448 first, so in original units |error| <= 2^-4 |x| + 2^-10 * absmax / 448.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from data_prep import cache as cache_mod
from data_prep.cache import TargetCache, bytes_per_shard, bytes_per_token, quantize_int8, write_cache
from data_prep.errors import CacheError, CacheMismatchError
from dspark_model.target import load_target

from .conftest import tiny_spec

ROWS = [list(range(3, 3 + n)) for n in (5, 17, 9, 30, 2, 12)]


def fp8_bound(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Sound per-value float8 error bound (module docstring), with fp32 rounding slack."""
    return (x.abs() * 2 ** -4 + absmax / 448 * 2 ** -10) * (1 + 1e-5)


@pytest.fixture(scope="module")
def target():
    return load_target(tiny_spec())


@pytest.fixture(scope="module")
def reference(target):
    """Per-row target features computed one row at a time (no padding, no batching)."""
    out = []
    for row in ROWS:
        o = target.forward(torch.tensor([row]))
        out.append((o.tap_hidden[0].float(), o.final_hidden[0].float()))
    return out


def _write(target, path, dtype, **kw):
    return write_cache(target, ROWS, path, dtype, target_id="tiny-random-llama", dataset_fingerprint="fp",
                       shard_tokens=25, batch_tokens=40, **kw)


def _shard_absmax(manifest, reference, groups: dict[str, int]) -> list[dict[str, torch.Tensor]]:
    """Per row: the absmax of its shard, per group, expanded to the row's shape (float8's scales)."""
    out = []
    for s in manifest.shards:
        rows = reference[s["row_start"]: s["row_end"]]
        absmax = {}
        for j, name in enumerate(("tap_hidden", "final_hidden")):
            x = torch.cat([r[j] for r in rows])  # (N, D)
            g = groups[name]
            absmax[name] = x.reshape(len(x), g, -1).abs().amax(dim=(0, 2)).repeat_interleave(x.shape[-1] // g)
        out += [absmax] * len(rows)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8", "float8"])
def test_round_trip_within_dtype_tolerance(target, reference, tmp_path, dtype):
    manifest = _write(target, tmp_path / "c", dtype)
    shard_absmax = _shard_absmax(manifest, reference, {"tap_hidden": len(target.tap_layer_ids), "final_hidden": 1})
    assert len(manifest.shards) > 2  # rows spread over several shards
    cache = TargetCache(tmp_path / "c")
    assert len(cache) == len(ROWS)
    k = len(target.tap_layer_ids)
    for i, (taps, final) in enumerate(reference):
        got = cache[i]
        assert got["tap_hidden"].dtype == torch.float32
        assert got["tap_hidden"].shape == (len(ROWS[i]), k * target.hidden_size)
        assert got["final_hidden"].shape == (len(ROWS[i]), target.hidden_size)
        for name, ref, groups in (("tap_hidden", taps, k), ("final_hidden", final, 1)):
            err = (got[name] - ref).abs()
            if dtype == "int8":  # within half a quantisation step of each row group's absmax / 127
                absmax = ref.reshape(len(ref), groups, -1).abs().amax(-1, keepdim=True)
                bound = (absmax / 254 * 1.01 + 1e-5).expand(-1, -1, ref.shape[-1] // groups).reshape(ref.shape)
                assert (err <= bound).all()
            elif dtype == "float8":  # scales per shard and tap: the bound uses the shard's absmax
                assert (err <= fp8_bound(ref, shard_absmax[i][name]) + 1e-5).all()
                assert err.max() > 0  # it really went through 8 bits
            else:
                rel = {"float32": 1e-5, "bfloat16": 2 ** -8, "float16": 2 ** -11}[dtype]
                assert (err <= ref.abs() * rel + 1e-5).all()
    assert manifest.tap_layer_convention == "decoder_layer"
    assert manifest.final_hidden == "after_final_norm"


def test_int8_needs_about_half_the_bytes_of_bf16(target, tmp_path):
    k, d = len(target.tap_layer_ids), target.hidden_size
    # One byte per value plus one fp16 scale per token and tap (and final state): half of bf16 + scales.
    assert bytes_per_token(k, d, "int8") == bytes_per_token(k, d, "bfloat16") // 2 + 2 * (k + 1)
    assert bytes_per_token(5, 576, "int8") / bytes_per_token(5, 576, "bfloat16") < 0.502  # SmolLM2 sizes
    sizes = {}
    for dtype in ("bfloat16", "int8"):
        _write(target, tmp_path / dtype, dtype)
        sizes[dtype] = sum(f.stat().st_size for f in (tmp_path / dtype).glob("*.safetensors"))
    assert sizes["int8"] < 0.6 * sizes["bfloat16"]  # headers and offsets weigh on a tiny cache


def test_float8_needs_at_most_half_the_bytes_of_bf16(target, tmp_path):
    k, d = len(target.tap_layer_ids), target.hidden_size
    for taps, width in ((k, d), (5, 576), (36, 4096)):  # tiny, SmolLM2-135M, an 8B model with many taps
        assert bytes_per_token(taps, width, "float8") == (taps + 1) * width  # one byte per value
        assert bytes_per_token(taps, width, "float8") <= 0.5 * bytes_per_token(taps, width, "bfloat16")
        assert bytes_per_shard(taps, "float8") == 4 * (taps + 1)  # fp32 scales, once per shard
    assert bytes_per_token(5, 576, "int8") > 0.5 * bytes_per_token(5, 576, "bfloat16")  # why float8 exists
    manifest = _write(target, tmp_path / "f8", "float8")
    assert manifest.bytes_per_token == (k + 1) * d and manifest.bytes_per_shard == 4 * (k + 1)
    _write(target, tmp_path / "bf16", "bfloat16")
    size = {n: sum(f.stat().st_size for f in (tmp_path / n).glob("*.safetensors")) for n in ("f8", "bf16")}
    # Both files carry the same offsets and similar headers; the payload difference is exactly half of bf16.
    payload_bf16 = manifest.tokens * bytes_per_token(k, d, "bfloat16")
    scales = len(manifest.shards) * bytes_per_shard(k, "float8")
    assert size["bf16"] - size["f8"] >= payload_bf16 // 2 - scales - 200 * len(manifest.shards)


def test_float8_quantiser_bound_on_outliers():
    """Random activations with a few huge outlier channels (as in SmolLM2's taps): error stays within bound."""
    g = torch.Generator().manual_seed(0)
    groups, width = 3, 96
    x = torch.randn(400, groups * width, generator=g)  # (N, G*W)
    x[:, 7] *= 300.0  # a massive-activation channel in group 0
    x[torch.randint(0, 400, (20,), generator=g), 100] = 5000.0  # rare spikes in group 1
    x[:, 2 * width:] *= 1e-3  # group 2: small values, its own scale keeps them precise
    q, scale = cache_mod.quantize_fp8(x, groups)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (groups,) and scale.dtype == torch.float32
    absmax = x.reshape(400, groups, width).abs().amax(dim=(0, 2))  # (G,)
    assert torch.equal(scale, absmax)
    back = cache_mod.dequantize_fp8(q, scale)
    err = (back - x).abs()
    assert (err <= fp8_bound(x, absmax.repeat_interleave(width))).all()
    big = x.abs() >= absmax.repeat_interleave(width) / 448 * 2 ** -6  # normal fp8 range: relative bound alone
    assert (err[big] <= x.abs()[big] * 2 ** -4 * (1 + 1e-5)).all()
    assert (err[big] / x.abs()[big]).max() > 2 ** -5  # the bound is tight, not vacuous
    assert torch.equal(back.abs().amax(0).reshape(groups, width).amax(-1), absmax)  # absmax comes back exactly
    zeros, zscale = cache_mod.quantize_fp8(torch.zeros(4, 6), 2)
    assert torch.equal(cache_mod.dequantize_fp8(zeros, zscale), torch.zeros(4, 6))  # no division by zero


def test_int8_quantiser_is_exact_on_representable_rows():
    x = torch.tensor([[127.0, -64.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_int8(x, groups=1)
    assert q[0].tolist() == [127, -64, 0, 1] and q[1].abs().sum() == 0
    assert torch.allclose(cache_mod.dequantize_int8(q, scale), x, atol=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_resume_rewrites_only_missing_shards(target, tmp_path, dtype):
    path = tmp_path / "c"
    manifest = _write(target, path, dtype)
    files = [path / s["file"] for s in manifest.shards]
    before = {f: f.stat().st_mtime_ns for f in files}
    reference = [TargetCache(path)[i] for i in range(len(ROWS))]
    os.remove(files[1])
    (path / (manifest.shards[2]["file"] + ".tmp")).write_bytes(b"partial")  # a crashed write
    _write(target, path, dtype)
    assert files[1].exists()
    assert all(f.stat().st_mtime_ns == before[f] for f in files if f != files[1])
    again = TargetCache(path)
    for i in range(len(ROWS)):
        assert torch.equal(again[i]["tap_hidden"], reference[i]["tap_hidden"])


def test_other_data_in_cache_dir_is_refused(target, tmp_path):
    _write(target, tmp_path / "c", "bfloat16")
    with pytest.raises(CacheError, match="another dtype"):
        _write(target, tmp_path / "c", "int8")
    _write(target, tmp_path / "c", "int8", overwrite=True)
    assert TargetCache(tmp_path / "c").manifest.dtype == "int8"


def test_a_cache_is_not_finished_by_a_target_in_another_dtype(target, tmp_path):
    import copy

    _write(target, tmp_path / "c", "bfloat16")
    assert TargetCache(tmp_path / "c").manifest.compute_dtype == "float32"
    bf16 = copy.copy(target)
    bf16.model = copy.deepcopy(target.model).to(torch.bfloat16)
    with pytest.raises(CacheError, match="another compute_dtype"):
        _write(bf16, tmp_path / "c", "bfloat16")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["compute_dtype"]  # a cache written before the key: resumed by any dtype, as before
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    _write(bf16, tmp_path / "c", "bfloat16")


def test_disk_check_stops_before_writing(target, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(CacheError, match=r"needs about .* but only 100.0 B is free"):
        _write(target, tmp_path / "c", "float32")
    assert not list((tmp_path / "c").glob("*.safetensors"))


def test_manifest_mismatch_and_incomplete_cache_are_refused(target, tmp_path):
    _write(target, tmp_path / "c", "float16")
    cache = TargetCache(tmp_path / "c")
    cache.check_compatible("tiny-random-llama", target.tap_layer_ids, target.hidden_size)  # matches
    with pytest.raises(CacheMismatchError, match=r"tap_layer_ids \[.*\] != \[0, 1\]"):
        cache.check_compatible("tiny-random-llama", [0, 1], target.hidden_size)
    with pytest.raises(CacheMismatchError, match="target 'tiny-random-llama' != 'other'.*hidden_size"):
        cache.check_compatible("other", target.tap_layer_ids, 99)
    dataclasses.replace(cache.manifest, complete=False).write(tmp_path / "c" / "manifest.json")
    with pytest.raises(CacheError, match="incomplete"):
        TargetCache(tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(dict(doc, format="dspark-target-cache/2")))
    with pytest.raises(CacheError, match=r"manifest.json is a target cache manifest of another version .*"
                                         r"rebuild the cache") as err:
        TargetCache(tmp_path / "c")
    assert "\n" not in str(err.value)
    with pytest.raises(CacheError, match="no target cache"):
        TargetCache(tmp_path / "missing")


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_worker_threads_write_the_same_cache(target, tmp_path, dtype):
    """workers > 1 runs the target over several batches at once; the shards are byte-identical."""
    from safetensors.torch import load_file

    one, two = _write(target, tmp_path / "w1", dtype), _write(target, tmp_path / "w2", dtype, workers=3)
    assert one.shards == two.shards
    for s in one.shards:
        a, b = load_file(tmp_path / "w1" / s["file"]), load_file(tmp_path / "w2" / s["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_shards_are_sized_in_bytes_and_read_back_identically(target, tmp_path, dtype):
    """A shard's payload stays within cache.shard_bytes (a row larger than that alone gets its own shard), and
    how rows are sharded never changes them (batch_tokens=1: one row per forward, so batching is the same)."""
    bpt = bytes_per_token(len(target.tap_layer_ids), target.hidden_size, dtype)
    kw = dict(target_id="tiny-random-llama", dataset_fingerprint="fp", batch_tokens=1)
    split = write_cache(target, ROWS, tmp_path / "split", dtype, shard_bytes=25 * bpt, **kw)
    whole = write_cache(target, ROWS, tmp_path / "whole", dtype, shard_bytes=1 << 40, **kw)
    assert len(whole.shards) == 1 and len(split.shards) > 2
    for s in split.shards:
        assert s["tokens"] * bpt <= 25 * bpt or s["row_end"] - s["row_start"] == 1
    a, b = TargetCache(tmp_path / "split"), TargetCache(tmp_path / "whole")
    for i in range(len(ROWS)):
        for name in ("tap_hidden", "final_hidden"):
            x, y = a.row(i, upcast=False)[name], b.row(i, upcast=False)[name]
            assert x.dtype == y.dtype and torch.equal(x, y), (i, name)


def test_shard_size_counts_the_width_of_each_token(target, tmp_path):
    """The same byte budget holds half the tokens in float32 as in bfloat16 (tokens alone ignore width)."""
    budget = 40 * bytes_per_token(len(target.tap_layer_ids), target.hidden_size, "bfloat16")
    kw = dict(target_id="tiny-random-llama", dataset_fingerprint="fp", shard_bytes=budget)
    wide = write_cache(target, ROWS, tmp_path / "f32", "float32", **kw)
    narrow = write_cache(target, ROWS, tmp_path / "bf16", "bfloat16", **kw)
    assert all(s["tokens"] <= 20 or s["row_end"] - s["row_start"] == 1 for s in wide.shards)
    assert all(s["tokens"] <= 40 or s["row_end"] - s["row_start"] == 1 for s in narrow.shards)
    assert len(wide.shards) > len(narrow.shards)


def test_each_batch_is_encoded_in_the_storage_dtype(target):
    """What reaches host memory per batch is already the storage dtype (no float32 shard is built)."""
    rows = ROWS[:3]
    width, k = max(map(len, rows)), len(target.tap_layer_ids)
    bf16 = cache_mod._forward_batch(target, rows, width, "bfloat16", k)
    assert bf16["tap_hidden"].dtype == torch.bfloat16 and bf16["tap_hidden"].shape[0] == sum(map(len, rows))
    int8 = cache_mod._forward_batch(target, rows, width, "int8", k)
    assert int8["tap_hidden"].dtype == torch.int8 and int8["tap_hidden_scale"].shape == (sum(map(len, rows)), k)


def test_a_cache_started_with_another_shard_layout_finishes_and_loads(target, tmp_path):
    """A cache written when shards were sized in tokens (an old manifest) is finished with its own layout
    under the byte-sized default, rewriting only the missing shard, and reads back unchanged."""
    path = tmp_path / "c"
    old = _write(target, path, "bfloat16")  # shard_tokens=25: four shards
    before = [TargetCache(path).row(i, upcast=False)["tap_hidden"] for i in range(len(ROWS))]
    os.remove(path / old.shards[1]["file"])
    again = write_cache(target, ROWS, path, "bfloat16", target_id="tiny-random-llama", dataset_fingerprint="fp")
    assert again.shards == old.shards
    cache = TargetCache(path)
    assert all(torch.equal(cache.row(i, upcast=False)["tap_hidden"], before[i]) for i in range(len(ROWS)))


def test_bad_shard_size_is_one_clear_error(target, tmp_path):
    with pytest.raises(CacheError, match="cache.shard_bytes must be >= 1"):
        write_cache(target, ROWS, tmp_path / "c", "bfloat16", shard_bytes=0)


def test_float16_clamp_of_a_bf16_batch_never_overflows():
    """Batches arrive in the target's dtype (bf16 on a GPU); a bf16 65536 must become fp16's max, not inf."""
    x = torch.tensor([[65536.0, -65536.0, 1.0, 2.0]], dtype=torch.bfloat16)
    out = cache_mod.encode("v", x, "float16", 1)["v"]
    assert torch.isfinite(out).all() and out[0, 0].item() == 65504.0
