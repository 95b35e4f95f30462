"""Static check: do vLLM's DSpark and EAGLE-3 loaders accept our speculators-format exports, name by name?

    nice -n 10 .venv/bin/python benchmarks/check_vllm.py                 # tiny exports of every head type
    .venv/bin/python benchmarks/check_vllm.py --export runs/export/vllm  # one export you made

vLLM is not a dependency and needs a GPU, so nothing here imports it. What its loader does with a
speculators export was read from its source (the files and commits in ``dspark_model/vllm_layout.json``) and
written down there as rules; this script applies them to an export's ``config.json`` and its safetensors
header, the way vLLM would:

* config: the speculators config becomes vLLM's draft config (``transformer_layer_config`` plus the DSpark
  keys vLLM copies, architecture ``Qwen3DSparkModel``); the keys it needs must be there, with values its
  Qwen3 DSpark backbone can run (SiLU MLP, one flat RoPE set, no sliding-window layer, the vanilla Markov
  head, the anchor-first block: ``sample_from_anchor`` true, ``speculative_tokens`` = ``block_size``);
* weights: every tensor name goes through vLLM's renames (``model.`` prefix except ``lm_head``, ``d2t`` ->
  ``draft_id_to_target_id``, ``t2d`` and ``mask_embedding`` skipped, q/k/v into ``qkv_proj`` and gate/up into
  ``gate_up_proj`` shards) and must land on a parameter vLLM builds, with its shape and an integer dtype for
  the d2t table; every parameter vLLM would otherwise leave unloaded (or take from the target when it may)
  must be in the file.

An EAGLE-3 export (``speculators_model_type: eagle3``) is checked against ``Eagle3LlamaForCausalLM``
(``llama_eagle3.py``, the ``eagle3`` rules): a one-layer Llama config, ``norm_before_residual`` false, three aux
ids, q/k/v over the 2d-wide [embedding ; feature] input, its own K-row LM head, ``d2t`` when K < V.

Without ``--export`` it exports tiny random drafts (Markov / gated / rnn heads, a 40-token draft vocabulary,
no confidence head, DFlash, EAGLE-3 over the full and a 40-token vocabulary) on tiny Qwen3 and Llama targets
and prints what maps and what does not; the gated and rnn heads are expected to fail (vLLM builds only the
vanilla Markov head). Exit status 1 when a result
differs from that expectation (or, with ``--export``, when the export has a problem). Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspark_model.reference import formula_value  # noqa: E402

RULES_PATH = ROOT / "dspark_model" / "vllm_layout.json"
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
INT_DTYPES = {"I64"}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def rules() -> dict:
    return json.loads(RULES_PATH.read_text())


def vllm_name(rules_: dict) -> str:
    """'vLLM qwen3_dspark.py @ 0302ff4': the loader the rules were read from."""
    path = rules_.get("loader", "vllm/model_executor/models/qwen3_dspark.py")
    return f"vLLM {Path(path).name} @ {rules_['files'][path][:7]}"


@dataclass
class VllmCheck:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)  # file name -> vLLM parameter (shard) or '(skipped)'
    config: dict = field(default_factory=dict)  # the draft config vLLM would build

    @property
    def ok(self) -> bool:
        return not self.problems


def _get(doc: dict, dotted: str):
    """'a.b[0].c' -> doc['a']['b'][0]['c'], or None."""
    cur = doc
    for part in dotted.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        key, idx = (m.group(1), int(m.group(2))) if m else (part, None)
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
        if idx is not None:
            if not isinstance(cur, list) or len(cur) <= idx:
                return None
            cur = cur[idx]
    return cur


def vllm_draft_config(cfg: dict, rules_: dict) -> tuple[dict, list[str]]:
    """The draft config vLLM builds from a speculators config, and what it cannot build it from."""
    spec, problems = rules_["config"], []
    if cfg.get("speculators_model_type") != spec["speculators_model_type"]:
        problems.append(f"config.json: speculators_model_type is {cfg.get('speculators_model_type')!r}; vLLM loads "
                        f"a DSpark draft from {spec['speculators_model_type']!r}")
    missing = [k for k in spec["required"] if _get(cfg, k) is None]
    if missing:
        problems.append(f"config.json: vLLM needs {missing}")
    layer = cfg.get("transformer_layer_config")
    view = dict(layer) if isinstance(layer, dict) else {}
    view["architectures"] = [spec["architecture_set_by_vllm"]]
    for key in spec["copied"]:
        if cfg.get(key) is not None:
            view[key] = cfg[key]
    aux = cfg.get("aux_hidden_state_layer_ids") or []
    view["eagle_aux_hidden_state_layer_ids"] = list(aux)
    view["target_layer_ids"] = [i - 1 for i in aux]
    view["num_speculative_tokens"] = _get(cfg, "speculators_config.proposal_methods[0].speculative_tokens")
    for key, value in spec["defaults"].items():
        if key not in view and not isinstance(value, str):
            view[key] = value
    if view.get("draft_vocab_size") is None:
        view["draft_vocab_size"] = view.get("vocab_size")
    view["dspark_bonus_anchor"] = not view["sample_from_anchor"]
    return view, problems


def _config_problems(view: dict, rules_: dict) -> list[str]:
    """Values vLLM's Qwen3 DSpark backbone cannot run as our draft computes."""
    spec, p = rules_["config"], []
    absent = [k for k in spec["layer_keys"] if k not in view and k not in ("head_dim", "layer_types", "rope_parameters")]
    if absent:
        p.append(f"transformer_layer_config: vLLM builds the draft layers from {absent}, absent")
    p += _layer_problems(view, spec)
    rope = view.get("rope_parameters")
    if rope is None and "rope_theta" not in view:
        p.append(f"transformer_layer_config: no rope_parameters; vLLM would use rope_theta "
                 f"{spec['defaults']['rope_theta']}")
    sliding = [i for i, t in enumerate(view.get("layer_types") or []) if t == spec["sliding_layer_type"]]
    if sliding:
        p.append(f"transformer_layer_config: layers {sliding} are '{spec['sliding_layer_type']}'; vLLM runs them "
                 f"causal with a sliding window, our draft attends to the whole block")
    rank = int(view.get("markov_rank") or 0)
    head = view.get("markov_head_type", "vanilla")
    if rank > 0 and head not in spec["markov_head_types"]:
        p.append(f"config.json: markov_head_type {head!r}; vLLM builds only the {spec['markov_head_types']} Markov "
                 f"head (its weights would not load, and the bias would be computed differently)")
    if view.get("sample_from_anchor") is not True:
        p.append("config.json: sample_from_anchor is not true; vLLM would run the 1+N block (anchor as a bonus "
                 "token) while our draft predicts from the anchor slot: every draft shifted by one")
    n, block = view.get("num_speculative_tokens"), view.get("block_size")
    if n is not None and block is not None and n != block:
        p.append(f"config.json: speculative_tokens {n} != block_size {block}; with sample_from_anchor the block "
                 f"drafts block_size tokens")
    aux = view.get("eagle_aux_hidden_state_layer_ids") or []
    if not aux or any(not isinstance(i, int) or i < 1 for i in aux):
        p.append(f"config.json: aux_hidden_state_layer_ids {aux}: vLLM taps the input of decoder layer i (>= 1)")
    V, K, mask = view.get("vocab_size"), view.get("draft_vocab_size"), view.get("mask_token_id")
    if isinstance(V, int) and isinstance(K, int) and K > V:
        p.append(f"config.json: draft_vocab_size {K} exceeds vocab_size {V}")
    if isinstance(V, int) and isinstance(mask, int) and not 0 <= mask < V:
        p.append(f"config.json: mask_token_id {mask} is outside the vocabulary of {V}")
    return p


