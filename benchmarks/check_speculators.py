"""Cross-check: our speculators-format exports, loaded by the reference ``speculators`` package, compute
what our own draft computes.

    PYTHONPATH=/path/to/speculators nice -n 10 .venv/bin/python benchmarks/check_speculators.py

``speculators`` is not a dependency of this toolkit: install it anywhere and put it on PYTHONPATH. The script
builds a tiny random Llama target (width 64, 4 layers), saves it as a plain Hugging Face folder (the verifier
speculators reads its embedding, final norm and LM head from), then for five drafts (Markov, gated and rnn
heads over the full vocabulary, a Markov head over a 40-token draft vocabulary, DFlash) randomises the
weights, saves and exports them (speculators, fp32, ``--verifier-path`` = the saved verifier folder), loads
each export with ``speculators``' own ``DSparkDraftModel`` and runs its training forward on the same tokens,
anchors and tapped target states as ours.

speculators is fed the verifier's ``hidden_states`` at the export's ``aux_hidden_state_layer_ids`` (its own
convention), so ``aux_hidden`` checks our id + 1 conversion. Compared per draft: those features against our
taps, block logits over the draft vocabulary after the Markov correction, confidence logits, the teacher
logits speculators rebuilds from the verifier (its verifier_norm + verifier_lm_head), and, for the reduced
vocabulary, the loaded d2t / t2d / lm_head against ours. Every tensor of the loaded model must
equal the export's or the verifier's (nothing left at its random / NaN initialisation). Exit status 1 when a
difference exceeds 1e-4 or loading reports missing / unexpected keys. Result:
benchmarks/results/speculators_check.json.

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
from unittest import mock

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

TOL = 1e-4
RESULT = ROOT / "benchmarks" / "results" / "speculators_check.json"
SEQ_LEN, ANCHORS = 24, [2, 5, 11, 19]  # speculators needs anchor + block_size < SEQ_LEN (block_size 4)
DRAFTS = {  # name -> DraftConfig fields (2 layers, block 4, rank 16 for all)
    "markov-full": dict(sequential_head="markov", confidence_head=True),
    "gated-full": dict(sequential_head="gated", confidence_head=True),
    "rnn-full": dict(sequential_head="rnn", confidence_head=True),
    "markov-reduced-40": dict(sequential_head="markov", confidence_head=True, draft_vocab_size=40),
    "dflash": dict(sequential_head="none", confidence_head=False),
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
    cfg = DraftConfig(num_layers=2, block_size=4, markov_rank=16, **fields)
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


def load_reference(export: Path):
    """speculators' DSparkDraftModel from the export, plus its loading report (missing / unexpected keys)."""
    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig

    config = DSparkSpeculatorConfig.from_pretrained(export)
    config.transformer_layer_config._attn_implementation = "eager"
    model, info = DSparkDraftModel.from_pretrained(export, config=config, output_loading_info=True)
    # With output_loading_info, SpeculatorModel.from_pretrained hands back the tuple before its two
    # post-load steps; run them as it would (no t2d/d2t given: the checkpoint's own tables are kept).
    model.load_vocab_mappings(None, None)
    model.load_verifier_weights()
    return model.eval(), info


def reference_outputs(model, taps, ids, last_hidden):
    """Run speculators' training forward and catch what it hands to its loss: (logits, teacher, confidence)."""
    import speculators.models.dspark.core as core

    seen = {}

    def catch(logits, targets, confidence_logits, *args, **kwargs):
        seen.update(logits=logits, targets=targets, conf=confidence_logits)
        return torch.zeros(()), {}

    loss_mask = torch.zeros_like(ids)
    loss_mask[0, ANCHORS] = 1  # the only valid positions: select_anchors must pick exactly these
    with mock.patch.object(core, "compute_metrics", catch), torch.no_grad():
        model(hidden_states=taps, input_ids=ids, loss_mask=loss_mask, verifier_last_hidden_states=last_hidden,
              document_ids=torch.zeros_like(ids), max_anchors=len(ANCHORS))
    A, G = len(ANCHORS), model.block_size
    conf = None if seen["conf"] is None else seen["conf"].view(A, G)
    return seen["logits"].view(A, G, -1), seen["targets"].view(A, G, -1), conf


