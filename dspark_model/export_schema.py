"""Written schemas of the three export formats, and the checks an export must pass before anyone serves it.

Silent format mismatches (a layer id off by one, a missing field, a vocabulary that does not fit) show up
in production only as poor acceptance, so every export is checked here, field by field:

* ``native``      our own checkpoint layout (``dspark_model.checkpoint``): ``config.json`` with ``arch``.
* ``deepspec``    SGLang / DeepSpec: the target's config with the draft's layer count, ``architectures``
                  ``<Family>DSparkModel``, ``target_layer_ids`` in OUR convention (decoder-layer ids), and
                  the target's ``embed_tokens`` / ``lm_head`` inside the weights.
* ``speculators`` vLLM speculators: ``speculators_model_type: dspark``, a ``transformer_layer_config``,
                  ``aux_hidden_state_layer_ids`` counting ``hidden_states`` indices (= decoder-layer id + 1),
                  no embedding or LM head in the weights.

``native_config(fmt, config)`` maps any format's config.json back to our native form (the draft's ``DraftArch``,
arch.py, with tap ids in the decoder-layer convention); the loader and the checks share it, so a field the
loader needs is a field the schema requires.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dspark_model.arch import HEAD_KIND_OF, DraftArch, DraftArchError, public_head
from dspark_model.calibration import CALIBRATION_NAME, Calibration, CalibrationError
from dspark_model.reference import reference_config_problems, reference_weight_problems
from dspark_model.serving import validate_serving_folder
from dspark_model.target import hidden_states_index, tap_id_of_hidden_states_index

FORMATS = ("native", "deepspec", "speculators")
TARGET_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
LEGACY_HEAD_WEIGHTS = ("markov_head.gate.", "markov_head.rnn_proj.")  # before the reference names (heads.py)
TOOLKIT_KEY = "dspark_toolkit"  # our provenance block inside the public formats (extra keys are ignored there)


class ExportSchemaError(ValueError):
    """An export does not follow its format's schema; the message lists every problem found."""


@dataclass(frozen=True)
class Key:
    """One config.json field: its name, its kind (see ``_KIND_CHECKS``) and what it means."""

    name: str
    kind: str
    doc: str


_KIND_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[dict]": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "int|null": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
}

# Sizes of the draft's decoder layers, stated alike by the deepspec config and speculators' layer config.
_DRAFT_LAYER_KEYS = (
    Key("num_hidden_layers", "int", "number of DRAFT layers"),
    Key("num_attention_heads", "int", "draft attention heads"),
    Key("num_key_value_heads", "int", "draft KV heads"),
    Key("head_dim", "int", "per-head width"),
    Key("intermediate_size", "int", "draft MLP width"),
    Key("rms_norm_eps", "number", "RMSNorm epsilon"),
    Key("hidden_act", "str", "MLP activation"),
    Key("rope_parameters", "dict", "RoPE parameters (the target's)"),
    Key("max_position_embeddings", "int", "RoPE context length"),
)

_DSPARK_HEAD_KEYS = (
    Key("block_size", "int", "gamma: anchor + (gamma - 1) mask slots; gamma predictions per block"),
    Key("mask_token_id", "int", "embedding row fed to the mask slots"),
    Key("markov_rank", "int", "rank r of the sequential head (0 = none, i.e. a DFlash draft)"),
    Key("markov_head_type", "str", "vanilla | gated | rnn (our markov | gated | rnn)"),
    Key("enable_confidence_head", "bool", "a confidence head c_k is present"),
    Key("confidence_head_with_markov", "bool", "the confidence head reads [h_k ; W1[x_{k-1}]]"),
)

