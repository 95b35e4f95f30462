"""``--verify`` for an EAGLE-3 draft's speculators export: speculators' own ``Eagle3DraftModel`` reads the written
files and must compute our training-time test.

    python -m dspark_model.export <eagle3 checkpoint> --format speculators --verify

The reference is PyPI ``speculators`` 0.9.0 (``speculators.models.eagle3.core``), used when importable:

* loading: ``Eagle3SpeculatorConfig`` and the base ``SpeculatorModel.from_pretrained`` with loading info, in
  float32, attention on its ``eager`` backend (its default flex attention compiles). ``Eagle3DraftModel``'s own
  override cannot be asked for loading info (it reads ``.config`` off the (model, info) pair it gets back), so
  its one extra step, checking the layer ids against the verifier, runs here when the verifier is a local
  folder. The post-load steps are ``verify.finish_speculators_loading``'s: the export's d2t / t2d and LM head are
  kept; the verifier's embedding, final norm and LM head come from a local verifier folder, else from the loaded
  target (nothing is downloaded). Load problems: a missing key other than those three verifier tensors, any
  unexpected key, a tensor that is neither the export's nor the verifier's.
* forward: its training-time test with ``ttt_steps`` = the draft's steps, on seeded random tokens
  (``verify.probe_inputs``) and the target's ``hidden_states`` at the export's
  ``eagle_aux_hidden_state_layer_ids`` (its own count), fed as pair i = (h_i, x_{i+1}); the output of its LM
  head is caught at every step.

Compared with our ``Eagle3Draft`` read back from the same files (``load_eagle3_export``): the three tapped
features (``aux_hidden``: checks the id + 1 conversion), the logits of step k (``logits_k``) at every index
whose gold tokens lie inside the sequence, and for a reduced vocabulary d2t / t2d / lm_head. Both sides run in
float32; the tolerance is ``verify.py``'s.

SGLang's EAGLE-3 layout (``--format deepspec`` for an EAGLE-3 draft) has no reference here, and ``--verify``
refuses it: SGLang is not importable on this machine. That layout is checked by the round-trip test
(``tests/dspark_model/test_eagle3.py``) and against the names read from SGLang's source
(``export_eagle3.SOURCES_CHECKED``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark_model.export_eagle3 import eagle3_format, load_eagle3_export
from dspark_model.export_schema import read_config
from dspark_model.verify import (
    ReferenceUnavailable,
    Verification,
    abs_max,
    finish_speculators_loading,
    float32_target,
    loading_row,
    max_diff,
    merge_diff,
    probe_inputs,
    quiet_references,
    reference_unavailable,
    reference_version,
    speculators_weight_problems,
    vocab_table_diffs,
)

REFERENCE_MODULE = "speculators.models.eagle3.core"
# What speculators may miss in an EAGLE-3 export: the verifier's tensors, shared at serving.
VERIFIER_KEYS = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")
SGLANG_UNVERIFIABLE = (
    "SGLang's EAGLE-3 layout (--format deepspec for an EAGLE-3 draft) has no reference implementation to verify "
    "against: SGLang is not importable on this machine. The layout is checked by the round-trip test and against "
    "SGLang's source names (export_eagle3.SOURCES_CHECKED); export it without --verify, or verify the "
    "--format speculators export of the same checkpoint")


def eagle3_reference_unavailable(fmt: str) -> str | None:
    """None when an EAGLE-3 export in ``fmt`` ("speculators" / "sglang") can be verified here; else one line
    saying why not and how to get the reference."""
    if fmt == "sglang":
        return SGLANG_UNVERIFIABLE
    return reference_unavailable("speculators", REFERENCE_MODULE)


def load_speculators_eagle3(export: Path, target):
    """speculators' Eagle3DraftModel from ``export`` in float32 on the target's device: (model, loading info with
    the verifier's own tensors dropped from ``missing_keys``, notes)."""
    from speculators.models.eagle3 import Eagle3SpeculatorConfig
    from speculators.models.eagle3.core import Eagle3DraftModel
    from speculators.models.utils import resolve_target_layer_ids

    config = Eagle3SpeculatorConfig.from_pretrained(export)
    config.transformer_layer_config._attn_implementation = "eager"
    model, info = super(Eagle3DraftModel, Eagle3DraftModel).from_pretrained(  # the base loader, see above
        export, config=config, output_loading_info=True, dtype=torch.float32)
    notes = finish_speculators_loading(model, target, True, export)  # an EAGLE-3 head is always the draft's
    verifier = config.speculators_config.verifier.name_or_path
    if verifier and Path(verifier).is_dir():
        model.config.eagle_aux_hidden_state_layer_ids = resolve_target_layer_ids(model.target_layer_ids, verifier)
    info = dict(info, missing_keys=[k for k in info.get("missing_keys", []) if k not in VERIFIER_KEYS])
    return model.float().to(target.device).eval(), info, notes


@torch.no_grad()
def speculators_step_logits(model, aux: torch.Tensor, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """speculators' training-time test on aux (1, T, 3d) and tokens ids (1, T): the (1, T, K) logits of each
    step, caught at its LM head. Pair i is (h_i, x_{i+1}): its input ids are ours shifted left by one."""
    caught = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        next_ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        model(hidden_states=aux, input_ids=next_ids, document_ids=torch.zeros_like(ids), ttt_steps=steps)
    finally:
        hook.remove()
    return caught


def check_speculators_eagle3_export(export: Path, draft, target, sequences: list[torch.Tensor]) -> dict:
    """speculators loading ``export`` vs ``draft`` on every sequence: loading report, weight problems, and per
    output the max |ours - speculators| (``diff``) and max |speculators| (``scale``)."""
    model, info, notes = load_speculators_eagle3(Path(export), target)
    row = {**loading_row(info, notes), "diff": {}, "scale": {},
           "weight_problems": speculators_weight_problems(model, Path(export), target, draft)}
    steps = draft.block_size
    for ids in sequences:
        ids = ids.to(target.device)
        with torch.no_grad():
            taps = target.forward(ids).tap_hidden  # (1, T, n_taps*d), ours
            hidden = target.model(ids, output_hidden_states=True).hidden_states
            ours = [draft.logits(state) for state in draft.forward_steps(taps, ids, steps)]  # steps x (1, T, K)
        aux = torch.cat([hidden[i] for i in model.target_layer_ids], dim=-1).float()  # at ITS ids (ours + 1)
        theirs = speculators_step_logits(model, aux, ids, steps)
        merge_diff(row, "aux_hidden", max_diff(draft.select_taps(taps), aux), abs_max(aux))
        for k in range(steps):
            valid = ids.shape[1] - 1 - k  # step k at index i predicts x_{i+k+2}
            b = theirs[k][:, :valid] if k < len(theirs) else None
            merge_diff(row, f"logits_{k + 1}", max_diff(ours[k][:, :valid], b), abs_max(b))
    if draft.reduced_vocab:
        row["diff"].update(vocab_table_diffs(model, draft, target, draft.lm_head.weight))
    return row


def verify_eagle3_export(export_dir: str | Path, target, tolerance: float, sequences: int = 2,
                         seed: int = 0) -> Verification:
    """Load an EAGLE-3 export with ``load_eagle3_export`` and with speculators; compare on random inputs.

    Raises ReferenceUnavailable for SGLang's layout, or when speculators cannot be imported."""
    export_dir = Path(export_dir)
    fmt = eagle3_format(read_config(export_dir))
    why = eagle3_reference_unavailable(fmt)
    if why:
        raise ReferenceUnavailable(why)
    with float32_target(target), quiet_references():
        draft = load_eagle3_export(export_dir, target).float()  # our reading of the very same files
        seqs, _ = probe_inputs(draft.block_size, target.vocab_size, sequences, seed)  # (its anchors are DSpark's)
        row = check_speculators_eagle3_export(export_dir, draft, target, seqs)
    blocks = (f"{sequences} random sequences of {seqs[0].shape[1]} tokens x {draft.block_size} "
              f"training-time-test steps")
    return Verification("speculators", reference_version("speculators"), tolerance, blocks, row)
