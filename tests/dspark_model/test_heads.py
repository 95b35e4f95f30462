"""Sequential heads: the reference definitions (DeepSpec / speculators), and checkpoints of the older names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_model.checkpoint import CheckpointMismatchError, load_draft, save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.heads import SequentialHead
from tests.conftest import tiny_draft_config, tiny_spec


def _random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def test_gated_head_gates_on_hidden_state_and_previous_token_embedding():
    """g = sigmoid(W_g [h ; W1[prev]] + b), feature = g * W1[prev]; the gate sees the previous token too."""
    d, r, V = 12, 5, 30
    head = _random(SequentialHead("gated", V, r, d))
    assert (head.gate_proj.in_features, head.gate_proj.out_features) == (d + r, r)
    h, prev = torch.randn(3, 4, d), torch.randint(0, V, (3, 4))
    e = head.markov_w1.weight[prev]
    gate = torch.sigmoid(torch.cat([h, e], -1) @ head.gate_proj.weight.T + head.gate_proj.bias)
    torch.testing.assert_close(head.features(h, prev), gate * e, rtol=0, atol=1e-6)
    step = torch.stack([head.step(h[:, k], prev[:, k], None)[0] for k in range(4)], 1)
    torch.testing.assert_close(step, head.features(h, prev), rtol=0, atol=0)  # training == sequential drafting


def test_rnn_head_uses_the_reference_name_and_layout():
    d, r = 12, 5
    head = SequentialHead("rnn", 30, r, d)
    assert set(head.state_dict()) == {"markov_w1.weight", "markov_w2.weight", "joint_proj.weight", "joint_proj.bias"}
    assert (head.joint_proj.in_features, head.joint_proj.out_features) == (2 * r + d, 3 * r)


def _rename(path, old: str, new: str) -> None:
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    save_file({k.replace(old, new): v for k, v in state.items()}, str(weights))


def test_old_rnn_checkpoint_loads_under_the_new_name(tmp_path, tiny_target):
    """``rnn_proj`` (older toolkits) is ``joint_proj`` under another name: mapped on load, same logits."""
    draft = _random(build_draft_for(tiny_target, tiny_draft_config(sequential_head="rnn")).eval())
    ckpt = save_pretrained(draft, tmp_path / "ckpt", target_spec=tiny_spec("llama"))
    _rename(ckpt, "markov_head.joint_proj.", "markov_head.rnn_proj.")
    old = load_draft(ckpt, tiny_target)
    assert torch.equal(old.markov_head.joint_proj.weight, draft.markov_head.joint_proj.weight)
    h, prev = torch.randn(2, 4, 64), torch.randint(0, 272, (2, 4))
    assert torch.equal(old.logits(h, prev), draft.logits(h, prev))


def test_old_gated_checkpoint_fails_with_one_clear_line(tmp_path, tiny_target):
    """The old gate read h alone (``gate``: d -> r): another function, so loading it must refuse, not guess."""
    draft = build_draft_for(tiny_target, tiny_draft_config(sequential_head="gated"))
    ckpt = save_pretrained(draft, tmp_path / "ckpt", target_spec=tiny_spec("llama"))
    state = load_file(str(ckpt / "model.safetensors"))
    state["markov_head.gate.weight"] = state.pop("markov_head.gate_proj.weight")[:, :64].contiguous()
    state["markov_head.gate.bias"] = state.pop("markov_head.gate_proj.bias")
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"older dspark-toolkit gated head.*retrain") as err:
        load_draft(ckpt, tiny_target)
    assert "\n" not in str(err.value)