def our_outputs(draft, target, ids):
    """Our draft on the same blocks: (logits, teacher logits, confidence), plus the tap / pre-norm states."""
    last = {}
    hook = target.model.get_decoder().layers[-1].register_forward_hook(
        lambda m, i, o: last.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        out = target.forward(ids)
    finally:
        hook.remove()
    anchors = torch.tensor([ANCHORS])
    with torch.no_grad():
        h = draft.forward_train(out.tap_hidden, ids, anchors).flatten(0, 1)  # (A, G, d)
        prev, _, _ = draft.block_inputs(ids, anchors)
        prev = prev.flatten(0, 1)
        pos = anchors[0, :, None] + torch.arange(draft.block_size)  # slot k at p + k predicts x_{p+k+1}
        final = out.final_hidden[0, pos]
        teacher = draft.teacher_logits(final) if draft.reduced_vocab else target.logits(final).float()
        return (draft.logits(h, prev), teacher, draft.confidence_logits(h, prev)), out.tap_hidden, last["h"]


def weight_problems(model, export: Path, target, draft) -> list[str]:
    """Every tensor of the loaded model must come from the export or the verifier, and nothing may be NaN."""
    from safetensors.torch import load_file

    exported = load_file(str(export / "model.safetensors"))
    rows = draft.draft_to_target if draft.reduced_vocab else slice(None)
    verifier = {"embed_tokens.weight": target.embed.weight, "verifier_lm_head.weight": target.lm_head.weight[rows],
                "lm_head.weight": target.lm_head.weight[rows],
                "verifier_norm.weight": target.model.get_decoder().norm.weight}
    state = model.state_dict()
    p = [f"{k}: in the export, not in the speculators model" for k in exported if k not in state]
    for k, v in state.items():
        if v.is_floating_point() and v.isnan().any():
            p.append(f"{k}: NaN (never loaded)")
        elif k in exported:
            if not torch.equal(v, exported[k].to(v.dtype)):
                p.append(f"{k}: differs from the export")
        elif k in verifier:
            if not torch.equal(v, verifier[k].to(v.dtype)):
                p.append(f"{k}: differs from the verifier's")
        else:
            p.append(f"{k}: neither in the export nor the verifier (left at its initialisation)")
    return p


def max_diff(a, b) -> float | None:
    if a is None and b is None:
        return None
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def check_draft(name, fields, target, spec, work, verifier, seed) -> dict:
    draft, export = make_export(name, fields, target, spec, work, verifier, seed)
    model, info = load_reference(export)
    row = {"missing_keys": sorted(info.get("missing_keys", [])),
           "unexpected_keys": sorted(info.get("unexpected_keys", [])),
           "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])),
           "weight_problems": weight_problems(model, export, target, draft), "diff": {}}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):  # two random sequences
        ids = torch.randint(0, 256, (1, SEQ_LEN), generator=gen)
        ours, taps, last_hidden = our_outputs(draft, target, ids)
        # speculators' input: the verifier's hidden_states at ITS aux ids (hidden_states indices, our id + 1)
        with torch.no_grad():
            hs = target.model(ids, output_hidden_states=True).hidden_states
        aux = torch.cat([hs[i] for i in model.target_layer_ids], dim=-1)
        theirs = reference_outputs(model, aux, ids, last_hidden)
        for key, a, b in zip(("aux_hidden", "logits", "teacher_logits", "confidence"), (taps, *ours),
                             (aux, *theirs)):
            d = max_diff(a, b)
            if d is not None:
                row["diff"][key] = max(d, row["diff"].get(key, 0.0))
    if draft.reduced_vocab:
        d2t = draft.draft_to_target - torch.arange(draft.out_vocab_size)
        t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
        t2d[draft.draft_to_target] = True
        row["diff"]["d2t"] = max_diff(model.d2t, d2t)
        row["diff"]["t2d"] = float((model.t2d != t2d).sum())  # number of disagreeing entries
        row["diff"]["lm_head"] = max_diff(model.lm_head.weight, target.lm_head.weight[draft.draft_to_target])
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
