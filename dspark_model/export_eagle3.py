"""Export an EAGLE-3 draft for vLLM (speculators ``eagle3`` format) and SGLang (EAGLE-3's own layout).

    python -m dspark_model.export runs/train/<name>/final --format speculators   # an eagle3 checkpoint: vLLM
    python -m dspark_model.export runs/train/<name>/final --format deepspec      # an eagle3 checkpoint: SGLang
    python -m dspark_model.export_eagle3 runs/train/<name>/final --format sglang --out DIR

Both write ``model.safetensors`` + ``config.json`` and neither carries the target's embedding (both engines
share the target's). Layouts, as their loaders read them (checked in ``SOURCES_CHECKED``):

* speculators / vLLM: ``speculators_model_type: eagle3``, a Llama ``transformer_layer_config`` (1 layer, the
  target's sizes and vocabulary), ``draft_vocab_size`` K, ``target_hidden_size``, ``norm_before_residual:
  false``, ``eagle_aux_hidden_state_layer_ids`` in vLLM's count (hidden_states index = our decoder-layer id
  + 1). Weights ``fc.weight`` (d, 3d; vLLM's fc has no bias), ``layers.0.{self_attn.{q,k,v}_proj (2d input),
  o_proj, input_layernorm, hidden_norm, post_attention_layernorm, mlp.*}``, ``norm.weight``,
  ``lm_head.weight`` (K, d), and with a reduced vocabulary ``d2t`` (int64, target id = i + d2t[i]) and
  ``t2d`` (bool over the target vocabulary; vLLM skips it).
* SGLang (``LlamaForCausalLMEagle3``): a flat Llama config with ``architectures: [LlamaForCausalLMEagle3]``,
  ``draft_vocab_size`` (always written: without it SGLang would run the target's LM head instead of the
  draft's), ``tie_word_embeddings: false``, ``eagle_config.eagle_aux_hidden_state_layer_ids`` in OUR
  decoder-layer count (SGLang adds 1 itself). The layer's weights are named ``midlayer.*``.

``load_eagle3_export`` reads either back into an ``Eagle3Draft`` (the round-trip tests). ``--verify`` loads
the speculators export with speculators 0.9.0's own ``Eagle3DraftModel`` (``verify_eagle3.py``, when it is on
PYTHONPATH): no unexpected key, only the verifier's embedding / norm / head missing (shared at serving), and
its training-time-test forward gives our logits at every step (max |diff| ~1e-6 in fp32) - the same mask,
positions (+1 per step) and token shift. SGLang's layout has no importable reference; ``--verify`` refuses it.
Both exports carry the toolkit's model card (``card.write_card``: taps in the engine's count, the vLLM /
SGLang serving flags, eval and training documents found beside the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark_model import __version__
from dspark_model.arch import DraftArch
from dspark_model.atomic import atomic_write_json, replace_dir
from dspark_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_draft, target_spec_from_checkpoint
from dspark_model.eagle3 import Eagle3Draft
from dspark_model.target import TAP_CONVENTION, dtype_name, hidden_states_index, tap_id_of_hidden_states_index
from dspark_model.vocab import d2t_t2d

log = logging.getLogger(__name__)

FORMATS = ("speculators", "sglang")
TOOLKIT_KEY = "dspark_toolkit"
SPECULATORS_VERSION = "0.9.0"
# What the layouts above were checked against (weight names, config keys, layer-id conventions).
SOURCES_CHECKED = {
    "vllm": "vllm-project/vllm@00bd1493b3e8 vllm/model_executor/models/llama_eagle3.py "
            "(Eagle3LlamaForCausalLM / LlamaModel.load_weights)",
    "speculators": "speculators 0.9.0 (PyPI) speculators/models/eagle3/{config,core}.py: Eagle3SpeculatorConfig, "
                   "Eagle3DraftModel (fc without bias, as vLLM); an older layout at vllm-project/speculators"
                   "@03a7c1497cdb had an fc bias",
    "sglang": "sgl-project/sglang@03d5a7771f60 python/sglang/srt/models/llama_eagle3.py "
              "(LlamaForCausalLMEagle3.load_weights) and set_eagle3_layers_to_capture (ids + 1)",
}
_LAYER_PREFIX = {"speculators": "layers.0.", "sglang": "midlayer."}


class Eagle3ExportError(ValueError):
    """An EAGLE-3 export that cannot be written or read; the message says why."""


def llama_layer_config(draft: Eagle3Draft) -> dict:
    """The draft's decoder layer as a Llama config (what both engines build the layer from)."""
    a = draft.arch
    rope = dict(a.rope_config["rope_parameters"])
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **a.layer_keys(),
        "rope_theta": rope.get("rope_theta"), "rope_parameters": rope,
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }


