"""The training loop: ``train(job)`` builds everything, then ``train_step`` runs one optimizer step.

One step: for each of this process's micro-batches, the frozen target gives tapped + final hidden states
(online, no grad) or the cache does (offline); anchors are sampled per row; the draft (wrapped with its
loss in ``DraftObjective`` so DDP / DeepSpeed see one forward) returns the loss; gradients accumulate to
the global batch; then clip, AdamW step, LR schedule step. Metrics are averaged over micro-batches and
processes. Checkpoints every ``save_every`` steps and at the end; the final draft goes to
``<output_dir>/final`` with ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_prep.store import default_data_dir
from dspark_model.atomic import atomic_write_text
from dspark_model.block_attention import flex_available
from dspark_model.draft import build_draft_for, count_parameters
from dspark_model.output_lock import output_lock
from dspark_model.target import cpu_has_native_bf16, load_target, resolve_device, resolve_weights
from dspark_model.vocab import answer_token_counts, top_k_vocab
from train import checkpointing, distributed
from train.anchors import batch_anchors, slot_mask
from train.data import (
    Batch,
    DataError,
    StepSampler,
    TrainData,
    check_data_target,
    collate,
    load_data_dir,
    micro_batches,
    open_cache,
    synthesize,
)
from train.loss import LossWeights, draft_loss
from train.metrics_log import MetricsLogger, NullLogger
from train.optim import make_optimizer
from train.prefetch import Prefetcher
from train.schema import TrainConfigError, TrainJob, validate
from train.teacher import TeacherMemo

log = logging.getLogger(__name__)


def noisy_taps(tap_hidden: torch.Tensor, std: float, num_taps: int) -> torch.Tensor:
    """(B, T, n*d) tapped states plus Gaussian noise of ``std`` times each state's own RMS (per tap and
    position: SmolLM2's deep taps carry values of ~1e4 where shallow ones are ~1, so one absolute scale fails)."""
    x = tap_hidden.float().unflatten(-1, (num_taps, -1))  # (B, T, n, d)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    return (x + std * rms * torch.randn_like(x)).flatten(-2).to(tap_hidden.dtype)


class DraftObjective(nn.Module):
    """The draft and its loss as one module: (target states, ids, anchors, mask) -> (loss, metrics)."""

    def __init__(self, draft, weights: LossWeights, chunk_size: int, recompute: bool, feature_noise: float = 0.0,
                 attention: str = "sdpa"):
        super().__init__()
        self.draft, self.weights, self.chunk_size, self.recompute = draft, weights, chunk_size, recompute
        self.feature_noise, self.attention = feature_noise, attention

    def forward(self, tap_hidden, final_hidden, input_ids, anchors, mask, teacher_lse=None, teacher_argmax=None,
                loss_mask=None):  # loss_mask: read by the EAGLE-3 objective only
        if self.training and self.feature_noise > 0:
            tap_hidden = noisy_taps(tap_hidden, self.feature_noise, len(self.draft.tap_layer_ids))
        h = self.draft.forward_train(tap_hidden, input_ids, anchors, self.attention)  # (B, A, G, d)
        return draft_loss(self.draft, self.draft.target, h, final_hidden, input_ids, anchors, mask,
                          self.weights, self.chunk_size, self.recompute, teacher_lse, teacher_argmax)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_path(job: TrainJob) -> Path | None:
    """The data folder to read, or None when rows are to be sampled from a random target (data.synthetic,
    asked for explicitly). Checked before any model is loaded so that missing data fails fast."""
    d = job.data
    if d.synthetic:
        if job.target.random is None or d.mode != "online":
            raise DataError("data.synthetic=true samples rows from a random target in online mode only; "
                            "prepare data for this target with `python -m data_prep` and set data.path")
        return None
    path = Path(d.path) if d.path else default_data_dir(d.prompts, job.target.id)
    if (path / "manifest.json").is_file():
        return path
    tiny = " (or sample rows from a random target with data=synthetic)" if job.target.random is not None else ""
    raise DataError(f"no training data at {path} (manifest.json missing); prepare it with "
                    f"`python -m data_prep target=<same target>` or set data.path=<data_prep output dir>{tiny}")


def load_data(job: TrainJob, target, path: Path | None) -> TrainData:
    """data_prep output (online / offline), or sampled rows from a random target (data.synthetic)."""
    d = job.data
    if path is None:
        return synthesize(target, d.synthetic_rows, d.synthetic_response_tokens, job.train.seed)
    data = load_data_dir(path, d.max_length, d.limit)
    check_data_target(data.manifest, path, job.target, target, d.allow_target_mismatch)
    if d.mode == "offline":
        open_cache(data, path / "cache", target, job.target.id)
    return data


