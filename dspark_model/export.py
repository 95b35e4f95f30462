"""Export a trained draft for serving engines, and load any export back into our own module.

    python -m dspark_model.export runs/train/<name>/final --format speculators --out runs/export/<name>

Formats (schemas and checks in ``export_schema.py``):

* ``native``      our checkpoint, recast to the export dtype: model.safetensors, config.json,
                  calibration.json (when calibrated), README.md. No target weights.
* ``deepspec``    SGLang / DeepSpec: config.json = the target's text config with ``num_hidden_layers`` = draft
                  layers, ``architectures`` = [<Family>DSparkModel], the DSpark keys, ``target_layer_ids`` in
                  OUR decoder-layer convention (no conversion), and what DeepSpec's config builder writes
                  (``num_anchors`` = train.max_anchors, ``tie_word_embeddings: false``, ``num_target_layers``).
                  Weights under the reference names (``layers.{i}.*``, ``fc``, ``hidden_norm``, ``norm``,
                  ``markov_head.*``, ``confidence_head.proj``) PLUS the target's ``embed_tokens.weight`` and
                  ``lm_head.weight`` (DeepSpec's evaluator silently runs with random ones otherwise);
                  ``--no-embeddings`` omits them.
* ``speculators`` vLLM speculators (``speculators_model_type: dspark``), keyed as speculators' own save writes
                  it: ``aux_hidden_state_layer_ids`` = our ids + 1 (hidden_states indices), the verifier named
                  by where it loads (``--verifier-path``, ``verifier_source``). Neither embed_tokens nor lm_head:
                  vLLM shares the verifier's, except that a reduced draft vocabulary (K tokens) carries its
                  K-row ``lm_head.weight`` and the ``d2t`` (int64 offsets, target id = i + d2t[i]) / ``t2d``
                  (bool over the target vocabulary) tables; deepspec refuses such a draft (SGLang runs the full
                  head). vLLM's loader (Qwen3DSparkModel) builds only the vanilla Markov head: a gated or rnn
                  head exports and loads in speculators, and the export warns that vLLM refuses it
                  (``benchmarks/check_vllm.py`` applies vLLM's loading rules, ``vllm_layout.json``).

Both public formats write the draft's flat RoPE set (rope.py) and are checked against the weight names and
shapes the reference implementations read (``reference.py``, recorded from their code).

A calibrated draft's deepspec / speculators export also carries ``serving/``: the STS and SPS / cost files
SGLang and TensorRT-LLM read for adaptive verification, converted from ``calibration.json`` (``serving.py``).
A checkpoint whose ``calibration.json`` was fitted on other weights, or written by another version of the
toolkit, is not exported (one ``error:`` line: calibrate again with eval); the copy in the export is bound
to the exported weights file (``calibration.py``).

``--verify`` loads the written export with the reference implementation of its format (speculators, or
DeepSpec's modeling code) and compares block logits and confidences with our draft on random inputs
(``verify.py``), printing the largest differences. The check runs before the folder is moved into place:
when the reference is not importable, or a difference exceeds the tolerance, nothing is written and the
command ends with one ``error:`` line (status 2). An EAGLE-3 checkpoint goes to ``export_eagle3.py``
(speculators -> vLLM's ``eagle3`` format, deepspec -> SGLang's EAGLE-3 layout); its ``--verify`` is
``verify_eagle3.py``'s and exists for the speculators export only.

A DFlash draft (no sequential head) is exported with ``markov_rank: 0`` and the readers' default
``markov_head_type: "vanilla"`` (inert at rank 0, and accepted by strict validators); no markov weights.
Every export is validated against its schema and loaded back before it is moved into place; the folder
appears atomically (written to a temporary sibling, then renamed).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark_model import __version__
from dspark_model.atomic import atomic_write_json, replace_dir
from dspark_model.calibration import CalibrationError, load_beside, read_beside, recalibrate_hint
from dspark_model.checkpoint import (
    CALIBRATION_NAME,
    CONFIG_NAME,
    LOADING_FIELDS,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    load_draft,
    read_draft_arch,
    read_draft_config,
    target_spec_from_checkpoint,
)
from dspark_model.config import TargetSpec
from dspark_model.draft import DSparkDraft
from dspark_model.export_schema import (
    FORMATS,
    TARGET_WEIGHTS,
    TOOLKIT_KEY,
    ExportSchemaError,
    deepspec_architecture,
    native_config,
    native_vocab_tensors,
    read_config,
    validate_export,
)
from dspark_model.rope import DRAFT_LAYER_TYPE, export_rope_parameters
from dspark_model.serving import write_engine_files
from dspark_model.target import TAP_CONVENTION, TargetNotFoundError, dtype_name, hidden_states_index
from dspark_model.vocab import d2t_t2d

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# What speculators' own DSparkDraftModel.save_pretrained writes (version checked: reference_layouts.json).
SPECULATORS_VERSION = "0.9.0"
SPECULATORS_ARCHITECTURE = "DSparkDraftModel"
DEFAULT_NUM_ANCHORS = 512  # train.max_anchors' default (train/schema.py OptimConfig); DeepSpec's recipes use 512 too
_PRIVATE_KEYS = ("_name_or_path", "transformers_version", "auto_map")  # local paths / remote code
INCLUDES_EMBEDDINGS = {"native": False, "deepspec": True, "speculators": False}  # per-format default


class ExportError(ValueError):
    """An export cannot be written as asked; the message names the problem and the fix."""


class VerificationError(ExportError):
    """``--verify``: the reference implementation cannot be used, or it computes something else."""


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ExportError(f"unknown export dtype {name!r}; choose bf16, fp16 or fp32")
    return DTYPES[name]


# ---- configs ------------------------------------------------------------------------------------------------
def layer_config(draft: DSparkDraft, target) -> dict:
    """The target's text config reshaped into the draft's decoder layers (deepspec's config and speculators'
    ``transformer_layer_config``): the draft's sizes and layer count, every layer full attention, and the
    draft's flat RoPE set (repeated per layer type for per-layer-type families, see rope.py)."""
    a = draft.arch
    flat = dict(a.rope_config["rope_parameters"])
    rope = export_rope_parameters(flat, getattr(target.config, "rope_parameters", None))
    cfg = {k: v for k, v in target.config.to_dict().items() if k not in _PRIVATE_KEYS}
    cfg.update(model_type=getattr(target.config, "model_type", None), architectures=target_architectures(target),
               **a.layer_keys(), rope_parameters=rope, attention_bias=False, mlp_bias=False)
    if "rope_theta" in flat:  # flat copy for readers that predate rope_parameters
        cfg["rope_theta"] = flat["rope_theta"]
    if "layer_types" in cfg:  # draft layers are all full attention (they attend to the whole context)
        cfg["layer_types"] = [DRAFT_LAYER_TYPE] * a.num_layers
    return cfg


