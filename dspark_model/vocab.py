"""The draft vocabulary: which K target tokens a reduced-vocabulary draft predicts.

The K most frequent target tokens of the loss-masked (answer) tokens of the training data, ties broken by the
smaller token id, returned in ascending id order (the order of the draft's ``draft_to_target`` map). Export
formats derive their own tables from that map (speculators/vLLM: ``d2t`` offsets and a ``t2d`` mask).
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


def top_k_vocab(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most frequent ids of ``counts`` (V,), ties to the smaller id, sorted ascending -> (k,) int64."""
    if not 1 <= k <= counts.numel():
        raise ValueError(f"draft_vocab_size must be in 1..{counts.numel()}, got {k}")
    order = torch.argsort(-counts.to(torch.long), stable=True)  # stable: equal counts keep ascending id order
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
