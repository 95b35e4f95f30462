"""Entry point: ``python -m eval draft=<checkpoint dir> [target=<name>] [prompts=<name>] [temperature=0] ...``.

Loads the target and the draft, runs speculative decoding, plain ``generate`` and prompt lookup side by side
on the prompts, writes the report into ``runs/eval/<name>`` under the working directory and, for drafts with a
confidence head, calibrates them (``eval/calibration_report.py``). The checkpoint only names its target: without ``target=`` that name is
loaded from local files with no remote code (``checkpoint.target_spec_from_checkpoint``); ``target=<name>``
(with ``target.path`` / ``target.allow_download`` / ``target.trust_remote_code``) is the user's own choice.
Either way the loaded target must be the one the checkpoint records (id, revision, weights fingerprint:
``dspark_model/identity.py``) unless ``allow_target_mismatch=true``.
``draft=random`` builds an untrained draft from ``draft_config=<conf/draft name>`` for smoke tests.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from eval.schema import EvalConfig, EvalConfigError, validate

log = logging.getLogger("eval")
ROOT = Path(__file__).resolve().parents[1]
# `draft` is also the name of the architecture config group, which Hydra would read as a group choice.
_CLI_ALIASES = {"draft": "draft_checkpoint", "draft_config": "draft@draft_config"}


def cli_args(argv: list[str]) -> list[str]:
    """Rename ``draft=...`` / ``draft_config=...`` command-line overrides to their config keys."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{_CLI_ALIASES[key]}={value}" if eq and key in _CLI_ALIASES else arg)
    return out


def load_models(cfg: EvalConfig, device: torch.device):
    """(target, draft, target spec, checkpoint dir or None)."""
    from dspark_model.draft import build_draft_for
    from dspark_model.target import TargetNotFoundError, load_target

    if cfg.draft_checkpoint == "random":
        if cfg.target is None:
            raise EvalConfigError("draft=random needs a target: add target=<name> (e.g. target=tiny)")
        target = load_target(cfg.target, device)
        torch.manual_seed(cfg.seed)
        return target, build_draft_for(target, cfg.draft_config).eval(), cfg.target, None
    from dspark_model.checkpoint import load_draft, target_spec_from_checkpoint

    ckpt = Path(cfg.draft_checkpoint).expanduser()
    if not (ckpt / "config.json").is_file():
        raise EvalConfigError(f"draft={cfg.draft_checkpoint}: no draft checkpoint there (config.json missing); "
                              f"pass a folder written by training, e.g. runs/train/<name>/final, or draft=random")
    spec = target_spec_from_checkpoint(ckpt, cfg.target)  # the checkpoint names its target, cfg.target loads it
    try:
        target = load_target(spec, device)
    except TargetNotFoundError as exc:
        if cfg.target is not None:
            raise
        raise TargetNotFoundError(f"{exc} (eval: the checkpoint only names its target; choose it yourself with "
                                  f"target=<conf/target name>, plus target.path=... or target.allow_download=true "
                                  f"as needed)") from None
    check_identity(ckpt, spec, target, cfg.allow_target_mismatch)
    return target, load_draft(ckpt, target, device=device), spec, str(ckpt)


def check_identity(ckpt: Path, spec, target, allow_mismatch: bool) -> None:
    """Refuse a target other than the one the checkpoint records (id, revision, weights fingerprint): a
    draft runs on any target of the same shapes, and its calibration would be fitted to the wrong one."""
    from dspark_model.checkpoint import CheckpointMismatchError, read_draft_config
    from dspark_model.identity import identity_problems, refuse_mismatch

    named = read_draft_config(ckpt).get("target") or {}
    problems = identity_problems(named if isinstance(named, dict) else {}, spec.id, spec.revision, target)
    refuse_mismatch(f"draft {ckpt} was trained", problems, allow_mismatch, "allow_target_mismatch",
                    "pass the target it was trained for (target=<name>, target.path=...)", CheckpointMismatchError,
                    log)


def load_eval_prompts(cfg: EvalConfig, num_prompts: int | None = None) -> list:
    """The prompts, at most ``num_prompts`` (default ``cfg.num_prompts``) per source; relative paths also tried
    against the repo root."""
    num_prompts = num_prompts if num_prompts is not None else cfg.num_prompts
    from data_prep.sources import load_prompts

    sources = []
    for src in cfg.prompts.sources:
        src = dataclasses.replace(src)
        if src.path and not src.path.startswith("pkg://") and not Path(src.path).expanduser().is_absolute():
            if not Path(src.path).exists() and (ROOT / src.path).exists():
                src.path = str((ROOT / src.path).resolve())
        if num_prompts is not None:
            src.num_samples = min(num_prompts, src.num_samples or num_prompts)
        sources.append(src)
    return load_prompts(sources, seed=cfg.seed).prompts


