"""Load an export with the reference implementation of its format and compare it with our draft.

    python -m dspark_model.export <ckpt> --format speculators --verify

The references are not dependencies of this toolkit; each is used when it is importable:

* ``--format speculators``: PyPI ``speculators`` (``DSparkDraftModel``; checked with the version recorded in
  ``reference_layouts.json``). Its training forward is run on the same tokens, anchors and tapped target
  states as ours, with the draft attention on its ``eager`` backend (its default flex attention compiles).
  Its input is the target's ``hidden_states`` at the export's ``aux_hidden_state_layer_ids`` (its own
  convention), so the id + 1 conversion is checked too. It rebuilds the embedding, final norm and LM head
  from the verifier the export names: from that folder when it is a local folder, else (a Hub id, which is
  never downloaded here) from the loaded target, and the report says which.
* ``--format deepspec``: DeepSpec's modeling code (``Qwen3DSparkModel`` / ``Gemma4DSparkModel``, the
  classes its ``architectures`` entry dispatches on); its training forward with anchors pinned through
  ``loss_mask``. An export written with ``--no-embeddings`` gets the target's embedding and LM head.

Compared: block logits after the sequential head and confidence logits (plus, for speculators, the tapped
features it is fed and a reduced vocabulary's d2t / t2d / lm_head; the teacher logits it rebuilds are reported
but not held to the tolerance, see ``REPORTED_ONLY``). Both sides run in float32: the
export is read by each side and cast, and the target is cast to float32 for the check (then restored), so
the tolerance does not depend on the export dtype. A difference counts against
``tolerance * max(1, max |reference output|)``.

``benchmarks/check_speculators.py`` and ``benchmarks/check_deepspec.py`` call the same functions. An EAGLE-3
export is handed to ``verify_eagle3.py`` (speculators' ``Eagle3DraftModel``, its training-time test), which
reuses the pieces here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from dspark_model.export import load_export
from dspark_model.export_eagle3 import eagle3_format
from dspark_model.export_schema import detect_format, read_config

TOLERANCE = 1e-4
REFERENCE_MODULES = {"speculators": "speculators.models.dspark", "deepspec": "deepspec.modeling.dspark"}
HOW_TO_GET = {
    "speculators": "pip install --no-deps --target DIR speculators==0.9.0 hs-connectors==0.9.0 openai loguru "
                   "pydantic-settings python-dotenv, then put DIR on PYTHONPATH",
    "deepspec": "put the root of a DeepSpec checkout (github.com/deepseek-ai/DeepSpec) on PYTHONPATH",
}
DEEPSPEC_CLASSES = ("Qwen3DSparkModel", "Gemma4DSparkModel")
TARGET_ROWS = ("embed_tokens.weight", "lm_head.weight")
# Reported, not held to the tolerance: speculators' teacher logits feed only its training loss, and it builds
# them with a final-norm convention it resolves from the verifier's config (unresolvable for a Hub id here).
REPORTED_ONLY = ("teacher_logits",)


class ReferenceUnavailable(RuntimeError):
    """The reference implementation for a format cannot be imported (or cannot read this export)."""


def reference_unavailable(fmt: str, module: str | None = None) -> str | None:
    """None when the reference of ``fmt`` imports (``module``: its module for another draft architecture than
    DSpark); else one line saying why not and how to get it."""
    if fmt not in REFERENCE_MODULES:
        return f"the {fmt} format has no reference implementation to verify against"
    module = module or REFERENCE_MODULES[fmt]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or the reference failing on import with this torch/transformers
        return f"{fmt}: {module} is not importable ({type(exc).__name__}: {exc}); {HOW_TO_GET[fmt]}"
    return None


def reference_version(fmt: str) -> str:
    if fmt == "speculators":
        try:
            return f"speculators {importlib.metadata.version('speculators')}"
        except importlib.metadata.PackageNotFoundError:
            return "speculators (version unknown)"
    return f"DeepSpec {os.environ.get('DEEPSPEC_COMMIT', '(commit not given: set DEEPSPEC_COMMIT)')}"


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """max |a - b| in fp32; None when neither side has the output, inf when only one has it or shapes differ."""
    if a is None and b is None:
        return None
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    return float((a.detach().float() - b.detach().float()).abs().max())


def export_dtype(export: Path) -> torch.dtype:
    """The dtype an export's weights were written in (its config's ``dtype``)."""
    name = json.loads((Path(export) / "config.json").read_text()).get("dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def use_target_rows(param: torch.Tensor, live: torch.Tensor, dtype: torch.dtype, name: str) -> list[str]:
    """Give the reference the target's own (float32) copy of a tensor the export holds only rounded to its
    dtype, as our draft uses the target's; a problem when the export's copy is not the target's."""
    problems = []
    with torch.no_grad():
        if not torch.equal(param, live.to(dtype).to(param)):
            problems.append(f"{name}: the export's copy differs from the target's (at {str(dtype)[6:]})")
        param.copy_(live)
    return problems


