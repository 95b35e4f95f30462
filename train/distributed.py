"""Process setup: accelerate (+ DeepSpeed ZeRO-2/3) or plain training, on GPUs or CPUs.

* ``deepspeed.stage: none`` -> ``accelerate.Accelerator()``: one plain process, or DDP when launched by
  torchrun / accelerate launch with several processes.
* ``deepspeed.stage: 2 | 3`` -> ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(config))`` with the client
  ``torch.optim.AdamW`` (no DeepSpeed op has to be compiled). Only the draft is handed to DeepSpeed; the
  frozen target stays a plain module replicated on every process.
* On CPU the process group uses gloo. A bare ``python -m train`` with DeepSpeed gets single-process
  rendezvous variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) so DeepSpeed does not look for MPI.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from dataclasses import dataclass

import torch

from dspark_model.target import resolve_device
from train.schema import TrainConfigError

log = logging.getLogger(__name__)


def ensure_launch_env() -> None:
    """Single-process rendezvous defaults for a bare ``python`` launch (no-op under torchrun / deepspeed)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun / accelerate / deepspeed: RANK; mpirun:
    OMPI_COMM_WORLD_RANK), readable before any process group exists; 0 for a plain launch."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def torch_autocast_section(user: dict | None, bf16_autocast: bool) -> dict:
    """DeepSpeed's ``torch_autocast`` block, decided by train.precision.

    DeepSpeed (0.19) runs the engine's forward under its own autocast context: with no enabled
    ``torch_autocast`` block it switches an outer ``torch.autocast`` off, so the draft would run in fp32.
    ``lower_precision_safe_modules`` names the module classes whose parameters DeepSpeed communicates in the
    autocast dtype (ZeRO gradient reduction / ZeRO-3 gathers); it defaults to none here, so gradients are
    reduced in fp32 as under DDP. A user may list classes there; ``enabled`` / ``dtype`` follow train.precision.
    """
    user = dict(user or {})
    for key in ("enabled", "dtype"):
        if key in user:
            raise TrainConfigError(f"deepspeed.config.torch_autocast.{key} is set from train.precision; remove it "
                                   "and choose train.precision=bf16 (or fp32) instead")
    if not bf16_autocast:
        return {"enabled": False}
    return {"enabled": True, "dtype": "bfloat16",
            "lower_precision_safe_modules": list(user.get("lower_precision_safe_modules", []))}


def deepspeed_config(user: dict, stage: str, micro: int, accum: int, world: int, grad_clip: float,
                     bf16_autocast: bool = False) -> dict:
    """The user's DeepSpeed config with the batch / clipping / stage fields filled from the train config, and
    the ``torch_autocast`` block from train.precision (``bf16_autocast``: the loop's autocast is bf16)."""
    cfg = copy.deepcopy(user)
    cfg["torch_autocast"] = torch_autocast_section(cfg.get("torch_autocast"), bf16_autocast)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * world
    cfg["gradient_clipping"] = float(grad_clip) if grad_clip > 0 else 0.0
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = int(stage)
    for key in ("bf16", "fp16"):  # precision comes from train.precision (autocast); "auto" means off here
        block = cfg.setdefault(key, {"enabled": False})
        if block.get("enabled") == "auto":
            block["enabled"] = False
    cfg.setdefault("steps_per_print", 10**9)
    cfg.pop("optimizer", None)  # the client AdamW is used; a config optimizer would need compiled ops
    cfg.pop("scheduler", None)  # the LR schedule is stepped by the loop
    return cfg


@dataclass
class Runtime:
    accelerator: object
    device: torch.device
    rank: int
    world: int
    deepspeed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def frozen_target_context(self):
        """Load the frozen target replicated, not sharded: accelerate's DeepSpeed plugin registers its config
        with transformers, which would otherwise build models under ZeRO-3 ``zero.Init`` (empty shards)."""
        if not self.deepspeed:
            yield
            return
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1 and torch.distributed.is_initialized():
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t


def setup(stage: str, ds_user_config: dict, micro: int, global_batch: int, grad_clip: float,
          device: str, bf16_autocast: bool = False) -> tuple[Runtime, int]:
    """Create the accelerator; returns (runtime, gradient accumulation steps). ``bf16_autocast``: the loop
    trains under bf16 autocast, which DeepSpeed must be told about (see ``torch_autocast_section``)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    device = str(resolve_device(device, "train.device", TrainConfigError))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if global_batch % (micro * world):
        raise TrainConfigError(f"train.global_batch_size={global_batch} is not a multiple of micro_batch_size x "
                         f"processes = {micro} x {world}; change one of them")
    accum = global_batch // (micro * world)
    gloo = device == "cpu" and (world > 1 or stage != "none")
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if gloo else []
    if stage == "none":
        acc = Accelerator(cpu=device == "cpu", gradient_accumulation_steps=accum, kwargs_handlers=kwargs)
    else:
        from accelerate import DeepSpeedPlugin

        ensure_launch_env()
        world = int(os.environ["WORLD_SIZE"])
        # zero3_init_flag=False: transformers must not build the frozen target sharded under ZeRO-3.
        ds = deepspeed_config(ds_user_config, stage, micro, accum, world, grad_clip, bf16_autocast)
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
        acc = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=accum, kwargs_handlers=kwargs)
    if acc.num_processes != world:
        log.warning("accelerate sees %d process(es) but WORLD_SIZE=%d", acc.num_processes, world)
    rt = Runtime(acc, acc.device, acc.process_index, acc.num_processes, stage != "none")
    return rt, accum
