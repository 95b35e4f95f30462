"""What the reference implementations read from an export, recorded as data, and the checks against it.

``reference_layouts.json`` (written by ``benchmarks/record_reference_layouts.py`` from the references' own
modeling code; the version or commit checked is recorded inside) holds, per public format:

* ``weights``: the names the reference model declares, split into backbone (``layers.{i}.*`` for every
  draft layer), sequential head (per ``markov_head_type``) and confidence head (with / without the Markov
  embedding), each with its shape as formulas of the draft's sizes: d (width), V (target vocabulary),
  K (draft vocabulary), r (Markov rank), I (MLP width), H / KV (attention / KV heads), hd (head width),
  taps (tapped target layers), e.g. ``"markov_head.gate_proj.weight": ["r", "d+r"]``;
* ``omitted_on_save``: names the reference fills from the verifier instead of the file (speculators);
* ``config`` (DeepSpec): the keys its draft model asserts, and those its config builder writes;
  ``saved_config`` (speculators): the keys and draft-independent values its own ``save_pretrained`` writes.

The export self-check compares every export's weights with this layout (our own module cannot catch a name
the reference does not know: it would load at random initialisation there), and the deepspec schema's
required keys include the reference's list. Our weight names equal the references' everywhere.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from dspark_model.arch import HEAD_TYPE_OF, DraftArch

LAYOUTS_PATH = Path(__file__).with_name("reference_layouts.json")


@lru_cache(maxsize=1)
def layouts() -> dict:
    return json.loads(LAYOUTS_PATH.read_text())


def reference_name(fmt: str) -> str:
    """'DeepSpec afdfa7c' / 'speculators 0.9.0': the reference and the version its layout was recorded from."""
    ref = layouts()[fmt]
    return f"DeepSpec {str(ref.get('commit'))[:7]}" if fmt == "deepspec" else f"speculators {ref['version']}"


def formula_value(formula: str, sizes: dict[str, int]) -> int:
    """'2*r+d' with sizes {'r': 16, 'd': 64} -> 96 (sums of products of sizes and integers)."""
    total = 0
    for term in formula.split("+"):
        product = 1
        for factor in term.split("*"):
            product *= int(factor) if factor.isdigit() else sizes[factor]
        total += product
    return total


def _sizes(arch: DraftArch) -> dict[str, int]:
    return {"d": arch.hidden_size, "V": arch.vocab_size, "K": arch.out_vocab_size, "r": arch.markov_rank,
            "I": arch.intermediate_size, "H": arch.num_attention_heads, "KV": arch.num_key_value_heads,
            "hd": arch.head_dim, "taps": len(arch.tap_layer_ids)}


def reference_weights(fmt: str, arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """Names and shapes the reference model of ``fmt`` declares for the draft ``arch``,
    before anything is left out of the file."""
    ref = layouts()[fmt]["weights"]
    kind, sizes = arch.sequential_head, _sizes(arch)
    parts = [ref["backbone"]]
    if kind != "none":
        parts.append(ref["sequential_head"][HEAD_TYPE_OF[kind]])
    if arch.confidence_head:
        parts.append(ref["confidence_head"]["with_markov" if kind != "none" else "hidden_only"])
    out = {}
    for part in parts:
        for name, shape in part.items():
            dims = tuple(formula_value(f, sizes) for f in shape)
            names = [name.format(i=i) for i in range(arch.num_layers)] if "{i}" in name else [name]
            out.update(dict.fromkeys(names, dims))
    return out


def expected_file_weights(fmt: str, arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """What an export file must hold for the reference to load every weight from the file or the verifier."""
    ref, want = layouts()[fmt], reference_weights(fmt, arch)
    reduced = arch.reduced_vocab
    if not reduced:
        for name in ref.get("only_with_reduced_vocab", []):
            want.pop(name, None)
    for name in ref.get("omitted_on_save_reduced_vocab" if reduced else "omitted_on_save", []):
        want.pop(name, None)
    return want


def reference_weight_problems(fmt: str, arch: DraftArch, header: dict, embeddings_omitted: bool = False) -> list[str]:
    """Differences between an export file's weights (``header``: name -> (shape, dtype)) and what the
    reference reads. ``embeddings_omitted``: a deepspec export written without the target's embed/lm_head on
    purpose (reported elsewhere)."""
    want = expected_file_weights(fmt, arch)
    if embeddings_omitted:
        for name in ("embed_tokens.weight", "lm_head.weight"):
            want.pop(name, None)
    who = reference_name(fmt)
    p = []
    missing = sorted(set(want) - set(header))
    unknown = sorted(set(header) - set(want))
    if missing:
        p.append(f"weights: {who} reads {missing[:6]}, absent from the file (it would run them at random "
                 f"initialisation)")
    if unknown:
        p.append(f"weights: {who} does not know {unknown[:6]} (it would ignore them)")
    for name in sorted(set(want) & set(header)):
        if tuple(header[name][0]) != want[name]:
            p.append(f"weights: {who} expects {name} of shape {want[name]}, the file has {tuple(header[name][0])}")
    return p


def required_config_keys(fmt: str, config: dict) -> list[str]:
    """The config keys the reference of ``fmt`` asserts for this config (DeepSpec; none recorded otherwise)."""
    spec = layouts()[fmt].get("config")
    if not spec:
        return []
    keys = list(spec["required"])
    if int(config.get("markov_rank") or 0) > 0:
        keys += spec["required_if"]["markov_rank > 0"]
    if config.get("enable_confidence_head"):
        keys += spec["required_if"]["enable_confidence_head"]
    for arch in config.get("architectures") or []:
        keys += spec["required_by_architecture"].get(arch, [])
    return keys


def reference_config_problems(fmt: str, config: dict) -> list[str]:
    missing = [k for k in required_config_keys(fmt, config) if k not in config]
    if not missing:
        return []
    return [f"config.json: {reference_name(fmt)} asserts {missing} (its model refuses to build without them)"]
