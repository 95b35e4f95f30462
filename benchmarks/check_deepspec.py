"""Cross-check: our deepspec-format exports, loaded by DeepSpec's own modeling code, compute what our draft
computes, in DeepSpec's training forward and in its cached greedy decoding loop.

    PYTHONPATH=/path/to/DeepSpec nice -n 10 .venv/bin/python benchmarks/check_deepspec.py

DeepSpec (github.com/deepseek-ai/DeepSpec, the DSpark paper's reference implementation) is not a package:
put the root of its repository (or of an archive of it) on PYTHONPATH; ``DEEPSPEC_COMMIT`` may name the commit
for the record. It runs on CPU with this project's torch / transformers, with one adaptation made here only:
DeepSpec calls ``DynamicCache.crop(n)`` meaning "keep n positions" (transformers <= 5.10), which transformers
5.24 reads as a count to remove; ``old_crop_meaning`` maps it back while the check runs.

Targets: tiny random Qwen3 models (width 64, 4 layers), one with untied embeddings (its ``lm_head`` differs
from ``embed_tokens``: an export whose config said ``tie_word_embeddings: true`` would load the wrong head) and
one tied. Drafts (2 layers, block 4, rank 16, randomised weights): every sequential head (markov, gated, rnn)
and DFlash on the untied target, markov on the tied one. Each is exported with ``--format deepspec`` at fp32
and loaded with ``Qwen3DSparkModel.from_pretrained``; compared:

* loading: no missing / unexpected keys, and ``num_anchors`` = the training run's ``train.max_anchors``;
* training forward (DeepSpec's ``forward`` with flex attention, anchors pinned through ``loss_mask``): block
  logits after the sequential head, and confidence logits, against ours on the same tokens and target states;
* greedy decoding with DeepSpec's own loop (``generate_decoding_sample`` driving its evaluator's
  propose / update, sdpa attention, a growing ``DynamicCache``): in every round, the proposed tokens equal our
  ``propose`` on our incrementally grown context cache, the block logits equal our training forward on the
  same block, and the confidences equal ours; its output equals plain greedy decoding of the target.

Exit status 1 when a difference exceeds 1e-5, a token differs, or loading reports missing / unexpected keys.
Result: benchmarks/results/deepspec_check.json. Loading and the training-forward comparison are
``dspark_model/verify.py``'s, the code behind ``python -m dspark_model.export --format deepspec --verify``; this
script adds the targets, the exports and the decoding loop.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

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
from dspark_model.verify import check_deepspec_export, max_diff, old_crop_meaning  # noqa: E402

TOL = 1e-5
RESULT = ROOT / "benchmarks" / "results" / "deepspec_check.json"
SEQ_LEN, ANCHORS = 24, [2, 6, 11, 17]  # anchors >= 3 apart: each is the only valid anchor of its loss-mask pair
NUM_ANCHORS = 24  # the training run's train.max_anchors, recorded in the checkpoint's resolved config
PROMPT_LEN, NEW_TOKENS = 10, 24
TARGETS = {"untied": {"tie_word_embeddings": False}, "tied": {}, "constant": {"tie_word_embeddings": False}}
MARKOV = dict(sequential_head="markov", confidence_head=True)
DRAFTS = {  # name -> (target, DraftConfig fields); 2 layers, block 4, rank 16
    "markov": ("untied", MARKOV),
    "gated": ("untied", dict(sequential_head="gated", confidence_head=True)),
    "rnn": ("untied", dict(sequential_head="rnn", confidence_head=True)),
    "dflash": ("untied", dict(sequential_head="none", confidence_head=False)),
    "markov-tied-target": ("tied", MARKOV),
    # Random drafts are never accepted; on the "constant" target (zero LM head: greedy emits token 0 forever)
    # this one is, whenever its Markov bias favours token 0, so rounds advance by 1 to 5 tokens.
    "markov-accepted": ("constant", MARKOV),
}


def build_target(name: str, overrides: dict):
    spec = TargetSpec(id=f"tiny-qwen3-{name}", path=None,
                      random={"family": "qwen3", "num_hidden_layers": 4, "seed": 0, **overrides})
    target = load_target(spec)
    if name == "constant":
        target.lm_head.weight.data.zero_()  # all logits 0: greedy picks token 0 (the first maximum)
    return spec, target


def make_export(name: str, fields: dict, target, spec, work: Path, seed: int):
    """A randomised draft, saved natively (with its training config) and exported for DeepSpec."""
    torch.manual_seed(seed)
    draft = build_draft_for(target, DraftConfig(num_layers=2, block_size=4, markov_rank=16, **fields)).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0.0, 0.3)
        if target.lm_head.weight.count_nonzero() == 0 and draft.markov_head is not None:
            head = draft.markov_head  # bias toward token 0 = 10 W1[0] . W1[prev]: always after a 0, else by sign
            head.markov_w2.weight[0] = 10 * head.markov_w1.weight[0]
    extra = {"resolved_config": {"train": {"max_anchors": NUM_ANCHORS}}}
    ckpt = save_pretrained(draft, work / f"{name}-ckpt", target_spec=spec, extra=extra)
    return draft, export_draft(ckpt, work / f"{name}-deepspec", "deepspec", "fp32", target=target)


def deepspec_greedy(model, target, prompt) -> tuple[torch.Tensor, list[dict]]:
    """DeepSpec's own greedy loop with its evaluator's propose/update; returns output ids and every round's
    (start, proposed tokens, block logits after the sequential head, confidence logits)."""
    from deepspec.eval.base_evaluator import generate_decoding_sample
    from deepspec.eval.dspark.evaluator import Qwen3DSparkEvaluator

    evaluator = object.__new__(Qwen3DSparkEvaluator)  # only its propose / update methods are used
    evaluator.draft_model = model
    evaluator.args = SimpleNamespace(temperature=0.0, confidence_threshold=0.0)
    rounds, sample = [], model.sample_draft_tokens

    def catch_logits(*args, **kwargs):
        tokens, logits = sample(*args, **kwargs)
        rounds[-1]["logits"] = logits[0]
        return tokens, logits

    def propose(**kwargs):
        rounds.append({"start": kwargs["start"]})
        proposal = evaluator._propose(**kwargs)
        rounds[-1].update(tokens=proposal.verify_input_ids[0, 1:], confidence=proposal.confidence_logits)
        return proposal

    model.sample_draft_tokens = catch_logits
    try:
        with old_crop_meaning(), torch.no_grad():
            out = generate_decoding_sample(
                target_model=target.model, input_ids=prompt, max_new_tokens=NEW_TOKENS,
                max_proposal_tokens=model.block_size, temperature=0.0, stop_token_ids=None,
                init_context=evaluator._init_context, propose=propose, update=evaluator._update)
    finally:
        del model.sample_draft_tokens
    return out.output_ids, rounds


def greedy_rounds(model, draft, target, prompt) -> dict:
    """Every round of DeepSpec's loop against our draft: tokens, block logits, confidences."""
    out_ids, rounds = deepspec_greedy(model, target, prompt)
    cache = draft.new_cache()
    worst = {"logits": 0.0, "confidence": None if draft.confidence_head is None else 0.0, "token_mismatches": 0}
    with torch.no_grad():
        taps = target.forward(out_ids).tap_hidden
        for r in rounds:
            p, tokens = r["start"], r["tokens"]
            draft.extend_context(cache, taps[:, cache.length:p])  # our context grows as decoding does
            ours = draft.propose(cache, out_ids[:, p], temperature=0.0)
            worst["token_mismatches"] += int((ours.tokens[0] != tokens).sum())
            block = torch.cat([out_ids[:, :p + 1], tokens[None]], dim=1)  # the block as DeepSpec drafted it
            h = draft.forward_train(target.forward(block).tap_hidden, block, torch.tensor([[p]]))[0]
            prev = draft.block_inputs(block, torch.tensor([[p]]))[0][0]
            worst["logits"] = max(worst["logits"], max_diff(r["logits"], draft.logits(h, prev)[0]))
            conf = None if r["confidence"] is None else r["confidence"][0]
            ours_conf = draft.confidence_logits(h, prev)
            d = max_diff(conf, None if ours_conf is None else ours_conf[0])
            worst["confidence"] = None if d is None and worst["confidence"] is None else max(worst["confidence"], d)
        plain = prompt
        while plain.shape[1] < out_ids.shape[1]:  # plain greedy decoding of the target, no stop token
            plain = torch.cat([plain, target.model(plain).logits[:, -1:].argmax(-1)], dim=1)
    worst.update(rounds=len(rounds), tokens_per_round=round((out_ids.shape[1] - prompt.shape[1]) / len(rounds), 2),
                 greedy_identical=bool(torch.equal(plain, out_ids)))
    return worst