def _provenance(draft: Eagle3Draft, target, fmt: str, dtype: torch.dtype) -> dict:
    return {"toolkit_version": __version__, "format": f"eagle3-{fmt}", "target_id": target.name_or_path,
            "target_revision": target.revision, "target_num_hidden_layers": target.num_layers,
            "tap_layer_ids": list(draft.tap_layer_ids), "tap_layer_convention": TAP_CONVENTION,
            "block_size": draft.block_size, "dtype": dtype_name(dtype),
            "layouts_checked": SOURCES_CHECKED[fmt if fmt == "sglang" else "vllm"]}


def eagle3_config(draft: Eagle3Draft, target, fmt: str, dtype: torch.dtype, verifier: str) -> dict:
    """config.json of the export: speculators (vLLM) or SGLang."""
    lc = llama_layer_config(draft)
    common = {"draft_vocab_size": draft.out_vocab_size, "target_hidden_size": target.hidden_size,
              "norm_before_residual": False}
    if fmt == "sglang":
        return {**lc, **common, "architectures": ["LlamaForCausalLMEagle3"], "torch_dtype": str(dtype)[6:],
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(draft.tap_layer_ids),
                                 "use_aux_hidden_state": True},
                TOOLKIT_KEY: _provenance(draft, target, fmt, dtype)}
    return {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION, "transformer_layer_config": lc, **common,
        "eagle_aux_hidden_state_layer_ids": [hidden_states_index(i) for i in draft.tap_layer_ids],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": draft.block_size,
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier,
                         "architectures": list(getattr(target.model.config, "architectures", None) or [])},
        },
        "dtype": str(dtype)[6:], TOOLKIT_KEY: _provenance(draft, target, fmt, dtype),
    }


def _engine_name(name: str, fmt: str) -> str:
    """Our parameter name -> the engine's (the one decoder layer is ``layers.0.`` / ``midlayer.``)."""
    return _LAYER_PREFIX[fmt] + name[len("layers.0."):] if name.startswith("layers.0.") else name


