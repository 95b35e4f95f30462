"""``train.estimate_memory=true``: the per-process peak memory of the composed config, before any weights load.

How it is built, so that it follows the code instead of a formula that can drift from it:

* The target comes from its config alone (``target_config``: the local config.json / GGUF header the loader
  would read, else the Hub numbers in ``KNOWN_CONFIGS``), built with ``transformers`` on fake tensors
  (``FakeTensorMode``: shapes and dtypes, no storage); the draft from ``build_draft``, the optimizer from
  ``make_optimizer`` — the real classes.
* One micro-batch step runs on them at the composed shapes (micro_batch_size rows of data.max_length tokens,
  the anchor count of ``anchor_count``): the online target forward, ``DraftObjective`` (draft forward + the
  chunked loss with its recompute setting) and backward, while ``LiveStorage`` (a dispatch mode) records
  every storage an op creates and when it dies. That timeline gives the activation peak and the gradients
  alive at that moment.
* What one CPU process on fake tensors cannot show is added by arithmetic: persistent state (target weights
  and buffers in the target's dtype, draft parameters in fp32, optimizer states: AdamW 2 fp32 tensors per
  parameter, Muon 1 momentum per matrix it owns, grouped by the real ``make_optimizer``), sharding over W
  processes (``shard_plan``) and the CUDA attention kernel. Autocast runs as on the GPU (bf16 when
  ``train.precision`` gives bf16 on the estimated device; CPU autocast's op list stands in for CUDA's).

Attention on CUDA cannot be traced here: ``flex`` (the CUDA default) is replaced by a stand-in that keeps what
flex keeps (q, k, v, output, fp32 log-sum-exp; the real BlockMask is built), ``sdpa`` on CUDA by the math
kernel (a dense mask with GQA rules out flash and memory-efficient attention), written out so the fp32 scores
appear at their real size. On the CPU the real SDPA runs as is.

Not modelled: the caching allocator's fragmentation and CUDA context (~0.5-1 GB per GPU), NCCL buffers,
DeepSpeed's ZeRO-3 parameter prefetch beyond the largest gathered module, the input prefetch thread's next
micro-batches, the final ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

GIB = 1024 ** 3
# Hub config.json numbers of the conf/target models, for estimating without a local copy (the loader reads the
# real file whenever one is found). Anything else needs its config.json locally (target.path=<folder>).
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                                     rms_norm_eps=1e-6, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                             vocab_size=128256, max_position_embeddings=131072, rope_theta=5e5,
                                             rms_norm_eps=1e-5, tie_word_embeddings=False),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=False),
    "Qwen/Qwen3-4B": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=True),
}
OPTIMIZER_STATES = {"adamw": 2, "muon": 1}  # fp32 state tensors per parameter (exp_avg + exp_avg_sq | momentum)


# ----------------------------------------------------------------------------------------------------
# Live storage bytes
# ----------------------------------------------------------------------------------------------------

class LiveStorage(TorchDispatchMode):
    """Records each storage an op creates (views share one) and when it is freed: ``events`` is the timeline
    [(storage serial, +bytes | -bytes)]. Storages of ``ignore`` (parameters, inputs) are never counted."""

    def __init__(self, ignore=()):
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self._serial: dict[int, int] = {}  # storage address -> serial, while alive
        self._refs: dict[int, weakref.ref] = {}
        self._ignore = {t.untyped_storage()._cdata for t in ignore}

    def serial_of(self, t: torch.Tensor) -> int | None:
        return self._serial.get(t.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._ignore or key in self._serial:
            return
        serial, size = len(self.events), int(storage.nbytes())

        def freed(_ref, key=key, serial=serial, size=size):
            self._serial.pop(key, None)
            self._refs.pop(key, None)
            self.events.append((serial, -size))

        self._serial[key] = serial
        self._refs[key] = weakref.ref(storage, freed)
        self.events.append((serial, size))

    def peak(self, weight=lambda serial: 1.0) -> tuple[float, int]:
        """(max over time of sum(weight(serial) * bytes) of the live storages, event index where it occurs)."""
        live, best, at = 0.0, 0.0, 0
        for i, (serial, size) in enumerate(self.events):
            live += weight(serial) * size
            if live > best:
                best, at = live, i
        return best, at

    def live_at(self, index: int, serials: set[int]) -> int:
        """Bytes of ``serials`` alive just after event ``index``."""
        return sum(size for serial, size in self.events[:index + 1] if serial in serials)


# ----------------------------------------------------------------------------------------------------
# The target's architecture without its weights
# ----------------------------------------------------------------------------------------------------

def target_config(spec):
    """The target's transformers config: tiny family config, the local config.json / GGUF header the loader
    would read, else the Hub numbers of ``KNOWN_CONFIGS``; ``TargetNotFoundError`` otherwise."""
    if spec.random is not None:
        from dspark_model.tiny import tiny_config

        fields = {k: v for k, v in spec.random.items() if k != "seed"}
        return tiny_config(fields.pop("family", "llama"), **fields)
    from transformers import AutoConfig

    from dspark_model.target import TargetNotFoundError, resolve_weights

    try:
        folder, gguf = resolve_weights(spec)
    except TargetNotFoundError:
        if spec.id not in KNOWN_CONFIGS:
            raise
        known = dict(KNOWN_CONFIGS[spec.id])
        log.info("estimate: %s is not available locally; using its Hub config numbers", spec.id)
        return AutoConfig.for_model(known.pop("model_type"), **known)
    kwargs = {"gguf_file": gguf} if gguf else {"revision": spec.revision}
    return AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code, **kwargs)


def target_from_config(spec, config, mode):
    """A ``Target`` built from ``config`` in the target's dtype under ``mode`` (FakeTensorMode: nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    from dspark_model.target import _DTYPES, Target

    dtype = _DTYPES.get(spec.dtype) or getattr(config, "dtype", None) or torch.float32  # as from_pretrained
    dtype = _DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    with mode:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return Target(model, None, name_or_path=spec.id, tap_layer_ids=spec.tap_layer_ids, num_taps=spec.num_tap_layers)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights count once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------
