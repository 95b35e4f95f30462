"""The EAGLE-3 draft (Li et al., 2025): the baseline DSpark is compared against, trained by the same pipeline.

Architecture (one decoder layer, as in the public EAGLE-3 checkpoints and vLLM's ``llama_eagle3`` loader):
  fused feature     g_i = fc([h_low ; h_mid ; h_high]_i)                      (3d -> d, no norm)
  layer input       x_i = [input_layernorm(embed(x_{i+1})) ; hidden_norm(g_i)]   (2d)
  attention         q/k/v projected from the 2d input (no q/k norm), o_proj back to d, residual = g_i
  MLP               the usual gated MLP with its own post-attention norm, residual
  output            s_i (pre-norm) -> norm -> lm_head over the K draft tokens
Pair i (target feature at position i, the NEXT token x_{i+1}) sits at position i and predicts x_{i+2}.
A chain step feeds the draft's own pre-norm output s back in place of g and the token it drafted as x.

Tapped layers: low / mid / high are the first, middle and last of the target's tap layers (decoder-layer
convention, see target.py), so the draft reads the same online features and the same offline cache as a
DSpark draft (for SmolLM2's default taps [1, 8, 14, 21, 27]: [1, 14, 27]; EAGLE-3's own choice would be
[1, 14, 26]). A target loaded with just these three taps works too: the draft picks its taps by id.

Its shape is a ``DraftArch`` (arch.py) with ``architecture="eagle3"``: the same record, builder
(``draft.build_arch``), config.json and loader as a DSpark draft (``draft.draft_from_arch`` dispatches).
The embedding is the target's (frozen, shared, not a parameter). The output head is the draft's own, trained,
initialised from the target's LM-head rows of its tokens. The draft vocabulary (K most frequent answer tokens,
``draft_vocab_size``) is the DSpark draft's machinery, shared through ``vocab.DraftVocabMixin``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark_model.arch import DraftArch, eagle3_tap_layer_ids
from dspark_model.config import DraftConfig
from dspark_model.draft import (
    DraftAttention,
    DraftLayer,
    DraftProposal,
    apply_rope,
    build_arch,
    sample_from_logits,
)
from dspark_model.rope import DraftRotary
from dspark_model.vocab import DraftVocabMixin

ARCHITECTURE = "eagle3"


class Eagle3Attention(DraftAttention):
    """The shared draft attention with 2d-wide q/k/v inputs and no q/k norms (a Llama layer over [e ; g])."""

    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, eps: float):
        super().__init__(hidden, n_heads, n_kv, head_dim, eps)
        self.q_proj = nn.Linear(2 * hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, n_kv * head_dim, bias=False)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, 2d) -> q (B, H, S, hd), rotated."""
        B, S, _ = x.shape
        return apply_rope(self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H, S, hd) -> (B, S, d)."""
        return self.o_proj(o.transpose(1, 2).flatten(2))


class Eagle3Layer(DraftLayer):
    """DraftLayer's norms and MLP, EAGLE-3's input: [input_layernorm(e) ; hidden_norm(g)], residual g."""

    def __init__(self, hidden, n_heads, n_kv, head_dim, intermediate, eps, act):
        super().__init__(hidden, n_heads, n_kv, head_dim, intermediate, eps, act)
        self.self_attn = Eagle3Attention(hidden, n_heads, n_kv, head_dim, eps)
        self.hidden_norm = nn.RMSNorm(hidden, eps=eps)

    def inputs(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """(B, S, d) token embeddings, (B, S, d) features -> (B, S, 2d) attention input."""
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(feat)], dim=-1)

    def finish(self, feat: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual (the un-normed feature) + attention, then the MLP block -> (B, S, d) pre-norm state."""
        h = feat + attn
        x = self.post_attention_layernorm(h)
        return h + self.mlp["down_proj"](self.act(self.mlp["gate_proj"](x)) * self.mlp["up_proj"](x))


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _causal_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Causal attention and its log-sum-exp per query with flex_attention (compiled on CUDA): no T x T scores
    are kept. -> out (B, H, T, hd), lse (B, H, T) fp32 (natural log)."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    from dspark_model.block_attention import _compiled_flex

    T = q.shape[2]
    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, T, T, device=q.device)
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    fn = _compiled_flex() if q.is_cuda else flex_attention  # eager flex (CPU): a forward-only reference
    out, aux = fn(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse.float()


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  kernel: str = "sdpa") -> torch.Tensor:
    """Training-time-test attention of unrolled step k = len(keys) - 1.

    q (B, H, T, hd); keys/values[m] (B, H, T, hd) of steps 0..k. Query i sees step 0's keys j <= i (the
    target-feature prefix, causal) and, of every later step m, only its own index i (the states the chain
    drafted from that very prefix): the mask of a chain run from every position at once. -> (B, H, T, hd).
    kernel "sdpa": the causal scores as a dense (B, H, T, T) tensor (the CPU path); "flex": flex_attention's
    causal output and log-sum-exp, merged with the k diagonal scores (the GPU path: O(T) memory per query)."""
    T, scale = q.shape[2], q.shape[-1] ** -0.5
    if len(keys) == 1:
        return F.scaled_dot_product_attention(q, keys[0], values[0], is_causal=True)
    diag = torch.stack([(q * k).sum(-1) for k in keys[1:]], dim=-1).float() * scale  # (B, H, T, k)
    if kernel == "flex":
        out0, lse0 = _causal_with_lse(q, keys[0], values[0])
        top = torch.maximum(lse0, diag.amax(-1))  # (B, H, T)
        w0, wd = torch.exp(lse0 - top), torch.exp(diag - top[..., None])  # causal block's mass, each diagonal's
        out = w0[..., None] * out0.float() + sum(wd[..., m, None] * v.float() for m, v in enumerate(values[1:]))
        return (out / (w0 + wd.sum(-1))[..., None]).to(q.dtype)
    causal = (q @ keys[0].transpose(-1, -2)) * scale  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    causal = causal.masked_fill(future, float("-inf"))
    p = torch.softmax(torch.cat([causal.float(), diag], dim=-1), dim=-1).to(q.dtype)
    out = p[..., :T] @ values[0]
    for m, v in enumerate(values[1:]):
        out = out + p[..., T + m, None] * v
    return out


