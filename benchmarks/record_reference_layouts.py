"""Record what the reference implementations read from a DSpark export: weight names and shapes (as formulas of
the draft's sizes) and the config keys they require. Writes ``dspark_model/reference_layouts.json``, the data
the export self-check (``dspark_model/reference.py``) and the fast tests compare every export with.

    PYTHONPATH=/path/to/DeepSpec:/path/to/speculators .venv/bin/python benchmarks/record_reference_layouts.py

Neither reference is a dependency. DeepSpec (github.com/deepseek-ai/DeepSpec) is its repository's root on
PYTHONPATH (``DEEPSPEC_COMMIT`` names the commit, recorded with the data); speculators is the PyPI package
(its version is read from the installed metadata). A reference that does not import keeps its recorded entry.

How shapes become formulas: each reference model is built on a probe configuration whose sizes are pairwise
distinct numbers (and so are the sums/products the layers use), and every dimension of every weight is
matched back to the one formula with that value; a value matching no formula, or two, stops the script.
The slow test ``tests/dspark_model/test_deepspec.py`` re-derives the DeepSpec entry from the code it loads
and compares it with the recorded one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspark_model.reference import LAYOUTS_PATH, formula_value  # noqa: E402

# Probe sizes: d, V, K, r, I, H, KV, hd, taps, layers. Pairwise distinct, and so are the formulas below.
PROBE = dict(d=48, V=131, K=37, r=7, I=88, H=6, KV=3, hd=10, taps=3, L=2)
FORMULAS = ("1", "d", "V", "K", "r", "I", "hd", "H*hd", "KV*hd", "taps*d", "d+r", "2*r+d", "3*r")
HEADS = ("vanilla", "gated", "rnn")
DEEPSPEC_FILES = ("deepspec/modeling/dspark/qwen3/modeling.py", "deepspec/modeling/dspark/qwen3/config.py",
                  "deepspec/modeling/dspark/gemma4/modeling.py", "deepspec/modeling/dspark/markov_head.py",
                  "deepspec/modeling/dspark/common.py")
SPECULATORS_FILES = ("speculators/models/dspark/core.py", "speculators/models/dspark/model_definitions.py",
                     "speculators/models/dflash/core.py", "speculators/model.py")


def _formula_of(n: int) -> str:
    hits = [f for f in FORMULAS if formula_value(f, PROBE) == n]
    if len(hits) != 1:
        raise SystemExit(f"probe dimension {n} matches {hits or 'no formula'}; choose other probe sizes")
    return hits[0]


def symbolic(state: dict) -> dict[str, list[str]]:
    """state dict -> {name with layers.{i}: [formula per dimension]} (every layer must agree)."""
    out: dict[str, list[str]] = {}
    for name, t in state.items():
        key = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
        shape = [_formula_of(n) for n in t.shape]
        if out.setdefault(key, shape) != shape:
            raise SystemExit(f"{key}: layers disagree on the shape")
    return dict(sorted(out.items()))


def components(build) -> dict:
    """Split a reference model's weights into backbone / sequential head / confidence head parts.

    ``build(rank, head, confidence, with_markov)`` returns the state dict of one configuration."""
    base = symbolic(build(0, "vanilla", False, False))
    heads = {h: _minus(symbolic(build(PROBE["r"], h, False, False)), base) for h in HEADS}
    with_markov = _minus(symbolic(build(PROBE["r"], "vanilla", True, True)),
                         symbolic(build(PROBE["r"], "vanilla", False, False)))
    alone = _minus(symbolic(build(0, "vanilla", True, False)), base)
    return {"backbone": base, "sequential_head": heads,
            "confidence_head": {"with_markov": with_markov, "hidden_only": alone}}


def _minus(a: dict, b: dict) -> dict:
    if any(a[k] != v for k, v in b.items() if k in a) or set(b) - set(a):
        raise SystemExit("a head configuration changed the backbone's weights")
    return {k: v for k, v in a.items() if k not in b}


def _qwen3_config(num_hidden_layers: int):
    from transformers import Qwen3Config

    p = PROBE
    return Qwen3Config(vocab_size=p["V"], hidden_size=p["d"], intermediate_size=p["I"],
                       num_hidden_layers=num_hidden_layers, num_attention_heads=p["H"], num_key_value_heads=p["KV"],
                       head_dim=p["hd"], max_position_embeddings=256)


# ---- DeepSpec -------------------------------------------------------------------------------------------------
def deepspec_config_keys() -> dict:
    """The config keys DeepSpec's draft models assert before building (read from their source text)."""
    import inspect

    from deepspec.modeling.dspark.gemma4 import modeling as gemma4
    from deepspec.modeling.dspark.qwen3 import modeling as qwen3

    def asserted(module) -> list[str]:
        src = inspect.getsource(module)
        block = re.search(r"required_fields = \((.*?)\)", src, re.S).group(1)
        return re.findall(r'"(\w+)"', block)

    q, g = asserted(qwen3), asserted(gemma4)
    return {"required": q + ["block_size"],  # block_size: read unconditionally (int(config.block_size))
            "required_if": {"markov_rank > 0": ["markov_head_type"],
                            "enable_confidence_head": ["confidence_head_with_markov"]},
            "required_by_architecture": {"Gemma4DSparkModel": [k for k in g if k not in q]},
            "builder_writes": {"tie_word_embeddings": False, "layer_types": "full_attention for every draft layer",
                               "num_target_layers": "the target's decoder layers",
                               "architectures": "[<Family>DSparkModel]"}}