# Attention kernels that cannot run here
# ----------------------------------------------------------------------------------------------------

class _FlexStandIn(torch.autograd.Function):
    """What compiled flex_attention on CUDA holds: the output, and q, k, v, output, fp32 log-sum-exp (B, H, Q)
    saved for backward, which returns dq, dk, dv. No scores are materialised."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape)  # (B, H, Q, hd)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flex_stand_in(q, k, v, block_mask=None, enable_gqa=False):
    return _FlexStandIn.apply(q, k, v)


def _math_sdpa(q, k, v, attn_mask=None, enable_gqa=False):
    """SDPA's math kernel (ATen ``_scaled_dot_product_attention_math``), the one CUDA runs for a dense boolean
    mask with GQA, op for op: q, k, v upcast to fp32, the mask turned into an fp32 additive tensor, fp32
    scores (B, H, Q, S) whose softmax is kept for backward."""
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        if enable_gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scale = q.shape[-1] ** -0.25
        scores = (q * scale) @ (k.transpose(-1, -2) * scale)  # (B, H, Q, S) fp32
        if attn_mask is not None:
            scores.add_(torch.zeros(attn_mask.shape, device=q.device).masked_fill_(~attn_mask, float("-inf")))
        return (scores.softmax(-1) @ v).to(dtype)


@contextlib.contextmanager
def cuda_attention(kernel: str):
    """Swap in the memory behaviour of the CUDA attention kernel for the duration of the trace."""
    import torch.nn.attention.flex_attention as flex_module

    import dspark_model.block_attention as block_attention

    saved = flex_module.flex_attention, block_attention.F
    if kernel == "flex":
        flex_module.flex_attention = _flex_stand_in
    else:
        block_attention.F = type("F", (), {"scaled_dot_product_attention": staticmethod(_math_sdpa)})
    try:
        yield
    finally:
        flex_module.flex_attention, block_attention.F = saved


# ----------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Per-process bytes at the step's peak, by component."""

    rows: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    def format(self) -> str:
        width = max(len(k) for k in self.rows) + 2
        unit, scale = ("GiB", GIB) if self.total >= 2 * GIB else ("MiB", 1024 ** 2)
        lines = [f"estimated peak memory per process ({self.settings['summary']}):"]
        lines += [f"  {name:<{width}}{value / scale:9.2f} {unit}" for name, value in self.rows.items()]
        lines.append(f"  {'total':<{width}}{self.total / scale:9.2f} {unit}")
        return "\n".join(lines)


