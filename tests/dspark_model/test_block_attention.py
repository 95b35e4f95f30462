"""The draft's training attention: flex_attention with a BlockMask computes what dense-mask SDPA computes.

torch 2.13 refuses flex_attention backward on CPU at its entry point (``_validate_device``); the eager
implementation behind it (the unfused reference that also runs on CUDA without compile) is device-neutral,
so these tests lift that one check to compare outputs and gradients on CPU. The compiled CUDA kernel also
relies on the BlockMask's tile tables, checked here against the dense mask.
"""

from __future__ import annotations

import pytest
import torch

from dspark_model.block_attention import block_mask, dense_block_mask, flex_block_mask
from dspark_model.draft import build_draft_for
from tests.conftest import tiny_draft_config

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *tensors: None)


def _anchors():
    """Rows with different anchors: row 0 dense and early, row 1 sparse and late, with padding (1) at its end
    the way batch_anchors pads."""
    row0 = torch.arange(1, 80, 2)  # 40 anchors
    row1 = torch.cat([torch.tensor([7, 60, 120, 200, 297]), torch.ones(35, dtype=torch.long)])
    return torch.stack([row0, row1])  # (2, 40)


def test_block_mask_tiles_cover_the_dense_mask():
    anchors, T, G = _anchors(), 300, 4
    dense = dense_block_mask(anchors, T, G)[:, 0]  # (B, Q, T + Q)
    bm = flex_block_mask(anchors, T, G)
    from torch.nn.attention.flex_attention import create_mask

    Q, KV = dense.shape[1:]
    assert torch.equal(create_mask(bm.mask_mod, 2, 1, Q, KV, device="cpu")[:, 0], dense)
    tiles = bm.to_dense()[:, 0].bool()  # (B, Q tiles, KV tiles): tiles the kernel visits
    tq, tk = bm.BLOCK_SIZE
    for b in range(2):
        for i in range(tiles.shape[1]):
            for j in range(tiles.shape[2]):
                any_true = dense[b, i * tq:(i + 1) * tq, j * tk:(j + 1) * tk].any().item()
                assert tiles[b, i, j].item() == any_true, (b, i, j)
    assert not tiles.all()  # some tiles are skipped: context after a tile's last anchor, other blocks


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_flex_matches_sdpa_outputs_and_gradients(tiny_target, flex_backward_on_cpu, kv_heads):
    torch.manual_seed(0)
    draft = build_draft_for(tiny_target, tiny_draft_config(num_key_value_heads=kv_heads))
    assert draft.layers[0].self_attn.n_heads == 4 and draft.layers[0].self_attn.n_kv == kv_heads
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 300), generator=g)
    with torch.no_grad():
        taps = tiny_target.forward(ids).tap_hidden
    anchors = _anchors()
    weight = torch.randn(2, 40, 4, 64, generator=g)
    results = {}
    for kernel in ("sdpa", "flex"):
        draft.zero_grad()
        x = taps.clone().requires_grad_(True)
        h = draft.forward_train(x, ids, anchors, attention=kernel)  # (B, A, G, d)
        (h * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        results[kernel] = (h.detach(), x.grad, grads)
    (h_s, x_s, g_s), (h_f, x_f, g_f) = results["sdpa"], results["flex"]
    _close(h_f, h_s, "block states")
    _close(x_f, x_s, "gradient of the tapped states")  # entries up to ~100: fp32 rounding is ~5e-5 there
    assert g_s.keys() == g_f.keys() and any("q_proj" in n for n in g_s)
    for name in g_s:
        _close(g_f[name], g_s[name], name)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to fp32 rounding: 1e-5 of the tensor's largest entry (at least 1e-5 absolute). Against an fp64
    run both kernels' gradients err by the same ~6e-7 of that scale."""
    tol = 1e-5 * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: max |flex - sdpa| = {err:.3g} > {tol:.3g}"


def test_kernel_choice():
    from train.loop import attention_kernel
    from train.schema import TrainConfigError

    cpu = torch.device("cpu")
    assert attention_kernel(cpu, "auto") == "sdpa"  # CPU default stays dense SDPA
    assert attention_kernel(cpu, "sdpa") == "sdpa"
    with pytest.raises(TrainConfigError, match="train.attention=flex cannot train on cpu"):
        attention_kernel(cpu, "flex")
    with pytest.raises(ValueError, match="sdpa"):
        block_mask("dense", torch.ones(1, 1, dtype=torch.long), 4, 2)
    from train.schema import OptimConfig, TrainJob, validate

    with pytest.raises(TrainConfigError, match=r"auto\|sdpa\|flex"):
        validate(TrainJob(train=OptimConfig(attention="dense")))
