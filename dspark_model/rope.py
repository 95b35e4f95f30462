"""RoPE of the draft: which of the target's rotary parameters its layers use, and how exports state them.

Every draft layer is a full-attention layer (a block attends to the whole context before its anchor), so the
draft rotates with the target's *full-attention* parameters. Most families have one flat set
(``{"rope_type": ..., "rope_theta": ..., scaling fields}``); families with per-layer-type attention
(Gemma 3/4) key them by layer type (``{"full_attention": {...}, "sliding_attention": {...}}``), and the draft
takes the ``full_attention`` entry explicitly. The draft's own config (``arch.rope_config``) always holds the
flat set it uses.

Exports write the flat set. For a per-layer-type target they also repeat it under every layer-type key the
target's config has: readers of that family's config class (which fills a missing per-type entry with the
family's defaults), and speculators (which takes the ``sliding_attention`` entry of a nested dict), then read
the same numbers as a flat reader.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

DRAFT_LAYER_TYPE = "full_attention"


def per_layer_type(params: dict | None) -> bool:
    """True when ``params`` keys RoPE sets by layer type (some values are dicts)."""
    return isinstance(params, dict) and any(isinstance(v, dict) for v in params.values())


def _flat_part(params: dict) -> dict:
    return {k: v for k, v in params.items() if not isinstance(v, dict)}


def target_rope_parameters(text_config) -> dict:
    """The flat RoPE parameters the draft's (full-attention) layers use, from the target's text config."""
    params = getattr(text_config, "rope_parameters", None)
    if per_layer_type(params):
        if isinstance(params.get(DRAFT_LAYER_TYPE), dict):
            return dict(params[DRAFT_LAYER_TYPE])
        if "rope_type" not in params:
            raise ValueError(f"the target's rope_parameters are keyed by layer type {sorted(params)} without a "
                             f"'{DRAFT_LAYER_TYPE}' entry; the draft's layers are full attention and need one")
    if params and "rope_type" in params:
        return _flat_part(params)
    return {"rope_type": "default", "rope_theta": getattr(text_config, "rope_theta", None) or 1e4}


def draft_rope_parameters(params: dict) -> dict:
    """The flat RoPE set of a draft config. A draft config written before layer types were resolved holds the
    target's per-type dict; its draft trained with what transformers' Llama RoPE made of it (the default
    θ, ignoring the per-type entries), so that is kept, with a warning."""
    if not per_layer_type(params) or "rope_type" in params:
        return _flat_part(params)
    from transformers import LlamaConfig

    legacy = _flat_part(LlamaConfig(rope_parameters=dict(params)).rope_parameters)
    log.warning("draft config holds per-layer-type RoPE %s (written before the draft chose its full-attention "
                "set); keeping what that draft was trained with: %s", sorted(params), legacy)
    return legacy


def export_rope_parameters(flat: dict, target_params: dict | None) -> dict:
    """RoPE parameters for an export's config: the flat set, repeated under each of the target's layer-type
    keys when the target's config is keyed by layer type."""
    out = dict(flat)
    if per_layer_type(target_params):
        out.update({k: dict(flat) for k, v in target_params.items() if isinstance(v, dict)})
    return out


class DraftRotary(nn.Module):
    """RoPE from flat rope parameters, computed by transformers (llama3/yarn/linear/... scaling too)."""

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        config = LlamaConfig(head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                             max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope_parameters))
        self.inner = LlamaRotaryEmbedding(config)
        self._inv_freq_fp32 = self.inner.inv_freq.detach().clone().float()  # plain attribute: never cast

    def _apply(self, fn, recurse=True):
        # Casting the draft to bf16 must not round RoPE frequencies: restore them in fp32 after any move.
        super()._apply(fn, recurse)
        device = self.inner.inv_freq.device
        self.inner.inv_freq = self._inv_freq_fp32.to(device)
        self.inner.original_inv_freq = self._inv_freq_fp32.to(device)
        return self

    def forward(self, like: torch.Tensor, positions: torch.Tensor):
        return self.inner(like, positions)