def eagle3_tensors(draft: Eagle3Draft, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The draft's weights under the engine's names, plus d2t / t2d for a reduced vocabulary."""
    out = {_engine_name(name, fmt): t.detach().to(dtype).contiguous().cpu()
           for name, t in draft.state_dict().items() if name != "draft_to_target"}
    if draft.reduced_vocab:
        out["d2t"], out["t2d"] = d2t_t2d(draft.draft_to_target.cpu(), draft.arch.vocab_size)
    return out


def write_eagle3_export(draft: Eagle3Draft, target, out_dir: str | Path, fmt: str, dtype: torch.dtype | None = None,
                        verifier: str | None = None, overwrite: bool = False, card_sources=None,
                        check: Callable[[Path, object], None] | None = None) -> Path:
    """Write the export into ``out_dir`` atomically, after reading it back and comparing every tensor.

    ``check(folder, target)`` runs on the written files before they are moved into place (``--verify``; it
    raises to stop the export). The model card (README.md) is rendered from the files and ``card_sources``
    (``card.CardSources``: eval report, training config, data manifest)."""
    from dspark_model.card import write_card

    if fmt not in FORMATS:
        raise Eagle3ExportError(f"EAGLE-3 drafts export as {' or '.join(FORMATS)}, not {fmt!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise Eagle3ExportError(f"{out_dir} already exists; pass --overwrite to replace it, or choose --out")
    dtype = dtype or next(draft.parameters()).dtype
    config = eagle3_config(draft, target, fmt, dtype, verifier or target.name_or_path)
    tensors = eagle3_tensors(draft, fmt, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "dspark_export": f"eagle3-{fmt}"})
        atomic_write_json(tmp / CONFIG_NAME, config)
        back = load_eagle3_export(tmp, target)
        again = eagle3_tensors(back, fmt, dtype)
        if sorted(again) != sorted(tensors) or any(not torch.equal(again[k], tensors[k]) for k in tensors):
            raise Eagle3ExportError(f"{fmt} export does not read back to the same weights")
        if check is not None:
            check(tmp, target)
        write_card(tmp, card_sources, target)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote EAGLE-3 %s export (%d tensors) to %s", fmt, len(tensors), out_dir)
    return out_dir


def eagle3_format(config: dict) -> str | None:
    """"speculators" or "sglang" when a config.json is an EAGLE-3 export of that layout, else None."""
    if config.get("speculators_model_type") == "eagle3":
        return "speculators"
    return "sglang" if "LlamaForCausalLMEagle3" in (config.get("architectures") or []) else None


def eagle3_arch(config: dict) -> DraftArch:
    """The ``DraftArch`` an EAGLE-3 export's config.json describes (taps in our decoder-layer convention)."""
    fmt = eagle3_format(config)
    lc = config["transformer_layer_config"] if fmt == "speculators" else config
    if fmt == "speculators":
        taps = [tap_id_of_hidden_states_index(i) for i in config["eagle_aux_hidden_state_layer_ids"]]
        steps = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    else:
        taps = list(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        steps = (config.get(TOOLKIT_KEY) or {}).get("block_size", 7)
    K, V = config["draft_vocab_size"], lc["vocab_size"]
    rope = lc.get("rope_parameters") or {"rope_type": "default", "rope_theta": lc.get("rope_theta") or 1e4}
    return DraftArch(
        architecture="eagle3", hidden_size=lc["hidden_size"], num_layers=1,
        num_attention_heads=lc["num_attention_heads"], num_key_value_heads=lc["num_key_value_heads"],
        head_dim=lc.get("head_dim") or lc["hidden_size"] // lc["num_attention_heads"],
        intermediate_size=lc["intermediate_size"], rms_norm_eps=lc["rms_norm_eps"],
        hidden_act=lc.get("hidden_act", "silu"), vocab_size=V, tap_layer_ids=taps, block_size=steps,
        mask_token_id=None, sequential_head="none", markov_rank=0, confidence_head=False,
        rope_config={"rope_parameters": rope, "max_position_embeddings": lc.get("max_position_embeddings") or 4096},
        draft_vocab_size=K if K < V else None)


def eagle3_export_problems(export_dir: str | Path, config: dict) -> list[str]:
    """What is wrong with an EAGLE-3 export folder, read without a target: every weight the config implies
    (built on the meta device) present under the engine's name with its shape, and nothing else."""
    from dspark_model.export_schema import read_weights_header

    fmt = eagle3_format(config)
    try:
        arch = eagle3_arch(config)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return [f"config.json is not a complete {fmt} EAGLE-3 config ({type(exc).__name__}: {exc})"]
    weights = Path(export_dir) / WEIGHTS_NAME
    if not weights.is_file():
        return [f"{WEIGHTS_NAME} is missing"]
    with torch.device("meta"):
        want = {_engine_name(n, fmt): tuple(t.shape) for n, t in Eagle3Draft(arch).state_dict().items()
                if n != "draft_to_target"}
    if arch.draft_vocab_size:
        want.update(d2t=(arch.draft_vocab_size,), t2d=(arch.vocab_size,))
    have = {name: tuple(shape) for name, (shape, _) in read_weights_header(weights).items()}
    problems = [f"missing weights {sorted(set(want) - set(have))[:6]}"] if set(want) - set(have) else []
    problems += [f"unexpected weights {sorted(set(have) - set(want))[:6]}"] if set(have) - set(want) else []
    problems += [f"{n} has shape {list(have[n])}, the config implies {list(want[n])}"
                 for n in sorted(set(want) & set(have)) if have[n] != want[n]]
    return problems


def load_eagle3_export(export_dir: str | Path, target, device=None) -> Eagle3Draft:
    """Rebuild our ``Eagle3Draft`` from a speculators or SGLang EAGLE-3 export and attach ``target``."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_NAME).read_text())
    fmt = eagle3_format(config)
    if fmt is None:
        raise Eagle3ExportError(f"{export_dir}: not an EAGLE-3 export (speculators eagle3 or LlamaForCausalLMEagle3)")
    arch = eagle3_arch(config)
    draft, K = Eagle3Draft(arch), arch.out_vocab_size
    tensors = load_file(str(export_dir / WEIGHTS_NAME))
    prefix, state = _LAYER_PREFIX[fmt], {}
    for key, t in tensors.items():
        if key in ("d2t", "t2d"):
            continue
        state["layers.0." + key[len(prefix):] if key.startswith(prefix) else key] = t
    if "d2t" in tensors:
        state["draft_to_target"] = torch.arange(K, dtype=torch.long) + tensors["d2t"].long()
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise Eagle3ExportError(f"{export_dir}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    draft.to(dtype=tensors["fc.weight"].dtype)
    return draft.to(device=device or target.device).attach_target(target).eval()


def export_eagle3_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, fmt: str, dtype=None, target=None,
                             target_spec=None, verifier_path: str | None = None, overwrite: bool = False,
                             device: str = "cpu", card_sources=None, check=None) -> Path:
    """A trained EAGLE-3 checkpoint -> an engine export (the target is loaded as ``export.py`` does). The card
    reads ``card_sources``, by default the documents found beside the checkpoint; ``check``: see
    ``write_eagle3_export``."""
    from dspark_model.card import discover_sources
    from dspark_model.target import load_target, resolve_device

    if target is None:
        target = load_target(target_spec_from_checkpoint(ckpt_dir, target_spec),
                             resolve_device(str(device), "--device", Eagle3ExportError))
    draft = load_draft(ckpt_dir, target)
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    sources = card_sources or discover_sources(ckpt_dir)
    return write_eagle3_export(draft, target, out_dir, fmt, dtype, verifier_path, overwrite, sources, check)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_model.export_eagle3", description=__doc__.split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--format", choices=FORMATS, default="speculators")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--verifier-path")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_eagle3_checkpoint(args.ckpt, args.out, args.format, args.dtype, verifier_path=args.verifier_path,
                                 overwrite=args.overwrite)
    except (Eagle3ExportError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
