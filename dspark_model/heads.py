"""Sequential and confidence heads of a DSpark draft (paper section 3.1, eq. 5-7).

The parallel backbone gives each block slot k a hidden state h_k and base logits U_k. The sequential head
adds a bias B_k that depends on the previous token of the block (the anchor for slot 0, then x_{p+k}):

* ``markov``: B_k = W2 . W1[x_{k-1}]                                  (low-rank first-order transition, eq. 5)
* ``gated``:  B_k = W2 . (g_k * W1[x_{k-1}]),  g_k = sigmoid(W_g [h_k ; W1[x_{k-1}]] + b_g)
* ``rnn``:    s_k = g * s_{k-1} + (1 - g) * tanh(W_c z_k), B_k = W2 . tanh(W_o z_k),
              z_k = [s_{k-1}; W1[x_{k-1}]; h_k], g = sigmoid(W_g z_k)    (eq. 6)

The gated and rnn heads are the reference definitions of DeepSpec (``GatedMarkovHead``, ``RNNHead``) and vLLM
speculators (``MarkovHead``), under their parameter names: ``gate_proj`` (d + r -> r, input order [h ; W1])
and ``joint_proj`` (2r + d -> 3r, input order [s ; W1 ; h], output chunks gate | candidate | output), so an
export loads in either reference with every weight in place.

All three work in a rank-r space and share the final projection W2 (r -> K), so the vocabulary-sized part is
one matmul per position. K is the draft's output vocabulary: the target's V, or the K most frequent answer
tokens of a reduced draft vocabulary; W1 always has one row per target token (the previous token, the anchor
included, can be any target token). ``none`` (DFlash) has no head at all. The confidence head (eq. 7) reads
[h_k ; W1[x_{k-1}]] when a sequential head exists (``confidence_head_with_markov``), else h_k alone.

Checkpoints written before the heads took the reference names: an rnn head's ``rnn_proj`` is the same
function and layout as ``joint_proj`` and is renamed on load; an old gated head (``gate``, reading h_k only)
computes a different function, so loading it raises ``LegacyHeadError``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_KINDS = ("none", "markov", "gated", "rnn")
LEGACY_RENAMES = {"rnn_proj.": "joint_proj."}  # old name -> reference name (same function, same layout)


class LegacyHeadError(ValueError):
    """A checkpoint's sequential head predates the reference definition and cannot be converted."""


class SequentialHead(nn.Module):
    """Prefix-dependent logit bias in a rank-``rank`` space (W1: V x r table, W2: r -> K projection)."""

    def __init__(self, kind: str, vocab_size: int, rank: int, hidden_size: int, out_size: int | None = None):
        super().__init__()
        if kind not in HEAD_KINDS or kind == "none":
            raise ValueError(f"sequential head kind must be one of {HEAD_KINDS[1:]}, got {kind!r}")
        self.kind, self.rank = kind, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # previous token -> rank-r feature
        self.markov_w2 = nn.Linear(rank, out_size or vocab_size, bias=False)  # rank-r feature -> logit bias
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)  # [h ; W1[prev]] -> gate
        if kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)  # [s ; W1[prev] ; h] -> g | c | o
        self.register_load_state_dict_pre_hook(_upgrade_legacy_names)

    def _gated(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h (…, d), e = W1[prev] (…, r) -> gated feature (…, r)."""
        return torch.sigmoid(self.gate_proj(torch.cat([h.to(e.dtype), e], dim=-1))) * e

    def step(self, h: torch.Tensor, prev: torch.Tensor, state: torch.Tensor | None):
        """One slot: h (N, d), prev (N,) -> rank feature (N, r), new state (rnn only, else None)."""
        e = self.markov_w1(prev)  # (N, r)
        if self.kind == "markov":
            return e, None
        if self.kind == "gated":
            return self._gated(h, e), None
        if state is None:
            state = torch.zeros_like(e)
        z = torch.cat([state, e, h.to(e.dtype)], dim=-1)  # (N, 2r + d)
        g, c, o = self.joint_proj(z).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        state = g * state + (1 - g) * torch.tanh(c)
        return torch.tanh(o), state

    def features(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Teacher-forced block: h (N, G, d), prev (N, G) -> rank features (N, G, r)."""
        if self.kind == "markov":
            return self.markov_w1(prev)
        if self.kind == "gated":
            return self._gated(h, self.markov_w1(prev))
        state, out = None, []
        for k in range(h.shape[1]):
            f, state = self.step(h[:, k], prev[:, k], state)
            out.append(f)
        return torch.stack(out, dim=1)

    def bias(self, features: torch.Tensor) -> torch.Tensor:
        """(…, r) -> (…, K) logit bias over the draft's output vocabulary."""
        return self.markov_w2(features)


def _upgrade_legacy_names(module: SequentialHead, state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: rename same-function legacy weights; refuse the old gated head (another function)."""
    if module.kind == "gated" and f"{prefix}gate.weight" in state_dict:
        raise LegacyHeadError(
            f"'{prefix}gate.weight' comes from an older dspark-toolkit gated head (its gate read h_k alone); the "
            f"gated head now gates on [h_k ; W1[prev]] ('{prefix}gate_proj', the DeepSpec/speculators definition), "
            f"a different function with more inputs, so these weights cannot be converted: retrain the draft")
    for old, new in LEGACY_RENAMES.items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            renamed = prefix + new + key[len(prefix + old):]
            state_dict[renamed] = state_dict.pop(key)
            log.info("legacy weight name %s loaded as %s", key, renamed)


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(w . [h_k ; W1[x_{k-1}]] + b): P(slot k accepted | slots before it accepted)."""

    def __init__(self, hidden_size: int, markov_rank: int = 0):
        super().__init__()
        self.with_markov = markov_rank > 0
        self.proj = nn.Linear(hidden_size + markov_rank, 1)

    def forward(self, h: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor:
        """h (…, d), prev_embedding (…, r) or None -> confidence logits (…)."""
        x = torch.cat([h, prev_embedding.to(h.dtype)], dim=-1) if self.with_markov else h
        return self.proj(x).squeeze(-1)