def shard_plan(stage: str, world: int, params: int, grads: int, states: int, zero_config: dict | None = None,
               largest_module: int = 0) -> dict[str, float]:
    """Persistent bytes per process for ``params`` (fp32 draft parameters), ``states`` (optimizer) and the
    gradient / communication buffers, under plain training, DDP or ZeRO-2/3 over ``world`` processes.

    Returns {"params", "grad_factor", "states", "buffers"}: grad_factor is the share of the gradients a
    process holds (1 or 1/world). ZeRO-2/3 keep an fp32 copy of their parameter partition (DeepSpeed clones
    it even without mixed precision) and reduce buckets of ``reduce_bucket_size`` fp32 elements (two with
    ``overlap_comm``); ZeRO-3 gathers parameters module by module (two of the largest at once, prefetch).
    DDP (world > 1, no ZeRO) keeps its own gradient buckets, as large as the gradients."""
    zero = dict(zero_config or {})
    if stage == "none":
        return {"params": params, "grad_factor": 1.0, "states": states,
                "buffers": float(grads) if world > 1 else 0.0}
    buckets = 4 * float(zero.get("reduce_bucket_size", 5e8)) * (2 if zero.get("overlap_comm") else 1)
    plan = {"params": params / world if stage == "3" else float(params), "grad_factor": 1.0 / world,
            "states": states / world, "buffers": params / world + buckets}
    if stage == "3":
        plan["buffers"] += 2 * largest_module
    return plan


def _optimizer_state_bytes(draft, cfg) -> int:
    """fp32 optimizer-state bytes of the real ``make_optimizer`` grouping (OPTIMIZER_STATES per parameter)."""
    from train.optim import MuonAdamW, make_optimizer

    optimizer, _ = make_optimizer(draft, cfg)
    muon = set()
    if isinstance(optimizer, MuonAdamW):
        muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            total += 4 * p.numel() * OPTIMIZER_STATES["muon" if id(p) in muon else "adamw"]
    return total