def uses_bf16(device: torch.device, precision: str) -> bool:
    """train.precision -> bf16 autocast or not. auto: on GPUs only; native: on GPUs and on CPUs with native
    bf16 (the measured-faster choice on such a CPU); bf16 / fp32: always / never."""
    if precision == "native":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def attention_kernel(device: torch.device, choice: str) -> str:
    """train.attention -> the draft's training attention kernel. auto: flex_attention where it can train
    (CUDA with Triton), else SDPA with a dense mask; sdpa / flex: forced (flex fails here if it cannot run)."""
    if choice == "sdpa":
        return "sdpa"
    why_not = flex_available(device)
    if choice == "flex" and why_not:
        raise TrainConfigError(f"train.attention=flex cannot train on {device}: {why_not}; "
                               "use train.attention=auto or sdpa")
    if why_not and device.type == "cuda":
        log.warning("train.attention=auto: dense SDPA instead of flex_attention (%s)", why_not)
    return "sdpa" if why_not else "flex"


def _autocast(device: torch.device, precision: str):
    bf16 = uses_bf16(device, precision)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def step_inputs(data: TrainData, sampler: StepSampler, lengths: list[int], rt, t, pad_id: int, start: int):
    """(epoch, this process's collated micro-batches) of every step from ``start`` on, in order."""
    for step in range(start, t.max_steps):
        epoch, rows = sampler.rows(step)
        batches = micro_batches(rows, lengths, t.micro_batch_size, rt.world, rt.rank)
        yield epoch, [collate(data, indices, pad_id, pin=rt.device.type == "cuda") for indices in batches]


def train_step(model, optimizer, scheduler, target, data: TrainData, batches: list[Batch], epoch: int,
               rt, job: TrainJob, block_size: int, memo: TeacherMemo | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step over this process's micro-batches; returns summed metrics (and a count).
    ``memo`` (reduced draft vocabulary): the target's per-row log-normalisers, computed at first visit."""
    t, acc = job.train, rt.accelerator
    totals: dict[str, torch.Tensor] = {}
    copy = {"device": rt.device, "non_blocking": True}
    for b in batches:
        indices = b.indices
        ids, lm = b.input_ids.to(**copy), b.loss_mask.to(**copy)  # (B, T)
        anchors, valid = batch_anchors(b.masks, [data.rows[i] for i in indices], epoch, t.seed,
                                       t.anchors_per_4096, t.min_anchors, t.max_anchors)
        anchors, valid = anchors.to(rt.device), valid.to(rt.device)  # (B, A)
        mask = slot_mask(lm, anchors, valid, block_size)  # (B, A, G)
        if b.tap_hidden is None:
            with _autocast(rt.device, t.precision):
                out = target.forward(ids)
            tap, fin = out.tap_hidden, out.final_hidden  # (B, T, k*d), (B, T, d)
        else:
            tap, fin = b.tap_hidden.to(**copy).float(), b.final_hidden.to(**copy).float()  # cache dtype -> fp32
        stats = (None, None) if memo is None else memo.lookup(target, indices, fin, lm, [m.numel() for m in b.masks])
        with acc.accumulate(model), _autocast(rt.device, t.precision):
            loss, metrics = model(tap, fin, ids, anchors, mask, *stats, loss_mask=lm)
            acc.backward(loss)
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
                metrics["grad_norm"] = (torch.as_tensor(norm, device=rt.device).float() if norm is not None
                                        else torch.tensor(float("nan"), device=rt.device))
            optimizer.step()
            optimizer.zero_grad()
        metrics["tokens"] = torch.tensor(float(b.tokens), device=rt.device)
        metrics["micro_batches"] = torch.tensor(1.0, device=rt.device)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float()  # stays on the device: no sync until logging
    scheduler.step()
    return totals


def reduce_metrics(totals: dict[str, torch.Tensor], rt, G: int, steps: int = 1) -> dict[str, float]:
    """Sum over processes, then means over micro-batches (the grad norm, recorded once per optimizer step and
    process: a mean over the ``steps`` steps of the window); tokens stay a sum."""
    keys = sorted(totals)
    flat = torch.cat([totals[k].reshape(-1) for k in keys]).to(rt.device)
    flat = rt.all_reduce_sum(flat).cpu()
    out, i = {}, 0
    for k in keys:
        n = totals[k].numel()
        out[k] = flat[i: i + n]
        i += n
    count = out.pop("micro_batches").item()
    tokens = out.pop("tokens").item()
    result = {"tokens": tokens}
    for k, v in out.items():
        if k == "accept_per_slot":
            result.update({f"accept_k{j + 1}": float(x) / count for j, x in enumerate(v)})
        elif k == "grad_norm":
            result[k] = float(v) / (rt.world * steps)
        else:
            result[k] = float(v) / count
    return result


def _trainer_state(step: int, sampler: StepSampler, scheduler, data: TrainData, world: int) -> dict:
    epoch, offset = sampler.position(step)
    return {"step": step, "epoch": epoch, "position": offset, "scheduler": scheduler.state_dict(),
            "data_fingerprint": data.fingerprint, "world_size": world}


def _final_save(rt, model, objective: DraftObjective, job: TrainJob, out: Path, data: TrainData,
                resolved: dict) -> None:
    """The final draft via save_pretrained (gathering ZeRO-3 shards first), plus the resolved config."""
    from omegaconf import OmegaConf

    from dspark_model.checkpoint import save_pretrained

    gather = contextlib.nullcontext()
    if rt.deepspeed and str(job.deepspeed.stage) == "3":
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(objective.parameters()), modifier_rank=None)
    with gather:
        if rt.is_main:
            extra = {"resolved_config": resolved, "data_fingerprint": data.fingerprint, "data": data.origin}
            final = save_pretrained(objective.draft, out / "final", job.target, extra=extra)
            atomic_write_text(final / "resolved_config.yaml", OmegaConf.to_yaml(resolved))
            log.info("final draft written to %s", final)
    rt.barrier()


