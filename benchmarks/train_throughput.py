"""Training throughput: supervised block positions per second, old vs new code paths, in one run.

Each variant runs in a fresh subprocess on the SmolLM2 target with the reference recipe
(conf/train/reference.yaml: 2-layer draft, Markov rank 64, block 7, 4 rows per step, 24 anchors per row, loss
chunks of 448 positions without recompute, fp32, AdamW):

* ``baseline``: the toolkit as of ``--baseline-ref`` (a git worktree of that commit; its full-vocabulary
  loss), i.e. the code the previous reference run trained with;
* ``full``: this tree, full vocabulary;
* ``vocab-<K>``: this tree, a reduced draft vocabulary of K tokens (the teacher's log-normaliser memoised per
  row, as ``train`` does); ``vocab-<K>-bf16`` (``--bf16``) the same under bf16 autocast
  (``train.precision=bf16``), faster only on CPUs with native bf16 (AMX / AVX512-BF16).

Rows: chat-templated prompts of the shared training sets, each followed by the text of another prompt as
its "answer" (loss-masked), cut to ``--prompt-tokens`` + ``--answer-tokens``. Token identities do not change
the cost of a step; the K-token vocabulary is counted over these answers. Target states are computed once
per row before timing. A variant steps through the rows twice: the first pass includes the memo's one-time
cost per row (reported apart); positions/s is measured on the second pass. Variants alternate, ``--repeats``
times each, and the median is reported, so that load from other processes hits all of them alike.

    .venv/bin/python benchmarks/train_throughput.py            # writes benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "train_throughput.json"
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "train"
RECIPE = dict(num_layers=2, markov_rank=64, block_size=7, batch=4, anchors=24, chunk_size=448, lr=1e-3)


def _rows(tokenizer, n: int, prompt_tokens: int, answer_tokens: int, seed: int = 0):
    """n (input_ids, loss_mask) rows from the shared training prompts (see the module docstring)."""
    import random

    import torch

    texts = []
    for name in ("gsm8k-train", "livecodebench", "arena-hard-train"):
        with open(SHARED_TRAIN / f"{name}.jsonl") as f:
            texts += [json.loads(line)["turns"][0] for _, line in zip(range(2 * n), f)]
    random.Random(seed).shuffle(texts)
    rows = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": texts[2 * i]}], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
        answer = tokenizer(texts[2 * i + 1], add_special_tokens=False)["input_ids"][:answer_tokens]
        ids = list(prompt[-prompt_tokens:]) + list(answer)
        mask = [0] * min(len(prompt), prompt_tokens) + [1] * len(answer)
        rows.append((torch.tensor(ids), torch.tensor(mask)))
    return rows


def worker(variant: str, args) -> dict:
    """One variant in this process (the toolkit is whatever ``sys.path`` finds first)."""
    import torch

    torch.set_num_threads(args.threads)
    from dspark_model.config import DraftConfig, TargetSpec
    from dspark_model.draft import build_draft_for
    from dspark_model.target import load_target
    from train.anchors import batch_anchors, slot_mask
    from train.loss import LossWeights, draft_loss

    r = RECIPE
    target = load_target(TargetSpec(), "cpu")
    rows = _rows(target.tokenizer, args.rows, args.prompt_tokens, args.answer_tokens)
    K = int(variant.split("-")[1]) if variant.startswith("vocab-") else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.endswith("-bf16"))
    cfg = dict(num_layers=r["num_layers"], block_size=r["block_size"], markov_rank=r["markov_rank"])
    if K:
        cfg["draft_vocab_size"] = K
    torch.manual_seed(0)
    draft = build_draft_for(target, DraftConfig(**cfg))
    memo = None
    if K:
        from dspark_model.vocab import answer_token_counts, top_k_vocab
        from train.teacher import TeacherMemo

        draft.set_draft_vocab(top_k_vocab(answer_token_counts([a for a, _ in rows], [m for _, m in rows],
                                                              target.vocab_size), K))
        memo = TeacherMemo()
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=r["lr"], foreach=False)
    B, G = r["batch"], r["block_size"]
    batches = [list(range(i, i + B)) for i in range(0, len(rows) - B + 1, B)]
    states = {}
    with torch.no_grad():
        for i, (ids, _) in enumerate(rows):
            out = target.forward(ids[None])
            states[i] = (out.tap_hidden[0], out.final_hidden[0])

    def pad(parts, T):
        out = parts[0].new_zeros(len(parts), T, *parts[0].shape[1:])
        for b, p in enumerate(parts):
            out[b, : p.shape[0]] = p
        return out

    def step(indices, epoch):
        T = max(rows[i][0].numel() for i in indices)
        ids = pad([rows[i][0] for i in indices], T)
        lm = pad([rows[i][1] for i in indices], T)
        tap = pad([states[i][0] for i in indices], T)
        fin = pad([states[i][1] for i in indices], T)
        anchors, valid = batch_anchors([rows[i][1] for i in indices], indices, epoch, 0, 512, r["anchors"],
                                       r["anchors"])
        mask = slot_mask(lm, anchors, valid, G)
        tic = time.perf_counter()
        extra = ()
        if memo is not None:
            extra = memo.lookup(target, indices, fin, lm, [rows[i][0].numel() for i in indices])
        memo_s = time.perf_counter() - tic
        with autocast:
            h = draft.forward_train(tap, ids, anchors)
            loss, _ = draft_loss(draft, target, h, fin, ids, anchors, mask, LossWeights(), r["chunk_size"], False,
                                 *extra)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - tic, memo_s, float(mask.sum())

    first = [step(ix, 0) for ix in batches]
    second = [step(ix, 1) for ix in batches]
    secs, positions = sum(s for s, _, _ in second), sum(p for _, _, p in second)
    return {"variant": variant, "positions_per_s": positions / secs, "step_s": secs / len(second),
            "positions_per_step": positions / len(second),
            "first_pass_step_s": sum(s for s, _, _ in first) / len(first),
            "memo_s_per_row": sum(m for _, m, _ in first) / len(rows),
            "draft_vocab_size": K or target.vocab_size, "threads": args.threads}


def after_variant(variants: list[str], native_bf16: bool) -> str:
    """The variant reported as "after": what ``train.precision=native`` (the reference recipe) trains with on
    this CPU, i.e. the bf16 variant when it was measured and the CPU has native bf16, else the first reduced
    vocabulary (or the full one when none was measured)."""
    bf16 = [v for v in variants if v.endswith("-bf16")]
    if bf16 and native_bf16:
        return bf16[0]
    vocab = [v for v in variants if v.startswith("vocab-") and not v.endswith("-bf16")]
    return vocab[0] if vocab else "full"


def _worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="dspark-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True,
                   capture_output=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ref", default="41eba57", help="commit of the old code path")
    p.add_argument("--vocab", type=int, nargs="*", default=[8192], help="reduced vocabulary sizes to measure")
    p.add_argument("--bf16", action="store_true", help="also measure the first vocabulary under bf16 autocast")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--answer-tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    tree = _worktree(args.baseline_ref)
    variants = ["baseline", "full"] + [f"vocab-{k}" for k in args.vocab]
    if args.bf16 and args.vocab:
        variants.append(f"vocab-{args.vocab[0]}-bf16")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [f"--rows={args.rows}", f"--prompt-tokens={args.prompt_tokens}",
                   f"--answer-tokens={args.answer_tokens}", f"--threads={args.threads}"]
    try:
        for rep in range(args.repeats):
            for v in variants:
                env = dict(os.environ, PYTHONPATH=str(tree if v == "baseline" else ROOT),
                           OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
                proc = subprocess.run([sys.executable, __file__, f"--worker={v}", *passthrough], env=env,
                                      capture_output=True, text=True, cwd=tree if v == "baseline" else ROOT)
                if proc.returncode != 0:
                    raise SystemExit(f"error: variant {v} failed:\n{proc.stderr[-3000:]}")
                runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"[{rep + 1}/{args.repeats}] {v}: {runs[v][-1]['positions_per_s']:.0f} positions/s",
                      flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    med = {v: statistics.median(x["positions_per_s"] for x in r) for v, r in runs.items()}
    sys.path.insert(0, str(ROOT))
    from dspark_model.atomic import atomic_write_json
    from dspark_model.target import cpu_has_native_bf16
    from eval.scheduler import describe_hardware

    best = after_variant(variants, cpu_has_native_bf16())

    result = {
        "recipe": RECIPE, "rows": args.rows, "prompt_tokens": args.prompt_tokens,
        "answer_tokens": args.answer_tokens, "baseline_ref": args.baseline_ref, "machine": describe_hardware(),
        "median_positions_per_s": med, "runs": runs,
        "train_throughput": {"positions_per_s": {"before": med["baseline"], "after": med[best]},
                             "after_variant": best},
        "speedup_vs_baseline": {v: med[v] / med["baseline"] for v in variants},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result["speedup_vs_baseline"], indent=1))


if __name__ == "__main__":
    main()