def deepspec_layout() -> dict:
    from deepspec.modeling.dspark.qwen3 import Qwen3DSparkModel
    from deepspec.modeling.dspark.qwen3.config import build_draft_config

    def build(rank, head, confidence, with_markov):
        args = _Args(num_draft_layers=PROBE["L"], target_layer_ids=list(range(PROBE["taps"])),
                     confidence_head_alpha=1.0 if confidence else 0.0, confidence_head_with_markov=with_markov,
                     markov_rank=rank, markov_head_type=head, block_size=4, mask_token_id=PROBE["V"] - 1,
                     num_anchors=8)
        cfg = build_draft_config(_qwen3_config(num_hidden_layers=PROBE["taps"] + 2), args)
        return Qwen3DSparkModel(cfg).state_dict()

    return {"source": "https://github.com/deepseek-ai/DeepSpec", "commit": os.environ.get("DEEPSPEC_COMMIT"),
            "files": list(DEEPSPEC_FILES), "model": "Qwen3DSparkModel (Gemma4DSparkModel: same weight names)",
            "config": deepspec_config_keys(), "weights": components(build), "omitted_on_save": []}


class _Args(dict):
    """DeepSpec's builder reads its arguments as attributes and tests membership with ``in``."""

    __getattr__ = dict.__getitem__


# ---- speculators ----------------------------------------------------------------------------------------------
def speculators_layout() -> dict:
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    def model(rank, head, confidence, with_markov, vocab):
        layer = _qwen3_config(PROBE["L"])
        layer._attn_implementation = "eager"
        cfg = DSparkSpeculatorConfig(
            transformer_layer_config=layer, draft_vocab_size=vocab, block_size=4,
            aux_hidden_state_layer_ids=list(range(1, PROBE["taps"] + 1)), mask_token_id=PROBE["V"] - 1,
            sample_from_anchor=True, markov_rank=rank, markov_head_type=head, enable_confidence_head=confidence,
            confidence_head_with_markov=with_markov,
            speculators_config=SpeculatorsConfig(
                algorithm="dspark", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=4)],
                default_proposal_method="greedy", verifier=VerifierConfig(name_or_path=None, architectures=[])))
        return DSparkDraftModel(cfg)

    # Shapes from a reduced draft vocabulary (K != V tells the two apart); a full-vocabulary draft is K = V
    # without the tables that only a reduced vocabulary has.
    full, reduced = model(0, "vanilla", False, False, PROBE["V"]), model(0, "vanilla", False, False, PROBE["K"])
    return {"source": "https://pypi.org/project/speculators/", "version": importlib.metadata.version("speculators"),
            "files": list(SPECULATORS_FILES), "model": "DSparkDraftModel", "saved_config": _saved_config(full),
            "weights": components(lambda *a: model(*a, PROBE["K"]).state_dict()),
            "only_with_reduced_vocab": sorted(set(reduced.state_dict()) - set(full.state_dict())),
            "omitted_on_save": sorted(full._keys_to_ignore_on_save),
            "omitted_on_save_reduced_vocab": sorted(reduced._keys_to_ignore_on_save)}


def _saved_config(model) -> dict:
    """What speculators' own save_pretrained writes into config.json: its keys, and the values that do not
    depend on the draft."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = json.loads((Path(tmp) / "config.json").read_text())
    fixed = ("architectures", "speculators_model_type", "speculators_version", "sliding_window_non_causal",
             "tie_word_embeddings", "sample_from_anchor")
    return {"keys": sorted(saved), "values": {k: saved[k] for k in fixed},
            "proposal_method_keys": sorted(saved["speculators_config"]["proposal_methods"][0]),
            "proposal_method_values": {k: v for k, v in saved["speculators_config"]["proposal_methods"][0].items()
                                       if k != "speculative_tokens"}}


def main() -> int:
    torch.manual_seed(0)
    data = json.loads(LAYOUTS_PATH.read_text()) if LAYOUTS_PATH.is_file() else {}
    for name, make in (("deepspec", deepspec_layout), ("speculators", speculators_layout)):
        try:
            layout = make()
        except ImportError as exc:
            print(f"{name}: not importable ({exc}); keeping the recorded entry")
            continue
        if name == "deepspec" and not layout["commit"]:
            raise SystemExit("set DEEPSPEC_COMMIT to the DeepSpec commit on PYTHONPATH (it is recorded with the data)")
        data[name] = layout
        data[name]["checked_with"] = {"torch": torch.__version__,
                                      "transformers": importlib.metadata.version("transformers")}
        print(f"{name}: {sum(len(v) for v in _flat(data[name]['weights']))} weight entries recorded")
    LAYOUTS_PATH.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {LAYOUTS_PATH.relative_to(ROOT)}")
    return 0


def _flat(weights: dict):
    yield weights["backbone"]
    yield from weights["sequential_head"].values()
    yield from weights["confidence_head"].values()


if __name__ == "__main__":
    sys.exit(main())
