"""Shared fixtures: tiny random targets (no downloads, CPU, milliseconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CPU contending OpenMP threads
    slow them ~10x. Restored after each test, so a test that sets its own thread count cannot leak it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