def target_architectures(target) -> list[str]:
    return list(getattr(target.model.config, "architectures", None) or [type(target.model).__name__])


def training_num_anchors(ckpt_config: dict) -> int:
    """Anchor blocks per training sequence (DeepSpec's ``num_anchors``): the run's ``train.max_anchors``, the
    cap on anchors per row, read from the resolved config saved with a final checkpoint; else its default."""
    for key in ("resolved_config", "train_config"):
        doc = ckpt_config.get(key)
        train = doc.get("train") if isinstance(doc, dict) else None
        if isinstance(train, dict) and isinstance(train.get("max_anchors"), int):
            return train["max_anchors"]
    return DEFAULT_NUM_ANCHORS


def _provenance(draft: DSparkDraft, target, fmt: str, dtype: torch.dtype, embeddings: bool) -> dict:
    return {"toolkit_version": __version__, "format": fmt, "target_id": target.name_or_path,
            "target_revision": target.revision, "target_num_hidden_layers": target.num_layers,
            "tap_layer_ids": list(draft.tap_layer_ids), "tap_layer_convention": TAP_CONVENTION,
            "sequential_head": draft.sequential_head, "includes_target_embeddings": embeddings,
            "includes_lm_head": embeddings, "dtype": dtype_name(dtype)}


def deepspec_config(draft: DSparkDraft, target, dtype: torch.dtype, embeddings: bool, num_anchors: int) -> dict:
    """The draft's layer config plus the keys DeepSpec's config builder writes (``build_draft_config``)."""
    cfg = layer_config(draft, target)
    model_type = cfg.get("model_type") or "unknown"
    cfg.update(architectures=[deepspec_architecture(model_type)], model_type=model_type,
               target_layer_ids=list(draft.tap_layer_ids), num_target_layers=target.num_layers,
               num_anchors=num_anchors, tie_word_embeddings=False,  # the draft's lm_head is its own copy
               dtype=dtype_name(dtype), torch_dtype=dtype_name(dtype), **draft.arch.head_keys())
    cfg[TOOLKIT_KEY] = _provenance(draft, target, "deepspec", dtype, embeddings)
    return cfg


