"""Sequential and confidence heads of a DSpark draft (paper section 3.1, eq. 5-7).

The parallel backbone gives each block slot k a hidden state h_k and base logits U_k. The sequential head
adds a bias B_k that depends on the previous token of the block (the anchor for slot 0, then x_{p+k}):

* ``markov``: B_k = W2 . W1[x_{k-1}]                          (low-rank first-order transition, eq. 5)
* ``gated``:  B_k = W2 . (sigmoid(G h_k) * W1[x_{k-1}])      (our variant: the backbone gates the transition)
* ``rnn``:    s_k = g * s_{k-1} + (1 - g) * tanh(W_c z_k), B_k = W2 . tanh(W_o z_k),
              z_k = [s_{k-1}; W1[x_{k-1}]; h_k], g = sigmoid(W_g z_k)    (eq. 6)

All three work in a rank-r space and share the final projection W2 (r -> K), so the vocabulary-sized part is
one matmul per position. K is the draft's output vocabulary: the target's V, or the K most frequent answer
tokens of a reduced draft vocabulary; W1 always has one row per target token (the previous token, the anchor
included, can be any target token). ``none`` (DFlash) has no head at all. The confidence head (eq. 7) reads
[h_k ; W1[x_{k-1}]] when a sequential head exists (``confidence_head_with_markov``), else h_k alone.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_KINDS = ("none", "markov", "gated", "rnn")


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
            self.gate = nn.Linear(hidden_size, rank)
        if kind == "rnn":
            self.rnn_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)  # gate | candidate | output

    def step(self, h: torch.Tensor, prev: torch.Tensor, state: torch.Tensor | None):
        """One slot: h (N, d), prev (N,) -> rank feature (N, r), new state (rnn only, else None)."""
        e = self.markov_w1(prev)  # (N, r)
        if self.kind == "markov":
            return e, None
        if self.kind == "gated":
            return torch.sigmoid(self.gate(h)) * e, None
        if state is None:
            state = torch.zeros_like(e)
        z = torch.cat([state, e, h.to(e.dtype)], dim=-1)  # (N, 2r + d)
        g, c, o = self.rnn_proj(z).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        state = g * state + (1 - g) * torch.tanh(c)
        return torch.tanh(o), state

    def features(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Teacher-forced block: h (N, G, d), prev (N, G) -> rank features (N, G, r)."""
        if self.kind == "markov":
            return self.markov_w1(prev)
        if self.kind == "gated":
            return torch.sigmoid(self.gate(h)) * self.markov_w1(prev)
        state, out = None, []
        for k in range(h.shape[1]):
            f, state = self.step(h[:, k], prev[:, k], state)
            out.append(f)
        return torch.stack(out, dim=1)

    def bias(self, features: torch.Tensor) -> torch.Tensor:
        """(…, r) -> (…, K) logit bias over the draft's output vocabulary."""
        return self.markov_w2(features)


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
