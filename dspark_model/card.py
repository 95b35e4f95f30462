"""Model card (README.md) for an exported draft: Hub metadata, how to serve it, and what was measured.

The card is a ``huggingface_hub.ModelCard``: its metadata is a ``ModelCardData`` (base_model = the target,
library name, license, tags) whose ``model-index`` holds the measured tau per eval set as ``EvalResult``s, so
the Hub shows them; the Markdown body below it is ours. It is rendered from the export folder itself
(config.json, calibration.json, the weights header) plus optional documents found beside the checkpoint or
named on the command line:

* the eval ``report.json`` (tau per dataset, acceptance by position, tokens/s and speed-ups), read as the
  ``eval.report.EvalReport`` record,
* the resolved training config (yaml or json),
* the data_prep ``manifest.json`` (prompt sources and their hashes), read as ``data_prep.manifest.DataManifest``.

A report or manifest of another format version stops the card with one line naming the file and the fix.

Secrets never reach the card: any config key that looks like a token, key, secret or password is redacted,
and every URL in the card loses its userinfo and secret query parameters (``dspark_model.redact``).
The license follows the target's (a small map of known families; anything else is ``other`` with a note).
A calibration.json that does not belong to the weights beside it, or that another version of the toolkit
wrote, is never published: building the card stops with a ``CardError`` saying to calibrate again.

An EAGLE-3 export (``export_eagle3.py``: vLLM's speculators ``eagle3`` or SGLang's layout) gets the same card
with its own first sections (``eagle3_card_body``): the tapped layers in that engine's count and how to serve
it with vLLM's ``eagle3`` method and SGLang's ``EAGLE3`` algorithm; the eval, training and data sections are
shared. ``write_card`` writes README.md into an export folder (both exporters call it before the folder is
moved into place).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from data_prep.manifest import DataManifest
from dspark_model import __version__
from dspark_model.atomic import atomic_write_text
from dspark_model.calibration import REEXPORT_HINT, Calibration, CalibrationError, read_beside
from dspark_model.export_eagle3 import eagle3_arch, eagle3_format
from dspark_model.export_schema import (
    TOOLKIT_KEY,
    deepspec_architecture,
    deepspec_can_evaluate,
    describe,
    detect_format,
    native_config,
    read_config,
    read_weights_header,
)
from dspark_model.record import RecordError
from dspark_model.redact import redact_text
from dspark_model.target import hidden_states_index
from eval.report import EvalReport


class CardError(ValueError):
    """A document meant for the card cannot be read; the message names the file and the fix."""


@dataclass
class CardSources:
    """Optional documents for the card (paths, or already-parsed dicts), and the repo id for usage snippets."""

    report: str | dict | None = None
    data_manifest: str | dict | None = None
    train_config: str | dict | None = None
    repo_id: str | None = None


@dataclass
class CardContext:
    fmt: str
    config: dict
    native: dict  # native_config(fmt, config)
    target_id: str
    target_revision: str | None
    target_model_type: str | None
    target_architectures: list[str]
    target_num_layers: int | None
    dtype: str
    num_parameters: int
    includes_embeddings: bool
    repo_id: str | None = None
    calibration: Calibration | None = None
    report: EvalReport | None = None
    train_config: dict | None = None
    data_manifest: DataManifest | None = None
    toolkit_version: str = __version__
    files: list[str] = field(default_factory=list)
    architecture: str = "dspark"  # or "eagle3" (fmt is then "speculators" or "sglang")


# (pattern on the lower-cased target id, Hub license id, note or None). First match wins.
_LICENSES = (
    (r"qwen2\.5-(3b|72b)", "other", "Qwen2.5-3B/72B use the Qwen research / Qwen license; see the target's card"),
    (r"qwen", "apache-2.0", None),
    (r"llama-?3\.1", "llama3.1", None),
    (r"llama-?3\.2", "llama3.2", None),
    (r"llama-?3\.3", "llama3.3", None),
    (r"llama-?3", "llama3", None),
    (r"llama-?2", "llama2", None),
    (r"gemma", "gemma", None),
    (r"mistral-7b|mixtral", "apache-2.0", None),
    (r"smollm", "apache-2.0", None),
    (r"phi-?[34]", "mit", None),
)
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
REPO_PLACEHOLDER = "<this-repo-id>"
CARD_NAME = "README.md"
# Key names that hold credentials (hf_token, api_key, wandb_api_key, password, ...); not mask_token_id etc.
_SECRET = re.compile(r"(^|_)(token|api_?key|key|secret|password|passwd|credentials?|auth)$", re.IGNORECASE)


def license_for(target_id: str) -> tuple[str, str | None]:
    """(Hub license id, note) following the target's license."""
    low = (target_id or "").lower()
    for pattern, lic, note in _LICENSES:
        if re.search(pattern, low):
            return lic, note
    return "other", (f"the license of {target_id or 'the target'} is not in this toolkit's map; this draft is "
                     f"derived from it (trained on its outputs, shares its embeddings): apply the target's license")