def abs_max(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(t.detach().float().abs().max())


def probe_inputs(block_size: int, vocab_size: int, sequences: int = 2, seed: int = 0):
    """Random token sequences (each (1, T)) and 4 anchors spaced so that both references pick exactly them
    (speculators: anchor + block < T; DeepSpec: an anchor needs its own and the next loss-mask bit)."""
    step = max(3, block_size + 1)
    anchors = [2 + i * step for i in range(4)]
    length = anchors[-1] + block_size + 2
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, length), generator=gen) for _ in range(sequences)], anchors


@contextlib.contextmanager
def float32_target(target):
    """The target's floating-point weights in float32 while active, restored (exactly) afterwards."""
    tensors = [t for t in (*target.model.parameters(), *target.model.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield target
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


@contextlib.contextmanager
def quiet_references():
    """Silence the references' own progress output (loguru in speculators, transformers' loading bar)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from loguru import logger
    except ImportError:
        logger = None
    if logger is not None:
        logger.disable("speculators")
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if logger is not None:
            logger.enable("speculators")


# ---- our side -----------------------------------------------------------------------------------------------
@torch.no_grad()
def our_blocks(draft, target, ids: torch.Tensor, anchors: list[int]) -> dict:
    """Our draft on the blocks at ``anchors``: logits (A, G, K), confidence (A, G) or None, teacher (A, G, K),
    and the target's tapped states (1, T, k*d) and pre-norm last hidden state (1, T, d)."""
    last = {}
    hook = target.model.get_decoder().layers[-1].register_forward_hook(
        lambda m, i, o: last.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        out = target.forward(ids)
    finally:
        hook.remove()
    pos_t = torch.tensor([anchors], device=ids.device)
    h = draft.forward_train(out.tap_hidden, ids, pos_t)[0]  # (A, G, d)
    prev = draft.block_inputs(ids, pos_t)[0][0]  # (A, G)
    pos = pos_t[0, :, None] + torch.arange(draft.block_size, device=ids.device)  # slot k at p + k
    final = out.final_hidden[0, pos]
    teacher = draft.teacher_logits(final) if draft.reduced_vocab else target.logits(final).float()
    return {"logits": draft.logits(h, prev), "confidence": draft.confidence_logits(h, prev), "teacher": teacher,
            "taps": out.tap_hidden, "last_hidden": last["h"]}


# ---- speculators --------------------------------------------------------------------------------------------
def fill_verifier_from_target(model, target, own_head: bool) -> None:
    """What speculators' ``load_verifier_weights`` reads from the verifier folder, taken from the loaded target.
    ``own_head``: the export holds the draft's ``lm_head`` (kept, as speculators keeps a checkpoint's)."""
    with torch.no_grad():
        head = target.lm_head.weight
        if model.use_draft_vocab:
            head = head[model.t2d.to(device=head.device, dtype=torch.bool)]
        model.embed_tokens.weight.copy_(target.embed.weight)
        if not own_head:
            model.lm_head.weight.copy_(head)
        model.verifier_lm_head.weight.copy_(head)
        if hasattr(model, "verifier_norm"):
            model.verifier_norm.weight.copy_(target.model.get_decoder().norm.weight)


def load_speculators(export: Path, target):
    """speculators' DSparkDraftModel from ``export`` in float32 on the target's device: (model, loading info,
    notes). One deviation from a plain ``from_pretrained``: the draft attention runs on the ``eager`` backend."""
    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig

    config = DSparkSpeculatorConfig.from_pretrained(export)
    config.transformer_layer_config._attn_implementation = "eager"
    model, info = DSparkDraftModel.from_pretrained(export, config=config, output_loading_info=True,
                                                   dtype=torch.float32)  # before the verifier weights go in
    notes = finish_speculators_loading(model, target, model.use_draft_vocab, export)
    return model.float().to(target.device).eval(), info, notes


# The tensors speculators' __init__ fills with NaN ("never loaded"), which load_verifier_weights replaces
# from the verifier only while they are still NaN.
NAN_MARKED = ("embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight")


def finish_speculators_loading(model, target, own_head: bool, export: Path | None = None) -> list[str]:
    """With output_loading_info, SpeculatorModel.from_pretrained returns before its two post-load steps; run
    them as it would (no t2d/d2t given: the checkpoint's own tables are kept), the verifier's weights from
    the target when the export names no local folder. -> notes for the report.

    ``export``: the folder loaded. speculators marks its verifier tensors NaN in ``__init__`` and fills one
    from the verifier only while it is NaN; transformers 5 builds the model on the meta device and leaves a
    tensor the file lacks as uninitialised memory (not even reported missing for EAGLE-3), so whether
    speculators then loads the verifier's embedding depended on that memory: an export without
    ``embed_tokens``, as speculators saves them, ran with a garbage embedding in some processes. Those of the
    marked tensors that ``export/model.safetensors`` lacks are therefore marked NaN again first."""
    if export is not None:
        from safetensors import safe_open

        with safe_open(str(Path(export) / "model.safetensors"), framework="pt") as f:
            saved = set(f.keys())
        state = model.state_dict()
        with torch.no_grad():
            for name in set(NAN_MARKED) - saved:
                state[name].fill_(float("nan"))
    model.load_vocab_mappings(None, None)
    verifier = model.config.speculators_config.verifier.name_or_path
    if verifier and Path(verifier).is_dir():
        model.load_verifier_weights()
        return [f"verifier weights loaded by speculators from {verifier}"]
    fill_verifier_from_target(model, target, own_head)
    return [f"verifier weights taken from the loaded target (the export names {verifier!r}, not a local "
            f"folder; nothing is downloaded)"]


@torch.no_grad()
def speculators_blocks(model, aux, ids, last_hidden, anchors: list[int]):
    """speculators' training forward, caught where it hands its outputs to the loss: (logits (A, G, K),
    teacher logits (A, G, K), confidence logits (A, G) or None)."""
    import speculators.models.dspark.core as core

    seen = {}

    def catch(logits, targets, confidence_logits, *args, **kwargs):
        seen.update(logits=logits, targets=targets, conf=confidence_logits)
        return torch.zeros(()), {}

    loss_mask = torch.zeros_like(ids)
    loss_mask[0, anchors] = 1  # the only valid positions: its anchor selection must pick exactly these
    with mock.patch.object(core, "compute_metrics", catch):
        model(hidden_states=aux, input_ids=ids, loss_mask=loss_mask, verifier_last_hidden_states=last_hidden,
              document_ids=torch.zeros_like(ids), max_anchors=len(anchors))
    A, G = len(anchors), model.block_size
    conf = None if seen["conf"] is None else seen["conf"].view(A, G)
    return seen["logits"].view(A, G, -1), seen["targets"].view(A, G, -1), conf


def speculators_weight_problems(model, export: Path, target, draft) -> list[str]:
    """Every tensor of the loaded model must come from the export or the verifier, and none may be NaN."""
    from safetensors.torch import load_file

    exported = load_file(str(export / "model.safetensors"))
    rows = draft.draft_to_target if draft.reduced_vocab else slice(None)
    verifier = {"embed_tokens.weight": target.embed.weight, "verifier_lm_head.weight": target.lm_head.weight[rows],
                "lm_head.weight": target.lm_head.weight[rows],
                "verifier_norm.weight": target.model.get_decoder().norm.weight}
    state = model.state_dict()
    p = [f"{k}: in the export, not in the speculators model" for k in exported if k not in state]
    for k, v in state.items():
        if v.is_floating_point() and v.isnan().any():
            p.append(f"{k}: NaN (never loaded)")
        elif k in exported:
            if not torch.equal(v.cpu(), exported[k].to(v.dtype)):
                p.append(f"{k}: differs from the export")
        elif k in verifier:
            if not torch.equal(v, verifier[k].to(v)):
                p.append(f"{k}: differs from the verifier's")
        else:
            p.append(f"{k}: neither in the export nor the verifier (left at its initialisation)")
    return p


def loading_row(info: dict, notes: list[str]) -> dict:
    return {"missing_keys": sorted(info.get("missing_keys", [])),
            "unexpected_keys": sorted(info.get("unexpected_keys", [])),
            "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])), "notes": notes}


def merge_diff(row: dict, key: str, d: float | None, scale: float) -> None:
    if d is not None:
        row["diff"][key] = max(d, row["diff"].get(key, 0.0))
        row["scale"][key] = max(scale, row["scale"].get(key, 0.0))


def check_speculators_export(export: Path, draft, target, sequences, anchors: list[int]) -> dict:
    """speculators loading ``export`` vs ``draft`` on every sequence: loading report, weight problems, and per
    output the max |ours - speculators| (``diff``) and max |speculators| (``scale``)."""
    model, info, notes = load_speculators(Path(export), target)
    row = {**loading_row(info, notes), "weight_problems": speculators_weight_problems(model, Path(export),
                                                                                       target, draft),
           "diff": {}, "scale": {}}
    for ids in sequences:
        ids = ids.to(target.device)
        ours = our_blocks(draft, target, ids, anchors)
        with torch.no_grad():  # its input: the target's hidden_states at ITS aux ids (ours + 1)
            hs = target.model(ids, output_hidden_states=True).hidden_states
        aux = torch.cat([hs[i] for i in model.target_layer_ids], dim=-1).float()
        logits, teacher, conf = speculators_blocks(model, aux, ids, ours["last_hidden"].float(), anchors)
        for key, a, b in (("aux_hidden", ours["taps"], aux), ("logits", ours["logits"], logits),
                          ("teacher_logits", ours["teacher"], teacher), ("confidence", ours["confidence"], conf)):
            merge_diff(row, key, max_diff(a, b), abs_max(b))
    if draft.reduced_vocab:  # the K-row head our draft predicts with
        row["diff"].update(vocab_table_diffs(model, draft, target, draft.output_head()[0]))
    return row


def vocab_table_diffs(model, draft, target, head: torch.Tensor) -> dict[str, float]:
    """A reduced vocabulary as speculators loaded it against ours: d2t and the K-row ``head`` (max |diff|),
    t2d (number of disagreeing entries)."""
    d2t = draft.draft_to_target - torch.arange(draft.out_vocab_size, device=draft.draft_to_target.device)
    t2d = torch.zeros(target.vocab_size, dtype=torch.bool, device=d2t.device)
    t2d[draft.draft_to_target] = True
    head = head.detach()
    return {"d2t": max_diff(model.d2t.to(d2t.device), d2t), "t2d": float((model.t2d.to(t2d.device) != t2d).sum()),
            "lm_head": max_diff(model.lm_head.weight.to(head.device), head)}


# ---- DeepSpec -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def old_crop_meaning():
    """While active, ``DynamicCache.crop(n)`` with n > 0 keeps the first n positions: what DeepSpec's decoding
    loop means (transformers <= 5.10); transformers 5.24 reads n as a count to remove."""
    from transformers import DynamicCache

    original = DynamicCache.crop

    def crop(self, n: int) -> None:
        original(self, -(self.get_seq_length() - n) if n > 0 else n)

    DynamicCache.crop = crop
    try:
        yield
    finally:
        DynamicCache.crop = original


def load_deepspec(export: Path, target):
    """DeepSpec's draft class named by the export's ``architectures`` (float32, sdpa attention) on the
    target's device: (model, loading info + ``weight_problems``, notes). Its embedding and LM head are the
    target's float32 ones (the export's copies are checked to be the target's at the export dtype)."""
    import deepspec.modeling.dspark as dspark

    arch = (json.loads((export / "config.json").read_text()).get("architectures") or ["?"])[0]
    if arch not in DEEPSPEC_CLASSES:
        raise ReferenceUnavailable(f"deepspec: DeepSpec's modeling code has no {arch} (it ships "
                                   f"{', '.join(DEEPSPEC_CLASSES)}), so this export cannot be checked with it")
    model, info = getattr(dspark, arch).from_pretrained(export, dtype=torch.float32, attn_implementation="sdpa",
                                                       output_loading_info=True)
    notes, missing, problems = [], set(info.get("missing_keys", [])), []
    live = {"embed_tokens.weight": (model.embed_tokens.weight, target.embed.weight),
            "lm_head.weight": (model.lm_head.weight, target.lm_head.weight)}
    if missing & set(TARGET_ROWS):  # written with --no-embeddings: DeepSpec would run them at random
        with torch.no_grad():
            for param, weight in live.values():
                param.copy_(weight)
        info = dict(info, missing_keys=sorted(missing - set(TARGET_ROWS)))
        notes.append("embed_tokens / lm_head are not in the export (--no-embeddings): taken from the loaded "
                     "target")
    else:
        for name, (param, weight) in live.items():
            problems += use_target_rows(param, weight, export_dtype(export), name)
    return model.float().to(target.device).eval(), dict(info, weight_problems=problems), notes


@torch.no_grad()
def deepspec_blocks(model, target, ids, anchors: list[int]):
    """DeepSpec's training forward with the anchors pinned through ``loss_mask``: (logits (A, G, K),
    confidence logits (A, G) or None)."""
    from deepspec.modeling.dspark import extract_context_feature

    loss_mask = torch.zeros_like(ids)
    for p in anchors:  # a valid anchor needs its own and its first label's loss-mask bit
        loss_mask[0, p:p + 2] = 1
    hs = target.model(ids, output_hidden_states=True).hidden_states
    model.num_anchors = len(anchors)
    model.config._attn_implementation = "flex_attention"  # its training mask is a flex BlockMask
    try:
        out = model(input_ids=ids, target_hidden_states=extract_context_feature(hs, model.target_layer_ids),
                    loss_mask=loss_mask)
    finally:
        model.config._attn_implementation = "sdpa"
    if not out.block_keep_mask.all():
        raise RuntimeError("DeepSpec did not sample the pinned anchors")
    return out.draft_logits[0], None if out.confidence_pred is None else out.confidence_pred[0]


def check_deepspec_export(export: Path, draft, target, sequences, anchors: list[int]) -> dict:
    """DeepSpec loading ``export`` vs ``draft`` (training forward) on every sequence: loading report, whether
    the exported lm_head is the target's, and per output ``diff`` / ``scale`` as for speculators. Also returns
    the loaded model under ``"model"`` (for the benchmark's decoding loop)."""
    model, info, notes = load_deepspec(Path(export), target)
    row = {**loading_row(info, notes), "weight_problems": info["weight_problems"], "diff": {}, "scale": {},
           "lm_head_equals_target": not any(p.startswith("lm_head") for p in info["weight_problems"])}
    for ids in sequences:
        ids = ids.to(target.device)
        ours = our_blocks(draft, target, ids, anchors)
        logits, conf = deepspec_blocks(model, target, ids, anchors)
        merge_diff(row, "logits", max_diff(ours["logits"], logits), abs_max(logits))
        merge_diff(row, "confidence", max_diff(ours["confidence"], conf), abs_max(conf))
    row["model"] = model
    return row


# ---- the export --verify check ------------------------------------------------------------------------------
@dataclass
class Verification:
    fmt: str
    reference: str
    tolerance: float
    blocks: str
    row: dict = field(default_factory=dict)

    @property
    def load_problems(self) -> list[str]:
        r = self.row
        out = [f"{k}: {r[k]}" for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if r.get(k)]
        return out + list(r.get("weight_problems", []))

    @property
    def failed(self) -> list[str]:
        """Outputs whose difference exceeds tolerance * max(1, max |reference|)."""
        return [k for k, d in self.row["diff"].items() if k not in REPORTED_ONLY
                and not d <= self.tolerance * max(1.0, self.row["scale"].get(k, 0.0))]

    @property
    def ok(self) -> bool:
        return not (self.load_problems or self.failed)

    def lines(self) -> list[str]:
        diffs = ", ".join(f"{k} {d:.2g}" for k, d in self.row["diff"].items())
        out = [f"verify: {self.reference} loaded the export ({'clean' if not self.load_problems else 'PROBLEMS'})"]
        out += [f"verify:   {n}" for n in self.row.get("notes", [])]
        out += [f"verify:   {p}" for p in self.load_problems]
        verdict = "ok" if self.ok else f"FAILED {', '.join(self.failed or ['(loading)'])}"
        out.append(f"verify: max |ours - {self.fmt}| over {self.blocks}: {diffs} (tolerance {self.tolerance:g} x "
                   f"max(1, |reference|)): {verdict}")
        return out


def verify_export(export_dir: str | Path, target, fmt: str | None = None, tolerance: float = TOLERANCE,
                  sequences: int = 2, seed: int = 0) -> Verification:
    """Load ``export_dir`` with our loader and with the reference of its format; compare on random inputs.

    Raises ReferenceUnavailable when the reference cannot be imported or has no class for this export.
    """
    export_dir = Path(export_dir)
    config = read_config(export_dir)
    if eagle3_format(config):  # an EAGLE-3 draft's export: its own reference class and forward
        from dspark_model.verify_eagle3 import verify_eagle3_export

        return verify_eagle3_export(export_dir, target, tolerance, sequences, seed)
    fmt = fmt or detect_format(config)
    why = reference_unavailable(fmt)
    if why:
        raise ReferenceUnavailable(why)
    with float32_target(target), quiet_references():
        draft = load_export(export_dir, target).float()  # our toolkit's reading of the very same files
        seqs, anchors = probe_inputs(draft.block_size, target.vocab_size, sequences, seed)
        check = check_speculators_export if fmt == "speculators" else check_deepspec_export
        row = check(export_dir, draft, target, seqs, anchors)
    row.pop("model", None)
    blocks = f"{sequences} random sequences x {len(anchors)} blocks of {draft.block_size}"
    return Verification(fmt, reference_version(fmt), tolerance, blocks, row)