def _build(job: TrainJob, rt):
    """Target (fails fast when its weights are missing), draft and data, in a fixed seeded order."""
    if job.target.random is None:
        resolve_weights(job.target)  # TargetNotFoundError before data checks and model loading
    source = data_path(job)
    seed_everything(job.train.seed)
    with rt.frozen_target_context():
        target = load_target(job.target, device=rt.device)
    seed_everything(job.train.seed)
    draft = build_draft_for(target, job.draft)
    data = load_data(job, target, source)
    if draft.reduced_vocab:
        counts = answer_token_counts(data.input_ids, data.loss_mask, target.vocab_size)
        ids = top_k_vocab(counts, draft.out_vocab_size, job.draft.draft_vocab_prior)
        draft.set_draft_vocab(ids)
        covered = counts[ids].sum().item() / max(1, counts.sum().item())
        log.info("draft vocabulary: %d of %d target tokens, %.2f %% of the training answer tokens",
                 ids.numel(), target.vocab_size, 100 * covered)
    return target, draft, data


def _prepare_and_resume(rt, objective, optimizer, scheduler, root: Path, resume: str, data: TrainData):
    """accelerator.prepare + checkpoint restore (plain: before wrapping; DeepSpeed: into the engine).
    Returns (model, optimizer, engine or None, first step)."""
    path = checkpointing.resolve_resume(root, resume)
    state = None
    if path is not None and not rt.deepspeed:
        state = checkpointing.load_checkpoint(path, rank=rt.rank, draft=objective.draft, optimizer=optimizer)
    model, optimizer = rt.accelerator.prepare(objective, optimizer)
    engine = model if rt.deepspeed else None
    if path is not None and rt.deepspeed:
        state = checkpointing.load_checkpoint(path, rank=rt.rank, engine=engine)
    if state is None:
        return model, optimizer, engine, 0
    scheduler.load_state_dict(state["scheduler"])
    if state.get("data_fingerprint") != data.fingerprint:
        log.warning("resuming on different data (fingerprint %s -> %s)", state.get("data_fingerprint"),
                    data.fingerprint)
    log.info("resumed from %s at step %d", path, state["step"])
    return model, optimizer, engine, int(state["step"])


def train(job: TrainJob, output_dir: str | Path | None = None, resolved: dict | None = None) -> dict:
    """Run a training job end to end; returns the last logged metrics (rank 0; {} elsewhere).

    The output folder is locked for the whole run (``dspark_model/output_lock.py``) by the process of global
    rank 0, before any process group exists: the other ranks write only where rank 0 tells them to."""
    validate(job)
    out = Path(output_dir or job.train.output_dir or "runs/train/default")
    lock = (output_lock(out, "train", "train.output_dir=<another folder>")
            if distributed.launch_rank() == 0 else contextlib.nullcontext())
    with lock:
        return _train(job, out, resolved)


