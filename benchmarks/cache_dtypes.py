"""Target-cache storage dtypes on real rows: bytes per token, reconstruction error, and what the error does to
a trained draft.

For a few rows of a data_prep output, the target's tap and final states are computed in float32 and passed
through every storage dtype's encode/decode round trip (the code the cache writer and reader use). Reported
per dtype: bytes per token, relative RMS error, the teacher's total-variation shift (target distribution from
the decoded final state vs from the float32 one), and the trained draft's expected acceptance
(mean 1 - TV against the float32 teacher, per block slot) when its input features are the decoded ones,
with the chained estimate 1 + sum_k prod_{j<=k} a_j of tokens per verification. That is the draft-side
sensitivity to the stored precision, a proxy: the effect through training itself would need one training
run per dtype.

    python benchmarks/cache_dtypes.py --data runs/reference/data --draft runs/reference/train-dspark/final \
        --out runs/reference/cache_dtypes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def round_trip(x: torch.Tensor, dtype: str, groups: int) -> torch.Tensor:
    """(N, D) float32 -> what the cache reader returns after storing ``x`` as ``dtype``."""
    from data_prep.cache import decode, encode

    t = encode("x", x, dtype, groups)
    return decode(t["x"], t.get("x_scale"), dtype)


def chained_tau(accept: list[float]) -> float:
    """1 + sum_k prod_{j<=k} a_j: tokens per verification if slot acceptances were independent."""
    tau, run = 1.0, 1.0
    for a in accept:
        run *= a
        tau += run
    return tau


@torch.no_grad()
def measure(data_dir: Path, draft_dir: Path, num_rows: int, max_anchors: int, max_length: int) -> dict:
    from data_prep.cache import STORAGE_DTYPES, bytes_per_token
    from data_prep.store import load_tokenized
    from dspark_model.checkpoint import load_draft, target_spec_from_checkpoint
    from dspark_model.target import load_target
    from train.anchors import anchor_candidates, slot_mask
    from train.loss import LossWeights, draft_loss

    target = load_target(target_spec_from_checkpoint(draft_dir), "cpu")
    draft = load_draft(draft_dir, target, device="cpu").eval()
    ds, _ = load_tokenized(data_dir)
    rows = list(range(max(0, len(ds) - num_rows), len(ds)))  # the last rows (any rows would do)
    k = len(target.tap_layer_ids)
    G = draft.block_size
    feats, batches = [], []
    for r in rows:
        ids = torch.as_tensor(ds[r]["input_ids"][:max_length])[None]  # (1, T)
        lm = torch.as_tensor(ds[r]["loss_mask"][:max_length])[None]
        cand = anchor_candidates(lm[0])
        if cand.numel() == 0:
            continue
        anchors = cand[torch.linspace(0, cand.numel() - 1, min(max_anchors, cand.numel())).long()][None]
        mask = slot_mask(lm, anchors, torch.ones_like(anchors, dtype=torch.bool), G)
        out = target.forward(ids)
        feats.append((out.tap_hidden[0].float(), out.final_hidden[0].float()))  # (T, k*d), (T, d)
        batches.append((ids, anchors, mask))
    result = {"rows": len(batches), "tokens": sum(f[0].shape[0] for f in feats), "dtypes": {}}
    weights = LossWeights()
    for dtype in STORAGE_DTYPES:
        err2 = ref2 = tv_sum = n_tv = 0.0
        accept_sum, slot_n = torch.zeros(G), torch.zeros(G)
        for (tap, fin), (ids, anchors, mask) in zip(feats, batches):
            tap_q, fin_q = round_trip(tap, dtype, k), round_trip(fin, dtype, 1)
            err2 += float((tap_q - tap).pow(2).sum() + (fin_q - fin).pow(2).sum())
            ref2 += float(tap.pow(2).sum() + fin.pow(2).sum())
            pos = anchors[0, :, None] + torch.arange(G)  # slot k's teacher: the target state at p + k
            pos = pos.clamp(max=fin.shape[0] - 1).flatten()
            p_ref = torch.softmax(target.logits(fin[pos]).float(), -1)
            p_q = torch.softmax(target.logits(fin_q[pos]).float(), -1)
            tv_sum += float(0.5 * (p_q - p_ref).abs().sum(-1).sum())
            n_tv += pos.numel()
            h = draft.forward_train(tap_q[None], ids, anchors)  # draft fed decoded features
            _, m = draft_loss(draft, target, h, fin[None], ids, anchors, mask, weights, chunk_size=448,
                              recompute=False)  # scored against the float32 teacher
            per_slot = mask.sum((0, 1))
            accept_sum += m["accept_per_slot"] * per_slot
            slot_n += per_slot
        accept = (accept_sum / slot_n.clamp_min(1)).tolist()
        result["dtypes"][dtype] = {
            "bytes_per_token": bytes_per_token(k, target.hidden_size, dtype),
            "relative_rms_error": (err2 / ref2) ** 0.5,
            "teacher_tv_shift": tv_sum / max(n_tv, 1),
            "draft_expected_accept_per_slot": accept,
            "draft_chained_tau": chained_tau(accept),
        }
    bf16 = result["dtypes"]["bfloat16"]["bytes_per_token"]
    base = result["dtypes"]["float32"]["draft_chained_tau"]
    for rec in result["dtypes"].values():
        rec["bytes_ratio_to_bfloat16"] = rec["bytes_per_token"] / bf16
        rec["chained_tau_ratio_to_float32"] = rec["draft_chained_tau"] / base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data_prep output folder")
    parser.add_argument("--draft", required=True, help="a trained draft checkpoint folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--anchors", type=int, default=64, help="evenly spaced anchors per row")
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    start = time.perf_counter()
    result = measure(Path(args.data), Path(args.draft), args.rows, args.anchors, args.max_length)
    result["seconds"] = round(time.perf_counter() - start, 1)
    from dspark_model.atomic import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