class Eagle3Cache:
    """The draft's KV cache of committed pairs, plus target features still waiting for their next token."""

    def __init__(self):
        self.k: torch.Tensor | None = None  # (B, n_kv, L, hd)
        self.v: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None  # (B, m, n_taps*d) target taps at positions L .. L+m-1
        self.tokens: torch.Tensor | None = None  # (B, m-1) the next tokens of all but the last pending feature
        self.committed = 0  # L

    @property
    def length(self) -> int:
        """Target positions whose features the draft holds (committed + pending)."""
        return self.committed + (0 if self.pending is None else self.pending.shape[1])


class Eagle3Draft(DraftVocabMixin, nn.Module):
    """One EAGLE-3 layer over fused target features; chain drafting with its own KV cache. See the module
    docstring. Interface of the shared pipeline: ``forward_steps`` (training), ``new_cache`` /
    ``extend_context`` / ``propose`` (decoding), ``save_pretrained`` attributes."""

    context_needs_tokens = True  # extend_context takes the token ids of the positions it adds
    markov_head, confidence_head = None, None

    def __init__(self, arch: DraftArch):
        super().__init__()
        if arch.architecture != ARCHITECTURE:
            raise ValueError(f"Eagle3Draft needs an 'eagle3' DraftArch, got {arch.architecture!r}")
        self.arch = a = arch  # the one record of this module's shape (arch.py), written to config.json as it is
        self.block_size, self.mask_token_id, self.tap_layer_ids = a.block_size, None, list(a.tap_layer_ids)
        self.out_vocab_size = K = a.out_vocab_size
        self.fc = nn.Linear(3 * a.hidden_size, a.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                                 a.head_dim, a.intermediate_size, a.rms_norm_eps, a.hidden_act)])
        self.norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, K, bias=False)  # always its own (arch.train_draft_head when K < V)
        if a.reduced_vocab:
            self.register_buffer("draft_to_target", torch.arange(K, dtype=torch.long))
        self.rotary = DraftRotary(a.rope_config["rope_parameters"], a.head_dim,
                                  a.rope_config.get("max_position_embeddings", 4096))
        self.calibration = None
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.normal_(m.weight, std=a.initializer_range)

    @property
    def architecture(self) -> str:
        return self.arch.architecture

    @property
    def sequential_head(self) -> str:
        return self.arch.sequential_head  # "none"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer(self) -> Eagle3Layer:
        return self.layers[0]

    def attach_target(self, target) -> Eagle3Draft:
        """Share the target's embedding (plain attribute, not state); find the draft's taps among the target's."""
        if target.hidden_size != self.arch.hidden_size or target.vocab_size != self.arch.vocab_size:
            raise ValueError(f"draft (width {self.arch.hidden_size}, vocab {self.arch.vocab_size}) does not "
                             f"fit target (width {target.hidden_size}, vocab {target.vocab_size})")
        missing = [i for i in self.tap_layer_ids if i not in target.tap_layer_ids]
        if missing:
            raise ValueError(f"the target does not tap layers {missing} this EAGLE-3 draft reads (target taps "
                             f"{target.tap_layer_ids}); load it with tap_layer_ids including {self.tap_layer_ids}")
        self.__dict__["target"] = target
        self.__dict__["_tap_index"] = torch.tensor([target.tap_layer_ids.index(i) for i in self.tap_layer_ids])
        self._refresh_head()
        return self

    def init_head_from_target(self) -> None:
        """Start the output head from the target's LM-head rows of the draft's tokens."""
        ids = self.draft_to_target if self.reduced_vocab else torch.arange(self.out_vocab_size)
        with torch.no_grad():
            self.lm_head.weight.copy_(self.target.head_rows(ids.to(self.target.device))[0].to(self.lm_head.weight))

    def select_taps(self, tap_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, n_taps*d) the target's taps -> (B, T, 3d) the draft's low / mid / high ones, in its order."""
        idx = self.__dict__["_tap_index"].to(tap_hidden.device)
        return tap_hidden.unflatten(-1, (-1, self.arch.hidden_size)).index_select(-2, idx).flatten(-2)

    def fuse(self, tap_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, n_taps*d) target taps -> (B, T, d) fused features of the low / mid / high taps."""
        return self.fc(self.select_taps(tap_hidden).to(self.fc.weight.dtype))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_tokens(ids).to(self.fc.weight.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, d) normed states -> (…, K) fp32 logits (the target's logit post-processing, the draft's head)."""
        h = h.to(self.target.dtype)
        return self.target.logits(h, self.lm_head.weight.to(h.dtype), None).float()

    def _step(self, emb, feat, positions, past_k=None, past_v=None, mask=None):
        """One layer pass over S new pairs attending to past keys: -> pre-norm state (B, S, d), k, v."""
        layer = self.layer
        x = layer.inputs(emb, feat)  # (B, S, 2d)
        cos, sin = self.rotary(x, positions)
        attn = layer.self_attn
        q = attn.project_q(x, cos, sin)  # (B, H, S, hd)
        k, v = attn.project_kv(x, cos, sin)  # (B, n_kv, S, hd)
        keys = k if past_k is None else torch.cat([past_k.to(k.dtype), k], dim=2)
        vals = v if past_v is None else torch.cat([past_v.to(v.dtype), v], dim=2)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=attn.n_kv != attn.n_heads)
        return layer.finish(feat, attn.out(o)), k, v

    # ---- training: the draft unrolled over its own states for gamma steps ---------------------------------
    def forward_steps(self, tap_hidden: torch.Tensor, input_ids: torch.Tensor, steps: int | None = None,
                      attention: str = "sdpa"):
        """Training-time test (``attention``: ``ttt_attention``'s kernel). tap_hidden (B, T, n_taps*d),
        input_ids (B, T) ->
        list of ``steps`` normed states (B, T, d): entry k at index i predicts x_{i+k+2} after pair (h_i, x_{i+1})
        and k drafted steps (own states, gold tokens x_{i+2..i+k+1}), at position i + k."""
        G = steps or self.block_size
        B, T = input_ids.shape
        attn, n_rep = self.layer.self_attn, self.layer.self_attn.n_heads // self.layer.self_attn.n_kv
        feat = self.fuse(tap_hidden)  # (B, T, d)
        keys, values, states = [], [], []
        pad = input_ids.new_zeros(B, G)  # tokens beyond the sequence: their positions are never supervised
        ids = torch.cat([input_ids, pad], dim=1)
        base = torch.arange(T, device=input_ids.device).expand(B, T)
        for k in range(G):
            x = self.layer.inputs(self._embed(ids[:, k + 1: k + 1 + T]), feat)  # token x_{i+k+1}
            cos, sin = self.rotary(x, base + k)
            q = attn.project_q(x, cos, sin)
            kk, vv = attn.project_kv(x, cos, sin)
            keys.append(_repeat_kv(kk, n_rep))
            values.append(_repeat_kv(vv, n_rep))
            feat = self.layer.finish(feat, attn.out(ttt_attention(q, keys, values, attention)))  # (B, T, d) pre-norm
            states.append(self.norm(feat))
        return states

    # ---- decoding: chain drafting with the draft's own KV cache ------------------------------------------
    def new_cache(self) -> Eagle3Cache:
        return Eagle3Cache()

    def extend_context(self, cache: Eagle3Cache, tap_hidden: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add target positions cache.length .. +n-1: taps (B, n, n_taps*d) and their tokens (B, n). Token x_s
        is the next token of the feature before it; the last feature waits for the next anchor (``propose``)."""
        if cache.pending is not None:
            cache.tokens = torch.cat([cache.tokens, token_ids[:, :1]], dim=1)
        cache.pending = tap_hidden if cache.pending is None else torch.cat([cache.pending, tap_hidden], dim=1)
        rest = token_ids[:, 1:]
        cache.tokens = rest if cache.tokens is None else torch.cat([cache.tokens, rest], dim=1)

    def _commit(self, cache: Eagle3Cache, anchor: torch.Tensor) -> torch.Tensor:
        """Run the pending pairs (feature, next token; the last one's is the anchor) into the cache.
        -> pre-norm state of the last pair (B, d)."""
        tokens = torch.cat([cache.tokens, anchor[:, None]], dim=1)  # (B, m)
        B, m = tokens.shape
        L = cache.committed
        pos = torch.arange(L, L + m, device=anchor.device).expand(B, m)
        causal = torch.ones(m, L + m, dtype=torch.bool, device=anchor.device).tril(L)  # (m, L + m)
        s, k, v = self._step(self._embed(tokens), self.fuse(cache.pending), pos, cache.k, cache.v, causal)
        cache.k = k if cache.k is None else torch.cat([cache.k, k], dim=2)
        cache.v = v if cache.v is None else torch.cat([cache.v, v], dim=2)
        cache.committed, cache.pending, cache.tokens = L + m, None, None
        return s[:, -1]

    @torch.no_grad()
    def propose(self, cache: Eagle3Cache, anchor: torch.Tensor, temperature: float = 0.0,
                generator: torch.Generator | None = None, gamma: int | None = None) -> DraftProposal:
        """Draft ``gamma`` tokens after ``anchor`` (B,) at position cache.length, one chain step each; the
        chain's own keys live only for this call (the cache keeps the committed target pairs)."""
        G = gamma or self.block_size
        if G > self.block_size:
            raise ValueError(f"gamma {G} exceeds the trained number of steps {self.block_size}")
        if cache.pending is None:
            raise ValueError("propose needs new target context first (extend_context)")
        s = self._commit(cache, anchor)  # (B, d): the pair (last target feature, anchor)
        past_k, past_v, pos = cache.k, cache.v, cache.committed - 1
        tokens, probs = [], []
        for k in range(G):
            if k:
                step_pos = torch.full((anchor.shape[0], 1), pos + k, device=anchor.device)
                out, kk, vv = self._step(self._embed(tokens[-1][:, None]), s[:, None], step_pos, past_k, past_v)
                past_k, past_v, s = torch.cat([past_k, kk], 2), torch.cat([past_v, vv], 2), out[:, 0]
            x, q = sample_from_logits(self.logits(self.norm(s)), temperature, generator)
            tokens.append(self.to_target_ids(x))
            probs.append(q)
        return DraftProposal(torch.stack(tokens, 1), self.to_target_probs(torch.stack(probs, 1)), None)


def build_eagle3_for(target, cfg: DraftConfig) -> Eagle3Draft:
    """An EAGLE-3 draft for a loaded target: taps from the target's, head from the target's rows."""
    draft = Eagle3Draft(build_arch(cfg, target.config, target.tap_layer_ids, None, target.vocab_size))
    draft = draft.to(device=target.device).attach_target(target)
    draft.init_head_from_target()  # a reduced vocabulary re-initialises it in set_draft_vocab
    return draft


__all__ = ["Eagle3Draft", "Eagle3Cache", "build_eagle3_for", "eagle3_tap_layer_ids", "ttt_attention"]