def _is_secret(key, value) -> bool:
    # special-token strings such as pad_token: "<|endoftext|>" are not credentials
    return bool(_SECRET.search(str(key))) and isinstance(value, str) and bool(value) and not value.startswith("<")


def redact(obj):
    """Copy of a nested config with credential-looking string values replaced by '<redacted>', and every
    URL in a string stripped of its userinfo and secret query parameters (``redact.redact_url``)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _is_secret(k, v) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _read_doc(path: str | dict | None, what: str) -> dict | None:
    if isinstance(path, dict) or not path:
        return path or None
    p = Path(path)
    if not p.is_file():
        raise CardError(f"{what} {path} does not exist; fix the path or leave the option out")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(p.read_text())
        else:
            doc = json.loads(p.read_text())
    except Exception as exc:  # yaml and json raise different types
        raise CardError(f"{what} {path} cannot be parsed ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise CardError(f"{what} {path} must hold a mapping at the top level")
    return doc


def _record(cls, source: str | dict | None, what: str):
    """The ``cls`` record (DataManifest, EvalReport) given for the card: a file, or a dict embedded in a
    checkpoint's config.json; None when none was given."""
    doc = _read_doc(source, what)
    try:
        return None if doc is None else cls.from_dict(doc, source if isinstance(source, str)
                                                      else f"the checkpoint's embedded {what}")
    except RecordError as exc:
        raise CardError(str(exc)) from None


