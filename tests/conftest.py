"""Shared fixtures: tiny random targets (no downloads, CPU, milliseconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny ops: thread hand-off costs more than it saves

from dspark_model.config import DraftConfig, TargetSpec  # noqa: E402
from dspark_model.target import load_target  # noqa: E402


def tiny_spec(family: str = "llama", layers: int = 4, seed: int = 0, **overrides) -> TargetSpec:
    return TargetSpec(id=f"tiny-{family}", path=None, random={"family": family, "num_hidden_layers": layers,
                                                               "seed": seed, **overrides})


def tiny_draft_config(**overrides) -> DraftConfig:
    fields = dict(num_layers=2, block_size=4, sequential_head="markov", markov_rank=16, confidence_head=True)
    fields.update(overrides)
    return DraftConfig(**fields)


@pytest.fixture(scope="session")
def tiny_target():
    torch.manual_seed(0)
    return load_target(tiny_spec("llama"))