def check_draft(name, target_name, fields, targets, work, seed) -> dict:
    spec, target = targets[target_name]
    draft, export = make_export(name, fields, target, spec, work, seed)
    config = json.loads((export / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, SEQ_LEN), generator=gen)
    checked = check_deepspec_export(export, draft, target, [ids], ANCHORS)  # dspark_model.verify compares
    model = checked.pop("model")
    row = {"target": target_name, **{k: checked[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")},
           "num_anchors": config.get("num_anchors"), "tie_word_embeddings": config.get("tie_word_embeddings"),
           "lm_head_equals_target": checked["lm_head_equals_target"],
           "training_forward": {k: checked["diff"].get(k) for k in ("logits", "confidence")}}
    row["greedy"] = greedy_rounds(model, draft, target, torch.randint(0, 256, (1, PROMPT_LEN), generator=gen))
    diffs = [*row["training_forward"].values(), row["greedy"]["logits"], row["greedy"]["confidence"]]
    row["ok"] = (not (row["missing_keys"] or row["unexpected_keys"] or row["mismatched_keys"])
                 and row["num_anchors"] == NUM_ANCHORS and row["tie_word_embeddings"] is False
                 and row["lm_head_equals_target"] and all(d is None or d <= TOL for d in diffs)
                 and row["greedy"]["token_mismatches"] == 0 and row["greedy"]["greedy_identical"])
    return row


def run(work: Path) -> dict:
    torch.manual_seed(0)
    targets = {name: build_target(name, overrides) for name, overrides in TARGETS.items()}
    return {name: check_draft(name, t, fields, targets, work, seed)
            for seed, (name, (t, fields)) in enumerate(DRAFTS.items())}


def _cell(d: float | None, width: int) -> str:
    return f"{'-':>{width}}" if d is None else f"{d:>{width}.3g}"


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="deepspec-check-") as tmp:
        rows = run(Path(tmp))
    print(f"DeepSpec {os.environ.get('DEEPSPEC_COMMIT', '(commit not given)')}: max |ours - DeepSpec| "
          f"(tolerance {TOL:g})")
    print(f"{'draft':<20}{'train logits':>14}{'train conf':>12}{'loop logits':>13}{'loop conf':>11}"
          f"{'rounds':>8}{'tok/round':>10}{'tokens':>8}   load   ok")
    for name, r in rows.items():
        clean = not (r["missing_keys"] or r["unexpected_keys"] or r["mismatched_keys"])
        g, t = r["greedy"], r["training_forward"]
        print(f"{name:<20}{_cell(t['logits'], 14)}{_cell(t['confidence'], 12)}{_cell(g['logits'], 13)}"
              f"{_cell(g['confidence'], 11)}"
              f"{g['rounds']:>8}{g['tokens_per_round']:>10}{'same' if not g['token_mismatches'] else 'DIFF':>8}   "
              f"{'clean' if clean else 'BAD':>5}   {'yes' if r['ok'] else 'NO'}")
    import transformers

    result = {"deepspec_commit": os.environ.get("DEEPSPEC_COMMIT"), "torch_version": torch.__version__,
              "transformers_version": transformers.__version__, "tolerance": TOL,
              "targets": "tiny random qwen3 (width 64, 4 layers, vocab 272): untied, tied, untied with a zero "
                         "LM head (constant greedy output)",
              "seq_len": SEQ_LEN, "anchors": ANCHORS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
              "crop_adaptation": "DynamicCache.crop(n > 0) = keep n positions (DeepSpec's transformers 5.10 meaning)",
              "drafts": rows, "ok": all(r["ok"] for r in rows.values())}
    atomic_write_json(RESULT, result, indent=2)
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