def _train(job: TrainJob, out: Path, resolved: dict | None) -> dict:
    t = job.train
    resolved = resolved if resolved is not None else dataclasses.asdict(job)
    device = resolve_device(t.device, "train.device", TrainConfigError)
    rt, accum = distributed.setup(str(job.deepspeed.stage), job.deepspeed.config, t.micro_batch_size,
                                  t.global_batch_size, t.grad_clip, device.type,
                                  bf16_autocast=uses_bf16(device, t.precision))
    if not rt.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    kernel = attention_kernel(rt.device, t.attention)  # a bad choice fails before the target loads
    log.info("draft training attention: %s", kernel)
    target, draft, data = _build(job, rt)
    sampler = StepSampler(len(data), t.global_batch_size, t.seed)
    optimizer, scheduler = make_optimizer(draft, t)
    weights = LossWeights(t.alpha_ce, t.alpha_tv, t.alpha_conf, t.position_decay)
    if job.draft.architecture == "eagle3":
        from train.eagle3_loss import Eagle3Objective

        objective = Eagle3Objective(draft, t.eagle3_step_weight, t.logits_chunk_size, t.recompute_chunks,
                                    t.feature_noise, kernel)
    else:
        objective = DraftObjective(draft, weights, t.logits_chunk_size, t.recompute_chunks, t.feature_noise, kernel)
    root = out / "checkpoints"
    checkpointing.start_run(root, rank=rt.rank, barrier=rt.barrier)  # run.json: resume only from our checkpoints
    model, optimizer, engine, start = _prepare_and_resume(rt, objective, optimizer, scheduler, root, t.resume,
                                                          data)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log.info("draft: %.2fM trainable parameters; %d rows; %d process(es) x %d micro x %d accumulation",
                 count_parameters(draft) / 1e6, len(data), rt.world, t.micro_batch_size, accum)
    logger = (MetricsLogger(out, job.logger.tensorboard, job.logger.wandb, job.logger.wandb_project,
                            job.logger.wandb_mode, job.logger.wandb_run_name, resolved, start_step=start)
              if rt.is_main else NullLogger())
    lengths = [x.numel() for x in data.input_ids]
    last = _loop(model, optimizer, scheduler, target, data, sampler, lengths, rt, job, engine, root, start, logger,
                 draft)
    logger.close()
    _final_save(rt, model, objective, job, out, data, resolved)
    return last if rt.is_main else {}


def _loop(model, optimizer, scheduler, target, data, sampler, lengths, rt, job, engine, root, start, logger,
          draft):
    t = job.train
    bar = tqdm(total=t.max_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=not (rt.is_main and job.logger.progress_bar))
    last: dict[str, float] = {}
    memo = TeacherMemo() if draft.reduced_vocab else None
    model.train()
    tic, window, n_window = time.perf_counter(), {}, 0
    pad_id = target.tokenizer.pad_token_id or 0
    inputs = Prefetcher(step_inputs(data, sampler, lengths, rt, t, pad_id, start), depth=1)
    try:
        for step in range(start, t.max_steps):
            epoch, batches = next(inputs)
            lr = scheduler.get_last_lr()[0]
            totals = train_step(model, optimizer, scheduler, target, data, batches, epoch, rt, job,
                                job.draft.block_size, memo)
            window = {k: window.get(k, 0.0) + v for k, v in totals.items()}
            n_window += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.max_steps:
                last = reduce_metrics(window, rt, job.draft.block_size, n_window)
                now = time.perf_counter()
                last.update(lr=lr, epoch=epoch, step_time_s=(now - tic) / n_window,
                            tokens_per_s=last.pop("tokens") / max(now - tic, 1e-9))
                tic, window, n_window = now, {}, 0
                logger.log(done, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                acc=f"{last['expected_accept']:.3f}")
            bar.update(1)
            if done % t.save_every == 0 or done == t.max_steps:
                checkpointing.save_checkpoint(root, done, _trainer_state(done, sampler, scheduler, data, rt.world),
                                              rank=rt.rank, barrier=rt.barrier, draft=draft, optimizer=optimizer,
                                              engine=engine, keep_last=t.keep_last)
    finally:
        inputs.close()
    bar.close()
    return last
