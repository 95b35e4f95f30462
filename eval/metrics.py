"""Acceptance metrics from speculative-decoding round records, and wall-clock throughput.

Definitions (DESIGN.md; the report labels them with these words):

* acceptance length tau: mean tokens emitted per target verification forward = accepted draft tokens + the
  correction/bonus token, except that a round which accepts an EOS token emits only its accepted tokens.
  It is the round's untruncated yield: the max_new_tokens cut of the last round does not lower it.
* conditional acceptance at position k: P(draft token k accepted | tokens 1..k-1 accepted) (paper Fig. 2).
  Rounds that stopped at an accepted EOS before position k were never at risk there and are left out.
* prefix survival at position k: P(tokens 1..k all accepted) = the product of the conditional acceptances
  up to k (equal to the fraction of rounds with accepted >= k when no round stops at EOS).
* accepted-length histogram: counts of rounds with 0..gamma accepted draft tokens.

Records are dicts with at least ``dataset``, ``accepted``, ``emitted``, ``eos``, ``gamma`` (rounds.jsonl).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

DEFINITIONS = {
    "tau": "mean tokens emitted per target verification forward (accepted draft tokens + bonus/correction; "
           "a round that accepts EOS counts only its accepted tokens)",
    "conditional_acceptance": "position k: P(draft token k accepted | draft tokens 1..k-1 accepted)",
    "prefix_survival": "position k: P(draft tokens 1..k all accepted) = product of conditional acceptances",
    "accepted_length_histogram": "number of rounds with 0, 1, ..., gamma accepted draft tokens",
}


def tau(records: Sequence[Mapping]) -> float | None:
    """Mean tokens emitted per verification forward; None without rounds."""
    if not records:
        return None
    return sum(int(r["emitted"]) for r in records) / len(records)


def by_dataset(records: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Records grouped by their ``dataset`` field, in first-seen order."""
    groups: dict[str, list[Mapping]] = defaultdict(list)
    for r in records:
        groups[str(r["dataset"])].append(r)
    return dict(groups)


def _gamma(records: Sequence[Mapping], gamma: int | None) -> int:
    if gamma is not None:
        return int(gamma)
    gammas = {int(r["gamma"]) for r in records}
    if len(gammas) != 1:
        raise ValueError(f"records mix block lengths gamma={sorted(gammas)}; pass gamma explicitly")
    return gammas.pop()


def conditional_acceptance(records: Sequence[Mapping], gamma: int | None = None) -> list[float | None]:
    """[P(k accepted | 1..k-1 accepted) for k = 1..gamma]; None where no round reached position k."""
    if not records:
        return []
    gamma = _gamma(records, gamma)
    out = []
    for k in range(1, gamma + 1):
        # at risk at k: tokens 1..k-1 accepted and the round did not already end at an accepted EOS
        at_risk = [r for r in records if int(r["accepted"]) >= k - 1
                   and not (r.get("eos") and int(r["accepted"]) == k - 1 and _eos_in_drafts(r))]
        passed = sum(int(r["accepted"]) >= k for r in at_risk)
        out.append(passed / len(at_risk) if at_risk else None)
    return out


def _eos_in_drafts(record: Mapping) -> bool:
    """The round ended because an accepted draft token was EOS (no correction/bonus token emitted)."""
    return int(record["emitted"]) == int(record["accepted"])


def prefix_survival(records: Sequence[Mapping], gamma: int | None = None) -> list[float | None]:
    """[P(1..k all accepted) for k = 1..gamma], the running product of ``conditional_acceptance``."""
    survival, running = [], 1.0
    for c in conditional_acceptance(records, gamma):
        running = None if c is None or running is None else running * c
        survival.append(running)
    return survival


def accepted_length_histogram(records: Sequence[Mapping], gamma: int | None = None) -> list[int]:
    """Counts of rounds with 0..gamma accepted draft tokens (list index = accepted length)."""
    if not records:
        return []
    gamma = _gamma(records, gamma)
    counts = [0] * (gamma + 1)
    for r in records:
        counts[int(r["accepted"])] += 1
    return counts


