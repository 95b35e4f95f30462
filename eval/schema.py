"""Typed configuration of the eval stage (``python -m eval``), registered in Hydra's ConfigStore.

Values live in ``conf/eval.yaml`` and the groups it composes: ``target`` (optional: by default the target
the draft checkpoint names, loaded from local files without remote code), ``draft@draft_config`` (architecture of a ``draft=random`` draft only) and
``prompts`` (named lists of prompt sources, the same group data_prep reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from data_prep.sources import PromptsConfig
from dspark_model.config import DraftConfig, TargetSpec


class EvalConfigError(ValueError):
    """Bad eval input; the message names the problem and the fix (the CLI prints it and exits 2)."""


@dataclass
class BaselineConfig:
    generate: bool = True  # plain target.model.generate
    prompt_lookup: bool = True  # transformers prompt-lookup decoding
    prompt_lookup_num_tokens: int = 10
    prompt_lookup_max_ngram: int = 2


@dataclass
class CalibrationConfig:
    """Confidence calibration + SPS profile (only for drafts with a confidence head)."""

    enabled: bool = True
    write_to_checkpoint: bool = True  # copy calibration.json beside the draft checkpoint
    n_bins: int = 15
    calib_fraction: float = 0.5
    sps_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    sps_context_len: int = 128
    sps_warmup: int = 1
    sps_repeats: int = 3


@dataclass
class SchedulerLiveConfig:
    """Algorithm 1 run live (eval/live.py): N concurrent requests decoded together, one packed target forward
    per round, Algorithm 1 vs every fixed verification length 1..gamma. Off by default: it decodes
    len(requests) x (gamma + 1) batches. Needs a confidence head and a calibration (this eval's, or the
    calibration.json beside the checkpoint)."""

    enabled: bool = False
    requests: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # concurrent requests N
    num_prompts: int | None = None  # distinct prompts, round-robin over datasets; None = max(requests)
    max_new_tokens: int | None = None  # per request; None = the eval's max_new_tokens
    repeats: int = 2  # timed runs per (N, policy), medians; >= 2: best fixed length also picked on held-out repeats
    # N x requests_per_slot requests per run, at most N at a time: a waiting one takes a finished one's place
    # (as on a server); 1 = one closed batch of N, which drains while its slowest request finishes
    requests_per_slot: int = 2
    # at least this many requests per run (0 = N x requests_per_slot only): small N otherwise times only a
    # handful of requests, which a few slow rounds can swing by several percent
    min_requests: int = 0
    check_greedy: bool = True  # at T = 0, every request's output must equal plain greedy generate
    # Algorithm 1's costs, profiled per N in the packed layout the live loop runs (eval/live_cost.py):
    profile_warmup: int = 1  # untimed calls per batch size
    profile_repeats: int = 5  # timed calls per batch size (median)
    # true: each round's drafting time (profiled) is part of the objective, tau* / (D(R) + 1/SPS(B));
    # false: the paper's tau* x SPS(B)
    draft_cost: bool = True


@dataclass
class GammaTuningConfig:
    """Choose gamma for this draft on this machine before timing (eval/gamma_tuning.py): an untimed pilot at
    the full length on prompts outside the timed set gives the acceptance profile, the calls of one round are
    timed per length, and the length with the most expected tokens per second is used. The calibration fitted
    at a shorter length stays in the eval folder (never written to the checkpoint)."""

    enabled: bool = False
    pilot_prompts: int = 3  # per source, beyond the num_prompts timed ones
    profile_repeats: int = 15  # timed calls per length (median), every length and kernel alternated


@dataclass
class EvalConfig:
    # `draft=<checkpoint dir>` on the command line (Hydra reserves the name `draft` for the architecture
    # group, so the entry point renames it to this field). "random" builds an untrained draft from
    # `draft_config` for the target given by `target=` (smoke tests).
    draft_checkpoint: str = "???"
    target: TargetSpec | None = None  # None: the target the checkpoint names, from local files, no remote code
    draft_config: DraftConfig = field(default_factory=DraftConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # conf/prompts/<name>.yaml
    name: str | None = None  # output folder name under runs/eval (default: derived from the draft)
    out_dir: str | None = None  # overrides runs/eval/<name>
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: int | None = None  # torch intra-op threads (None = torch's default)
    # CPU, float32 target: pack its GEMM weights once for the gamma + 1 rows of a verification forward
    # (dspark_model/prepack.py; one more copy of the weights in memory), kept where both kernels, timed on the
    # first prompt, measured the packed one faster (for 2-3 rows it is not, on SmolLM2). Other row counts,
    # plain decoding's one-token step included, run the kernels they ran before. false: never pack.
    prepack_gemm: bool = True
    temperature: float = 0.0  # 0 = greedy
    gamma: int | None = None  # tokens drafted per round; None = the draft's trained block size
    max_new_tokens: int = 128
    num_prompts: int | None = 8  # per prompt source (dataset); None = all
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # merged over the target's
    warmup: bool = True  # run the first prompt once untimed before timing
    save_rounds: bool = True  # rounds.jsonl for calibration / scheduling
    progress: bool = True
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    scheduler_live: SchedulerLiveConfig = field(default_factory=SchedulerLiveConfig)
    gamma_tuning: GammaTuningConfig = field(default_factory=GammaTuningConfig)
    # The target must be the one the checkpoint records (id, revision, weights fingerprint); true: warn only.
    allow_target_mismatch: bool = False


def validate(cfg: EvalConfig) -> None:
    """Cheap checks before any model is loaded (gamma's upper bound needs the draft: checked in run)."""
    checks = [
        (cfg.gamma is None or cfg.gamma >= 1, f"gamma={cfg.gamma} must be >= 1 (draft tokens per round); "
         f"leave it unset for the draft's trained block size"),
        (math.isfinite(cfg.temperature) and cfg.temperature >= 0,
         f"temperature={cfg.temperature} must be >= 0 (0 = greedy)"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens={cfg.max_new_tokens} must be >= 1"),
        (cfg.num_prompts is None or cfg.num_prompts >= 1, f"num_prompts={cfg.num_prompts} must be >= 1 or null"),
    ]
    tuning = cfg.gamma_tuning
    if tuning.enabled:
        checks += [
            (cfg.num_prompts is not None, "gamma_tuning.enabled=true pilots on prompts outside the timed set, but "
             "num_prompts=null times every prompt: set num_prompts=<n>"),
            (tuning.pilot_prompts >= 1, f"gamma_tuning.pilot_prompts={tuning.pilot_prompts} must be >= 1"),
            (tuning.profile_repeats >= 1, f"gamma_tuning.profile_repeats={tuning.profile_repeats} must be >= 1"),
            (not cfg.scheduler_live.enabled, "gamma_tuning picks one length for batch-1 decoding, while "
             "scheduler_live compares Algorithm 1 with every length itself: enable one of them per eval"),
        ]
    live = cfg.scheduler_live
    if live.enabled:
        checks += [
            (bool(live.requests) and min(live.requests) >= 1,
             f"scheduler_live.requests={live.requests} must be a non-empty list of counts >= 1"),
            (live.num_prompts is None or live.num_prompts >= 1,
             f"scheduler_live.num_prompts={live.num_prompts} must be >= 1 or null"),
            (live.max_new_tokens is None or live.max_new_tokens >= 1,
             f"scheduler_live.max_new_tokens={live.max_new_tokens} must be >= 1 or null"),
            (live.repeats >= 1, f"scheduler_live.repeats={live.repeats} must be >= 1"),
            (live.requests_per_slot >= 1, f"scheduler_live.requests_per_slot={live.requests_per_slot} must be >= 1"),
            (live.min_requests >= 0, f"scheduler_live.min_requests={live.min_requests} must be >= 0"),
            (live.profile_repeats >= 1 and live.profile_warmup >= 0,
             "scheduler_live.profile_repeats must be >= 1 and scheduler_live.profile_warmup >= 0"),
        ]
    for ok, message in checks:
        if not ok:
            raise EvalConfigError(message)


def register() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


register()
