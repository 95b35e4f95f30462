"""What one speculative round costs on the SmolLM2 target: the draft's propose() as a fraction of a one-token
target step, full vs reduced draft vocabulary, and the verification step over gamma + 1 tokens.

All timings in one process, alternated and repeated (median), on a context of ``--context`` tokens from a
shared training prompt; a random draft is as expensive as a trained one.

    .venv/bin/python benchmarks/decode_cost.py      # writes benchmarks/results/decode_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "decode_cost.json"


def main() -> None:
    import torch

    from dspark_model.atomic import atomic_write_json
    from dspark_model.config import DraftConfig, TargetSpec
    from dspark_model.draft import build_draft_for
    from dspark_model.target import crop_cache, load_target
    from eval.scheduler import describe_hardware

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="*", default=[8192, 4096])
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(TargetSpec(), "cpu")
    with open(ROOT.parent / "shared" / "datasets" / "train" / "livecodebench.jsonl") as f:
        text = json.loads(f.readline())["turns"][0]
    ids = torch.tensor([target.tokenizer(text)["input_ids"][: args.context]])
    cache = target.new_cache()
    with torch.no_grad():
        out = target.forward(ids, past_key_values=cache, use_cache=True)
    drafts = {}
    for k in [None, *args.vocab]:
        torch.manual_seed(0)
        cfg = DraftConfig(num_layers=2, block_size=args.gamma, markov_rank=64, draft_vocab_size=k)
        d = build_draft_for(target, cfg).eval()
        if k:
            d.set_draft_vocab(torch.arange(k))
        ctx = d.new_cache()
        d.extend_context(ctx, out.tap_hidden)
        drafts["full" if k is None else f"vocab-{k}"] = (d, ctx)
    anchor = torch.tensor([int(ids[0, -1])])
    T = ids.shape[1]

    @torch.no_grad()
    def target_step(n: int) -> float:
        block = torch.full((1, n), int(anchor), dtype=torch.long)
        tic = time.perf_counter()
        o = target.forward(block, past_key_values=cache, use_cache=True)
        target.logits(o.final_hidden[0])
        dt = time.perf_counter() - tic
        crop_cache(cache, T)
        return dt

    def propose(name: str) -> float:
        d, ctx = drafts[name]
        tic = time.perf_counter()
        d.propose(ctx, anchor, 0.0, None, args.gamma)
        return time.perf_counter() - tic

    times: dict[str, list[float]] = {"target_1": [], f"target_{args.gamma + 1}": []}
    times.update({f"propose_{n}": [] for n in drafts})
    for _ in range(3):  # warm-up
        target_step(1), [propose(n) for n in drafts]
    for _ in range(args.repeats):
        times["target_1"].append(target_step(1))
        times[f"target_{args.gamma + 1}"].append(target_step(args.gamma + 1))
        for n in drafts:
            times[f"propose_{n}"].append(propose(n))
    med = {k: statistics.median(v) for k, v in times.items()}
    one = med["target_1"]
    result = {
        "gamma": args.gamma, "context": T, "threads": args.threads, "machine": describe_hardware(),
        "median_s": med,
        "propose_over_target_step": {n: med[f"propose_{n}"] / one for n in drafts},
        "verify_over_target_step": med[f"target_{args.gamma + 1}"] / one,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("propose_over_target_step", "verify_over_target_step")}, indent=1))


if __name__ == "__main__":
    main()
