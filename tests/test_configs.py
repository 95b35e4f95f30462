"""Every file in conf/ composes into its stage's typed schema, and the cheap parts of it build (STYLE §12).

Primary configs are the top-level ``conf/<stage>.yaml`` files (train, data_prep, eval: whichever exist);
each group option ``conf/<group>/<option>.yaml`` is composed into every primary whose defaults list uses
that group. Nothing here loads a real model.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARIES = sorted(p.stem for p in CONF.glob("*.yaml"))


def _schema_module(stage: str):
    """``<stage>.schema`` registers ``<stage>_schema`` in the ConfigStore (on import or via ``register()``)."""
    module = importlib.import_module(f"{stage}.schema")
    if hasattr(module, "register"):
        module.register()
    return module


def _group_keys(stage: str) -> dict[str, str]:
    """group name -> override key (``draft@draft_config`` style) from a primary's defaults list."""
    keys = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / f"{stage}.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                if not key.startswith("override "):
                    keys[key.split("@")[0]] = key
    return keys


def _cases():
    cases = []
    for stage in PRIMARIES:
        cases.append((stage, None, None))
        for group, key in _group_keys(stage).items():
            for option in sorted((CONF / group).glob("*.yaml")):
                cases.append((stage, key, option.stem))
    return cases


def _compose(stage: str, overrides: list[str]):
    _schema_module(stage)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=overrides)
    for key in OmegaConf.missing_keys(cfg):  # mandatory values (e.g. eval's draft_checkpoint) get a stand-in
        OmegaConf.update(cfg, key, "placeholder")
    return OmegaConf.to_object(cfg)


def _build(stage: str, group: str | None, obj) -> None:
    """Cheap builds of what a config option describes."""
    from dspark_model.config import DraftConfig, TargetSpec

    for value in vars(obj).values():
        if isinstance(value, DraftConfig):
            from dspark_model.draft import build_draft
            from dspark_model.tiny import tiny_config

            draft = build_draft(value, tiny_config("llama", num_hidden_layers=4), mask_token_id=259)
            assert draft.block_size == value.block_size and draft.num_layers == value.num_layers
        if isinstance(value, TargetSpec):
            assert value.id and value.dtype in ("auto", "float32", "bfloat16", "float16")
    if stage == "train":
        _build_train(obj)


def _build_train(job) -> None:
    from train.distributed import deepspeed_config
    from train.optim import lr_lambda
    from train.schema import validate

    validate(job)
    t = job.train
    assert lr_lambda(t.max_steps - 1, t.warmup_steps, t.max_steps, t.schedule, t.min_lr_ratio) > 0
    if job.deepspeed.stage != "none":
        ds = deepspeed_config(job.deepspeed.config, job.deepspeed.stage, t.micro_batch_size, 2, 2, t.grad_clip)
        assert ds["zero_optimization"]["stage"] == int(job.deepspeed.stage)
        assert ds["train_batch_size"] == 4 * t.micro_batch_size
        assert ds["bf16"]["enabled"] in (True, False)


@pytest.mark.parametrize("stage,group,option", _cases(),
                         ids=lambda v: str(v) if v is not None else "-")
def test_config_composes_and_builds(stage, group, option):
    overrides = [f"{group}={option}"] if group else []
    obj = _compose(stage, overrides)
    assert not OmegaConf.is_config(obj)
    _build(stage, group, obj)


@pytest.mark.skipif("train" not in PRIMARIES, reason="no conf/train.yaml")
def test_train_defaults_and_bad_overrides():
    from train.schema import TrainJob

    job = _compose("train", [])
    assert isinstance(job, TrainJob)
    assert job.target.id == "HuggingFaceTB/SmolLM2-135M-Instruct" and job.draft.sequential_head == "markov"
    assert (job.train.alpha_ce, job.train.alpha_tv, job.train.alpha_conf) == (0.1, 0.9, 1.0)
    assert job.train.anchors_per_4096 == 512 and job.deepspeed.stage == "none"
    demo = _compose("train", ["train=demo"])
    assert demo.draft.num_layers == 2 and demo.train.global_batch_size == 4
    assert demo.data.mode == "offline" and demo.draft.draft_vocab_size == 4096  # scripts/demo.sh builds the cache
    # the reference benchmark's two drafts share the backbone and recipe; only the heads differ
    ref = {d: _compose("train", ["train=reference", f"draft={d}", "data=demo-offline"]) for d in ("dspark", "dflash")}
    assert ref["dspark"].train == ref["dflash"].train and ref["dspark"].data == ref["dflash"].data
    assert ref["dspark"].data.mode == "offline"
    a, b = ref["dspark"].draft, ref["dflash"].draft
    assert (a.num_layers, a.block_size) == (b.num_layers, b.block_size) == (2, 7)
    assert (a.sequential_head, a.confidence_head) == ("markov", True)
    assert (b.sequential_head, b.confidence_head) == ("none", False)
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        _compose("train", ["train.max_stepz=3"])
    with pytest.raises(Exception, match="max_steps"):
        _compose("train", ["train.max_steps=many"])
