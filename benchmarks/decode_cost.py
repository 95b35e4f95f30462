"""What one speculative round costs on the SmolLM2 target: the draft's propose() as a fraction of a one-token
target step, full vs reduced draft vocabulary, and the verification step over gamma + 1 tokens, with the
target's GEMM weights as loaded and prepacked for gamma + 1 rows (``dspark_model/prepack.py``, what eval does
on a CPU) alternated in the same process; the same two costs for every shorter length, as eval's
``gamma_tuning`` profiles them (``round_cost_by_length``); and one drafting round for R concurrent requests (contexts of
different lengths), one batched ``propose_batch`` call vs R ``propose`` calls (eval/live.py's drafting).

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
    from dspark_model.prepack import PackedLinear, prepack_linears, unpack_linears
    from dspark_model.target import crop_cache, load_target
    from eval.scheduler import describe_hardware

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="*", default=[8192, 4096])
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, nargs="*", default=[2, 4, 8, 16], help="R for the batched-drafting arm")
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
    packed = prepack_linears(target.model, [args.gamma + 1])
    packed_layers = [m for m in target.model.modules() if isinstance(m, PackedLinear)]

    def use_packs(on: bool) -> None:  # the same modules with and without their packs, alternated below
        for m in packed_layers:
            m.__class__ = PackedLinear if on else torch.nn.Linear

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

    V = args.gamma + 1
    times: dict[str, list[float]] = {"target_1": [], f"target_{V}": []}
    if packed:
        times.update({"target_1_prepacked": [], f"target_{V}_prepacked": []})
    times.update({f"propose_{n}": [] for n in drafts})
    for _ in range(3):  # warm-up
        target_step(1), target_step(V), [propose(n) for n in drafts]
    for i in range(args.repeats):
        for on in ([i % 2 == 0, i % 2 == 1] if packed else [False]):  # ABBA over repeats
            use_packs(on)
            tag = "_prepacked" if on else ""
            times[f"target_1{tag}"].append(target_step(1))
            times[f"target_{V}{tag}"].append(target_step(V))
        use_packs(False)
        for n in drafts:
            times[f"propose_{n}"].append(propose(n))
    med = {k: statistics.median(v) for k, v in times.items()}
    one = med["target_1"]
    unpack_linears(target.model)
    draft = drafts[f"vocab-{args.vocab[0]}"][0] if args.vocab else drafts["full"][0]
    by_length = _round_cost_by_length(target, draft, ids[0].tolist(), args.gamma, args.repeats)
    batched = _batched_drafting(draft, out.tap_hidden, ids, args.requests, args.gamma, args.repeats)
    result = {
        "gamma": args.gamma, "context": T, "threads": args.threads, "machine": describe_hardware(),
        "median_s": med,
        "propose_over_target_step": {n: med[f"propose_{n}"] / one for n in drafts},
        "verify_over_target_step": med[f"target_{V}"] / one,
        "draft_round_batched_over_per_request": batched,
        "round_cost_by_length": by_length,
    }
    if packed:  # both relative to the plain one-token step, which packing for V rows leaves as it was
        result["verify_over_target_step_prepacked"] = med[f"target_{V}_prepacked"] / one
        result["target_1_prepacked_over_target_1"] = med["target_1_prepacked"] / one
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if "over" in k}, indent=1))


def _round_cost_by_length(target, draft, ids: list[int], gamma: int, repeats: int) -> dict:
    """{gamma': {propose, verify, verify_prepacked}} for gamma' = 1..gamma, in one-token target steps timed
    alongside: eval's own cost profile (``eval.gamma_tuning.profile_round_costs``, every length and kernel
    alternated), the forward over gamma' + 1 tokens with and without packing for that count."""
    from eval.gamma_tuning import profile_round_costs

    costs = profile_round_costs(target, draft, ids, range(1, gamma + 1), 0.0, True, repeats=repeats)
    return {str(g): {"propose": c["draft_s"] / c["one_token_s"], "verify": c["verify_s"] / c["one_token_s"],
                     "verify_prepacked": None if c["verify_prepacked_s"] is None
                     else c["verify_prepacked_s"] / c["one_token_s"]}
            for g, c in costs.items()}


def _batched_drafting(draft, taps, ids, requests, gamma: int, repeats: int) -> dict:
    """{R: seconds of one batched drafting round / seconds of R single proposals}, medians of alternated runs;
    request r's context is the first T - 8r positions (so the batch pads and masks)."""
    import torch

    from eval.live_cost import draft_round

    out = {}
    for R in requests:
        contexts, anchors = [], []
        for r in range(R):
            n = max(1, taps.shape[1] - 8 * r)
            contexts.append(draft.new_cache())
            draft.extend_context(contexts[-1], taps[:, :n])
            anchors.append(int(ids[0, n - 1]))
        timed = {"batched": [], "per_request": []}
        for i in range(1 + max(3, repeats // 3)):  # the first pass is a warm-up
            for kind in (("batched", "per_request") if i % 2 == 0 else ("per_request", "batched")):
                tic = time.perf_counter()
                if kind == "batched":
                    draft_round(draft, contexts, anchors, 0.0, [None] * R, gamma)
                else:
                    for c, a in zip(contexts, anchors):
                        draft.propose(c, torch.tensor([a]), 0.0, None, gamma)
                if i:
                    timed[kind].append(time.perf_counter() - tic)
        out[str(R)] = statistics.median(timed["batched"]) / statistics.median(timed["per_request"])
    return out


if __name__ == "__main__":
    main()
