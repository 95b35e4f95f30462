"""Optimizers and the learning-rate schedule of the draft.

``train.optimizer=adamw`` (default): AdamW, weight decay on matrices only.
``train.optimizer=muon``: ``torch.optim.Muon`` (orthogonalised momentum) for the 2-D weight matrices of the
draft's own layers, AdamW for everything else (norms, biases, the Markov head's token table, a trainable
draft LM head). Muon's step size is scaled to match AdamW's update RMS (``adjust_lr_fn="match_rms_adamw"``), so
one ``train.lr`` serves both. The pair steps and saves as one optimizer, so the LR schedule, accelerate and the
safetensors checkpoints see the usual interface. Not combined with DeepSpeed ZeRO (refused at start).
"""

from __future__ import annotations

import math
from collections import ChainMap

import torch
from torch import nn

# Matrices that are lookup tables or output heads rather than hidden-to-hidden maps: Muon's orthogonalised
# update is meant for the latter; token tables and output heads stay on AdamW (as Muon's authors advise), and so
# do single-row matrices such as the confidence head's projection.
_TABLE_NAMES = ("markov_w1", "markov_w2", "lm_head", "embed")


def lr_lambda(step: int, warmup: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to ``min_ratio`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MuonAdamW(torch.optim.Optimizer):
    """Muon over ``matrices`` and AdamW over ``adam_groups``, as one optimizer.

    ``param_groups`` is the Muon groups followed by the AdamW groups (the very same dicts, so a scheduler that
    sets ``lr`` on them reaches both); ``state_dict`` numbers parameters in that order, like a plain optimizer."""

    def __init__(self, matrices: list[nn.Parameter], adam_groups: list[dict], lr: float, betas, weight_decay: float):
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adam_groups, lr=lr, betas=tuple(betas), foreach=False)
        super().__init__([{"params": matrices}] + [{"params": g["params"]} for g in adam_groups], {"lr": lr})
        self._share_children()

    def _share_children(self) -> None:
        """Expose the two optimizers' own groups and (live) per-parameter state as this one's."""
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = ChainMap(self.muon.state, self.adamw.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        first, second = self.muon.state_dict(), self.adamw.state_dict()
        offset = sum(len(g["params"]) for g in first["param_groups"])
        state = dict(first["state"])
        state.update({offset + pid: s for pid, s in second["state"].items()})
        groups = [dict(g, optimizer="muon") for g in first["param_groups"]]
        groups += [dict(g, optimizer="adamw", params=[offset + p for p in g["params"]])
                   for g in second["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [g.get("optimizer") for g in groups] != ["muon"] * len(self.muon.param_groups) + \
                ["adamw"] * len(self.adamw.param_groups):
            raise ValueError("optimizer state was saved by a different optimizer (train.optimizer changed?); "
                             "resume with the same train.optimizer or start a new output_dir")
        offset = sum(len(g["params"]) for g in groups if g["optimizer"] == "muon")
        state = {int(k): v for k, v in state_dict["state"].items()}

        def part(name: str, shift: int) -> dict:
            mine = [dict({k: v for k, v in g.items() if k != "optimizer"},
                         params=[p - shift for p in g["params"]]) for g in groups if g["optimizer"] == name]
            ids = {p for g in mine for p in g["params"]}
            return {"state": {p: state[p + shift] for p in ids if p + shift in state}, "param_groups": mine}

        self.muon.load_state_dict(part("muon", 0))
        self.adamw.load_state_dict(part("adamw", offset))
        self._share_children()


def make_optimizer(draft: nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer ``cfg.optimizer`` names, and the warm-up + cosine schedule."""
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        matrices = [p for n, p in named
                    if p.ndim == 2 and min(p.shape) > 1 and not any(t in n for t in _TABLE_NAMES)]
        chosen = {id(p) for p in matrices}
        others = [p for _, p in named if id(p) not in chosen]
        groups = [{"params": [p for p in others if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in others if p.ndim < 2], "weight_decay": 0.0}]
        opt = MuonAdamW(matrices, [g for g in groups if g["params"]], cfg.lr, cfg.betas, cfg.weight_decay)
    else:
        params = [p for _, p in named]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.min_lr_ratio))
    return opt, sched
