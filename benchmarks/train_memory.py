"""Peak memory of one training step's loss: chunked (train.loss.draft_loss) vs naive, on the SmolLM2 target.

Each variant runs in a fresh subprocess: load the target, build the demo-sized draft, run the target
forward, run one warm-up step, then reset the kernel's resident-set high-water mark
(``/proc/self/clear_refs`` <- 5), run a measured step (draft forward + loss + backward) and read ``VmHWM``.
The reported number is that peak minus the resident set just before the step, i.e. the memory the step itself
needed: allocations of 1 MiB or more are mmapped (``mallopt``), and the heap pages the warm-up freed are handed
back to the OS (``malloc_trim``) before the step, so the resident set follows the live tensors. Where the reset
is not allowed, the fallback is ``ru_maxrss`` minus the resident set before the step, an upper bound that
includes the loading peak; the JSON names the method used.

A third child checks ``train.estimate_memory`` (train/memory.py) against the measured chunked step: the same
step (same draft, shapes, chunking; the target states already computed) estimated on fake tensors from the
target's config, no weights loaded. Goal: within 20 % of the measured peak.

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


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the resident set before the step
    holds no memory the warm-up freed: the step's own allocations then all show in the high-water mark."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measured peak may then undercount reused heap pages
        pass


def _mmap_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap (glibc ``mallopt``), so that
    freeing it returns it to the OS: the resident set then follows the live tensors instead of a heap that
    keeps (and fragments) what was freed. glibc's default threshold adapts up to 32 MB, so tensors below that
    would otherwise come from the heap and the measured peak depend on their order."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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
    _mmap_large_allocations()
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
    _release_free_heap()
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "loss": loss, "step_peak_mb": (peak - before) / 1024, "step_s": seconds,
            "method": "VmHWM after clear_refs" if reset else "ru_maxrss (no reset; upper bound)"}


def estimate_child() -> dict:
    """train/memory.py's estimate of the chunked step above: activations + gradients of one micro-batch."""
    from dspark_model.config import DraftConfig, TargetSpec
    from train.memory import estimate_memory
    from train.schema import DataConfig, OptimConfig, TrainJob

    s = SETTINGS
    job = TrainJob(target=TargetSpec(),
                   draft=DraftConfig(num_layers=s["num_layers"], block_size=s["block_size"],
                                     markov_rank=s["markov_rank"]),
                   # offline with fp32 cache rows: the target states exist before the step, as in child()
                   data=DataConfig(mode="offline", max_length=s["seq_len"]),
                   train=OptimConfig(micro_batch_size=s["batch"], global_batch_size=s["batch"], anchors_per_4096=0,
                                     min_anchors=s["anchors"], max_anchors=s["anchors"],
                                     logits_chunk_size=s["chunk_size"], recompute_chunks=True, device="cpu",
                                     precision="fp32"))
    est = estimate_memory(job, world=1)
    mib = 1024 ** 2
    return {"variant": "estimate", "step_peak_mb": (est.rows["activations"] + est.rows["gradients"]) / mib,
            "rows_mb": {k: v / mib for k, v in est.rows.items()}, "settings": est.settings["summary"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["naive", "chunked", "estimate"])
    parser.add_argument("--out", default=str(RESULT), help="where the JSON goes")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(estimate_child() if args.child == "estimate" else child(args.child)))
        return
    results = {}
    for variant in ("naive", "chunked", "estimate"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(results[variant])
    ratio = results["chunked"]["step_peak_mb"] / results["naive"]["step_peak_mb"]
    report = {"benchmark": "train loss peak memory, chunked vs naive", "target": "SmolLM2-135M-Instruct",
              "settings": SETTINGS, "naive": results["naive"], "chunked": results["chunked"],
              "ratio_chunked_over_naive": ratio, "goal": "<= 0.5", "meets_goal": ratio <= 0.5,
              "estimate": results["estimate"],
              "estimate_over_measured": results["estimate"]["step_peak_mb"] / results["chunked"]["step_peak_mb"],
              "estimate_goal": "within 20 % of the measured chunked step"}
    from dspark_model.atomic import atomic_write_json

    atomic_write_json(args.out, report)
    print(f"chunked / naive peak = {ratio:.3f} (goal <= 0.5); estimate / measured = "
          f"{report['estimate_over_measured']:.3f} (goal 0.8-1.2) -> {args.out}")


if __name__ == "__main__":
    main()