def verifier_source(target, verifier_path: str | None = None) -> tuple[str, str]:
    """(``speculators_config.verifier.name_or_path``, why): what speculators / vLLM load the verifier's
    embedding, final norm and LM head from. It must load there, so a GGUF file never is one."""
    if verifier_path:
        return verifier_path, "given with --verifier-path"
    local = target.weights_path
    if local and not str(local).endswith(".gguf"):
        return str(Path(local).resolve()), ("the local folder the target was loaded from: it loads on this "
                                            "machine only; name a Hub id or shared path with --verifier-path")
    if local:
        return target.name_or_path, ("the target's Hub id: the target was loaded from a GGUF file, which "
                                     "speculators cannot read; name another copy with --verifier-path")
    return target.name_or_path, "the target's Hub id"


def speculators_config(draft: DSparkDraft, target, dtype: torch.dtype, verifier_path: str | None = None) -> dict:
    """vLLM speculators config, keyed as speculators' own save writes it: hidden_states-index layer ids, the
    target's config reshaped into the draft's layers, verifier = where the target loads from."""
    verifier, why = verifier_source(target, verifier_path)
    lc = dict(layer_config(draft, target), dtype=dtype_name(dtype))
    prov = dict(_provenance(draft, target, "speculators", dtype, False), verifier_source=why)
    return {
        "architectures": [SPECULATORS_ARCHITECTURE], "speculators_model_type": "dspark",
        "speculators_version": SPECULATORS_VERSION, "transformer_layer_config": lc,
        "draft_vocab_size": draft.out_vocab_size, "target_hidden_size": target.hidden_size,
        "aux_hidden_state_layer_ids": [hidden_states_index(i) for i in draft.tap_layer_ids],
        "sample_from_anchor": True, "sliding_window_non_causal": False, "tie_word_embeddings": False,
        **draft.arch.head_keys(),
        "speculators_config": {
            "algorithm": "dspark",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": draft.block_size,
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": target_architectures(target)},
        },
        "dtype": dtype_name(dtype),
        TOOLKIT_KEY: prov,
    }


def export_tensors(draft: DSparkDraft, target, dtype: torch.dtype, embeddings: bool,
                   fmt: str = "native") -> dict[str, torch.Tensor]:
    """Draft weights under their own names (all formats share them), plus the target's embedding and LM
    head when asked. Tied target weights are cloned: safetensors refuses shared storage. A reduced draft
    vocabulary goes to speculators as its ``d2t``/``t2d`` tables and the K-row ``lm_head.weight``."""
    out = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
           for k, v in draft.state_dict().items()}
    if fmt == "speculators" and draft.reduced_vocab:
        d2t, t2d = d2t_t2d(out.pop("draft_to_target"), draft.arch.vocab_size)
        out.update(d2t=d2t, t2d=t2d)
        if "lm_head.weight" not in out:  # the frozen head: the target's own rows of the K tokens
            out["lm_head.weight"] = draft.output_head()[0].detach().to(dtype).cpu().contiguous()
    if embeddings:
        out["embed_tokens.weight"] = target.embed.weight.detach().to(dtype).cpu().clone()  # (V, d)
        out["lm_head.weight"] = target.lm_head.weight.detach().to(dtype).cpu().clone()  # (V, d)
    return out


