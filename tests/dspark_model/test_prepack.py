"""Prepacked GEMM weights: same layers, same results, only the packed row counts take the packed kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark_model.prepack import PackedLinear, prepack_linears, prepack_problem, unpack_linears
from eval.speculative import speculative_generate
from tests.conftest import tiny_draft_config, tiny_spec

pytestmark = pytest.mark.skipif(prepack_problem(nn.Linear(4, 4)) is not None,
                                reason="this torch build has no MKL packed GEMM")


class Scaled(nn.Linear):
    """A Linear subclass computing something else: packing must leave it alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 32, bias=False), Scaled(32, 8))


def test_packed_rows_match_the_plain_kernel_and_other_rows_are_untouched(monkeypatch):
    model = _model()
    keys = list(model.state_dict())
    xs = {n: torch.randn(1, n, 48) for n in (1, 3, 5, 8)}
    with torch.no_grad():
        before = {n: model(x) for n, x in xs.items()}
    assert prepack_linears(model, [5, 8]) == 2
    assert [type(m) for m in model] == [PackedLinear, nn.GELU, PackedLinear, Scaled]
    assert list(model.state_dict()) == keys  # the packs are not state
    calls = []
    real = torch.ops.mkl._mkl_linear
    with torch.no_grad():
        for n, x in xs.items():
            out = model(x)
            if n in (5, 8):
                assert torch.allclose(out, before[n], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(out, before[n])  # the plain kernel, bit for bit
    # the packed kernel really runs for the packed counts, and only for those

    def spy(x, *rest):
        calls.append(x.shape[0])
        return real(x, *rest)

    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", spy)
    with torch.no_grad():
        for x in xs.values():
            model(x)
    assert sorted(calls) == [5, 5, 8, 8]


def test_autograd_takes_the_plain_kernel_and_unpack_restores_linear():
    model = _model()
    prepack_linears(model, [4])
    x = torch.randn(4, 48, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    unpack_linears(model)
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, Scaled]
    assert not hasattr(model[0], "_packs")
    prepack_linears(model, [4])
    model[0].__class__ = nn.Linear  # switched back to time the plain kernel (eval.gamma_tuning does so)
    unpack_linears(model)  # its packs go too
    assert not any(hasattr(m, "_packs") for m in model) and type(model[2]) is nn.Linear


def test_packing_is_refused_with_a_reason_for_non_fp32_weights():
    model = _model().to(torch.bfloat16)
    assert "bfloat16" in prepack_problem(model)
    assert prepack_linears(model, [8]) == 0
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match=">= 1"):
        prepack_linears(_model(), [0])


def test_speculative_decoding_with_a_prepacked_target_stays_greedy_identical():
    from dspark_model.draft import build_draft_for
    from dspark_model.target import load_target

    torch.manual_seed(0)
    target = load_target(tiny_spec("llama", layers=3, seed=3, initializer_range=0.3))
    draft = build_draft_for(target, tiny_draft_config()).eval()
    prompt = [5, 9, 17, 33, 2, 71]
    plain = speculative_generate(target, draft, prompt, 24, 0.0)
    assert prepack_linears(target.model, [draft.block_size + 1]) > 0
    packed = speculative_generate(target, draft, prompt, 24, 0.0)
    with torch.no_grad():
        reference = target.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                          min_new_tokens=24)[0, len(prompt):].tolist()
    assert packed.tokens == plain.tokens == reference
