"""The draft vocabulary: which K target tokens a reduced-vocabulary draft predicts.

The K most frequent target tokens of the loss-masked (answer) tokens of the training data, ties broken by the
smaller token id, returned in ascending id order (the order of the draft's ``draft_to_target`` map). Export
formats derive their own tables from that map (speculators/vLLM: ``d2t`` offsets and a ``t2d`` mask).

Counts from a few hundred thousand answer tokens are a noisy estimate of what serving traffic will ask for:
thousands of tokens occur once or twice, and once the distinct tokens seen approach K, such one-off tokens
take the places of common tokens that merely did not occur. A prior fixes that: subword vocabularies number
their tokens roughly by frequency in the tokenizer's own corpus (BPE merge order, SentencePiece scores), so
``rank_prior`` adds ``prior`` x (the total count) pseudo-counts spread over the ids as p(id) ~ 1 / (id + 1000).
Measured on SmolLM2 (BENCHMARKS.md, "Draft vocabulary"): with 2 173 training answers the target's greedy
token on held-out answers fell outside the 8 192-token vocabulary at 11.9 % of the positions with the counts
alone and 7.8 % with ``prior`` 0.3 (with 1 180 answers: 8.0 % and 7.8 %), while on answers held out from the
training sets themselves it cost 0.2-0.3 points, and a draft trained with it replayed the same held-out τ.
Off by default (``draft.draft_vocab_prior`` 0).
"""

from __future__ import annotations

import torch


def answer_token_counts(input_ids: list[torch.Tensor], loss_mask: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(V,) int64 counts of each target id over the tokens where the loss mask is set."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in zip(input_ids, loss_mask):
        picked = ids[mask.bool()]
        if picked.numel():
            counts += torch.bincount(picked, minlength=vocab_size)[:vocab_size]
    return counts


RANK_PRIOR_OFFSET = 1000.0  # p(id) ~ 1 / (id + offset): flat over the first ~1000 ids, then Zipf-like


def rank_prior(vocab_size: int) -> torch.Tensor:
    """(V,) float64 probabilities over token ids, decreasing with the id (see the module docstring)."""
    p = 1.0 / (torch.arange(vocab_size, dtype=torch.float64) + RANK_PRIOR_OFFSET)
    return p / p.sum()


def top_k_vocab(counts: torch.Tensor, k: int, prior: float = 0.0) -> torch.Tensor:
    """The ``k`` highest-scoring ids of ``counts`` (V,), score = count + ``prior`` x total x ``rank_prior``,
    ties to the smaller id, sorted ascending -> (k,) int64. ``prior`` 0: the most frequent ids."""
    if not 1 <= k <= counts.numel():
        raise ValueError(f"draft_vocab_size must be in 1..{counts.numel()}, got {k}")
    if prior < 0:
        raise ValueError(f"draft_vocab_prior must be >= 0, got {prior}")
    score = counts.to(torch.float64)
    if prior > 0:
        score = score + prior * score.sum() * rank_prior(counts.numel())
    order = torch.argsort(-score, stable=True)  # stable: equal scores keep ascending id order
    return order[:k].sort().values


def d2t_t2d(draft_to_target: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The EAGLE-3 / speculators tables: d2t (K,) int64 offsets with target_id = i + d2t[i], and t2d (V,) bool,
    true for target ids the draft can emit."""
    ids = draft_to_target.to(torch.long)
    d2t = ids - torch.arange(ids.numel(), dtype=torch.long, device=ids.device)
    t2d = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
    t2d[ids] = True
    return d2t, t2d


def mass_in_vocab(target_probs: torch.Tensor, draft_to_target: torch.Tensor) -> torch.Tensor:
    """Per-position target probability mass inside the draft vocabulary: (N, V) -> (N,)."""
    return target_probs[:, draft_to_target.to(target_probs.device)].sum(-1)


class DraftVocabMixin:
    """The draft vocabulary on a draft module (``DSparkDraft``, ``Eagle3Draft``): the ``draft_to_target`` map
    (a buffer of K ids, ascending), the target's frozen K head rows and the target -> draft index table.

    Needs ``self.arch`` (a ``DraftArch``: ``reduced_vocab``, ``out_vocab_size``, ``vocab_size``,
    ``train_draft_head``), the ``draft_to_target`` buffer when reduced, ``lm_head`` when the head is trained,
    and ``self.target`` once attached."""

    @property
    def reduced_vocab(self) -> bool:
        return self.arch.reduced_vocab

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Set the K target ids the draft predicts (stored ascending); a trainable head starts from their
        target LM-head rows."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).flatten().sort().values
        if not self.reduced_vocab or ids.numel() != self.out_vocab_size:
            raise ValueError(f"this draft predicts {self.out_vocab_size} tokens; got {ids.numel()} ids "
                             f"(build it with draft.draft_vocab_size={ids.numel()})")
        if ids.unique().numel() != ids.numel() or ids[0] < 0 or ids[-1] >= self.arch.vocab_size:
            raise ValueError("draft vocabulary ids must be distinct target token ids")
        self.draft_to_target.copy_(ids.to(self.draft_to_target.device))
        if "target" in self.__dict__:
            self._refresh_head()
            if self.arch.train_draft_head:
                with torch.no_grad():
                    self.lm_head.weight.copy_(self.target.head_rows(ids)[0].to(self.lm_head.weight))

    def _refresh_head(self) -> None:
        """Cache the frozen K-row head and the target -> draft index table (plain attributes, not state)."""
        if not self.reduced_vocab:
            return
        ids = self.draft_to_target
        self.__dict__["_head_rows"] = self.target.head_rows(ids)  # the target's own K rows (teacher, frozen head)
        t2d = torch.full((self.arch.vocab_size,), -1, dtype=torch.long, device=ids.device)
        t2d[ids] = torch.arange(ids.numel(), device=ids.device)
        self.__dict__["target_to_draft"] = t2d

    @torch.no_grad()
    def teacher_logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """(…, d) target final states -> (…, K) fp32 target logits at the draft's K tokens (reduced only)."""
        weight, bias = self.__dict__["_head_rows"]
        return self.target.logits(final_hidden.to(weight.dtype), weight, bias).float()

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> target token ids (identity for the full vocabulary)."""
        return self.draft_to_target[draft_ids] if self.reduced_vocab else draft_ids

    def to_target_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """(…, K) draft distributions -> (…, V) target-vocabulary distributions, zero outside the K tokens."""
        if not self.reduced_vocab:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.arch.vocab_size)
        return out.index_copy_(-1, self.draft_to_target, probs)