def estimate_memory(job, world: int | None = None) -> MemoryEstimate:
    """The per-process peak of one training step of ``job`` over ``world`` processes (module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dspark_model.draft import build_draft
    from train.anchors import anchor_count
    from train.loop import uses_bf16
    from train.schema import TrainConfigError

    if job.draft.architecture != "dspark":  # the traced step is DraftObjective's, not the EAGLE-3 objective's
        raise TrainConfigError(f"train.estimate_memory models DSpark / DFlash drafts; draft.architecture="
                               f"{job.draft.architecture} is not estimated yet")
    t, stage = job.train, str(job.deepspeed.stage)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if t.device == "auto" else t.device))
    kernel = "sdpa" if device.type == "cpu" or t.attention == "sdpa" else "flex"
    bf16 = uses_bf16(device, t.precision)
    accum = max(1, t.global_batch_size // (t.micro_batch_size * world))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    config = target_config(job.target)
    target = target_from_config(job.target, config, mode)
    with mode:
        draft = build_draft(job.draft, target.config, target.tap_layer_ids, mask_token_id=0).attach_target(target)
    B, T = t.micro_batch_size, job.data.max_length
    A = anchor_count(T, t.anchors_per_4096, t.min_anchors, t.max_anchors)
    trace, grads = trace_step(target, draft, job, mode, B, T, A, kernel if device.type == "cuda" else None, bf16)

    target_bytes = tensor_bytes([*target.model.parameters(), *target.model.buffers()])
    draft_params = tensor_bytes([*draft.parameters(), *draft.buffers()])
    largest = max(tensor_bytes(m.parameters(recurse=False)) for m in draft.modules())
    plan = shard_plan(stage, world, draft_params, tensor_bytes([p for p in draft.parameters()]),
                      _optimizer_state_bytes(draft, t), job.deepspeed.config.get("zero_optimization"), largest)
    grad_total = sum(s for serial, s in trace.events if serial in grads and s > 0)

    def weight(serial):  # gradients count by the process's share; with accumulation they are all live
        return 0.0 if serial in grads and accum > 1 else (plan["grad_factor"] if serial in grads else 1.0)

    step_peak, at = trace.peak(weight)
    grads_at_peak = (grad_total if accum > 1 else trace.live_at(at, grads)) * plan["grad_factor"]
    activations = step_peak - (0.0 if accum > 1 else grads_at_peak)
    rows = {"target weights": target_bytes, "draft parameters": plan["params"],
            "optimizer states": plan["states"], "gradients": grads_at_peak, "activations": activations,
            "distributed buffers": plan["buffers"]}
    # the optimizer step, after the activations are gone: every gradient share + one parameter's temporaries
    step_phase = grad_total * plan["grad_factor"] + 2 * largest
    if step_phase > grads_at_peak + activations:
        rows["gradients"], rows["activations"] = grad_total * plan["grad_factor"], 2.0 * largest
    summary = (f"{job.target.id}, {world} process(es), deepspeed={stage}, {t.optimizer}, {device.type}, "
               f"{'bf16' if bf16 else 'fp32'}, attention={kernel}, {B} x {T} tokens, {A} anchors x "
               f"{job.draft.block_size}, logits chunk {t.logits_chunk_size}, recompute={t.recompute_chunks}, "
               f"{job.data.mode}, accumulation {accum}")
    return MemoryEstimate({k: float(v) for k, v in rows.items()},
                          {"summary": summary, "world": world, "accumulation": accum, "anchors": A,
                           "attention": kernel, "bf16": bf16, "device": device.type})


def trace_step(target, draft, job, mode, batch: int, length: int, anchors: int, cuda_kernel: str | None,
               bf16: bool) -> tuple[LiveStorage, set[int]]:
    """Run one micro-batch (target forward if online, objective, backward) on fake tensors under
    ``LiveStorage``; returns the trace and the serials of the draft's gradients."""
    from train.anchors import slot_mask
    from train.loop import DraftObjective
    from train.loss import LossWeights, teacher_stats

    t = job.train
    weights = LossWeights(t.alpha_ce, t.alpha_tv, t.alpha_conf, t.position_decay)
    objective = DraftObjective(draft, weights, t.logits_chunk_size, t.recompute_chunks, t.feature_noise,
                               "sdpa" if cuda_kernel is None else cuda_kernel).train()
    G, d, n_taps = draft.block_size, target.hidden_size, len(target.tap_layer_ids)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    with mode:
        ids = torch.randint(0, target.vocab_size, (batch, length))  # (B, T)
        lm = torch.ones(batch, length)
        spread = torch.linspace(1, length - G - 1, anchors).long()  # (A,) anchors across the row
        anchor_pos = spread.expand(batch, anchors).contiguous()  # (B, A)
        mask = slot_mask(lm, anchor_pos, torch.ones(batch, anchors, dtype=torch.bool), G)  # (B, A, G)
        cache_dtype = target.dtype
        offline = None if job.data.mode == "online" else (
            torch.empty(batch, length, n_taps * d, dtype=cache_dtype), torch.empty(batch, length, d, dtype=cache_dtype))
    known = [*target.model.parameters(), *target.model.buffers(), *draft.parameters(), *draft.buffers(), ids, lm,
             anchor_pos, mask, *(offline or ())]
    trace = LiveStorage(ignore=known)
    swap = cuda_attention(cuda_kernel) if cuda_kernel else contextlib.nullcontext()
    with mode, swap, trace:
        if offline is None:
            with autocast:
                out = target.forward(ids)
            tap, fin = out.tap_hidden, out.final_hidden  # (B, T, k*d), (B, T, d)
        else:
            tap, fin = offline[0].float(), offline[1].float()  # as train_step: the cache dtype -> fp32
        stats = (None, None)
        if draft.reduced_vocab:  # the teacher memo's first visit: chunked full-vocabulary statistics
            lse, arg = teacher_stats(target, fin.flatten(0, 1))
            stats = (lse.view(batch, length), arg.view(batch, length))
        grads: set[int | None] = set()  # every storage that is ever a .grad (accumulation may replace it)
        hooks = [p.register_post_accumulate_grad_hook(lambda q: grads.add(trace.serial_of(q.grad)))
                 for p in draft.parameters() if p.requires_grad]
        with autocast:
            loss, _ = objective(tap, fin, ids, anchor_pos, mask, *stats)
        loss.backward()
        for hook in hooks:
            hook.remove()
    return trace, grads - {None}
