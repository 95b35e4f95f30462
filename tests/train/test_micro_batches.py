"""Micro-batches are dealt to processes by token count, in equal numbers, covering the step's rows once."""

from __future__ import annotations

import random

from train.data import micro_batches


def _tokens(batches, lengths):
    return sum(lengths[r] for b in batches for r in b)


def test_ranks_get_equal_counts_and_balanced_tokens():
    rng = random.Random(0)
    lengths = [rng.choice([4096, 3000, 900, 300, 120]) for _ in range(64)]
    rows = list(range(64))
    world, micro = 8, 2
    parts = [micro_batches(rows, lengths, micro, world, r) for r in range(world)]
    assert sorted(r for p in parts for b in p for r in b) == rows
    assert {len(p) for p in parts} == {64 // micro // world}
    loads = [_tokens(p, lengths) for p in parts]
    # round-robin over longest-first micro-batches gives rank 0 the most every round; this stays near the mean
    round_robin = [_tokens(sorted([rows[i: i + micro] for i in range(0, 64, micro)],
                                  key=lambda c: -sum(lengths[r] for r in c))[k::world], lengths) for k in range(world)]
    assert max(loads) - min(loads) < max(round_robin) - min(round_robin)
    assert max(loads) < max(round_robin)
    assert parts == [micro_batches(rows, lengths, micro, world, r) for r in range(world)]  # deterministic


def test_one_process_sees_every_micro_batch_of_the_step():
    lengths = list(range(10, 42))
    rows = list(range(32))
    single = micro_batches(rows, lengths, 4, 1, 0)
    spread = [b for r in range(4) for b in micro_batches(rows, lengths, 4, 4, r)]
    assert sorted(map(tuple, single)) == sorted(map(tuple, spread))
    assert all(len(b) == 4 for b in single)
