"""Greedy acceptance length of drafts on held-out data_prep rows, without running the decoding loop.

At T = 0 a drafted block is accepted up to the first slot whose token differs from the target's argmax, and
when every earlier slot was accepted the draft's previous tokens are exactly the target's greedy tokens. So
on rows the target generated greedily, one teacher-forced ``forward_train`` over every anchor gives, for
each answer position p, the number of slots speculative decoding would accept from p. Walking the answer
from its first position (anchor p -> next anchor p + n + 1) replays the rounds of a greedy speculative run
over that answer: tau = tokens / rounds, as ``python -m eval`` would count it, at a fraction of the cost.
The rows must be greedy generations of the same target (``python -m data_prep`` with temperature 0).

Also reported per draft: tau and first-slot acceptance per prompt source, conditional acceptance per slot
along that walk, and for a reduced draft vocabulary the target's probability mass inside the K tokens on
these rows (the ceiling the restriction sets) and the share of answer positions whose target argmax lies
outside K.

    .venv/bin/python benchmarks/heldout_tau.py --data runs/heldout --draft a=runs/train/a/final b=...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _accept_runs(draft, target, ids, lm, chunk: int = 96):
    """Accepted slots from every anchor of one row: ids, lm (T,) -> dict p -> n accepted (0..G)."""
    import torch

    from train.anchors import anchor_candidates

    G, T = draft.block_size, ids.numel()
    out = target.forward(ids[None])
    t_arg = target.logits(out.final_hidden[0]).argmax(-1)  # (T,) target's greedy next token at each position
    cands = anchor_candidates(lm)
    runs = {}
    with torch.no_grad():
        for s in range(0, cands.numel(), chunk):
            anchors = cands[s: s + chunk][None]  # (1, A)
            h = draft.forward_train(out.tap_hidden, ids[None], anchors)  # (1, A, G, d)
            prev, _, in_range = draft.block_inputs(ids[None], anchors)
            guess = draft.to_target_ids(draft.logits(h[0], prev[0]).argmax(-1))  # (A, G)
            pos = (anchors[0][:, None] + torch.arange(G)).clamp(max=T - 1)  # (A, G) position judged by slot k
            ok = (guess == t_arg[pos]) & in_range[0] & (lm[(pos + 1).clamp(max=T - 1)] > 0)  # inside the answer
            n = ok.long().cumprod(-1).sum(-1)  # (A,) leading accepted slots
            runs.update(zip(cands[s: s + chunk].tolist(), n.tolist()))
    return runs, out.final_hidden[0], t_arg


def evaluate(draft, target, rows, sources=None) -> dict:
    """Replay greedy speculative rounds over every row's answer; see the module docstring. ``sources``: each
    row's prompt source, for tau and first-slot acceptance per source (``by_source``)."""
    import torch

    G = draft.block_size
    tokens = rounds = 0
    reached, accepted = [0] * G, [0] * G
    mass, outside, positions = 0.0, 0, 0
    per: dict[str, list[int]] = {}  # source -> [tokens, rounds, first slot accepted]
    for i, (ids, lm) in enumerate(rows):
        runs, fin, t_arg = _accept_runs(draft, target, ids, lm)
        p = min(runs) if runs else None
        mine = per.setdefault(sources[i] if sources else "all", [0, 0, 0])
        while p is not None and p in runs:
            n = runs[p]
            for k in range(min(n + 1, G)):
                reached[k] += 1
                accepted[k] += k < n
            tokens, rounds = tokens + n + 1, rounds + 1
            mine[0], mine[1], mine[2] = mine[0] + n + 1, mine[1] + 1, mine[2] + (n > 0)
            p += n + 1
        if draft.reduced_vocab:
            q = (lm[1:] > 0).nonzero().squeeze(-1)  # positions whose next token is an answer token
            probs = torch.softmax(target.logits(fin[q]).float(), -1)
            mass += probs[:, draft.draft_to_target].sum().item()
            outside += int((draft.target_to_draft[t_arg[q]] < 0).sum())
            positions += q.numel()
    result = {"tau": tokens / max(rounds, 1), "rounds": rounds,
              "conditional_acceptance": [a / r if r else None for a, r in zip(accepted, reached)],
              "draft_vocab_size": draft.out_vocab_size}
    if sources:
        result["by_source"] = {name: {"tau": t / max(r, 1), "rounds": r, "acceptance_k1": a / max(r, 1)}
                               for name, (t, r, a) in sorted(per.items())}
    if draft.reduced_vocab:
        result.update(vocab_mass_in_draft=mass / max(positions, 1),
                      argmax_outside_vocab=outside / max(positions, 1))
    return result


def main() -> None:
    import torch

    from data_prep.store import load_tokenized
    from dspark_model.atomic import atomic_write_json
    from dspark_model.checkpoint import load_draft, target_spec_from_checkpoint
    from dspark_model.target import load_target
    from train.data import load_data_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a data_prep output folder of greedy generations")
    p.add_argument("--draft", nargs="+", required=True, help="name=checkpoint folder, one or more")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    drafts = [item.partition("=")[::2] for item in args.draft]
    target = load_target(target_spec_from_checkpoint(drafts[0][1]), "cpu")  # the target the drafts name
    data = load_data_dir(args.data, args.max_length, None)
    rows = list(zip(data.input_ids, data.loss_mask))
    row_ids = load_tokenized(args.data)[0]["row_id"]
    sources = [row_ids[i].rpartition(":")[0] for i in data.rows]  # row ids are <source>:<line or index>
    results = {}
    for name, path in drafts:
        results[name] = evaluate(load_draft(path, target), target, rows, sources)
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, {"data": str(args.data), "rows": len(rows), "drafts": results})


if __name__ == "__main__":
    main()