def discover_sources(ckpt_dir: str | Path) -> CardSources:
    """Documents conventionally kept with a checkpoint: files beside it (report.json, eval/report.json,
    train_config.yaml|json, config.yaml, .hydra/config.yaml, data_manifest.json, manifest.json), else the
    ``train_config`` / ``data_manifest`` entries of its config.json (a dict, or a file inside the checkpoint
    folder: a checkpoint cannot make the card publish a file from elsewhere on this machine)."""
    ck = Path(ckpt_dir)

    def first(*names):
        for n in names:
            if (ck / n).is_file():
                return str(ck / n)
        return None

    try:
        extra = json.loads((ck / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        extra = {}
    extra = extra if isinstance(extra, dict) else {}

    def embedded(key):
        value = extra.get(key)
        if isinstance(value, str):  # a file named by the checkpoint: only one inside the checkpoint folder
            path = (ck / value).resolve()
            return str(path) if path.is_file() and ck.resolve() in path.parents else None
        return value if isinstance(value, dict) else None

    return CardSources(report=first("report.json", "eval/report.json"),
                       data_manifest=first("data_manifest.json", "manifest.json") or embedded("data_manifest"),
                       train_config=first("train_config.yaml", "train_config.json", "config.yaml",
                                          ".hydra/config.yaml") or embedded("train_config"))


def _target_facts(fmt: str, config: dict, target) -> tuple:
    prov = config.get(TOOLKIT_KEY, {})
    if eagle3_format(config):  # the layer config is the draft's Llama layer, not the target's
        facts = [prov.get("target_id"), prov.get("target_revision"), None,
                 (config.get("speculators_config") or {}).get("verifier", {}).get("architectures"),
                 prov.get("target_num_hidden_layers")]
    elif fmt == "native":
        t = config.get("target", {})
        facts = [t.get("id"), t.get("revision"), t.get("model_type"), t.get("architectures"), t.get("num_layers")]
    elif fmt == "deepspec":
        facts = [prov.get("target_id"), prov.get("target_revision"), config.get("model_type"), None,
                 prov.get("target_num_hidden_layers")]
    else:
        v = config["speculators_config"]["verifier"]
        facts = [prov.get("target_id") or v.get("name_or_path"), prov.get("target_revision"),
                 config["transformer_layer_config"].get("model_type"), v.get("architectures"),
                 prov.get("target_num_hidden_layers")]
    if target is not None:
        facts = [target.name_or_path, target.revision, getattr(target.config, "model_type", None),
                 getattr(target.model.config, "architectures", None) or [type(target.model).__name__],
                 target.num_layers]
    return tuple(facts)


def context_from_export(export_dir: str | Path, sources: CardSources | None = None, target=None) -> CardContext:
    """Everything the card needs, read from an export folder (+ optional documents and the live target)."""
    export_dir, sources = Path(export_dir), sources or CardSources()
    config = read_config(export_dir)
    fmt = eagle3_format(config) or detect_format(config)
    if eagle3_format(config):
        arch = eagle3_arch(config)
        native = dict(arch.native_keys(), arch=arch)
        shared = ("embed_tokens.weight", "d2t", "t2d")  # its lm_head is its own, trained
    else:
        native, shared = native_config(fmt, config), ("embed_tokens.weight", "lm_head.weight")
    tid, rev, mtype, archs, depth = _target_facts(fmt, config, target)
    header = read_weights_header(export_dir / "model.safetensors")
    n_params = 0
    for name, (shape, _) in header.items():
        if name not in shared:
            count = 1
            for s in shape:
                count *= s
            n_params += count
    dtypes = sorted({dt for name, (_, dt) in header.items() if name not in ("d2t", "t2d")})  # the weights' own
    try:
        calibration = read_beside(export_dir, fix=REEXPORT_HINT)
    except CalibrationError as exc:
        raise CardError(f"not publishing the calibration: {exc}") from None
    return CardContext(
        fmt=fmt, config=config, native=native, target_id=tid or "unknown", target_revision=rev,
        target_model_type=mtype, target_architectures=list(archs or []), target_num_layers=depth,
        dtype=",".join(_SAFETENSORS_DTYPES.get(d, d) for d in dtypes), num_parameters=n_params,
        includes_embeddings="embed_tokens.weight" in header, repo_id=sources.repo_id,
        calibration=calibration,
        report=_record(EvalReport, sources.report, "eval report"),
        train_config=_read_doc(sources.train_config, "training config"),
        data_manifest=_record(DataManifest, sources.data_manifest, "data manifest"),
        files=sorted(p.name for p in export_dir.iterdir() if not p.name.startswith(".")) + [CARD_NAME],
        architecture=native.get("architecture", "dspark"),
    )


def write_card(export_dir: str | Path, sources: CardSources | None = None, target=None) -> Path:
    """Render the card of the export in ``export_dir`` and write it there as README.md."""
    path = Path(export_dir) / CARD_NAME
    atomic_write_text(path, render_card(context_from_export(export_dir, sources, target=target)))
    return path


# ---- rendering ----------------------------------------------------------------------------------------------
def _num(x, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "n/a" if x is None else str(x)
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return str(x)


TAU_METRIC = "acceptance_length"  # model-index metric type of tau


def card_data(ctx: CardContext) -> ModelCardData:
    """The card's Hub metadata; the measured tau per eval set becomes the ``model-index`` results."""
    lic, _ = license_for(ctx.target_id)
    tags = ["speculative-decoding", ctx.architecture, "draft-model", f"{ctx.fmt}-format"]
    if ctx.architecture == "dspark" and ctx.native["sequential_head"] == "none":
        tags.append("dflash")
    results = eval_results(ctx.report)
    return ModelCardData(
        base_model=ctx.target_id, library_name="speculators" if ctx.fmt == "speculators" else "dspark-toolkit",
        license=lic, license_name="same-as-base-model" if lic == "other" else None,
        pipeline_tag="text-generation", tags=tags, eval_results=results or None,
        model_name=(ctx.repo_id or REPO_PLACEHOLDER) if results else None)  # hub.py fills in the placeholder


def eval_results(report: EvalReport | None) -> list[EvalResult]:
    """tau (tokens emitted per target verification forward) of each eval set in an eval ``report.json``."""
    if report is None:
        return []
    args = {k: report.settings[k] for k in ("temperature", "gamma", "max_new_tokens")
            if report.settings.get(k) is not None}
    return [EvalResult(task_type="text-generation", task_name="Speculative decoding", dataset_type=str(name),
                       dataset_name=str(name), metric_type=TAU_METRIC, metric_name="tau (acceptance length)",
                       metric_value=float(tau), metric_args=args or None)
            for name, tau in report.tau_by_dataset.items() if tau is not None]


def _layer_section(ctx: CardContext) -> str:
    taps = ctx.native["tap_layer_ids"]
    depth = ctx.target_num_layers
    return "\n".join([
        "## Layer ids (read this before serving)",
        f"The draft reads the hidden states of {len(taps)} target layers"
        + (f" of {depth}" if depth else "") + ". Engines count them differently:",
        "",
        "| convention | key | ids |", "|---|---|---|",
        f"| decoder layer (this toolkit, DeepSpec): layer i's output = `hidden_states[i + 1]` "
        f"| `tap_layer_ids` / `target_layer_ids` | {taps} |",
        f"| hidden_states index (vLLM speculators) = decoder-layer id + 1 | `aux_hidden_state_layer_ids` "
        f"| {[hidden_states_index(i) for i in taps]} |",
        "",
        f"This {ctx.fmt} export stores "
        + {"native": "decoder-layer ids (no conversion).",
           "deepspec": "decoder-layer ids in `target_layer_ids` (no conversion).",
           "speculators": "hidden_states indices in `aux_hidden_state_layer_ids` (converted: ours + 1)."}[ctx.fmt],
    ])


def _serving_section(ctx: CardContext) -> str:
    repo = ctx.repo_id or REPO_PLACEHOLDER
    G = ctx.native["block_size"]
    taps = ctx.native["tap_layer_ids"]
    mtype = ctx.target_model_type or "unknown"
    out = ["## How to serve", "",
           "### vLLM (speculators format)",
           "Export with `--format speculators`; the config names its verifier, so a vLLM build with the "
           "speculators `dspark` algorithm can serve it directly:", "```bash",
           f"vllm serve {repo if ctx.fmt == 'speculators' else '<speculators-export-repo>'}", "```",
           f"or next to the target: `vllm serve {ctx.target_id} --speculative-config "
           f"'{{\"model\": \"{repo}\", \"num_speculative_tokens\": {G}}}'`.", *_verifier_lines(ctx), "",
           "### SGLang / DeepSpec (deepspec format)",
           f"Export with `--format deepspec` (config `architectures` = `{deepspec_architecture(mtype)}`, "
           "`embed_tokens`/`lm_head` included). Point the engine's draft-model path at this repo with "
           f"{G} draft tokens per step, e.g. `--speculative-draft-model-path {repo} "
           f"--speculative-num-draft-tokens {G}` next to `--model-path {ctx.target_id}`."]
    if not deepspec_can_evaluate(mtype):
        out.append(f"Note: DeepSpec's evaluator only dispatches on `Qwen3DSparkModel` and `Gemma4DSparkModel`; "
                   f"it cannot evaluate this `{mtype}` draft.")
    if "serving" in ctx.files:
        out += ["", "### Adaptive verification",
                "`serving/` holds the calibration and cost files converted from `calibration.json`: "
                "`sglang_sts.json` (`--speculative-dspark-confidence-sts-path`) and `sglang_sps.json` "
                "(`--speculative-dspark-sps-table-path`, with `SGLANG_RAGGED_VERIFY_MODE=compact`), TensorRT-LLM's "
                "`trtllm_sts.json` and `trtllm_cost_table.json`; `serving/manifest.json` lists the engine versions "
                "they follow. vLLM's `enable_adaptive_verification` reads no file (it profiles and calibrates "
                "online). The cost tables were profiled by this toolkit's eval, not on your serving hardware."]
    out += ["", "### This toolkit", "```python", "from dspark_model import TargetSpec, load_target",
            "from dspark_model.export import load_export",
            f"target = load_target(TargetSpec(id=\"{ctx.target_id}\", path=None, tap_layer_ids={taps}))",
            "draft = load_export(\"<downloaded folder>\", target)  # any of the three formats", "```"]
    return "\n".join(out)


def _verifier_lines(ctx: CardContext) -> list[str]:
    """Where a speculators export's verifier loads from (engines rebuild embedding, norm and LM head there)."""
    if ctx.fmt != "speculators":
        return []
    name = ctx.config["speculators_config"]["verifier"].get("name_or_path")
    why = ctx.config.get(TOOLKIT_KEY, {}).get("verifier_source", "")
    return ["", f"The verifier is named `{name}` ({why}): speculators and vLLM load the verifier's embedding, "
            f"final norm and LM head from it, so it must load where the draft is served. To name another copy, "
            f"export again with `--verifier-path <Hub id or folder>`."]


def _files_section(ctx: CardContext) -> str:
    included = {
        "native": "draft weights only (the target's embedding and LM head are shared at load time)",
        "deepspec": ("draft weights plus the target's `embed_tokens.weight` and `lm_head.weight`"
                     if ctx.includes_embeddings else
                     "draft weights only: exported with --no-embeddings, DeepSpec's evaluator would use "
                     "RANDOM embeddings"),
        "speculators": "draft weights only: neither `embed_tokens` nor `lm_head` (vLLM shares the verifier's)",
    }[ctx.fmt]
    return "\n".join([f"## Files ({ctx.fmt} format, {ctx.dtype}, safetensors only)",
                      f"Contents: {included}.", "", "Files: " + ", ".join(f"`{f}`" for f in ctx.files), "",
                      "<details><summary>config.json schema</summary>", "", describe(ctx.fmt), "", "</details>"])


def _report_section(report: EvalReport | None) -> str:
    if report is None:
        return "## Measured acceptance\nNo eval report was given at export time (`--report report.json`)."
    out = ["## Measured acceptance", "tau = tokens emitted per target verification forward (accepted + bonus)."]
    settings = {k: report.settings[k] for k in ("temperature", "gamma", "max_new_tokens", "device")
                if report.settings.get(k) is not None}
    if settings:
        out.append("Settings: " + ", ".join(f"{k} = {_num(v)}" for k, v in settings.items()))
    out += ["", "| dataset | tau |", "|---|---|"]
    out += [f"| {name} | {_num(tau)} |" for name, tau in report.tau_by_dataset.items()]
    out.append(f"| **pooled** | **{_num(report.tau)}** |")
    tps = report.tokens_per_s
    if tps.get("spec") and tps.get("generate"):
        row = (f"Tokens/s: speculative {_num(tps['spec'], 1)}, plain generate {_num(tps['generate'], 1)} "
               f"(speed-up {_num(report.speedup_vs_generate, 2)}x)")
        if tps.get("prompt_lookup"):
            row += (f", prompt lookup {_num(tps['prompt_lookup'], 1)} (speed-up vs prompt lookup "
                    f"{_num(report.speedup_vs_prompt_lookup, 2)}x)")
        out += ["", row + "."]
    for label, per_position in (("Conditional acceptance P(k accepted | 1..k-1 accepted)",
                                 report.conditional_acceptance), ("Prefix survival P(1..k all accepted)",
                                                                  report.prefix_survival)):
        if per_position.get("pooled"):
            out.append(f"{label} by position: " + ", ".join(_num(v) for v in per_position["pooled"]) + ".")
    if report.greedy_match_rate is not None:
        out.append(f"Greedy outputs identical to plain greedy decoding: {_num(report.greedy_match_rate)} "
                   f"(lossless check, must be 1.0).")
    return "\n".join(out)


def _calibration_section(calib: Calibration | None, ctx: CardContext) -> str:
    if ctx.native["confidence_head"] is False:
        return "## Confidence calibration\nThis draft has no confidence head."
    if calib is None:
        return "## Confidence calibration\nNot calibrated (no calibration.json)."
    out = ["## Confidence calibration",
           "Sequential Temperature Scaling of the confidence head (calibration.json holds the temperatures and "
           "the sha256 of the weights file they belong to).",
           f"- positions: {_num(calib.gamma)}; temperatures: " + ", ".join(_num(t, 3) for t in calib.temperatures),
           f"- ECE of prefix survival (held out): {_num(calib.ece_before)} before -> "
           f"{_num(calib.ece_after)} after; AUROC {_num(calib.auroc)}; Brier {_num(calib.brier)}"]
    thr = calib.threshold
    if isinstance(thr, dict) and "recommended" in thr:
        out.append(f"- recommended static threshold: {_num(thr['recommended'])} ({thr.get('rule', '')})")
    if isinstance(calib.scheduler_vs_best_fixed, (int, float)):
        out.append(f"- verification-budget scheduler vs best fixed gamma (simulated throughput): "
                   f"{_num(calib.scheduler_vs_best_fixed)}")
    return "\n".join(out)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif isinstance(v, list) and len(v) > 8:
            out.append((key, f"[{len(v)} items]"))
        else:
            out.append((key, v))
    return out


def _training_section(ctx: CardContext) -> str:
    a = ctx.native["arch"]
    size = (f"width {a.hidden_size}, {a.num_attention_heads} heads ({a.num_key_value_heads} KV), MLP "
            f"{a.intermediate_size}; {ctx.num_parameters:,} parameters")
    if ctx.architecture == "eagle3":
        out = ["## Draft and training", f"- one EAGLE-3 decoder layer, {size} (its own LM head included, the "
               "target's embedding shared)",
               f"- trained with a {a.block_size}-step training-time test; draft vocabulary {a.out_vocab_size} of "
               f"{a.vocab_size} tokens"]
    else:
        out = ["## Draft and training", f"- {a.num_layers} draft layers, {size} (without the shared embedding / "
               "LM head)",
               f"- block size gamma = {ctx.native['block_size']}, mask token id {ctx.native['mask_token_id']}, "
               f"sequential head `{ctx.native['sequential_head']}` (rank {ctx.native['markov_rank']}), "
               f"confidence head: {'yes' if ctx.native['confidence_head'] else 'no'}"]
    if ctx.train_config:
        rows = _flatten(redact(ctx.train_config))
        out += ["", "<details><summary>training config</summary>", "", "```"]
        out += [f"{k}: {v}" for k, v in rows[:80]] + (["..."] if len(rows) > 80 else []) + ["```", "</details>"]
    else:
        out.append("- training config: not given at export time (`--train-config`)")
    return "\n".join(out)


def _data_section(manifest: DataManifest | None) -> str:
    if manifest is None:
        return "## Data provenance\nNo data_prep manifest was given at export time (`--data-manifest`)."
    m = redact(manifest.to_dict())
    out = ["## Data provenance", "Prompts (responses regenerated by the target):", "",
           "| source | location | rows | hash |", "|---|---|---|---|"]
    for s in m.get("sources") or []:
        if not isinstance(s, dict):
            continue
        loc = s.get("location", "")  # the keys data_prep's manifest writes (data_prep/sources.py)
        hashes = [f"{k}={v}" for k, v in s.items() if re.search("hash|sha256|fingerprint", k) and v]
        rows = f"{s['rows_used']} of {s['rows_read']}" if "rows_used" in s and "rows_read" in s else ""
        out.append(f"| {s.get('name') or ''} | {loc} | {rows} | {'; '.join(hashes)} |")
    facts = [(k, v) for k, v in m.items() if k != "sources" and not isinstance(v, (dict, list))]
    facts += [(k, json.dumps(v)) for k, v in m.items() if k in ("target", "generation", "counts", "skipped")]
    out += [""] + [f"- {k}: {v}" for k, v in facts[:25]]
    return "\n".join(out)


def model_card(ctx: CardContext) -> ModelCard:
    """The card: ``card_data`` as its YAML metadata, then the Markdown body (``card_body``)."""
    return ModelCard(f"---\n{card_data(ctx).to_yaml()}\n---\n\n{card_body(ctx)}")


def render_card(ctx: CardContext) -> str:
    """README.md text; any URL that reached it loses its secrets (``redact.redact_text``)."""
    return redact_text(str(model_card(ctx)))


def _footer(ctx: CardContext) -> str:
    lic, note = license_for(ctx.target_id)
    return (f"## Toolkit\nExported by dspark-toolkit {ctx.toolkit_version} ({ctx.fmt} format).\n\n"
            f"## License\n`{lic}`, following the target's license." + (f" Note: {note}." if note else ""))


def card_body(ctx: CardContext) -> str:
    if ctx.architecture == "eagle3":
        return eagle3_card_body(ctx)
    head = ctx.native["sequential_head"]
    kind = "DFlash (no sequential head)" if head == "none" else f"DSpark ({head} sequential head)"
    intro = (f"# {kind} draft for {ctx.target_id}\n\n"
             f"A speculative-decoding draft model for [{ctx.target_id}](https://huggingface.co/{ctx.target_id})"
             f"{' (revision ' + ctx.target_revision + ')' if ctx.target_revision else ''}: it reads hidden "
             f"states of the target, drafts {ctx.native['block_size']} tokens per target forward in one "
             f"parallel block, and the target verifies them losslessly.")
    parts = [intro, _files_section(ctx), _layer_section(ctx), _serving_section(ctx), _report_section(ctx.report),
             _calibration_section(ctx.calibration, ctx), _training_section(ctx), _data_section(ctx.data_manifest),
             _footer(ctx)]
    return "\n\n".join(parts) + "\n"


# ---- EAGLE-3 exports --------------------------------------------------------------------------------------
# Serving flags as checked (2026-07): vLLM docs/features/speculative_decoding/eagle.md @44c6aa262cb3
# (speculative_config "method": "eagle3", "model", "num_speculative_tokens"; the loader: export_eagle3's
# SOURCES_CHECKED); SGLang docs.sglang.io advanced_features/speculative_decoding and its launch scripts
# (--speculative-algorithm EAGLE3, --speculative-draft-model-path, --speculative-num-steps,
# --speculative-eagle-topk, --speculative-num-draft-tokens = steps + 1 for a chain of top-1 drafts).
_EAGLE3_TAPS = {  # fmt -> (config key, how the engine counts)
    "speculators": ("eagle_aux_hidden_state_layer_ids", "hidden_states indices = decoder-layer id + 1, vLLM's "
                    "convention"),
    "sglang": ("eagle_config.eagle_aux_hidden_state_layer_ids", "decoder-layer ids; SGLang adds 1 itself when it "
               "captures them"),
}


def _eagle3_serving_section(ctx: CardContext) -> str:
    repo, G, target = ctx.repo_id or REPO_PLACEHOLDER, ctx.native["block_size"], ctx.target_id
    here, other = ("vLLM", "SGLang") if ctx.fmt == "speculators" else ("SGLang", "vLLM")
    other_fmt = "deepspec" if ctx.fmt == "speculators" else "speculators"
    spec = f'{{"method": "eagle3", "model": "{repo}", "num_speculative_tokens": {G}}}'
    return "\n".join([
        "## How to serve",
        f"This folder is the {here} layout; for {other}, export the checkpoint again with `--format {other_fmt}`.",
        "", "### vLLM (`--format speculators`)", "```bash", f"vllm serve {target} --speculative-config '{spec}'",
        "```", *([f"or `vllm serve {repo}` alone: the speculators config names its verifier."]
                 if ctx.fmt == "speculators" else []), "", "### SGLang (`--format deepspec`: SGLang's `LlamaForCausalLMEagle3` layout)", "```bash",
        f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
        f"--speculative-draft-model-path {repo} --speculative-num-steps {G} --speculative-eagle-topk 1 "
        f"--speculative-num-draft-tokens {G + 1}", "```",
        f"Both engines share the target's embedding; the draft was trained for {G} chained steps, so more "
        f"speculative tokens than {G} leave its training range.", "",
        "### This toolkit", "```python", "from dspark_model.export_eagle3 import load_eagle3_export",
        f'draft = load_eagle3_export("<downloaded folder>", target)  # target: load_target(... id="{target}")',
        "```"])


def eagle3_card_body(ctx: CardContext) -> str:
    a = ctx.native["arch"]
    key, convention = _EAGLE3_TAPS[ctx.fmt]
    stored = a.tap_layer_ids if ctx.fmt == "sglang" else [hidden_states_index(i) for i in a.tap_layer_ids]
    vocab = (f"a reduced draft vocabulary of {a.out_vocab_size} of the target's {a.vocab_size} tokens (`d2t` / "
             "`t2d` map draft ids to target ids)" if a.reduced_vocab else f"the target's {a.vocab_size} tokens")
    intro = (f"# EAGLE-3 draft for {ctx.target_id}\n\nAn EAGLE-3 speculative-decoding draft (one decoder layer "
             f"over three fused target hidden states) for [{ctx.target_id}](https://huggingface.co/"
             f"{ctx.target_id}){' (revision ' + ctx.target_revision + ')' if ctx.target_revision else ''}, "
             f"trained by dspark-toolkit. It drafts {a.block_size} tokens per target forward, one chained step "
             f"each, over {vocab}; the target verifies them losslessly.")
    files = "\n".join([f"## Files ({ctx.fmt} layout, {ctx.dtype}, safetensors only)",
                       "Draft weights and its own LM head; no `embed_tokens` (the engine shares the target's).",
                       "", "Files: " + ", ".join(f"`{f}`" for f in ctx.files)])
    taps = "\n".join(["## Tapped layers",
                      f"The draft reads the target's decoder layers {a.tap_layer_ids} (this toolkit's count: layer "
                      f"i's output = `hidden_states[i + 1]`). This export stores them as {stored} in `{key}` "
                      f"({convention})."])
    parts = [intro, files, taps, _eagle3_serving_section(ctx), _report_section(ctx.report), _training_section(ctx),
             _data_section(ctx.data_manifest), _footer(ctx)]
    return "\n\n".join(parts) + "\n"