SCHEMAS: dict[str, tuple[Key, ...]] = {
    "native": (
        Key("model_type", "str", "always 'dspark'"),
        Key("format_version", "int", "version of the native layout"),
        Key("toolkit_version", "str", "dspark-toolkit version that wrote it"),
        Key("target", "dict", "TargetSpec fields + depth/width/vocabulary of the target it was trained for"),
        Key("tap_layer_ids", "list[int]", "decoder-layer ids (output of layer i = hidden_states[i + 1])"),
        Key("block_size", "int", "gamma"),
        Key("mask_token_id", "int", "mask slot embedding row"),
        Key("sequential_head", "str", "none | markov | gated | rnn"),
        Key("markov_rank", "int", "0 without a sequential head"),
        Key("confidence_head", "bool", "confidence head present"),
        Key("arch", "dict", "the DraftArch record (dspark_model/arch.py) the draft is built from"),
    ),
    "deepspec": (
        Key("architectures", "list[str]", "['<Family>DSparkModel']; DeepSpec dispatches on Qwen3/Gemma4 only"),
        Key("model_type", "str", "the target family's model_type"),
        Key("hidden_size", "int", "= target width"),
        Key("vocab_size", "int", "= target embedding rows"),
        *_DRAFT_LAYER_KEYS,
        Key("target_layer_ids", "list[int]", "tapped target layers, decoder-layer ids (ours, unchanged)"),
        Key("num_anchors", "int", "anchor blocks per training sequence (train.max_anchors); DeepSpec asserts it"),
        Key("tie_word_embeddings", "bool", "false: the draft's lm_head is its own copy (DeepSpec's builder)"),
        *_DSPARK_HEAD_KEYS,
    ),
    "speculators": (
        Key("architectures", "list[str]", "['DSparkSpeculator']"),
        Key("speculators_model_type", "str", "always 'dspark'"),
        Key("speculators_version", "str", "speculators config layout version"),
        Key("transformer_layer_config", "dict", "the draft decoder layers, HF config style"),
        Key("draft_vocab_size", "int", "tokens the draft predicts: the full target vocabulary, or K with d2t/t2d tables"),
        Key("target_hidden_size", "int", "= target width"),
        Key("aux_hidden_state_layer_ids", "list[int]", "hidden_states indices = our decoder-layer ids + 1"),
        Key("sample_from_anchor", "bool", "true: the anchor slot itself predicts the next token"),
        Key("speculators_config", "dict", "algorithm, proposal methods, verifier"),
        *_DSPARK_HEAD_KEYS,
    ),
    "speculators.transformer_layer_config": (
        Key("model_type", "str", "the target family's model_type"),
        Key("hidden_size", "int", "draft width = target width"),
        *_DRAFT_LAYER_KEYS,
        Key("vocab_size", "int", "full target vocabulary"),
    ),
    "speculators.speculators_config": (
        Key("algorithm", "str", "always 'dspark'"),
        Key("proposal_methods", "list[dict]", "[{proposal_type: greedy, speculative_tokens: block_size}]"),
        Key("default_proposal_method", "str", "one of the proposal types"),
        Key("verifier", "dict", "{name_or_path: target id, architectures: target architectures}"),
    ),
}


def family_name(model_type: str) -> str:
    """'qwen3' -> 'Qwen3', 'gemma4_text' -> 'Gemma4', 'qwen3_moe' -> 'Qwen3Moe'."""
    parts = [p for p in str(model_type).split("_") if p and p != "text"]
    return "".join(p[:1].upper() + p[1:] for p in parts) or "Unknown"


def deepspec_architecture(model_type: str) -> str:
    """The ``architectures`` entry DeepSpec dispatches on: Qwen3DSparkModel, Gemma4DSparkModel, ..."""
    return f"{family_name(model_type)}DSparkModel"


def deepspec_can_evaluate(model_type: str) -> bool:
    """DeepSpec's evaluator only knows the Qwen3 and Gemma4 draft classes."""
    return family_name(model_type) in ("Qwen3", "Gemma4")


def detect_format(config: dict) -> str:
    """Which export format a config.json belongs to (raises ExportSchemaError when none fits)."""
    if "speculators_model_type" in config or "speculators_config" in config:
        return "speculators"
    if "target_layer_ids" in config:
        return "deepspec"
    if config.get("model_type") == "dspark" and "arch" in config:
        return "native"
    raise ExportSchemaError("config.json is none of the export formats (native: 'arch'; deepspec: "
                            "'target_layer_ids'; speculators: 'speculators_model_type'); re-export it with "
                            "python -m dspark_model.export")


def read_config(export_dir: str | Path) -> dict:
    path = Path(export_dir) / "config.json"
    if not path.is_file():
        raise ExportSchemaError(f"{export_dir} has no config.json; point at a folder written by "
                                f"python -m dspark_model.export")
    return json.loads(path.read_text())


