"""Peak memory of one training step's loss: chunked (train.loss.draft_loss) vs naive, on the SmolLM2 target.

Each variant runs in a fresh subprocess: load the target, build the demo-sized draft, run the target
forward, run one warm-up step, then reset the kernel's resident-set high-water mark
(``/proc/self/clear_refs`` <- 5), run a measured step (draft forward + loss + backward) and read ``VmHWM``.
The reported number is that peak minus the resident set just before the step, i.e. the memory the step
itself needed. Where the reset is not allowed, the fallback is ``ru_maxrss`` minus the resident set before
the step, an upper bound that includes the loading peak; the JSON names the method used.

    python benchmarks/train_memory.py            # writes benchmarks/results/train_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "train_memory.json"
SETTINGS = dict(batch=4, seq_len=512, anchors=32, block_size=7, num_layers=2, markov_rank=64, chunk_size=448)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(variant: str) -> dict:
    import torch

    from dspark_model.config import DraftConfig, TargetSpec
    from dspark_model.draft import build_draft_for
    from dspark_model.target import load_target
    from train.anchors import batch_anchors, slot_mask
    from train.loss import LossWeights, draft_loss, naive_draft_loss

    s = SETTINGS
    torch.manual_seed(0)
    target = load_target(TargetSpec(), "cpu")
    draft = build_draft_for(target, DraftConfig(num_layers=s["num_layers"], block_size=s["block_size"],
                                                markov_rank=s["markov_rank"]))
    ids = torch.randint(0, 49152, (s["batch"], s["seq_len"]))  # (B, T)
    lm = torch.ones_like(ids)
    lm[:, :64] = 0  # a prompt, then the response
    out = target.forward(ids)
    anchors, valid = batch_anchors(list(lm), list(range(s["batch"])), 0, 0, 0, s["anchors"], s["anchors"])
    mask = slot_mask(lm, anchors, valid, s["block_size"])

    def step():
        draft.zero_grad(set_to_none=True)
        h = draft.forward_train(out.tap_hidden, ids, anchors)
        if variant == "naive":
            loss, _ = naive_draft_loss(draft, target, h, out.final_hidden, ids, anchors, mask, LossWeights())
        else:
            loss, _ = draft_loss(draft, target, h, out.final_hidden, ids, anchors, mask, LossWeights(),
                                 s["chunk_size"], recompute=True)
        loss.backward()
        return loss.item()

    step()  # warm-up: allocator and lazy initialisation
    draft.zero_grad(set_to_none=True)
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "loss": loss, "step_peak_mb": (peak - before) / 1024, "step_s": seconds,
            "method": "VmHWM after clear_refs" if reset else "ru_maxrss (no reset; upper bound)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["naive", "chunked"])
    parser.add_argument("--out", default=str(RESULT), help="where the JSON goes")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    results = {}
    for variant in ("naive", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(results[variant])
    ratio = results["chunked"]["step_peak_mb"] / results["naive"]["step_peak_mb"]
    report = {"benchmark": "train loss peak memory, chunked vs naive", "target": "SmolLM2-135M-Instruct",
              "settings": SETTINGS, "naive": results["naive"], "chunked": results["chunked"],
              "ratio_chunked_over_naive": ratio, "goal": "<= 0.5", "meets_goal": ratio <= 0.5}
    from dspark_model.atomic import atomic_write_json

    atomic_write_json(args.out, report)
    print(f"chunked / naive peak = {ratio:.3f} (goal <= 0.5) -> {args.out}")


if __name__ == "__main__":
    main()
