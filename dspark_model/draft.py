"""The DSpark draft: one implementation for every target family (paper section 3.1, DESIGN.md).

Backbone (DFlash-style parallel block diffusion):
  context features  H_ctx = RMSNorm(fc([h_{l1}; ...; h_{lm}]))          from tapped target layers
  block input       [anchor x_p, mask, ..., mask] (gamma slots), slot k at position p + k, predicts x_{p+k+1}
  each layer        queries from the block; keys/values = [W_k H_ctx ; W_k H_block] (KV injection);
                    the block attends bidirectionally to itself and only to context positions < p
  output            h_k after a final RMSNorm; base logits U_k = target lm_head(h_k)
Draft vocabulary (optional, ``draft_vocab_size`` = K): the draft predicts only K target tokens (the most
frequent answer tokens of its training data, ``draft_to_target`` maps draft index -> target id, ascending).
Its base logits are then the target LM-head rows of those tokens (a frozen copy, or a trainable head), the
sequential head projects to K, and every distribution the draft emits is zero outside those K tokens.
Then a sequential head (heads.py) adds a bias from the previous token, and a confidence head predicts
P(slot k accepted | earlier slots accepted).

Sizes (heads, KV heads, MLP width, RoPE: the target's full-attention set, see rope.py) come from the target
config and are held in one ``DraftArch`` record (arch.py; ``build_arch``); the embedding and LM head are the
target's own, frozen and shared - they are NOT parameters of this module (see ``attach_target``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark_model.arch import DraftArch, eagle3_tap_layer_ids
from dspark_model.block_attention import attend, block_mask
from dspark_model.config import DraftConfig
from dspark_model.heads import ConfidenceHead, SequentialHead
from dspark_model.rope import DraftRotary, target_rope_parameters
from dspark_model.vocab import DraftVocabMixin

log = logging.getLogger(__name__)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, hd); cos/sin (B, S, hd)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class DraftAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, eps: float):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, d) -> k, v (B, n_kv, S, hd), k normed and rotated."""
        B, S, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        """h (B, Q, d) block states; ctx_k/v (B, n_kv, C, hd); mask: None, a (B, 1, Q, C + Q) bool tensor
        (SDPA) or a flex_attention BlockMask over (Q, C + Q) (see block_attention.py)."""
        B, Q, _ = h.shape
        q = self.q_norm(self.q_proj(h).view(B, Q, self.n_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)  # (B, H, Q, hd)
        kb, vb = self.project_kv(h, cos, sin)
        k = torch.cat([ctx_k.to(kb.dtype), kb], dim=2)  # (B, n_kv, C + Q, hd)
        v = torch.cat([ctx_v.to(vb.dtype), vb], dim=2)
        out = attend(q, k, v, mask, gqa=self.n_kv != self.n_heads)  # (B, H, Q, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, -1))


class DraftLayer(nn.Module):
    def __init__(self, hidden, n_heads, n_kv, head_dim, intermediate, eps, act):
        super().__init__()
        from transformers.activations import ACT2FN

        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.self_attn = DraftAttention(hidden, n_heads, n_kv, head_dim, eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.mlp = nn.ModuleDict(dict(
            gate_proj=nn.Linear(hidden, intermediate, bias=False),
            up_proj=nn.Linear(hidden, intermediate, bias=False),
            down_proj=nn.Linear(intermediate, hidden, bias=False),
        ))
        self.act = ACT2FN[act]

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_k, ctx_v, mask)
        x = self.post_attention_layernorm(h)
        return h + self.mlp["down_proj"](self.act(self.mlp["gate_proj"](x)) * self.mlp["up_proj"](x))


@dataclass
class DraftProposal:
    tokens: torch.Tensor  # (B, G) drafted tokens
    probs: torch.Tensor  # (B, G, V) fp32 draft distributions they were sampled from (one-hot when greedy)
    confidences: torch.Tensor | None  # (B, G) c_k in (0, 1), or None without a confidence head


class DraftContextCache:
    """Per-layer keys/values of the projected context features, grown as the target accepts tokens."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)

    def crop(self, length: int) -> None:
        self.k = [None if t is None else t[:, :, :length] for t in self.k]
        self.v = [None if t is None else t[:, :, :length] for t in self.v]


class DSparkDraft(DraftVocabMixin, nn.Module):
    """Parallel block backbone + sequential head + confidence head. See the module docstring."""

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.arch = arch  # the one record of this module's shape (arch.py), written to config.json as it is
        a = arch
        self.block_size, self.mask_token_id, self.tap_layer_ids = a.block_size, a.mask_token_id, list(a.tap_layer_ids)
        self.fc = nn.Linear(len(a.tap_layer_ids) * a.hidden_size, a.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                               a.head_dim, a.intermediate_size, a.rms_norm_eps, a.hidden_act)
                                    for _ in range(a.num_layers))
        self.norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        K = self.out_vocab_size = a.out_vocab_size
        if a.reduced_vocab:
            # draft index i <-> target id draft_to_target[i]; stored with the weights, set by set_draft_vocab
            self.register_buffer("draft_to_target", torch.arange(K, dtype=torch.long))
            if a.train_draft_head:
                self.lm_head = nn.Linear(a.hidden_size, K, bias=False)  # initialised from the target's rows
        self.markov_head = (SequentialHead(a.sequential_head, a.vocab_size, a.markov_width, a.hidden_size, K)
                            if a.markov_width else None)
        self.confidence_head = ConfidenceHead(a.hidden_size, a.markov_width) if a.confidence_head else None
        self.rotary = DraftRotary(a.rope_config["rope_parameters"], a.head_dim,
                                  a.rope_config.get("max_position_embeddings", 4096))
        self.calibration = None  # a dspark_model.calibration.Calibration, set by checkpoint loading
        self._init_weights(a.initializer_range)

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ---- the frozen, shared target pieces (the draft vocabulary: vocab.DraftVocabMixin) ---------------
    def attach_target(self, target) -> DSparkDraft:
        """Share the target's embedding and LM head (kept out of this module's parameters and state)."""
        if target.hidden_size != self.arch.hidden_size or target.vocab_size != self.arch.vocab_size:
            raise ValueError(f"draft (width {self.arch.hidden_size}, vocab {self.arch.vocab_size}) does not "
                             f"fit target (width {target.hidden_size}, vocab {target.vocab_size})")
        self.__dict__["target"] = target  # plain attribute: not a submodule, not in state_dict
        self._refresh_head()
        return self

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (K, d), bias) of a reduced vocabulary's head: the trained copy, or the target's frozen rows."""
        if self.arch.train_draft_head:
            return self.lm_head.weight, None
        return self.__dict__["_head_rows"]

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, d) -> (…, K) fp32 logits of the backbone over the draft's output vocabulary."""
        h = h.to(self.target.dtype)
        if not self.reduced_vocab:
            return self.target.logits(h).float()
        weight, bias = self.output_head()
        return self.target.logits(h, weight.to(h.dtype), bias).float()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sequential_head(self) -> str:
        return self.arch.sequential_head

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_tokens(ids).to(self.fc.weight.dtype)

    def context_features(self, tap_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, n_taps * d) tapped target states -> (B, T, d) projected, normed context features."""
        return self.hidden_norm(self.fc(tap_hidden.to(self.fc.weight.dtype)))

    def _rope(self, positions: torch.Tensor, like: torch.Tensor):
        return self.rotary(like, positions)

    def _run_layers(self, block_emb, block_pos, ctx_feats, ctx_pos, mask, cache: DraftContextCache | None):
        """Backbone over the block. ctx_feats are new context positions (appended to cache if given)."""
        cos_b, sin_b = self._rope(block_pos, block_emb)
        cos_c, sin_c = self._rope(ctx_pos, block_emb) if ctx_feats is not None else (None, None)
        h = block_emb
        for i, layer in enumerate(self.layers):
            if ctx_feats is not None:
                ck, cv = layer.self_attn.project_kv(ctx_feats, cos_c, sin_c)
                if cache is not None:
                    cache.append(i, ck, cv)
            if cache is not None:
                ck, cv = cache.k[i], cache.v[i]
            h = layer(h, cos_b, sin_b, ck, cv, mask)
        return self.norm(h)

    # ---- training forward ------------------------------------------------------------------------------
    def block_inputs(self, input_ids: torch.Tensor, anchors: torch.Tensor):
        """Tokens around anchors: (B, T) ids, (B, A) anchor positions ->
        prev (B, A, G) previous-token ids (anchor, then x_{p+k}), labels (B, A, G) = x_{p+k+1},
        in_range (B, A, G) bool (label inside the sequence)."""
        G, T = self.block_size, input_ids.shape[1]
        offs = torch.arange(G, device=anchors.device)
        pos = anchors.unsqueeze(-1) + offs  # (B, A, G) = p + k
        in_range = pos + 1 < T
        b = torch.arange(input_ids.shape[0], device=anchors.device)[:, None, None]
        prev = input_ids[b, pos.clamp(max=T - 1)]
        labels = input_ids[b, (pos + 1).clamp(max=T - 1)]
        return prev, labels, in_range

    def forward_train(self, tap_hidden: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor,
                      attention: str = "sdpa"):
        """Many blocks per sequence in one pass.

        tap_hidden (B, T, n_taps*d), input_ids (B, T), anchors (B, A) positions p with 1 <= p < T.
        attention: the kernel, "sdpa" (dense mask) or "flex" (flex_attention BlockMask), same rule.
        Returns final-normed block states (B, A, G, d). Logits are left to ``logits`` per chunk.
        """
        B, T = input_ids.shape
        A, G = anchors.shape[1], self.block_size
        if self.mask_token_id is None:
            raise ValueError("draft has no mask_token_id; build it with build_draft_for(target, cfg)")
        block_pos = (anchors.unsqueeze(-1) + torch.arange(G, device=anchors.device)).reshape(B, A * G)
        block_ids = torch.full((B, A, G), self.mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
        block_ids[:, :, 0] = input_ids.gather(1, anchors)
        ctx_pos = torch.arange(T, device=input_ids.device).expand(B, T)
        # over (A*G queries, T + A*G keys): context strictly before the anchor; bidirectional within a block
        mask = block_mask(attention, anchors, T, G)
        feats = self.context_features(tap_hidden)
        h = self._run_layers(self._embed(block_ids.reshape(B, A * G)), block_pos, feats, ctx_pos, mask, None)
        return h.view(B, A, G, -1)

    # ---- heads (shared by training and inference) ------------------------------------------------------
    def logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Draft logits for whole blocks: h (N, G, d), prev (N, G) teacher-forced -> (N, G, K) fp32.

        Call it on chunks of blocks: the output spans the draft's whole output vocabulary.
        """
        base = self.base_logits(h)
        if self.markov_head is None:
            return base
        return base + self.markov_head.bias(self.markov_head.features(h, prev)).float()

    def confidence_logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """(N, G, d), (N, G) -> (N, G) pre-sigmoid confidences, or None without a confidence head."""
        if self.confidence_head is None:
            return None
        emb = self.markov_head.markov_w1(prev) if self.markov_head is not None else None
        return self.confidence_head(h, emb)

    # ---- inference ----------------------------------------------------------------------------------------
    def new_cache(self) -> DraftContextCache:
        return DraftContextCache(self.num_layers)

    def extend_context(self, cache: DraftContextCache, tap_hidden: torch.Tensor) -> None:
        """Append context positions cache.length .. cache.length + n - 1 from (B, n, n_taps*d) tap states."""
        n, start = tap_hidden.shape[1], cache.length
        pos = torch.arange(start, start + n, device=tap_hidden.device).expand(tap_hidden.shape[0], n)
        feats = self.context_features(tap_hidden)
        cos, sin = self._rope(pos, feats)
        for i, layer in enumerate(self.layers):
            cache.append(i, *layer.self_attn.project_kv(feats, cos, sin))

    @torch.no_grad()
    def propose(self, cache: DraftContextCache, anchor: torch.Tensor, temperature: float = 0.0,
                generator: torch.Generator | None = None, gamma: int | None = None) -> DraftProposal:
        """Draft ``gamma`` tokens after ``anchor`` (B,), at position cache.length (context = all cached).

        The backbone runs once; the sequential head then samples left to right. Sampling is fp32.
        """
        G = self._gamma(gamma)
        B, p = anchor.shape[0], cache.length
        pos = torch.arange(p, p + G, device=anchor.device).expand(B, G)
        h = self._run_layers(self._embed(self._block_ids(anchor, G)), pos, None, None, None, cache)  # (B, G, d)
        return self._draft_block(h, anchor, temperature, lambda logit: sample_from_logits(logit, temperature,
                                                                                          generator))

    @torch.no_grad()
    def propose_batch(self, caches: Sequence[DraftContextCache], anchors: torch.Tensor, temperature: float = 0.0,
                      generators: Sequence[torch.Generator | None] | None = None,
                      gamma: int | None = None) -> DraftProposal:
        """``propose`` for R requests at once, each with its own context cache (of its own length) and
        generator: one backbone call over the R blocks, every context right-padded to the longest and the padding
        masked out. Row r is ``propose(caches[r], anchors[r:r + 1], temperature, generators[r], gamma)`` up to
        float rounding, and draws from ``generators[r]`` exactly as that call would."""
        G, R = self._gamma(gamma), anchors.shape[0]
        generators = list(generators) if generators is not None else [None] * R
        if len(caches) != R or len(generators) != R:
            raise ValueError(f"propose_batch: {R} anchors, {len(caches)} caches, {len(generators)} generators")
        lengths = torch.tensor([c.length for c in caches], device=anchors.device)  # (R,)
        longest = int(lengths.max())
        stacked = DraftContextCache(self.num_layers)
        for i in range(self.num_layers):
            stacked.k[i] = torch.cat([F.pad(c.k[i], (0, 0, 0, longest - c.length)) for c in caches])
            stacked.v[i] = torch.cat([F.pad(c.v[i], (0, 0, 0, longest - c.length)) for c in caches])
        real = torch.arange(longest, device=anchors.device)[None, :] < lengths[:, None]  # (R, C) not padding
        mask = torch.cat([real, real.new_ones(R, G)], dim=1)[:, None, None, :].expand(R, 1, G, longest + G)
        pos = lengths[:, None] + torch.arange(G, device=anchors.device)  # (R, G)
        h = self._run_layers(self._embed(self._block_ids(anchors, G)), pos, None, None, mask, stacked)

        def sample(logit):
            if temperature <= 0:
                return sample_from_logits(logit, temperature)
            rows = [sample_from_logits(logit[r:r + 1], temperature, g) for r, g in enumerate(generators)]
            return torch.cat([x for x, _ in rows]), torch.cat([q for _, q in rows])

        return self._draft_block(h, anchors, temperature, sample)

    def _gamma(self, gamma: int | None) -> int:
        G = gamma or self.block_size
        if G > self.block_size:
            raise ValueError(f"gamma {G} exceeds the trained block size {self.block_size}")
        return G

    def _block_ids(self, anchor: torch.Tensor, G: int) -> torch.Tensor:
        """(B,) anchors -> (B, G) block input ids: the anchor, then mask tokens."""
        ids = torch.full((anchor.shape[0], G), self.mask_token_id, dtype=anchor.dtype, device=anchor.device)
        ids[:, 0] = anchor
        return ids

    def _draft_block(self, h: torch.Tensor, anchor: torch.Tensor, temperature: float, sample) -> DraftProposal:
        """Heads over the backbone states h (B, G, d), left to right; ``sample(logits (B, K))`` -> (tokens (B,),
        distributions (B, K))."""
        G = h.shape[1]
        base = self.base_logits(h)  # (B, G, K)
        tokens, probs, confs = [], [], []
        prev, state = anchor, None
        for k in range(G):
            logit = base[:, k]
            if self.markov_head is not None:
                feat, state = self.markov_head.step(h[:, k], prev, state)
                logit = logit + self.markov_head.bias(feat).float()
            if self.confidence_head is not None:
                emb = self.markov_head.markov_w1(prev) if self.markov_head is not None else None
                confs.append(torch.sigmoid(self.confidence_head(h[:, k], emb).float()))
            x, q = sample(logit)
            prev = self.to_target_ids(x)
            tokens.append(prev)
            probs.append(q)
        return DraftProposal(torch.stack(tokens, 1), self.to_target_probs(torch.stack(probs, 1)),
                             torch.stack(confs, 1) if confs else None)


