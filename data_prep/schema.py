"""Typed configuration of the data_prep stage, registered in Hydra's ConfigStore as ``data_prep_schema``.

Values live in ``conf/data_prep.yaml`` and the ``target`` / ``prompts`` groups; the entry point converts
the composed config to these dataclasses once, so no DictConfig travels further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from data_prep.sources import PromptsConfig
from dspark_model.config import TargetSpec


@dataclass
class GenerationConfig:
    """How the target regenerates responses."""

    backend: str = "local"  # local (transformers generate) | openai (OpenAI-compatible server)
    max_new_tokens: int = 256  # per assistant turn
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 64  # local: prompts decoded together (sorted by length); benchmarks/data_prep_throughput.py
    max_batch_tokens: int = 32768  # local: rows x (longest prompt + max_new_tokens) per batch (KV-cache memory)
    # openai backend
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # served model name; None = target.id
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the key, if the server needs one
    concurrency: int = 8  # requests in flight
    max_retries: int = 4  # per request, exponential backoff from backoff_s
    backoff_s: float = 1.0
    timeout_s: float = 120.0


@dataclass
class CacheConfig:
    """Optional offline target cache (hidden states for training without the target)."""

    enabled: bool = False
    # float32 | bfloat16 | float16 | float8 (e4m3, per-shard scales: 0.5x bf16) | int8 (per-row scales:
    # slightly over 0.5x bf16, kept for existing caches)
    dtype: str = "bfloat16"
    dir: str | None = None  # None = <out_dir>/cache
    # Payload bytes per shard file; a shard is held once in host memory, in the storage dtype, while written
    # (float8: in the target's dtype until its per-shard scales are known). data_prep/cache.py.
    shard_bytes: int = 2 << 30
    shard_tokens: int | None = None  # optional cap on tokens per shard as well (None = bytes only)
    batch_tokens: int = 8192  # padded tokens per target forward
    overwrite: bool = False


@dataclass
class DataPrepConfig:
    target: TargetSpec = field(default_factory=TargetSpec)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    name: str | None = None  # output name; None = <prompts.name>-<target id's last part>
    out_dir: str | None = None  # None = runs/data/<name>
    num_prompts: int | None = None  # seeded subset of all prompts (a larger value extends a smaller one)
    seed: int = 0
    strict: bool = False  # fail on the first bad row instead of skipping it
    max_length: int = 2048  # tokens per training row (truncation policy in data_prep/chat.py)
    min_loss_tokens: int = 2  # rows with fewer assistant tokens are dropped
    max_prompt_chars: int | None = 32000  # longer prompts are skipped as too_long
    chat_template: str | None = None  # over target.chat_template: a file, Jinja text, or "plain" (no template)
    chat_template_kwargs: dict[str, Any] | None = None  # merged over target.chat_template_kwargs
    thinking: bool | None = None  # shortcut for chat_template_kwargs.enable_thinking
    device: str = "auto"  # auto = cuda if available, else cpu
    num_threads: int | None = 1  # torch CPU threads; None = torch's default (all cores: for an idle machine)
    # Local target forwards (generation batches, cache batches) run this many at once on threads: with
    # num_threads=1, one core each (the matrix work releases the GIL). Outputs do not depend on it.
    workers: int = 2
    overwrite: bool = False  # discard generations of an earlier run in out_dir


def validate(cfg: DataPrepConfig) -> None:
    """Cheap checks before anything is loaded; raises DataPrepError naming the field."""
    from data_prep.errors import DataPrepError
    from dspark_model.chat_template import is_plain

    g = cfg.generation
    checks = [
        (math.isfinite(g.temperature) and g.temperature >= 0,
         f"generation.temperature must be >= 0 (0 = greedy), got {g.temperature}"),
        (0 < g.top_p <= 1, f"generation.top_p must lie in (0, 1], got {g.top_p}"),
        (g.max_new_tokens >= 1, f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}"),
        (g.batch_size >= 1 and g.concurrency >= 1, "generation.batch_size and generation.concurrency must be >= 1"),
        (cfg.workers >= 1, f"workers must be >= 1, got {cfg.workers}"),
    ]
    for src in cfg.prompts.sources:
        if src.synthesize is None:
            continue
        where = f"synthesized prompt source {src.name or '<unnamed>'!r}"
        checks += [
            (src.name is not None, "a synthesized prompt source (synthesize: N) needs a name"),
            (not (src.path or src.hf_name), f"{where} also sets path / hf_name; keep one of the three"),
            (src.synthesize >= 1, f"{where}: synthesize must be >= 1, got {src.synthesize}"),
            (math.isfinite(src.synthesize_temperature) and src.synthesize_temperature > 0,
             f"{where}: synthesize_temperature must be > 0 (greedy would write the same prompt every time)"),
            (0 < src.synthesize_top_p <= 1, f"{where}: synthesize_top_p must lie in (0, 1]"),
            (src.synthesize_max_tokens >= 1 and src.synthesize_batch_size >= 1,
             f"{where}: synthesize_max_tokens and synthesize_batch_size must be >= 1"),
            (g.backend == "local", f"{where} needs generation.backend=local: a chat server cannot continue the "
                                   f"raw opening of a user turn"),
            (not is_plain(cfg.chat_template if cfg.chat_template is not None else cfg.target.chat_template),
             f"{where} needs a chat template: with chat_template=plain there is no user turn to open"),
        ]
    for ok, message in checks:
        if not ok:
            raise DataPrepError(message)


def register() -> None:
    ConfigStore.instance().store(name="data_prep_schema", node=DataPrepConfig)