# ---- conversion to our native form -------------------------------------------------------------------------
def native_config(fmt: str, config: dict, source: str | Path = "config.json") -> dict:
    """Any format's config.json -> what the loader and the checks need: ``arch`` (the ``DraftArch``, tap ids in
    the decoder-layer convention), ``target`` (what is known of the target) and ``DraftArch.native_keys``.
    Assumes ``validate_config`` passed; ``source`` names the file in errors."""
    prov = config.get(TOOLKIT_KEY, {})
    if fmt == "native":
        try:
            arch = DraftArch.from_config(config, source)
        except DraftArchError as exc:
            raise ExportSchemaError(str(exc)) from None
        target = config.get("target") or {}
    elif fmt == "deepspec":
        arch = DraftArch.from_public(config, config, list(config["target_layer_ids"]))
        target = {"id": prov.get("target_id"), "num_layers": prov.get("target_num_hidden_layers")}
    else:
        taps = [tap_id_of_hidden_states_index(i) for i in config["aux_hidden_state_layer_ids"]]
        arch = DraftArch.from_public(config["transformer_layer_config"], config, taps)
        verifier = config["speculators_config"]["verifier"]
        target = {"id": verifier.get("name_or_path"), "num_layers": prov.get("target_num_hidden_layers")}
    return dict(arch.native_keys(), arch=arch, target=target)


def native_vocab_tensors(tensors: dict) -> dict:
    """speculators' ``d2t``/``t2d`` tables -> our ``draft_to_target`` map (target id = i + d2t[i]); other
    tensors untouched. Refuses tables that disagree."""
    if "d2t" not in tensors:
        return tensors
    import torch

    d2t, t2d = tensors.pop("d2t"), tensors.pop("t2d", None)
    ids = torch.arange(d2t.numel(), dtype=torch.long) + d2t.to(torch.long)
    if t2d is not None and not (t2d.sum() == ids.numel() and bool(t2d[ids].all())):
        raise ExportSchemaError("d2t and t2d disagree: t2d must be true exactly at the target ids i + d2t[i]")
    tensors["draft_to_target"] = ids
    return tensors


