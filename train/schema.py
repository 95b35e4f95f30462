"""Typed schema of ``python -m train`` (values live in conf/train.yaml and its groups).

Registered in Hydra's ConfigStore as ``train_schema``; the entry point converts the composed config into a
``TrainJob`` once, so no DictConfig travels further. Field comments state units and defaults' sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from dspark_model.arch import ARCHITECTURES
from dspark_model.config import DraftConfig, TargetSpec


@dataclass
class DataConfig:
    """Tokenized training data written by data_prep (``<path>/dataset``, ``<path>/manifest.json``)."""

    path: str | None = None  # None: data_prep's default output, runs/data/<prompts>-<target id tail>
    prompts: str = "demo"  # prompt set name used to derive the default path
    mode: str = "online"  # online: frozen target runs in the loop | offline: read <path>/cache (data_prep)
    max_length: int = 2048  # tokens per sequence; longer rows are truncated
    limit: int | None = None  # use only the first N rows
    # Data prepared for another target (id, revision or tokenizer in its manifest.json) is refused unless true.
    allow_target_mismatch: bool = False
    # Random (tiny) targets only, and only when asked (data=synthetic): sample rows from the target itself
    # instead of reading a data_prep folder. A missing data folder is an error otherwise.
    synthetic: bool = False
    synthetic_rows: int = 64
    synthetic_response_tokens: int = 48


@dataclass
class OptimConfig:
    """Optimisation, anchors, loss and checkpoint cadence (the `train` group)."""

    max_steps: int = 2000  # optimizer steps
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant (both after linear warm-up)
    weight_decay: float = 0.0  # applied to matrices only (not norms / biases)
    optimizer: str = "adamw"  # adamw | muon (Muon for the draft's hidden matrices, AdamW for the rest; train/optim.py)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables
    global_batch_size: int = 32  # sequences per optimizer step, all processes together
    micro_batch_size: int = 4  # sequences per forward, per process (accumulation makes up the rest)
    # Anchors: 512 per 4096 tokens in the reference; scaled with sequence length, then clamped.
    anchors_per_4096: float = 512.0
    min_anchors: int = 8
    max_anchors: int = 512
    # Loss (paper eq. 12): weights and the position decay gamma_w in w_k = exp(-(k-1)/gamma_w).
    # The paper's text sets gamma_w = block size; the public reference code uses 4 (our default).
    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    position_decay: float = 4.0
    # draft=eagle3 only: its loss is sum_k w_k * mean KL of unrolled step k with w_k = eagle3_step_weight^k
    # (EAGLE-3's public trainers: 0.8); position_decay and alpha_* apply to DSpark / DFlash drafts.
    eagle3_step_weight: float = 0.8
    logits_chunk_size: int = 2048  # block positions whose full-vocab logits are alive at once (<= 0: no chunks)
    recompute_chunks: bool = True  # checkpoint each chunk: recompute its logits in backward instead of storing
    # Std of Gaussian noise added to the tapped target states while training, relative to each state's RMS
    # (a regulariser against the draft leaning on exact features; 0 = off).
    feature_noise: float = 0.0
    # auto (bf16 on GPU, fp32 on CPU) | native (bf16 also on CPUs with AMX / AVX512-BF16) | fp32 | bf16 (autocast)
    precision: str = "auto"
    # Draft training attention: auto (flex_attention with a block mask on CUDA, dense-mask SDPA elsewhere) |
    # sdpa | flex. Both apply the same mask; flex skips masked-out tiles and never materialises the mask.
    attention: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 1  # steps between metric records
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept on disk
    resume: str = "auto"  # auto (newest checkpoint in output_dir, if any) | never | /path/to/step-dir
    output_dir: str | None = None  # None: Hydra's run dir (runs/train/<target>)
    # Print the per-process peak memory of this config (train/memory.py: real modules on fake tensors, no weights
    # loaded) and exit without training; estimate_processes: the world size to shard over (None = WORLD_SIZE or 1).
    estimate_memory: bool = False
    estimate_processes: int | None = None


@dataclass
class DeepSpeedConfig:
    """`stage: none` trains plainly (one process, or DDP under torchrun); 2 / 3 use DeepSpeed ZeRO."""

    stage: str = "none"  # none | 2 | 3
    config: dict[str, Any] = field(default_factory=dict)  # a DeepSpeed JSON config; "auto" values are filled in


@dataclass
class LoggerConfig:
    """Metric sinks. A JSONL file is always written; the others are optional and never stop training."""

    tensorboard: bool = True
    wandb: bool = False  # off by default; silently off when wandb is not installed
    wandb_project: str = "dspark"
    wandb_mode: str | None = None  # online | offline | disabled; None = wandb's own default (WANDB_MODE)
    wandb_run_name: str | None = None
    progress_bar: bool = True


@dataclass
class TrainJob:
    target: TargetSpec = field(default_factory=TargetSpec)
    draft: DraftConfig = field(default_factory=DraftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


class TrainConfigError(ValueError):
    """A training setting that cannot work; the message names the field and the fix."""


def validate(job: TrainJob) -> None:
    """Cheap checks that fail before any model is loaded."""
    t, d = job.train, job.draft
    checks = [
        (job.data.mode in ("online", "offline"), f"data.mode must be online or offline, got {job.data.mode!r}"),
        (not (job.data.synthetic and job.data.path), "data.synthetic=true samples rows from the target and "
         "reads no data folder: drop data.path, or drop data.synthetic to train on data_prep output"),
        (math.isfinite(t.lr) and t.lr > 0, f"train.lr must be a positive number, got {t.lr}"),
        (d.block_size >= 1, f"draft.block_size must be >= 1 (anchor + mask slots), got {d.block_size}"),
        (d.num_layers >= 1, f"draft.num_layers must be >= 1, got {d.num_layers}"),
        (str(job.deepspeed.stage) in ("none", "2", "3"),
         f"deepspeed.stage must be none, 2 or 3, got {job.deepspeed.stage!r}"),
        (t.precision in ("auto", "native", "fp32", "bf16"),
         f"train.precision must be auto|native|fp32|bf16, got {t.precision!r}"),
        (t.attention in ("auto", "sdpa", "flex"),
         f"train.attention must be auto|sdpa|flex, got {t.attention!r}"),
        (t.schedule in ("cosine", "constant"), f"train.schedule must be cosine|constant, got {t.schedule!r}"),
        (t.optimizer in ("adamw", "muon"), f"train.optimizer must be adamw|muon, got {t.optimizer!r}"),
        (t.optimizer == "adamw" or str(job.deepspeed.stage) == "none",
         "train.optimizer=muon is not supported with DeepSpeed ZeRO; use train.optimizer=adamw or deepspeed=none"),
        (t.feature_noise >= 0, f"train.feature_noise must be >= 0, got {t.feature_noise}"),
        (t.micro_batch_size >= 1 and t.global_batch_size >= 1, "train.*_batch_size must be >= 1"),
        (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
        (1 <= t.min_anchors <= t.max_anchors, "need 1 <= train.min_anchors <= train.max_anchors"),
        (t.position_decay > 0, "train.position_decay must be > 0"),
        (d.architecture in ARCHITECTURES, f"draft.architecture must be one of {ARCHITECTURES}, got "
                                          f"{d.architecture!r}"),
        (d.architecture != "eagle3" or d.num_layers == 1, "draft=eagle3 has one decoder layer: draft.num_layers=1"),
        (0 < t.eagle3_step_weight <= 1, f"train.eagle3_step_weight must be in (0, 1], got {t.eagle3_step_weight}"),
        (t.save_every >= 1 and t.keep_last >= 1, "train.save_every and train.keep_last must be >= 1"),
        (t.estimate_processes is None or t.estimate_processes >= 1, "train.estimate_processes must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainConfigError(message)


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainJob)


register()