def build_export(draft: DSparkDraft, target, fmt: str, dtype: torch.dtype, embeddings: bool,
                 ckpt_config: dict, verifier_path: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json content, tensors) of one format."""
    if fmt == "deepspec" and draft.reduced_vocab:
        raise ExportError(f"this draft predicts a reduced vocabulary of {draft.out_vocab_size} tokens, but the "
                          f"deepspec/SGLang format runs the target's full LM head; export --format speculators "
                          f"(vLLM reads d2t/t2d), or train with draft.draft_vocab_size=null for SGLang")
    tensors = export_tensors(draft, target, dtype, embeddings, fmt)
    if fmt == "native":
        from dspark_model.card import redact  # the checkpoint may embed a training config with credentials

        # an export names its target like a checkpoint does: no loading settings travel with it
        named = {k: v for k, v in (ckpt_config.get("target") or {}).items() if k not in LOADING_FIELDS}
        config = redact(dict(ckpt_config, target=named, dtype=dtype_name(dtype),
                             includes_target_embeddings=False))
    elif fmt == "deepspec":
        config = deepspec_config(draft, target, dtype, embeddings, training_num_anchors(ckpt_config))
    else:
        config = speculators_config(draft, target, dtype, verifier_path)
        if config["markov_rank"] and config["markov_head_type"] != "vanilla":
            log.warning("a %s Markov head exports for speculators, but vLLM's DSpark loader (Qwen3DSparkModel) "
                        "builds only the vanilla head and refuses its weights; serve it with speculators or "
                        "train sequential_head=markov for vLLM", config["markov_head_type"])
    return config, tensors


# ---- writing ------------------------------------------------------------------------------------------------
def _swap_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty folder is simply replaced
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it, or choose --out")
    replace_dir(tmp, out_dir)


def _check_out_dir(ckpt_dir: Path, out_dir: Path) -> None:
    ck, out = ckpt_dir.resolve(), out_dir.resolve()
    if out == ck or out in ck.parents:
        raise ExportError(f"--out {out_dir} would replace the checkpoint {ckpt_dir}; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file; choose a folder")


def _verify_round_trip(tmp: Path, target, tensors: dict[str, torch.Tensor]) -> None:
    """Load the written export with our loader and require the very same draft weights."""
    loaded = load_export(tmp, target).state_dict()
    tensors = native_vocab_tensors(dict(tensors))
    shared = [k for k in TARGET_WEIGHTS if k in tensors and k not in loaded]  # the target's, not the draft's
    bad = [k for k, v in loaded.items() if k not in tensors or not torch.equal(v.cpu(), tensors[k])]
    if bad or len(loaded) != len(tensors) - len(shared):
        raise ExportError(f"internal error: the export does not load back to the same weights ({bad[:4]})")


def _verify_with_reference(tmp: Path, target, fmt: str, tolerance: float, echo) -> None:
    """``--verify``: the reference implementation reads the written files; raise unless it computes ours."""
    from dspark_model.verify import ReferenceUnavailable, verify_export

    try:
        result = verify_export(tmp, target, fmt, tolerance=tolerance)
    except ReferenceUnavailable as exc:
        raise VerificationError(f"--verify: {exc}; nothing was written") from None
    for line in result.lines():
        echo(line)
    if not result.ok:
        raise VerificationError(f"--verify: the {fmt} reference ({result.reference}) does not compute what this "
                                f"draft computes ({'; '.join(result.load_problems + result.failed)}); nothing "
                                f"was written")


def _check_verify_request(fmt: str, verify: bool) -> None:
    if not verify:
        return
    if fmt == "native":
        raise ExportError("--verify checks an export against the reference implementation of its format; the "
                          "native format has none (it is loaded back and compared with the checkpoint anyway)")
    from dspark_model.verify import reference_unavailable

    why = reference_unavailable(fmt)  # before anything is loaded or written
    if why:
        raise VerificationError(f"--verify: {why}; nothing was written")


def export_draft(ckpt_dir: str | Path, out_dir: str | Path, format: str = "native", dtype=None,
                 include_embeddings: bool | None = None, target=None, overwrite: bool = False,
                 card_sources=None, device: str = "cpu", target_spec: TargetSpec | None = None,
                 verifier_path: str | None = None, verify: bool = False, verify_tolerance: float | None = None,
                 echo=None) -> Path:
    """Export the checkpoint in ``ckpt_dir`` to ``out_dir`` in ``format``; returns the folder.

    ``dtype``: bf16 / fp16 / fp32 (None keeps the checkpoint's). ``include_embeddings``: None = the format's
    default (deepspec only). ``target``: a loaded Target; else it is loaded from ``target_spec`` (the user's
    choice of weights, downloads, remote code), else the target the checkpoint names is loaded the safe way
    (``checkpoint.target_spec_from_checkpoint``: local files only, no remote code).
    ``card_sources``: ``card.CardSources`` (eval report, data manifest, train config; auto-discovered).
    ``verifier_path`` (speculators): where engines load the verifier from (default: ``verifier_source``).
    ``verify``: check the export with the reference implementation of its format before it is moved into place
    (``verify.py``; ``verify_tolerance`` defaults to ``verify.TOLERANCE``); its report lines go to ``echo``
    (default: this module's log at INFO).
    """
    from dspark_model import card as card_mod
    from dspark_model.target import load_target

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    embeddings = INCLUDES_EMBEDDINGS[format] if include_embeddings is None else bool(include_embeddings)
    if verifier_path and format != "speculators":
        raise ExportError("--verifier-path names the verifier of a speculators export; the "
                          f"{format} format has none")
    if embeddings and format != "deepspec":
        raise ExportError(f"the {format} format never carries the target's embed_tokens/lm_head "
                          f"(the engine shares the target's); drop include_embeddings")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if read_draft_arch(ckpt_dir)[1].architecture == "eagle3":  # the EAGLE-3 baseline: export_eagle3.py
        _check_out_dir(ckpt_dir, out_dir)
        check = _eagle3_verify_check(format, verify, verify_tolerance, echo or log.info)
        return _export_eagle3(ckpt_dir, out_dir, format, check, dtype=dtype, target=target,
                              target_spec=target_spec, verifier_path=verifier_path, overwrite=overwrite,
                              device=device, card_sources=card_sources)
    _check_verify_request(format, verify)
    _check_out_dir(ckpt_dir, out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it, or choose --out")
    ckpt_config = read_draft_config(ckpt_dir)
    _check_calibration(ckpt_dir)
    if target is None:
        try:
            target = load_target(target_spec_from_checkpoint(ckpt_dir, target_spec), device)
        except TargetNotFoundError as exc:
            if target_spec is not None:
                raise
            raise TargetNotFoundError(f"{exc} (export: the checkpoint only names its target; say where it is "
                                      f"with --target-path, or let it download with --allow-download)") from None
    draft = load_draft(ckpt_dir, target)
    torch_dtype = resolve_dtype(dtype) or next(draft.parameters()).dtype
    config, tensors = build_export(draft, target, format, torch_dtype, embeddings, ckpt_config, verifier_path)
    sources = card_sources or card_mod.discover_sources(ckpt_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "dspark_export": format})
        atomic_write_json(tmp / CONFIG_NAME, config)
        if draft.calibration is not None:  # checked against the checkpoint's weights: bind it to their export
            calibration = draft.calibration.bound_to(tmp / WEIGHTS_NAME)
            calibration.write(tmp / CALIBRATION_NAME)
            if format != "native":  # what SGLang / TensorRT-LLM read for adaptive verification
                write_engine_files(tmp, calibration, draft.block_size, draft.confidence_head is not None)
        validate_export(tmp, target, fmt=format)
        _verify_round_trip(tmp, target, tensors)
        if verify:
            from dspark_model.verify import TOLERANCE

            _verify_with_reference(tmp, target, format, verify_tolerance or TOLERANCE, echo or log.info)
        card_mod.write_card(tmp, sources, target)
        _swap_into_place(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s export (%s, %d tensors) to %s", format, dtype_name(torch_dtype), len(tensors), out_dir)
    return out_dir


def _eagle3_verify_check(format: str, verify: bool, tolerance: float | None, echo):
    """An EAGLE-3 export's ``--verify`` as a check on the written folder (None without --verify); refused here,
    before anything is loaded or written, for the native format, SGLang's layout (no importable reference) or
    when speculators is not importable."""
    if format == "native":
        raise ExportError("an EAGLE-3 draft exports as --format speculators (vLLM) or deepspec (SGLang's EAGLE-3 "
                          "layout); its checkpoint folder is already the native format")
    if not verify:
        return None
    from dspark_model.verify import TOLERANCE
    from dspark_model.verify_eagle3 import eagle3_reference_unavailable

    why = eagle3_reference_unavailable("speculators" if format == "speculators" else "sglang")
    if why:
        raise VerificationError(f"--verify: {why}; nothing was written")
    return lambda tmp, target: _verify_with_reference(tmp, target, format, tolerance or TOLERANCE, echo)


def _export_eagle3(ckpt_dir: Path, out_dir: Path, format: str, check, **kwargs) -> Path:
    """An EAGLE-3 checkpoint: speculators -> vLLM's eagle3 format, deepspec -> SGLang's EAGLE-3 format."""
    from dspark_model.export_eagle3 import export_eagle3_checkpoint

    fmt = "speculators" if format == "speculators" else "sglang"
    return export_eagle3_checkpoint(ckpt_dir, out_dir, fmt, check=check, **kwargs)


def _check_calibration(ckpt_dir: Path) -> None:
    """Refuse to publish a calibration that does not belong to the checkpoint's weights."""
    try:
        read_beside(ckpt_dir, fix=f"{recalibrate_hint(ckpt_dir)}, then export again")
    except CalibrationError as exc:
        raise ExportError(f"not exporting {ckpt_dir}: {exc}") from None


# ---- loading ------------------------------------------------------------------------------------------------
def _check_target_weights(extra: dict[str, torch.Tensor], target, export_dir: Path) -> None:
    """Exported embed/lm_head should be this target's: warn (the draft still uses the live target's)."""
    live = {"embed_tokens.weight": target.embed.weight, "lm_head.weight": target.lm_head.weight}
    for name, t in extra.items():
        if not torch.equal(t, live[name].detach().to(device=t.device, dtype=t.dtype)):
            log.warning("%s: %s differs from the target %s's (exported for another revision?); the loaded "
                        "draft uses the target's own", export_dir, name, target.name_or_path)


def load_export(export_dir: str | Path, target, device=None) -> DSparkDraft:
    """Rebuild our ``DSparkDraft`` from an export of any format, checked against and attached to ``target``.

    The draft keeps the export's dtype; its logits equal those of the native draft cast to that dtype.
    """
    export_dir = Path(export_dir)
    fmt = validate_export(export_dir, target)
    if fmt == "native":
        return load_draft(export_dir, target, device)
    native = native_config(fmt, read_config(export_dir))
    draft = DSparkDraft(native["arch"])
    state = native_vocab_tensors(load_file(str(export_dir / WEIGHTS_NAME)))
    own = set(draft.state_dict())  # a reduced draft's K-row lm_head is its own weight
    extra = {k: state.pop(k) for k in TARGET_WEIGHTS if k in state and k not in own}
    _check_target_weights(extra, target, export_dir)
    draft.load_state_dict(state, strict=True)
    draft.to(dtype=next(v.dtype for v in state.values() if v.is_floating_point()))
    try:
        draft.calibration = load_beside(export_dir)  # None (with a warning) when fitted on other weights
    except CalibrationError as exc:
        raise ExportError(str(exc)) from None
    draft.to(device=device or target.device).attach_target(target)
    return draft.eval()


# ---- command line -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dspark_model.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="draft checkpoint folder (save_pretrained output, e.g. runs/train/<name>/final)")
    p.add_argument("--format", choices=FORMATS, default="native")
    p.add_argument("--out", help="output folder (default runs/export/<checkpoint name>-<format>)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="export dtype (default: checkpoint's)")
    p.add_argument("--no-embeddings", action="store_true", help="deepspec: omit embed_tokens and lm_head")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--report", help="eval report.json for the card (default: found beside the checkpoint)")
    p.add_argument("--data-manifest", help="data_prep manifest.json for the card's data provenance")
    p.add_argument("--train-config", help="resolved training config (yaml/json) for the card")
    p.add_argument("--repo-id", help="Hub repo id to show in the card's usage snippets")
    p.add_argument("--verifier-path", help="speculators: the verifier engines load (Hub id or path; default: the "
                                           "target's Hub id, or the local folder it was loaded from)")
    p.add_argument("--verify", action="store_true",
                   help="load the export with the reference implementation of its format (speculators / "
                        "DeepSpec's modeling code, when importable) and compare block logits and confidences "
                        "with this draft before writing it; fails when the reference is not importable")
    p.add_argument("--verify-tolerance", type=float, default=None,
                   help="--verify: largest allowed |ours - reference| per unit of max(1, |reference|) "
                        "(default 1e-4)")
    p.add_argument("--device", default="cpu", help="where to load the target (default cpu)")
    # The checkpoint only names its target; where its weights come from is decided here, never by the checkpoint.
    p.add_argument("--target-path", help="the target's weights: a model folder or a .gguf file (default: the "
                                          "target the checkpoint names, from the local Hugging Face cache)")
    p.add_argument("--allow-download", action="store_true",
                   help="let the Hub client download the named target if it is not cached")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the target's own Python code (only for a target folder / repo you trust)")
    return p.parse_args(argv)


def user_target_spec(args: argparse.Namespace) -> TargetSpec | None:
    """The target as the user chose it on the command line (None: the checkpoint's named target, safely)."""
    if not (args.target_path or args.allow_download or args.trust_remote_code):
        return None
    named = target_spec_from_checkpoint(args.ckpt)
    return dataclasses.replace(named, path=args.target_path or named.path,
                               random=None if args.target_path else named.random,
                               allow_download=args.allow_download, trust_remote_code=args.trust_remote_code)


def main(argv=None) -> int:
    from dspark_model import card as card_mod

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = args.out or os.path.join("runs", "export", f"{Path(args.ckpt).resolve().name}-{args.format}")
    try:
        sources = card_mod.discover_sources(args.ckpt)
        sources = dataclasses.replace(
            sources, report=args.report or sources.report, repo_id=args.repo_id,
            data_manifest=args.data_manifest or sources.data_manifest,
            train_config=args.train_config or sources.train_config)
        export_draft(args.ckpt, out, args.format, args.dtype, False if args.no_embeddings else None,
                     overwrite=args.overwrite, card_sources=sources, device=args.device,
                     target_spec=user_target_spec(args), verifier_path=args.verifier_path, verify=args.verify,
                     verify_tolerance=args.verify_tolerance, echo=lambda line: print(line, file=sys.stderr))
    except (ExportError, ExportSchemaError, CheckpointMismatchError, TargetNotFoundError,
            card_mod.CardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