def _layer_problems(view: dict, spec: dict) -> list[str]:
    """The draft layer's activation and RoPE set, as vLLM's draft layers (DSpark's and EAGLE-3's) run them."""
    p = []
    act = view.get("hidden_act")
    if act is not None and act not in spec["hidden_act"]:
        p.append(f"transformer_layer_config: hidden_act {act!r}; vLLM's draft MLP runs only {spec['hidden_act']}")
    rope = view.get("rope_parameters")
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        p.append("transformer_layer_config: rope_parameters is keyed by layer type; vLLM's draft layers take one "
                 "flat RoPE set")
    return p


def _sizes(view: dict) -> dict[str, int]:
    d, H = int(view["hidden_size"]), int(view["num_attention_heads"])
    V = int(view["vocab_size"])
    r = int(view.get("markov_rank") or 0)
    return {"d": d, "V": V, "K": int(view.get("draft_vocab_size") or V), "r": r,
            "I": int(view["intermediate_size"]), "H": H, "KV": int(view.get("num_key_value_heads") or H),
            "hd": int(view.get("head_dim") or d // H), "taps": len(view["eagle_aux_hidden_state_layer_ids"]),
            "T": int(view.get("target_hidden_size") or d), "L": int(view["num_hidden_layers"]),
            "c": r if view.get("confidence_head_with_markov") else 0}


def map_name(name: str, rules_: dict) -> tuple[str | None, str | None]:
    """(vLLM parameter, shard) a file tensor lands on; (None, None) when vLLM skips it."""
    w = rules_["weights"]
    if any(s in name for s in w["skipped"]):
        return None, None
    for old, new in w["renamed"].items():
        if old in name:
            return name.replace(old, new), None
    out = name if any(s in name for s in w["unprefixed"]) else w["prefix"] + name
    for old, (new, shard) in w["stacked"].items():
        if old in out:
            return out.replace(old, new), shard
    return out, None


def _template(param: str) -> tuple[str, int | None]:
    m = LAYER.match(param)
    if not m:
        return param, None
    return LAYER.sub("model.layers.{i}.", param), int(m.group(1))


def _built(template: str, sizes: dict, view: dict, target_vocab: int) -> bool:
    """Whether vLLM builds this parameter for this config."""
    if template.startswith("model.confidence_head."):
        return bool(view.get("enable_confidence_head"))
    if template == "draft_id_to_target_id":
        return sizes["K"] < target_vocab
    return True


def _needs(params, sizes: dict, why) -> dict[str, str]:
    """vLLM parameter (or shard key 'param#shard') -> why it must come from the file: every fused shard, and
    each other parameter for which ``why(template)`` gives a reason (None: the file may leave it out)."""
    need = {}
    for template in params:
        for p in [template.format(i=i) for i in range(sizes["L"])] if "{i}" in template else [template]:
            if _fused_shards(template):
                need.update({f"{p}#{s}": reason for s, reason in _fused_shards(template)})
            elif why(template):
                need[p] = why(template)
    return need


def _shared_embedding(template: str, sizes: dict, target_vocab: int) -> str | None:
    if sizes["V"] > target_vocab:
        return "vocab_size exceeds the target's, so the target's embedding cannot be shared"
    return None


def _needed(sizes: dict, view: dict, target_vocab: int, params: dict) -> dict[str, str]:
    """What a DSpark export must carry (``_needs``)."""
    reduced = sizes["K"] < target_vocab

    def why(template: str) -> str | None:
        if template == "model.embed_tokens.weight":
            return _shared_embedding(template, sizes, target_vocab)
        if template == "lm_head.weight":
            return "a reduced draft vocabulary cannot share the target's LM head" if reduced else None
        if template == "draft_id_to_target_id":
            return "draft ids of a reduced vocabulary are mapped through d2t" if reduced else None
        if template.startswith("model.markov_head."):
            return "the Markov head" if sizes["r"] > 0 else None
        if template.startswith("model.confidence_head."):
            return ("enable_confidence_head (left out silently otherwise: no adaptive verification)"
                    if view.get("enable_confidence_head") else None)
        return "the backbone"
    return _needs(params, sizes, why)


def _check_weights(res: VllmCheck, view: dict, header: dict, rules_: dict, target_vocab_size, built, needed):
    """Map the file's tensors onto what the loader builds (``built(template, sizes, target_vocab)``) and report
    the parameters left unloaded among ``needed(sizes, target_vocab)``; the embedding shared from the target
    is noted. -> (sizes, target vocabulary, loaded parameters), or None when the sizes cannot be read."""
    try:
        sizes = _sizes(view)
    except (KeyError, TypeError, ValueError):
        res.problems.append("transformer_layer_config: the draft sizes cannot be read; weights not checked")
        return None
    target_vocab = int(target_vocab_size or sizes["V"])
    loaded = map_weights(res, header, rules_, sizes, lambda t: built(t, sizes, target_vocab))
    report_unloaded(res, needed(sizes, target_vocab), loaded, rules_)
    if "model.embed_tokens.weight" not in loaded:
        res.notes.append("embed_tokens: shared from the target")
    return sizes, target_vocab, loaded


def _fused_shards(template: str) -> list[tuple[str, str]]:
    """The shards vLLM loads into one fused parameter (q/k/v, gate/up), each a separate need; [] otherwise."""
    if template.endswith("qkv_proj.weight"):
        return [(s, "the attention projections") for s in ("q", "k", "v")]
    if template.endswith("gate_up_proj.weight"):
        return [(s, "the MLP projections") for s in ("0", "1")]
    return []


def map_weights(res: VllmCheck, header: dict, rules_: dict, sizes: dict, built) -> set[str]:
    """Every file tensor through the loader's renames onto the parameters it builds (``built(template)``: for
    this config), shape and dtype checked; problems and the mapping go into ``res``. -> the parameters (and
    'param#shard' keys) the file fills."""
    w, who = rules_["weights"], vllm_name(rules_)
    loaded: set[str] = set()
    for name, (shape, dtype) in sorted(header.items()):
        param, shard = map_name(name, rules_)
        if param is None:
            res.mapping[name] = "(skipped)"
            continue
        res.mapping[name] = param + (f" [shard {shard}]" if shard else "")
        template, layer = _template(param)
        if template not in w["params"] or (layer is not None and layer >= sizes["L"]):
            res.problems.append(f"weights: {name} -> {param}: {who} has no such parameter ({w['unknown_name']})")
            continue
        if not built(template):
            res.problems.append(f"weights: {name} -> {param}: {who} does not build it for this config "
                                f"({w['when'].get(template, '')}) and stops on the name")
            continue
        want = tuple(formula_value(f, sizes) for f in (w["shards"][shard] if shard else w["params"][template]))
        if tuple(shape) != want:
            res.problems.append(f"weights: {name} -> {res.mapping[name]}: shape {tuple(shape)}, {who} expects {want}")
        if template in w["integer"] and dtype not in INT_DTYPES:
            res.problems.append(f"weights: {name} is {dtype}; {who} loads it into an int64 parameter")
        if template not in w["integer"] and dtype not in FLOAT_DTYPES:
            res.problems.append(f"weights: {name} is {dtype}; {who} expects a floating-point tensor")
        loaded.add(f"{param}#{shard}" if shard else param)
    return loaded


def report_unloaded(res: VllmCheck, need: dict[str, str], loaded: set[str], rules_: dict) -> None:
    """A problem naming the parameters (shards) vLLM needs from the file and the file does not fill."""
    missing = sorted(set(need) - loaded)
    if missing:
        shown = [m.replace("#", " [shard ") + "]" if "#" in m else m for m in missing[:6]]
        res.problems.append(f"weights: {vllm_name(rules_)} would leave {shown} unloaded ({need[missing[0]]})")


def check_layout(cfg: dict, header: dict, rules_: dict | None = None, target_vocab_size: int | None = None) -> VllmCheck:
    """Apply vLLM's loading rules to a speculators config and a safetensors header (name -> (shape, dtype)):
    its DSpark loader's, or for an ``eagle3`` export its EAGLE-3 loader's (``check_eagle3_layout``)."""
    rules_ = rules_ or rules()
    if cfg.get("speculators_model_type") == "eagle3":
        return check_eagle3_layout(cfg, header, rules_["eagle3"], target_vocab_size)
    res = VllmCheck()
    view, res.problems = vllm_draft_config(cfg, rules_)
    res.config = view
    res.problems += _config_problems(view, rules_)
    checked = _check_weights(res, view, header, rules_, target_vocab_size,
                             lambda t, sizes, vocab: _built(t, sizes, view, vocab),
                             lambda sizes, vocab: _needed(sizes, view, vocab, rules_["weights"]["params"]))
    if checked is None:
        return res
    sizes, target_vocab, loaded = checked
    if sizes["K"] == target_vocab and "lm_head.weight" not in loaded:
        res.notes.append("lm_head: shared from the target")
    if sizes["r"] == 0:
        res.notes.append("markov_rank 0: vLLM builds a zero-width Markov head (its bias is zero)")
    if view.get("enable_confidence_head"):
        res.notes.append(f"confidence head: {1} x {sizes['d'] + sizes['c']}, float32 in vLLM")
    res.notes.append("sample_from_anchor: honoured by vLLM builds with PR #48639; builds with PR #47093 but "
                     "without #48639 run every speculators DSpark draft as a 1+N block")
    return res


# ---- EAGLE-3 exports (vLLM's llama_eagle3.py; rules under "eagle3" in vllm_layout.json) --------------------
def vllm_eagle3_config(cfg: dict, spec: dict) -> tuple[dict, list[str]]:
    """The draft config vLLM builds from a speculators ``eagle3`` config, and what it cannot build it from."""
    missing = [k for k in spec["required"] if _get(cfg, k) is None]
    problems = [f"config.json: vLLM needs {missing}"] if missing else []
    layer = cfg.get("transformer_layer_config")
    view = dict(layer) if isinstance(layer, dict) else {}
    for key in spec["copied"]:
        if cfg.get(key) is not None:
            view[key] = cfg[key]
    for key, value in spec["defaults"].items():  # a string default names the key whose value it takes
        if view.get(key) is None:
            view[key] = view.get(value) if isinstance(value, str) else value
    view["architectures"] = [spec["architecture_set_by_vllm"]]
    view["num_lookahead_tokens"] = _get(cfg, "speculators_config.proposal_methods[0].speculative_tokens")
    return view, problems


def _eagle3_config_problems(view: dict, cfg: dict, spec: dict) -> list[str]:
    """Values vLLM's EAGLE-3 Llama layer cannot run as our draft computes."""
    p = _layer_problems(view, spec)
    if view.get("model_type") not in spec["layer_model_types"]:
        p.append(f"transformer_layer_config: model_type {view.get('model_type')!r}; vLLM builds "
                 f"{spec['architecture_set_by_vllm']} from a {spec['layer_model_types']} layer config")
    absent = [k for k in spec["layer_keys"] if k not in view]
    if absent:
        p.append(f"transformer_layer_config: vLLM builds the draft layer from {absent}, absent")
    if view.get("norm_before_residual") is not False:
        p.append("config.json: norm_before_residual is not false (vLLM's default is true): vLLM would keep the "
                 "hidden_norm-ed feature as the residual, our draft adds the feature itself")
    extra = [k for k in spec["draft_has_no"] if cfg.get(k)]
    if extra or view.get("attention_bias") or view.get("mlp_bias"):
        p.append(f"config.json: {extra or 'attention_bias / mlp_bias'} set; the draft has no such norm or bias")
    if view.get("num_hidden_layers") != 1:
        p.append(f"transformer_layer_config: num_hidden_layers {view.get('num_hidden_layers')}; the draft is one "
                 f"layer (vLLM's later layers read d-wide inputs, not [embedding ; feature])")
    aux, n = view.get("eagle_aux_hidden_state_layer_ids") or [], spec["num_taps"]
    if len(aux) != n or any(not isinstance(i, int) or i < 1 for i in aux):
        p.append(f"config.json: eagle_aux_hidden_state_layer_ids {aux}: vLLM's fc reads {n} tapped states, id a "
                 f"being the output of decoder layer a - 1 (>= 1)")
    V, K = view.get("vocab_size"), view.get("draft_vocab_size")
    if isinstance(V, int) and isinstance(K, int) and K > V:
        p.append(f"config.json: draft_vocab_size {K} exceeds vocab_size {V}")
    return p


def _eagle3_needed(sizes: dict, target_vocab: int, params: dict) -> dict[str, str]:
    """What an EAGLE-3 export must carry (``_needs``)."""
    def why(template: str) -> str | None:
        if template == "model.embed_tokens.weight":
            return _shared_embedding(template, sizes, target_vocab)
        if template == "draft_id_to_target_id":
            return ("a reduced draft vocabulary maps its ids through d2t (zeros would read them as target ids)"
                    if sizes["K"] < target_vocab else None)
        return "the draft's own weights (its LM head included)"
    return _needs(params, sizes, why)


def check_eagle3_layout(cfg: dict, header: dict, rules_: dict, target_vocab_size: int | None = None) -> VllmCheck:
    """``check_layout`` for an EAGLE-3 speculators export, with the ``eagle3`` rules of vllm_layout.json."""
    res, spec = VllmCheck(), rules_["config"]
    view, res.problems = vllm_eagle3_config(cfg, spec)
    res.config = view
    res.problems += _eagle3_config_problems(view, cfg, spec)
    checked = _check_weights(res, view, header, rules_, target_vocab_size,
                             lambda t, sizes, vocab: True,  # it builds every parameter
                             lambda sizes, vocab: _eagle3_needed(sizes, vocab, rules_["weights"]["params"]))
    if checked is None:
        return res
    loaded = checked[2]
    if "draft_id_to_target_id" not in loaded:
        res.notes.append("draft_id_to_target_id: not in the file, left at zeros (the identity map)")
    return res


def check_export(export_dir: str | Path, target_vocab_size: int | None = None) -> VllmCheck:
    from dspark_model.export_schema import read_weights_header

    export_dir = Path(export_dir)
    cfg = json.loads((export_dir / "config.json").read_text())
    return check_layout(cfg, read_weights_header(export_dir / "model.safetensors"), target_vocab_size=target_vocab_size)


# ---- tiny exports -------------------------------------------------------------------------------------------
EAGLE3 = dict(architecture="eagle3", num_layers=1, sequential_head="none", confidence_head=False)
CASES = {  # name -> (target family, DraftConfig fields, expected to load in vLLM)
    "qwen3-markov": ("qwen3", dict(sequential_head="markov", confidence_head=True), True),
    "qwen3-markov-reduced-40": ("qwen3", dict(sequential_head="markov", confidence_head=True,
                                              draft_vocab_size=40), True),
    "qwen3-markov-no-confidence": ("qwen3", dict(sequential_head="markov", confidence_head=False), True),
    "qwen3-dflash": ("qwen3", dict(sequential_head="none", confidence_head=False), True),
    "llama-markov": ("llama", dict(sequential_head="markov", confidence_head=True), True),
    "qwen3-gated": ("qwen3", dict(sequential_head="gated", confidence_head=True), False),
    "qwen3-rnn": ("qwen3", dict(sequential_head="rnn", confidence_head=True), False),
    "llama-eagle3": ("llama", dict(EAGLE3), True),
    "qwen3-eagle3-reduced-40": ("qwen3", dict(EAGLE3, draft_vocab_size=40), True),
}


def export_case(name: str, work: Path, targets: dict) -> tuple[Path, int]:
    """A tiny random draft of one case, exported for speculators; (export folder, target vocabulary)."""
    import torch

    from dspark_model.checkpoint import save_pretrained
    from dspark_model.config import DraftConfig, TargetSpec
    from dspark_model.draft import build_draft_for
    from dspark_model.export import export_draft
    from dspark_model.target import load_target

    family, fields, _ = CASES[name]
    spec = TargetSpec(id=f"tiny-{family}", random={"family": family, "num_hidden_layers": 4, "seed": 0})
    if family not in targets:
        targets[family] = load_target(spec)
    target = targets[family]
    torch.manual_seed(0)
    cfg = DraftConfig(**{"num_layers": 2, "block_size": 4, "markov_rank": 16, **fields})
    draft = build_draft_for(target, cfg).eval()
    if draft.reduced_vocab:
        draft.set_draft_vocab(torch.arange(0, 200, 5))
    ckpt = save_pretrained(draft, work / f"{name}-ckpt", target_spec=spec)
    return export_draft(ckpt, work / name, "speculators", target=target), target.vocab_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", help="a speculators export folder to check (default: tiny exports of every head)")
    p.add_argument("--target-vocab-size", type=int, help="the target's vocabulary (default: the export's vocab_size)")
    p.add_argument("--show-mapping", action="store_true", help="print every tensor's vLLM parameter")
    args = p.parse_args(argv)
    r = rules()
    print(f"rules: {vllm_name(r)}, {vllm_name(r['eagle3'])} (dspark_model/vllm_layout.json)")
    if args.export:
        res = check_export(args.export, args.target_vocab_size)
        _print(args.export, res, args.show_mapping)
        return 0 if res.ok else 1
    import torch

    torch.set_num_threads(1)
    ok, targets = True, {}
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as tmp:
        for name, (_, _, expected) in CASES.items():
            out, vocab = export_case(name, Path(tmp), targets)
            res = check_export(out, vocab)
            verdict = "loads" if res.ok else "refused"
            as_expected = res.ok == expected
            ok &= as_expected
            print(f"{name:<28} {verdict:<8} {'(as expected)' if as_expected else '(UNEXPECTED)'}")
            _print(None, res, args.show_mapping, indent="    ")
    return 0 if ok else 1


def _print(title, res: VllmCheck, mapping: bool, indent: str = "") -> None:
    if title:
        print(f"{title}: {'loads' if res.ok else 'refused'}")
    for line in res.problems:
        print(f"{indent}problem: {line}")
    for line in res.notes:
        print(f"{indent}note: {line}")
    if mapping:
        for k, v in res.mapping.items():
            print(f"{indent}{k} -> {v}")


if __name__ == "__main__":
    sys.exit(main())