def acceptance_summary(records: Sequence[Mapping], gamma: int) -> dict:
    """tau, conditional acceptance, prefix survival and histogram: pooled and per dataset."""
    groups = by_dataset(records)
    return {
        "tau": tau(records),
        "tau_by_dataset": {name: tau(rs) for name, rs in groups.items()},
        "conditional_acceptance": {"pooled": conditional_acceptance(records, gamma),
                                   "by_dataset": {n: conditional_acceptance(rs, gamma) for n, rs in groups.items()}},
        "prefix_survival": {"pooled": prefix_survival(records, gamma),
                            "by_dataset": {n: prefix_survival(rs, gamma) for n, rs in groups.items()}},
        "accepted_length_histogram": {"pooled": accepted_length_histogram(records, gamma),
                                      "by_dataset": {n: accepted_length_histogram(rs, gamma)
                                                     for n, rs in groups.items()}},
        "num_rounds": len(records),
        "num_rounds_by_dataset": {n: len(rs) for n, rs in groups.items()},
    }


# ----------------------------------------------------------------------------------------------------
# Wall clock
# ----------------------------------------------------------------------------------------------------

METHODS = ("spec", "generate", "prompt_lookup")


def _timed(rows: Sequence[Mapping], method: str) -> tuple[int, float, int]:
    """(tokens, seconds, prompts) of ``method`` over the rows that timed it."""
    timed = [r for r in rows if r.get(f"{method}_s") is not None]
    return (sum(int(r[f"{method}_tokens"]) for r in timed), sum(float(r[f"{method}_s"]) for r in timed),
            len(timed))


def speedup_by_dataset(rows: Sequence[Mapping], method: str = "spec", baseline: str = "generate") -> dict:
    """{dataset: tokens/s of ``method`` / tokens/s of ``baseline``} over the prompt rows of each dataset that
    timed both (rows without a ``dataset`` key are pooled under "all")."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        if r.get(f"{method}_s") is not None and r.get(f"{baseline}_s") is not None:
            groups.setdefault(str(r.get("dataset", "all")), []).append(r)
    out = {}
    for ds, group in groups.items():
        (a, b, _), (c, d, _) = _timed(group, method), _timed(group, baseline)
        if a and b and c and d:
            out[ds] = (a / b) / (c / d)
    return out


def throughput_summary(rows: Sequence[Mapping]) -> dict:
    """Tokens/s per method, speed-ups and output-match rates from per-prompt timing rows.

    Each row has ``<method>_tokens`` and ``<method>_s`` for the methods that ran (warm-up excluded) and
    ``greedy_match`` / ``prompt_lookup_match`` (True/False, or None when not compared).
    """
    tokens_per_s, totals = {}, {}
    for m in METHODS:
        n_tok, secs, prompts = _timed(rows, m)
        if not prompts:
            continue
        totals[m] = {"tokens": n_tok, "seconds": secs, "prompts": prompts}
        tokens_per_s[m] = n_tok / secs if secs > 0 else None

    def ratio(a, b):
        x, y = tokens_per_s.get(a), tokens_per_s.get(b)
        return x / y if x and y else None

    def rate(key):
        seen = [bool(r[key]) for r in rows if r.get(key) is not None]
        return sum(seen) / len(seen) if seen else None

    return {"tokens_per_s": tokens_per_s, "timing_totals": totals,
            "speedup_vs_generate": ratio("spec", "generate"),
            "speedup_vs_generate_by_dataset": speedup_by_dataset(rows),
            "speedup_vs_prompt_lookup": ratio("spec", "prompt_lookup"),
            "greedy_match_rate": rate("greedy_match"),
            "prompt_lookup_match_rate": rate("prompt_lookup_match")}
