"""How often the target's greedy token falls outside the draft vocabulary, for several ``draft_vocab_prior``.

The draft vocabulary is picked from answer-token counts of the training data (``dspark_model/vocab.py``). On
rows the target generated greedily, each answer token is the target's argmax at the previous position, so the
share of answer tokens outside the K picked ids is exactly the share of positions where a greedy draft cannot
be accepted. Two held-out measures, no model needed:

* ``--heldout``: data_prep folders of other prompts (the eval sets: the traffic a draft is served on);
* a random ``--split`` share of the training rows, the vocabulary counted on the rest (same distribution).

    .venv/bin/python benchmarks/vocab_prior.py --train runs/reference3/data runs/reference2/data \\
        --heldout runs/exp/heldout-large runs/reference2/heldout       # -> benchmarks/results/vocab_prior.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "vocab_prior.json"


def _rows(folder: Path):
    from datasets import load_from_disk

    return load_from_disk(str(folder / "dataset"))


def _counts(rows, vocab_size: int):
    """(total counts, {source: counts}) over the loss-masked tokens of ``rows``."""
    import torch

    from dspark_model.vocab import answer_token_counts

    by_source = {}
    for source in sorted(set(rows["source"])):
        part = rows.filter(lambda r, s=source: r["source"] == s)
        by_source[source] = answer_token_counts([torch.tensor(r) for r in part["input_ids"]],
                                                [torch.tensor(m) for m in part["loss_mask"]], vocab_size)
    return sum(by_source.values()), by_source


def _outside(ids, counts) -> float:
    import torch

    inside = torch.zeros(counts.numel(), dtype=torch.bool)
    inside[ids] = True
    return 1.0 - float(counts[inside].sum()) / max(1.0, float(counts.sum()))


def main() -> None:
    from dspark_model.atomic import atomic_write_json
    from dspark_model.vocab import top_k_vocab

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, nargs="+", required=True, help="data_prep folders the vocabulary is counted on")
    p.add_argument("--heldout", type=Path, nargs="*", default=[], help="data_prep folders of greedy held-out answers")
    p.add_argument("--priors", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=49152, help="the target's vocabulary (SmolLM2: 49152)")
    p.add_argument("--split", type=float, default=0.15, help="share of training rows held out (same distribution)")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()

    V, K = args.vocab_size, args.vocab
    heldout = {str(h): _counts(_rows(h), V) for h in args.heldout}
    result = {"vocab": K, "priors": args.priors, "train": {}}
    for folder in args.train:
        rows = _rows(folder)
        total, _ = _counts(rows, V)
        entry = {"rows": len(rows), "answer_tokens": int(total.sum()), "distinct_tokens": int((total > 0).sum()),
                 "heldout": {}, "split": {}}
        for name, (held, by_source) in heldout.items():
            entry["heldout"][name] = {
                f"{prior:g}": {"outside": _outside(ids := top_k_vocab(total, K, prior), held),
                               "by_source": {s: _outside(ids, c) for s, c in by_source.items()}}
                for prior in args.priors}
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        cut = int(round(len(rows) * args.split))
        fit, _ = _counts(rows.select(order[cut:]), V)
        held, _ = _counts(rows.select(order[:cut]), V)
        entry["split"] = {"heldout_rows": cut,
                          **{f"{prior:g}": _outside(top_k_vocab(fit, K, prior), held) for prior in args.priors}}
        result["train"][str(folder)] = entry
        print(json.dumps({str(folder): {"heldout": {n: {k: round(v["outside"], 4) for k, v in h.items()}
                                                    for n, h in entry["heldout"].items()},
                                        "split": {k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in entry["split"].items()}}}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