def expected_weight_shapes(arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes of the draft described by ``arch`` (built on the meta device: no memory)."""
    import torch

    from dspark_model.draft import DSparkDraft

    with torch.device("meta"):
        draft = DSparkDraft(arch)
    return {k: tuple(v.shape) for k, v in draft.state_dict().items()}


# ---- checks -----------------------------------------------------------------------------------------------
def _check_keys(config: dict, schema: tuple[Key, ...], where: str) -> list[str]:
    problems = []
    for key in schema:
        if key.name not in config:
            problems.append(f"{where}: required key '{key.name}' is missing ({key.doc})")
        elif not _KIND_CHECKS[key.kind](config[key.name]):
            problems.append(f"{where}: '{key.name}' must be {key.kind}, got {config[key.name]!r}")
    return problems


def _check_heads(config: dict, where: str) -> list[str]:
    p = []
    rank, head = config["markov_rank"], config["markov_head_type"]
    if head not in HEAD_KIND_OF:
        p.append(f"{where}: markov_head_type {head!r} is not one of {sorted(HEAD_KIND_OF)}")
    if rank < 0:
        p.append(f"{where}: markov_rank must be >= 0, got {rank}")
    if config["confidence_head_with_markov"] and not (config["enable_confidence_head"] and rank > 0):
        p.append(f"{where}: confidence_head_with_markov needs enable_confidence_head and markov_rank > 0")
    if config["enable_confidence_head"] and rank > 0 and not config["confidence_head_with_markov"]:
        p.append(f"{where}: our confidence head always reads the Markov table when one exists; "
                 f"confidence_head_with_markov must be true")
    if config["block_size"] < 1:
        p.append(f"{where}: block_size must be >= 1, got {config['block_size']}")
    return p


def _check_speculators(config: dict) -> list[str]:
    p = _check_keys(config["transformer_layer_config"], SCHEMAS["speculators.transformer_layer_config"],
                    "transformer_layer_config")
    p += _check_keys(config["speculators_config"], SCHEMAS["speculators.speculators_config"],
                     "speculators_config")
    if p:
        return p
    lc, sc = config["transformer_layer_config"], config["speculators_config"]
    if config["speculators_model_type"] != "dspark" or sc["algorithm"] != "dspark":
        p.append("speculators_model_type and speculators_config.algorithm must both be 'dspark'")
    if not 1 <= config["draft_vocab_size"] <= lc["vocab_size"]:
        p.append(f"draft_vocab_size {config['draft_vocab_size']} must be in 1..transformer_layer_config.vocab_size "
                 f"({lc['vocab_size']})")
    if config["target_hidden_size"] != lc["hidden_size"]:
        p.append(f"target_hidden_size {config['target_hidden_size']} != draft width {lc['hidden_size']}")
    if config["sample_from_anchor"] is not True:
        p.append("sample_from_anchor must be true: the anchor slot of a DSpark block is a prediction position")
    if any(i < 1 for i in config["aux_hidden_state_layer_ids"]):
        p.append(f"aux_hidden_state_layer_ids {config['aux_hidden_state_layer_ids']} contain 0 (the embedding "
                 f"output): speculators counts hidden_states indices = decoder-layer id + 1 - off by one?")
    methods = {m.get("proposal_type"): m for m in sc["proposal_methods"]}
    if sc["default_proposal_method"] not in methods:
        p.append(f"default_proposal_method {sc['default_proposal_method']!r} is not among the proposal methods")
    for m in methods.values():
        if m.get("speculative_tokens") != config["block_size"]:
            p.append(f"proposal method {m.get('proposal_type')!r}: speculative_tokens "
                     f"{m.get('speculative_tokens')} != block_size {config['block_size']}")
    if not {"name_or_path", "architectures"} <= set(sc["verifier"]):
        p.append("speculators_config.verifier needs name_or_path and architectures")
    return p


def _check_deepspec(config: dict) -> list[str]:
    p = []
    want = deepspec_architecture(config["model_type"])
    if config["architectures"] != [want]:
        p.append(f"architectures must be [{want!r}] for model_type {config['model_type']!r}, "
                 f"got {config['architectures']}")
    if any(i < 0 for i in config["target_layer_ids"]):
        p.append(f"target_layer_ids {config['target_layer_ids']} must be decoder-layer ids >= 0")
    if config["tie_word_embeddings"] is not False:
        p.append("tie_word_embeddings must be false: the draft's lm_head is its own copy of the target's, and "
                 "DeepSpec would tie it to embed_tokens (wrong for an untied target)")
    return p


def validate_config(fmt: str, config: dict) -> list[str]:
    """Problems with a config.json on its own (keys, kinds, internal consistency)."""
    if fmt not in FORMATS:
        return [f"unknown format {fmt!r}; choose one of {FORMATS}"]
    p = _check_keys(config, SCHEMAS[fmt], "config.json")
    if p:
        return p
    if fmt == "native":
        if config["model_type"] != "dspark":
            return ["config.json: model_type must be 'dspark'"]
        try:
            native_config(fmt, config)
        except ExportSchemaError as exc:
            return [str(exc)]
        return []
    p = _check_heads(config, "config.json")
    p += _check_speculators(config) if fmt == "speculators" else _check_deepspec(config)
    p += reference_config_problems(fmt, config)
    if not p:
        p += _check_provenance(fmt, config)
        kind, _ = public_head(config)
        if kind == "?":
            return p + [f"markov_head_type {config['markov_head_type']!r} is unknown"]
        vocab = native_config(fmt, config)["arch"].vocab_size
        if not 0 <= config["mask_token_id"] < vocab:
            p.append(f"mask_token_id {config['mask_token_id']} is outside the vocabulary 0..{vocab - 1}")
    return p


def _check_provenance(fmt: str, config: dict) -> list[str]:
    """Our provenance block records the decoder-layer taps and the target depth: the public keys must agree."""
    prov = config.get(TOOLKIT_KEY)
    if not isinstance(prov, dict) or not isinstance(prov.get("tap_layer_ids"), list):
        return []
    taps, depth = prov["tap_layer_ids"], prov.get("target_num_hidden_layers")
    name, shown, want = (("aux_hidden_state_layer_ids", config["aux_hidden_state_layer_ids"],
                          [hidden_states_index(i) for i in taps])
                         if fmt == "speculators" else ("target_layer_ids", config["target_layer_ids"], taps))
    p = []
    if shown != want:
        p.append(f"{name} {shown} != {want} recorded for decoder-layer taps {taps} ({_convention(fmt)}) "
                 f"- off by one?")
    if isinstance(depth, int) and any(not 0 <= i <= depth - 2 for i in taps):
        p.append(f"tap layers {taps} outside 0..{depth - 2} for the recorded {depth}-layer target")
    return p


def validate_against_target(fmt: str, config: dict, target) -> list[str]:
    """Problems fitting ``target`` (a loaded dspark_model Target): width, vocabulary, layer ids, family."""
    native = native_config(fmt, config)
    arch, taps, L = native["arch"], native["tap_layer_ids"], target.num_layers
    p = []
    if arch.hidden_size != target.hidden_size:
        p.append(f"hidden size {arch.hidden_size} != target width {target.hidden_size}")
    if arch.vocab_size != target.vocab_size:
        p.append(f"vocabulary {arch.vocab_size} != target embedding rows {target.vocab_size}")
    name = {"native": "tap_layer_ids", "deepspec": "target_layer_ids",
            "speculators": "aux_hidden_state_layer_ids"}[fmt]
    shown = config[name]
    lo, hi = (1, L - 1) if fmt == "speculators" else (0, L - 2)
    if any(not lo <= i <= hi for i in shown):
        p.append(f"{name} {shown} outside {lo}..{hi} for a {L}-layer target ({_convention(fmt)})")
    if taps != list(target.tap_layer_ids):
        want = ([hidden_states_index(i) for i in target.tap_layer_ids] if fmt == "speculators"
                else list(target.tap_layer_ids))
        p.append(f"{name} {shown} != {want} expected for this target's taps {target.tap_layer_ids} "
                 f"({_convention(fmt)}) - off by one?")
    model_type = getattr(target.config, "model_type", None)
    layer_type = (config.get("model_type") if fmt == "deepspec"
                  else config.get("transformer_layer_config", {}).get("model_type") if fmt == "speculators"
                  else None)
    if layer_type is not None and model_type is not None and layer_type != model_type:
        p.append(f"model_type {layer_type!r} != target model_type {model_type!r}")
    return p


def _convention(fmt: str) -> str:
    if fmt == "speculators":
        return "speculators counts hidden_states indices: decoder-layer id + 1"
    return "decoder-layer ids: layer i's output is hidden_states[i + 1]"


def check_weights(fmt: str, config: dict, header: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Compare weight names/shapes/dtypes (``header``: name -> (shape, dtype)) with the format's layout."""
    arch = native_config(fmt, config)["arch"]
    want = expected_weight_shapes(arch)
    V, d = arch.vocab_size, arch.hidden_size
    p = []
    maps = {"draft_to_target"}  # integer / bool vocabulary tables: exempt from the one-dtype rule
    if fmt == "speculators" and "draft_to_target" in want:
        K = want.pop("draft_to_target")[0]
        want.update(d2t=(K,), t2d=(V,))
        maps |= {"d2t", "t2d"}
    if fmt == "deepspec":
        deliberate = config.get(TOOLKIT_KEY, {}).get("includes_target_embeddings", True) is False
        if not deliberate or any(name in header for name in TARGET_WEIGHTS):
            want.update({name: (V, d) for name in TARGET_WEIGHTS})
    else:
        for name in TARGET_WEIGHTS:
            if name in header and name not in want:
                p.append(f"weights: {name} must not be in a {fmt} export (the engine shares the target's)")
        header = {k: v for k, v in header.items() if k not in TARGET_WEIGHTS or k in want}
    missing = sorted(set(want) - set(header))
    unexpected = sorted(set(header) - set(want))
    if missing:
        hint = (" (DeepSpec's evaluator would run with RANDOM embeddings; re-export without --no-embeddings)"
                if set(missing) & set(TARGET_WEIGHTS) else "")
        p.append(f"weights: missing {missing[:6]}{'...' if len(missing) > 6 else ''}{hint}")
    if unexpected:
        legacy = [n for n in unexpected if n.startswith(LEGACY_HEAD_WEIGHTS)]
        hint = (f" ({legacy[0]}: written by an older toolkit under a name the references do not know; export the "
                f"checkpoint again (a gated head must be retrained first))" if legacy else "")
        p.append(f"weights: unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}{hint}")
    for name in sorted(set(want) & set(header)):
        if tuple(header[name][0]) != want[name]:
            p.append(f"weights: {name} has shape {tuple(header[name][0])}, expected {want[name]}")
    dtypes = sorted({dt for k, (_, dt) in header.items() if k not in maps})
    if len(dtypes) > 1:
        p.append(f"weights: mixed dtypes {dtypes}")
    return p


def read_weights_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = (tuple(s.get_shape()), str(s.get_dtype()))
    return out


def _pickle_content(path: Path) -> str | None:
    """Why the bytes of ``path`` could be unpickled by a loader (None: they cannot). The name does not matter:
    a pickle renamed ``notes.txt`` is still one."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not _is_safetensors(path, head):
        return f"a pickle (protocol {head[1]})"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy array file (object arrays are pickled)"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a zip archive that cannot be read"
        inner = [n for n in names if n.lower().endswith((".pkl", ".pickle", ".npy"))]
        if inner:
            return f"a zip archive holding pickled data ({inner[0]}; torch.save writes this format)"
    return None


def _is_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little endian), which can begin with
    the bytes of a pickle marker: accept it when that header really is there and is JSON."""
    n = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or n > min(path.stat().st_size - 8, 100 << 20):
        return False
    with open(path, "rb") as f:
        f.seek(8)
        try:
            return isinstance(json.loads(f.read(n)), dict)
        except ValueError:
            return False


def pickle_files(folder: str | Path) -> list[str]:
    """One problem per file under ``folder`` (sub-folders included) that is or may hold a pickle, judged by
    its name and by its first bytes. Exports and uploads are safetensors + JSON + text only."""
    folder = Path(folder)
    problems = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        name = f.relative_to(folder)
        why = "pickle-based file type" if f.suffix.lower() in PICKLE_SUFFIXES else _pickle_content(f)
        if why:
            problems.append(f"file {name}: {why}; pickle-based files are not allowed (safetensors only), "
                            f"remove it")
    return problems


def validate_export(export_dir: str | Path, target=None, fmt: str | None = None) -> str:
    """Check a whole export folder (config, weights, files, and the target when given); returns its format
    (an EAGLE-3 export: "speculators-eagle3" or "sglang-eagle3", checked without the target).

    Raises ExportSchemaError listing every problem.
    """
    export_dir = Path(export_dir)
    config = read_config(export_dir)
    from dspark_model.export_eagle3 import eagle3_export_problems, eagle3_format  # imports this module

    eagle3 = eagle3_format(config)  # the EAGLE-3 baseline: its own layouts (export_eagle3.py)
    found = f"{eagle3}-eagle3" if eagle3 else detect_format(config)
    if fmt is not None and found != fmt:
        raise ExportSchemaError(f"{export_dir}: expected a {fmt} export, config.json looks like {found}")
    problems = pickle_files(export_dir)
    problems += eagle3_export_problems(export_dir, config) if eagle3 else validate_config(found, config)
    if not problems and not eagle3:
        weights = export_dir / "model.safetensors"
        if not weights.is_file():
            problems.append("model.safetensors is missing")
        else:
            header = read_weights_header(weights)
            problems += check_weights(found, config, header)
            if found != "native" and not problems:
                omitted = found == "deepspec" and not {"embed_tokens.weight", "lm_head.weight"} & set(header)
                problems += reference_weight_problems(found, native_config(found, config)["arch"], header, omitted)
        if target is not None:
            problems += validate_against_target(found, config, target)
        block_size = native_config(found, config)["block_size"]
        problems += _check_calibration(export_dir, block_size) + validate_serving_folder(export_dir, block_size)
    if problems:
        raise ExportSchemaError(f"{export_dir} is not a valid {found} export: " + "; ".join(problems))
    return found


def _check_calibration(export_dir: Path, block_size: int) -> list[str]:
    """The calibration record must parse in this toolkit's schema (calibration.py) and fit the block size;
    whether it belongs to the weights is the loader's and the card's check."""
    path = export_dir / CALIBRATION_NAME
    if not path.is_file():
        return []
    try:
        calib = Calibration.read(path)
    except CalibrationError as exc:
        return [str(exc)]
    if len(calib.temperatures) > block_size:
        return [f"calibration.json: temperatures must be a list of at most block_size={block_size} values"]
    return []


def describe(fmt: str) -> str:
    """The schema of a format as a markdown table (for docs and the model card)."""
    rows = [f"| `{k.name}` | {k.kind} | {k.doc} |" for k in SCHEMAS[fmt]]
    return "\n".join(["| key | type | meaning |", "|---|---|---|", *rows])
