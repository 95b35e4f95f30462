"""Per-row memo of the target's next-token log-normaliser and argmax at every supervised position.

With a reduced draft vocabulary, the teacher distribution over the K draft tokens is
exp(target_logits[K] - logsumexp(target_logits[V])): only the normaliser needs the full vocabulary, and it
depends on nothing but the (frozen) target and the row. ``TeacherMemo`` computes it once per row, at the
first visit, for the positions q whose next token is an answer token (the only ones a block slot can be
supervised at); every later epoch pays for K columns instead of V. Positions outside the answer hold
lse = +inf (a zero teacher distribution) and are never supervised.
"""

from __future__ import annotations

import torch

from train.loss import teacher_stats


class TeacherMemo:
    def __init__(self, chunk: int = 1024):
        self.chunk = chunk
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, target, rows: list[int], final_hidden: torch.Tensor, loss_mask: torch.Tensor,
               lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: a key per batch row; final_hidden (B, T, d); loss_mask (B, T); lengths: real row lengths.
        Returns lse (B, T) fp32 and argmax (B, T) int64 on final_hidden's device."""
        B, T = loss_mask.shape
        lse = torch.full((B, T), float("inf"), device=final_hidden.device)
        arg = torch.zeros(B, T, dtype=torch.long, device=final_hidden.device)
        for b, key in enumerate(rows):
            if key not in self._rows:
                self._rows[key] = self._compute(target, final_hidden[b, : lengths[b]], loss_mask[b, : lengths[b]])
            row_lse, row_arg = self._rows[key]
            n = row_lse.numel()
            lse[b, :n] = row_lse.to(lse.device)
            arg[b, :n] = row_arg.to(arg.device)
        return lse, arg

    def _compute(self, target, fh: torch.Tensor, mask: torch.Tensor):
        n = fh.shape[0]
        lse = torch.full((n,), float("inf"))
        arg = torch.zeros(n, dtype=torch.long)
        q = (mask[1:] > 0).nonzero().squeeze(-1)  # positions whose next token is an answer token
        if q.numel():
            row_lse, row_arg = teacher_stats(target, fh[q.to(fh.device)], self.chunk)
            lse[q] = row_lse.cpu()
            arg[q] = row_arg.cpu()
        return lse, arg