def run(cfg: EvalConfig) -> str:
    from dspark_model.atomic import file_sha256
    from dspark_model.calibration import WEIGHTS_NAME
    from dspark_model.prepack import prepack_linears, unpack_linears
    from dspark_model.target import resolve_device
    from eval.baselines import RunSettings, compare_on_prompts
    from eval.gamma_tuning import calibration_config_for
    from eval.metrics import acceptance_summary, throughput_summary
    from eval.report import build_report, calibrate, run_settings_record, write_outputs
    from eval.speculative import eos_token_ids_of

    validate(cfg)
    device = resolve_device(cfg.device, "device", EvalConfigError)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    target, draft, spec, ckpt = load_models(cfg, device)
    weights_sha256 = file_sha256(Path(ckpt) / WEIGHTS_NAME) if ckpt else None  # what a calibration is fitted on
    gamma = cfg.gamma if cfg.gamma is not None else draft.block_size
    if not 1 <= gamma <= draft.block_size:
        raise EvalConfigError(f"gamma={gamma} must lie in 1..{draft.block_size} (the draft's trained block "
                              f"size); set gamma<={draft.block_size}")
    if cfg.scheduler_live.enabled:  # refuse before the eval when the live stage could not run after it
        from eval.live import live_problem

        problem = live_problem(draft, cfg.calibration.enabled)
        if problem:
            raise EvalConfigError(f"scheduler_live.enabled=true: {problem}")
    prompts = load_eval_prompts(cfg)
    name = cfg.name or (f"{Path(ckpt).parent.name}-{Path(ckpt).name}" if ckpt else f"random-{spec.id}")
    out_dir = cfg.out_dir or str(Path("runs") / "eval" / name.replace("/", "_"))  # under the working directory
    settings = RunSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, gamma=gamma,
                           seed=cfg.seed, eos_token_ids=eos_token_ids_of(target),
                           chat_template_kwargs={**spec.chat_template_kwargs, **cfg.chat_template_kwargs},
                           run_generate=cfg.baselines.generate, run_prompt_lookup=cfg.baselines.prompt_lookup,
                           prompt_lookup_num_tokens=cfg.baselines.prompt_lookup_num_tokens,
                           prompt_lookup_max_ngram=cfg.baselines.prompt_lookup_max_ngram,
                           warmup=cfg.warmup, progress=cfg.progress)
    log.info("evaluating %s on %s: %d prompts, gamma=%d, T=%g -> %s", cfg.draft_checkpoint, spec.id,
             len(prompts), gamma, cfg.temperature, out_dir)
    tuning = choose_length(cfg, target, draft, prompts, settings, gamma)
    calibration = calibration_config_for(cfg.calibration, tuning["gamma"], gamma)
    if tuning["gamma"] != gamma:
        settings, gamma = dataclasses.replace(settings, gamma=tuning["gamma"]), tuning["gamma"]
    prepacked = [gamma + 1] if tuning["prepack"] and prepack_linears(target.model, [gamma + 1]) else []
    records, rows, outputs = compare_on_prompts(target, draft, prompts, settings)
    unpack_linears(target.model)  # the live stage profiles and runs its own batch sizes on the plain kernels
    record = run_settings_record(cfg, spec, target, draft, settings, prompts, ckpt, prepacked)
    record["gamma_tuning"] = tuning
    report = build_report(acceptance_summary(records, gamma), throughput_summary(rows), record)
    if cfg.calibration.enabled and draft.confidence_head is not None:
        report = dataclasses.replace(report, **calibrate(records, target, out_dir, ckpt, calibration, cfg.seed,
                                                         spec, weights_sha256))
    if cfg.scheduler_live.enabled:
        from eval.live import run_live_stage

        report.scheduler_live = run_live_stage(target, draft, prompts, cfg.scheduler_live, settings, out_dir,
                                               report.calibration_dir)
    write_outputs(out_dir, report, records if cfg.save_rounds else None, rows, outputs)
    log.info("tau %.3f | tokens/s %s | greedy match %s | report: %s/report.md", report.tau or 0,
             {k: round(v, 1) for k, v in report.tokens_per_s.items() if v}, report.greedy_match_rate, out_dir)
    return out_dir


def choose_length(cfg: EvalConfig, target, draft, prompts, settings, gamma: int) -> dict:
    """The verification length and kernel to time with: ``gamma_tuning``'s pilot and profile when enabled;
    otherwise ``gamma``, prepacked where ``prepack_gemm`` and a timing of both kernels says it pays.
    Returns the report's ``settings.gamma_tuning`` record (``gamma``, ``prepack``, what was measured)."""
    from dspark_model.prepack import prepack_problem
    from eval import gamma_tuning
    from eval.speculative import first_turn_ids

    can_pack = cfg.prepack_gemm and prepack_problem(target.model) is None
    if cfg.gamma_tuning.enabled:
        pilot = gamma_tuning.pilot_prompts(lambda n: load_eval_prompts(cfg, n), prompts,
                                           cfg.gamma_tuning.pilot_prompts, cfg.num_prompts)
        return gamma_tuning.tune_gamma(target, draft, pilot, settings, gamma, can_pack,
                                       cfg.gamma_tuning.profile_repeats)
    if not can_pack:
        return {"gamma": gamma, "prepack": False, "enabled": False}
    context = first_turn_ids(target.tokenizer, prompts[0], settings.chat_template_kwargs)
    costs = gamma_tuning.profile_round_costs(target, draft, context, [gamma], settings.temperature, True, repeats=5,
                                             seed=settings.seed)
    c = costs[gamma]
    return {"gamma": gamma, "prepack": gamma_tuning.prepack_pays(c), "enabled": False,
            "verify_s": c["verify_s"], "verify_prepacked_s": c["verify_prepacked_s"]}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(dcfg) -> None:
    from dspark_model.cli_errors import fail, run_stage

    if OmegaConf.is_missing(dcfg, "draft_checkpoint"):
        fail("eval: no draft given; pass draft=<checkpoint dir> (e.g. runs/train/<name>/final), or "
             "draft=random target=<name> for an untrained draft")
    cfg: EvalConfig = OmegaConf.to_object(dcfg)
    from data_prep.errors import DataPrepError
    from dspark_model.checkpoint import CheckpointMismatchError
    from dspark_model.target import TargetNotFoundError

    run_stage(lambda: run(cfg), (EvalConfigError, DataPrepError, CheckpointMismatchError, TargetNotFoundError),
              folder=cfg.out_dir or Path("runs") / "eval",
              resume="an eval keeps no partial state; rerun the same command to evaluate again")


if __name__ == "__main__":
    sys.argv = cli_args(sys.argv)
    main()
