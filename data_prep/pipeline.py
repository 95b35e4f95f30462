"""The data_prep stage end to end: prompts -> regenerated conversations -> tokenized dataset -> cache.

``run(cfg)`` is what ``python -m data_prep`` calls; every step is resumable (see generate.py, cache.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from pathlib import Path

from data_prep.chat import stop_token_ids, template_sha256, tokenize_records, tokenizer_sha256
from data_prep.errors import DataPrepError, TemplateError
from data_prep.generate import ChatClient, drop_long_prompts, generate_local, generate_openai, prompt_sha
from data_prep.manifest import DataManifest
from data_prep.schema import DataPrepConfig, validate
from data_prep.sources import load_prompts
from data_prep.store import (
    GenerationLog,
    check_settings,
    dataset_fingerprint,
    default_data_dir,
    save_token_counts,
    save_tokenized,
)
from dspark_model.chat_template import is_plain, template_source
from dspark_model.output_lock import output_lock
from dspark_model.redact import redact_url
from dspark_model.target import dtype_name

log = logging.getLogger(__name__)

TRUNCATION_POLICY = ("a row longer than max_length keeps its answers: the start of the text before the first "
                     "answer is cut (prompt_cut); if an empty prompt still does not fit, the row's end is cut "
                     "(truncated); a row keeping fewer than min_loss_tokens answer tokens is dropped (too_long)")


def resolve_out_dir(cfg: DataPrepConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path("runs") / "data" / cfg.name if cfg.name else default_data_dir(cfg.prompts.name, cfg.target.id)


def chat_kwargs(cfg: DataPrepConfig) -> dict:
    kwargs = dict(cfg.target.chat_template_kwargs or {})
    kwargs.update(cfg.chat_template_kwargs or {})
    if cfg.thinking is not None:
        kwargs["enable_thinking"] = cfg.thinking
    return kwargs


def target_spec(cfg: DataPrepConfig):
    """The target as configured, with the stage's ``chat_template`` (if set) over the target's own."""
    if cfg.chat_template is None:
        return cfg.target
    return dataclasses.replace(cfg.target, chat_template=cfg.chat_template)


def sampling_settings(cfg: DataPrepConfig) -> dict:
    """What decides each generated token, as applied (recorded in generation_settings.json and the manifest)."""
    g = cfg.generation
    sample = g.temperature > 0
    out = {"decoding": "sample" if sample else "greedy", "temperature": g.temperature,
           "top_p": g.top_p if sample else None}
    if g.backend == "local":  # data_prep/decode.py applies these and nothing else
        out.update(top_k=None, repetition_penalty=None, model_generation_config="not applied")
    else:
        out["unspecified"] = "the server's defaults"
    return out


def generation_settings(cfg: DataPrepConfig, tokenizer, kwargs: dict, target=None) -> dict:
    g = cfg.generation
    settings = {"backend": g.backend, "target_id": cfg.target.id, "target_revision": cfg.target.revision,
                "chat_template_sha256": template_sha256(tokenizer), "chat_template_kwargs": kwargs,
                "chat_template": template_source(target_spec(cfg).chat_template),
                "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                "sampling": sampling_settings(cfg), "seed": cfg.seed}
    if g.backend == "local":
        settings.update(batch_size=g.batch_size, max_batch_tokens=g.max_batch_tokens,
                        target_dtype=dtype_name(target.dtype))  # the local backend always loads the target
    else:
        settings["model"] = g.model or cfg.target.id
    return settings


def _generate(cfg, prompts, lengths, target, tokenizer, out_dir: Path, kwargs, stop_ids) -> dict[str, dict]:
    """Resume from the log, generate what is missing; returns row_id -> record for ``prompts``."""
    g = cfg.generation
    glog = GenerationLog(out_dir / "generations.jsonl")
    by_id = {p.row_id: p for p in prompts}
    done = {rid: rec for rid, rec in glog.load().items()
            if rid in by_id and rec.get("prompt_sha") == prompt_sha(by_id[rid])}
    start = time.perf_counter()
    if g.backend == "local":
        tokens = generate_local(prompts, lengths, target.model, tokenizer, glog, done, stop_ids, g.batch_size,
                                g.max_new_tokens, g.temperature, g.top_p, cfg.seed, kwargs, g.max_batch_tokens,
                                cfg.workers)
    elif g.backend == "openai":
        key = os.environ.get(g.api_key_env) if g.api_key_env else None
        client = ChatClient(g.base_url, g.model or cfg.target.id, g.timeout_s, g.max_retries, g.backoff_s, key,
                            {"chat_template_kwargs": kwargs} if kwargs else None)
        try:
            tokens = generate_openai(prompts, client, glog, done, g.concurrency, g.max_new_tokens,
                                     g.temperature, g.top_p, cfg.seed)
        finally:
            client.close()
    else:
        raise DataPrepError(f"generation.backend={g.backend!r} is unknown; choose local or openai")
    elapsed = time.perf_counter() - start
    if tokens:
        log.info("generated %d tokens in %.1f s (%.1f tokens/s)", tokens, elapsed, tokens / max(elapsed, 1e-9))
    return done


def _manifest(cfg, out_dir, prompt_set, skipped, settings, records, cols, stats, tokenizer,
              counts) -> DataManifest:
    dropped = {k: stats[k] for k in ("too_long", "too_few_loss_tokens") if stats[k]}
    return DataManifest(
        name=out_dir.name,
        target={"id": cfg.target.id, "revision": cfg.target.revision, "path": cfg.target.path,
                "chat_template_sha256": template_sha256(tokenizer), "tokenizer_sha256": tokenizer_sha256(tokenizer)},
        sources=prompt_set.sources, prompts_config=cfg.prompts.name,
        generation={**settings, "base_url": redact_url(cfg.generation.base_url)
                    if cfg.generation.backend == "openai" else None},
        max_length=cfg.max_length, min_loss_tokens=cfg.min_loss_tokens, truncation_policy=TRUNCATION_POLICY,
        counts={"prompts": len(prompt_set.prompts), "skipped": dict(skipped), "generated": len(records),
                "rows": len(cols["row_id"]), "prompt_cut": stats["prompt_cut"], "truncated": stats["truncated"],
                "dropped": dropped},
        tokens={"total": sum(map(len, cols["input_ids"])), "loss": sum(map(sum, cols["loss_mask"])),
                "generated": sum(sum(r["num_tokens"]) for r in records)},
        fingerprint=dataset_fingerprint(cols), token_counts=counts)


def run(cfg: DataPrepConfig) -> DataManifest:
    """Run the stage, holding ``out_dir`` locked; returns the manifest written to ``<out_dir>/manifest.json``."""
    validate(cfg)
    out_dir = resolve_out_dir(cfg)
    with output_lock(out_dir, "data_prep", "out_dir=<another folder> or name=<another name>"):
        return _run(cfg, out_dir)


def _run(cfg: DataPrepConfig, out_dir: Path) -> DataManifest:
    kwargs = chat_kwargs(cfg)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    sources = cfg.prompts.sources
    target = tokenizer = None
    if any(src.synthesize for src in sources):  # the target writes these prompts first (data_prep/synthesize.py)
        target, tokenizer = _load(cfg)
        sources = _synthesize(cfg, sources, target, tokenizer, out_dir, kwargs)
    prompt_set = load_prompts(sources, strict=cfg.strict, seed=cfg.seed,
                              max_chars=cfg.max_prompt_chars, num_prompts=cfg.num_prompts)
    if tokenizer is None:
        target, tokenizer = _load(cfg)
    prompts, lengths, n_long = drop_long_prompts(prompt_set.prompts, tokenizer, cfg.max_length, kwargs,
                                                 cfg.strict)
    skipped = Counter(prompt_set.skipped)
    skipped.update({"too_long": n_long} if n_long else {})
    if not prompts:
        raise DataPrepError(f"no prompt fits in max_length={cfg.max_length} tokens; raise max_length")
    settings = generation_settings(cfg, tokenizer, kwargs, target)
    check_settings(out_dir, settings, cfg.overwrite)
    stop_ids = stop_token_ids(tokenizer, getattr(target.model, "generation_config", None) if target else None)
    done = _generate(cfg, prompts, lengths, target, tokenizer, out_dir, kwargs, stop_ids)
    records = [done[p.row_id] for p in prompts]
    cols, stats = tokenize_records(records, tokenizer, stop_ids, cfg.max_length, kwargs, cfg.min_loss_tokens)
    if not cols["row_id"]:
        raise DataPrepError("every generated conversation was dropped by tokenization (see counts); raise "
                            "max_length or generation.max_new_tokens")
    vocab_size = target.vocab_size if target is not None else len(tokenizer)
    counts = save_token_counts(out_dir, cols["input_ids"], cols["loss_mask"], vocab_size)
    manifest = _manifest(cfg, out_dir, prompt_set, skipped, settings, records, cols, stats, tokenizer, counts)
    save_tokenized(out_dir, cols, manifest)
    if cfg.cache.enabled:
        manifest.cache = _write_cache(cfg, target, cols, manifest, out_dir)
        manifest.write(out_dir / "manifest.json")
    _summary(out_dir, manifest)
    return manifest


def _synthesize(cfg: DataPrepConfig, sources, target, tokenizer, out_dir: Path, kwargs: dict) -> list:
    from data_prep.synthesize import synthesize_source

    stop_ids = stop_token_ids(tokenizer, getattr(target.model, "generation_config", None))
    return [synthesize_source(src, target.model, tokenizer, stop_ids, out_dir, cfg.seed, kwargs, cfg.target.id,
                              cfg.overwrite, cfg.workers) if src.synthesize else src for src in sources]


def _load(cfg: DataPrepConfig):
    """(target or None, tokenizer): the target is loaded when it generates or fills the cache."""
    import torch

    from dspark_model.chat_template import ChatTemplateError
    from dspark_model.target import cpu_has_native_bf16, load_target, load_tokenizer, resolve_device

    spec = target_spec(cfg)
    if cfg.generation.backend == "openai" and is_plain(spec.chat_template):
        raise DataPrepError("chat_template=plain needs generation.backend=local: an OpenAI-compatible chat "
                            "server always applies its own chat template")
    try:
        if cfg.generation.backend == "local" or cfg.cache.enabled:
            target = load_target(spec, resolve_device(cfg.device, "device", DataPrepError))
            if target.device.type == "cpu" and target.dtype == torch.float32 and cpu_has_native_bf16():
                log.info("this CPU computes in bf16 natively (AMX / AVX512-BF16): target.dtype=bfloat16 generates "
                         "~1.2x and fills the target cache ~4x faster than float32 on such a CPU "
                         "(benchmarks/results/data_prep.json)")
            return target, target.tokenizer
        return None, load_tokenizer(spec)
    except ChatTemplateError as exc:
        raise TemplateError(str(exc)) from None


def _write_cache(cfg: DataPrepConfig, target, cols, manifest: DataManifest, out_dir: Path) -> dict:
    from data_prep.cache import write_cache

    c = cfg.cache
    cache_dir = Path(c.dir) if c.dir else out_dir / "cache"
    cm = write_cache(target, cols["input_ids"], cache_dir, c.dtype, cfg.target.id, cfg.target.revision,
                     manifest.fingerprint, shard_bytes=c.shard_bytes, shard_tokens=c.shard_tokens,
                     batch_tokens=c.batch_tokens, overwrite=c.overwrite, workers=cfg.workers)
    return {"dir": str(cache_dir), "dtype": c.dtype, "bytes_per_token": cm.bytes_per_token,
            "shards": len(cm.shards)}


def _summary(out_dir: Path, m: DataManifest) -> None:
    c, t = m.counts, m.tokens
    log.info("data_prep done: %d rows (%d tokens, %d assistant) from %d prompts -> %s", c["rows"], t["total"],
             t["loss"], c["prompts"], out_dir)
    log.info("skipped prompts: %s; rows with a cut prompt: %d; rows with a cut end: %d; dropped rows: %s",
             c["skipped"] or "none", c["prompt_cut"], c["truncated"], c["dropped"] or "none")
    log.info("fingerprint %s", m.fingerprint)