def sample_from_logits(logits: torch.Tensor, temperature: float, generator=None):
    """(B, V) logits -> token (B,), distribution (B, V) fp32. T = 0 is greedy (one-hot distribution)."""
    logits = logits.float()
    if temperature <= 0:
        x = logits.argmax(-1)
        return x, F.one_hot(x, logits.shape[-1]).float()
    q = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(q, 1, generator=generator).squeeze(-1), q


def build_arch(cfg: DraftConfig, target_config, tap_layer_ids: list[int], mask_token_id: int | None,
               vocab_size: int | None = None) -> DraftArch:
    """Map the draft config + the target's config to the draft's ``DraftArch``. ``tap_layer_ids`` are the
    target's; an EAGLE-3 draft reads their low / mid / high and has no mask token."""
    tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    if cfg.architecture == "eagle3":
        tap_layer_ids, mask_token_id = eagle3_tap_layer_ids(tap_layer_ids), None
    n_heads = cfg.num_attention_heads or tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return DraftArch(
        hidden_size=tc.hidden_size, num_layers=cfg.num_layers, num_attention_heads=n_heads,
        num_key_value_heads=cfg.num_key_value_heads or getattr(tc, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, intermediate_size=cfg.intermediate_size or tc.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps or getattr(tc, "rms_norm_eps", 1e-6),
        hidden_act=getattr(tc, "hidden_act", "silu"), vocab_size=vocab_size or tc.vocab_size,
        tap_layer_ids=list(tap_layer_ids), block_size=cfg.block_size, mask_token_id=mask_token_id,
        sequential_head=cfg.sequential_head, markov_rank=cfg.markov_rank, confidence_head=cfg.confidence_head,
        rope_config={"rope_parameters": target_rope_parameters(tc),
                     "max_position_embeddings": tc.max_position_embeddings},
        initializer_range=cfg.initializer_range, draft_vocab_size=cfg.draft_vocab_size,
        train_draft_head=cfg.train_draft_head, architecture=cfg.architecture,
    )


def draft_from_arch(arch: DraftArch) -> nn.Module:
    """The draft module ``arch`` describes: a ``DSparkDraft``, or an ``eagle3.Eagle3Draft``."""
    if arch.architecture == "eagle3":
        from dspark_model.eagle3 import Eagle3Draft

        return Eagle3Draft(arch)
    return DSparkDraft(arch)


def build_draft(cfg: DraftConfig, target_config, tap_layer_ids: list[int] | None = None,
                mask_token_id: int | None = None) -> nn.Module:
    """Config -> draft module (no target attached; works on the meta device for sizing)."""
    from dspark_model.target import default_tap_layer_ids, text_config

    tc = text_config(target_config)
    taps = tap_layer_ids or default_tap_layer_ids(tc.num_hidden_layers)
    return draft_from_arch(build_arch(cfg, tc, taps, cfg.mask_token_id if mask_token_id is None else mask_token_id))


def choose_mask_token_id(tokenizer, embedding_rows: int) -> int:
    """The embedding row fed to mask slots (DESIGN.md): the tokenizer's mask token; else the first spare
    embedding row beyond the tokenizer's vocabulary; else pad, then unk."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    if embedding_rows > len(tokenizer):
        return len(tokenizer)
    for name in ("pad_token_id", "unk_token_id"):
        if getattr(tokenizer, name, None) is not None:
            return int(getattr(tokenizer, name))
    raise ValueError("cannot choose a mask token: the tokenizer has no mask/pad/unk token and the embedding "
                     "has no spare row; set draft.mask_token_id explicitly")


def build_draft_for(target, cfg: DraftConfig) -> DSparkDraft:
    """Build a draft for a loaded target (tap layers and mask token derived) and attach the target."""
    if cfg.architecture == "eagle3":
        from dspark_model.eagle3 import build_eagle3_for

        return build_eagle3_for(target, cfg)
    mask = cfg.mask_token_id if cfg.mask_token_id is not None else choose_mask_token_id(target.tokenizer,
                                                                                         target.vocab_size)
    draft = DSparkDraft(build_arch(cfg, target.config, target.tap_layer_ids, mask, target.vocab_size))
    draft = draft.to(device=target.device).attach_target(target)
    layers = warm_start_layers(cfg.init_from_target, cfg.num_layers)
    if layers:
        init_layers_from_target(draft, target, layers)
    return draft


def warm_start_layers(choice: str, num_layers: int) -> list[int]:
    """``draft.init_from_target`` -> target layer ids ([] = random initialisation)."""
    choice = str(choice).strip().lower()
    if choice in ("", "none", "null", "random"):
        return []
    if choice == "last":
        return list(range(-num_layers, 0))
    try:
        return [int(x) for x in choice.replace("[", "").replace("]", "").split(",")]
    except ValueError:
        raise ValueError(f"draft.init_from_target must be none, last or comma-separated target layer ids "
                         f"(e.g. 14,15), got {choice!r}") from None


def init_layers_from_target(draft: DSparkDraft, target, layer_ids: list[int]) -> list[int]:
    """Warm start: copy target decoder layer ``layer_ids[j]`` into draft layer j (negative ids count from the
    end). Every draft tensor with a same-named, same-shaped target tensor is copied (attention and MLP
    matrices, both norms; q/k norms only where the family has them); target biases have no draft twin and
    are left out. Returns the absolute target layer ids used."""
    layers = target.model.get_decoder().layers
    L = len(layers)
    if len(layer_ids) != draft.num_layers:
        raise ValueError(f"draft.init_from_target lists {len(layer_ids)} layers for a "
                         f"{draft.num_layers}-layer draft; give one target layer per draft layer")
    chosen = [i + L if i < 0 else i for i in layer_ids]
    if any(not 0 <= i < L for i in chosen):
        raise ValueError(f"draft.init_from_target {layer_ids}: the target has layers 0..{L - 1}")
    required = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight")
    with torch.no_grad():
        for j, i in enumerate(chosen):
            src, dst = layers[i].state_dict(), draft.layers[j].state_dict()
            copied = [k for k, v in dst.items() if k in src and src[k].shape == v.shape]
            missing = [k for k in required if k not in copied]
            if missing:
                raise ValueError(f"cannot warm-start draft layer {j} from target layer {i}: {missing} differ in "
                                 f"name or shape (the draft's sizes must equal the target's)")
            for k in copied:
                dst[k].copy_(src[k].to(dst[k]))
    return chosen


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def position_weights(gamma: int, decay: float, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/decay) for slots k = 1..gamma (paper 3.3; decay = block size in the text, 4 in code)."""
    return torch.exp(-torch.arange(gamma, device=device, dtype=torch.float32) / decay)


__all__ = ["DSparkDraft", "DraftProposal", "DraftContextCache", "build_draft", "build_draft_for",
           "init_layers_from_target", "warm_start_layers",
           "choose_mask_token_id", "count_parameters", "position_weights", "sample_from_logits"]
