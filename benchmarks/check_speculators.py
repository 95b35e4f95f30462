"""Cross-check: our speculators-format exports, loaded by the reference ``speculators`` package, compute
what our own draft computes.

    PYTHONPATH=/path/to/speculators nice -n 10 .venv/bin/python benchmarks/check_speculators.py

``speculators`` is not a dependency of this toolkit: install it anywhere and put it on PYTHONPATH. The script
builds a tiny random Llama target (width 64, 4 layers), saves it as a plain Hugging Face folder (the verifier
speculators reads its embedding, final norm and LM head from), then for five DSpark drafts (Markov, gated and
rnn heads over the full vocabulary, a Markov head over a 40-token draft vocabulary, DFlash) randomises the
weights, saves and exports them (speculators, fp32, ``--verifier-path`` = the saved verifier folder), loads
each export with ``speculators``' own ``DSparkDraftModel`` and runs its training forward on the same tokens,
anchors and tapped target states as ours. Two EAGLE-3 drafts (40-token and full vocabulary, 4 steps) go the
same way through ``Eagle3DraftModel`` and its training-time test (``dspark_model/verify_eagle3.py``); their
``logits`` cell is the largest over the steps.

speculators is fed the verifier's ``hidden_states`` at the export's ``aux_hidden_state_layer_ids`` (its own
convention), so ``aux_hidden`` checks our id + 1 conversion. Compared per draft: those features against our
taps, block logits over the draft vocabulary after the Markov correction, confidence logits, the teacher
logits speculators rebuilds from the verifier (its verifier_norm + verifier_lm_head), and, for the reduced
vocabulary, the loaded d2t / t2d / lm_head against ours. Every tensor of the loaded model must
equal the export's or the verifier's (nothing left at its random / NaN initialisation). Exit status 1 when a
difference exceeds 1e-4 or loading reports missing / unexpected keys. Result:
benchmarks/results/speculators_check.json. Loading and comparing is ``dspark_model/verify.py``'s (and
``verify_eagle3.py``'s), the code behind ``python -m dspark_model.export --format speculators --verify``; this
script builds the target and the seven exports.

One deliberate deviation from a plain ``DSparkDraftModel.from_pretrained(export)``: the draft layers use
speculators' ``eager`` attention instead of its default flex attention (which compiles its block mask with
torch.compile; a supported ``draft_attn_impl``, same mask, no compiler needed on CPU).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspark_model.atomic import atomic_write_json  # noqa: E402
from dspark_model.checkpoint import save_pretrained  # noqa: E402
from dspark_model.config import DraftConfig, TargetSpec  # noqa: E402
from dspark_model.draft import build_draft_for  # noqa: E402
from dspark_model.export import export_draft  # noqa: E402
from dspark_model.target import load_target  # noqa: E402
from dspark_model.verify import check_speculators_export  # noqa: E402
from dspark_model.verify_eagle3 import check_speculators_eagle3_export  # noqa: E402

TOL = 1e-4
RESULT = ROOT / "benchmarks" / "results" / "speculators_check.json"
SEQ_LEN, ANCHORS = 24, [2, 5, 11, 19]  # speculators needs anchor + block_size < SEQ_LEN (block_size 4)
DRAFTS = {  # name -> DraftConfig fields (2 layers, block 4, rank 16 unless given)
    "markov-full": dict(sequential_head="markov", confidence_head=True),
    "gated-full": dict(sequential_head="gated", confidence_head=True),
    "rnn-full": dict(sequential_head="rnn", confidence_head=True),
    "markov-reduced-40": dict(sequential_head="markov", confidence_head=True, draft_vocab_size=40),
    "dflash": dict(sequential_head="none", confidence_head=False),
    "eagle3-reduced-40": dict(architecture="eagle3", num_layers=1, sequential_head="none", confidence_head=False,
                              draft_vocab_size=40),
    "eagle3-full": dict(architecture="eagle3", num_layers=1, sequential_head="none", confidence_head=False),
}
REDUCED_IDS = torch.arange(0, 200, 5)  # the 40 target ids of the reduced draft vocabulary


def build_target(folder: Path):
    spec = TargetSpec(id="tiny-llama", random={"family": "llama", "num_hidden_layers": 4, "seed": 0})
    target = load_target(spec)
    target.model.save_pretrained(folder)  # model.safetensors + config.json: what speculators reads
    target.tokenizer.save_pretrained(folder)
    return spec, target


def make_export(name: str, fields: dict, target, spec, work: Path, verifier: Path, seed: int):
    """A randomised draft, saved natively and exported for speculators, naming the saved verifier folder."""
    torch.manual_seed(seed)
    cfg = DraftConfig(**{"num_layers": 2, "block_size": 4, "markov_rank": 16, **fields})
    draft = build_draft_for(target, cfg).eval()
    if draft.reduced_vocab:
        draft.set_draft_vocab(REDUCED_IDS)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0.0, 0.3)
    ckpt = save_pretrained(draft, work / f"{name}-ckpt", target_spec=spec)
    out = export_draft(ckpt, work / f"{name}-speculators", "speculators", "fp32", target=target,
                       verifier_path=str(verifier))
    return draft, out


def check_draft(name, fields, target, spec, work, verifier, seed) -> dict:
    """One draft: export it, load it with speculators, compare (dspark_model.verify does the comparing)."""
    draft, export = make_export(name, fields, target, spec, work, verifier, seed)
    gen = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 256, (1, SEQ_LEN), generator=gen) for _ in range(2)]  # two random sequences
    if draft.arch.architecture == "eagle3":  # its training-time test runs over every position: no anchors
        row = check_speculators_eagle3_export(export, draft, target, sequences)
        row["diff"]["logits"] = max(d for k, d in row["diff"].items() if k.startswith("logits_"))
    else:
        row = check_speculators_export(export, draft, target, sequences, ANCHORS)
    del row["scale"], row["notes"]  # notes name the temporary verifier folder
    row["ok"] = (not (row["missing_keys"] or row["unexpected_keys"] or row["mismatched_keys"]
                      or row["weight_problems"]) and all(d <= TOL for d in row["diff"].values()))
    return row


def main() -> int:
    torch.set_num_threads(1)
    version = importlib.metadata.version("speculators")
    with tempfile.TemporaryDirectory(prefix="spec-check-") as tmp:
        work = Path(tmp)
        spec, target = build_target(work / "verifier")
        rows = {name: check_draft(name, fields, target, spec, work, work / "verifier", seed)
                for seed, (name, fields) in enumerate(DRAFTS.items())}
    keys = ("aux_hidden", "logits", "teacher_logits", "confidence", "d2t", "t2d", "lm_head")
    print(f"speculators {version}: max |ours - speculators| per output (tolerance {TOL:g}; '-' = not applicable)")
    print(f"{'draft':<18}" + "".join(f"{k:>15}" for k in keys) + "   load   ok")
    for name, row in rows.items():
        cells = "".join(f"{row['diff'][k]:>15.3g}" if k in row["diff"] else f"{'-':>15}" for k in keys)
        clean = not (row["missing_keys"] or row["unexpected_keys"] or row["mismatched_keys"] or row["weight_problems"])
        print(f"{name:<18}{cells}   {'clean' if clean else 'BAD':>5}   {'yes' if row['ok'] else 'NO'}")
        for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "weight_problems"):
            if row[what]:
                print(f"    {what}: {row[what]}")
    print("note: exported with --verifier-path = the saved verifier folder; draft attention ran with "
          "speculators' 'eager' backend")
    result = {"speculators_version": version, "torch_version": torch.__version__, "tolerance": TOL,
              "target": "tiny random llama (width 64, 4 layers, vocab 272)", "seq_len": SEQ_LEN,
              "anchors": ANCHORS, "sequences_per_draft": 2, "verifier_path": "--verifier-path <saved folder>",
              "speculators_attention": "eager", "drafts": rows, "ok": all(r["ok"] for r in rows.values())}
    atomic_write_json(RESULT, result, indent=2)
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
