"""``python -m dspark_model.export --verify``: the reference implementation of the format reads the export and
must compute our block logits and confidences; fail closed (nothing written) when it cannot or does not.

The slow tests need the references on PYTHONPATH (each skips cleanly otherwise):
speculators 0.9.0 (``pip install --no-deps --target DIR speculators==0.9.0 hs-connectors==0.9.0`` plus
``openai loguru pydantic-settings python-dotenv``) and DeepSpec's source (``git archive`` of the commit in
``dspark_model/reference_layouts.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dspark_model import verify, verify_eagle3
from dspark_model.checkpoint import save_pretrained
from dspark_model.draft import build_draft_for
from dspark_model.export import main
from dspark_model.target import load_target
from tests.conftest import tiny_draft_config, tiny_spec

HEADS = ["markov", "gated", "rnn", "none"]  # none = DFlash (no sequential, no confidence head)


def make_ckpt(path: Path, family: str, head: str, seed: int = 0, **fields) -> Path:
    """A draft of the tiny target with random (not default-initialised) weights, saved natively. head "eagle3":
    an EAGLE-3 draft (one layer, 3 steps)."""
    if head == "eagle3":
        head, fields = "none", dict(architecture="eagle3", num_layers=1, block_size=3, **fields)
    target = load_target(tiny_spec(family))
    torch.manual_seed(seed)
    draft = build_draft_for(target, tiny_draft_config(sequential_head=head, confidence_head=head != "none",
                                                      **fields)).eval()
    if draft.reduced_vocab:
        draft.set_draft_vocab(torch.arange(0, 200, 5))
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0.0, 0.3)
    return save_pretrained(draft, path, target_spec=tiny_spec(family))


def run_verify(tmp_path, ckpt, fmt, *extra) -> tuple[int, str]:
    out = tmp_path / f"out-{fmt}"
    rc = main([str(ckpt), "--format", fmt, "--out", str(out), "--verify", *extra])
    return rc, out


# ---- fast: no reference needed -----------------------------------------------------------------------------
def test_native_has_nothing_to_verify_against(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ckpt", "llama", "markov")
    rc, out = run_verify(tmp_path, ckpt, "native")
    assert rc == 2 and not out.exists()
    assert "native format has none" in capsys.readouterr().err


@pytest.mark.parametrize("head, module", [("markov", "speculators.models.dspark"),
                                          ("eagle3", "speculators.models.eagle3.core")])
def test_unimportable_reference_fails_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, head, module):
    real_import = verify.importlib.import_module

    def no_speculators(name, *args):
        if name.startswith("speculators"):
            raise ImportError("No module named 'speculators'")
        return real_import(name, *args)

    monkeypatch.setattr(verify.importlib, "import_module", no_speculators)
    ckpt = make_ckpt(tmp_path / "ckpt", "llama", head)
    rc, out = run_verify(tmp_path, ckpt, "speculators")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists() and not list(tmp_path.glob(".out-*"))
    assert err[-1].startswith(f"error: --verify: speculators: {module} is not importable")
    assert "PYTHONPATH" in err[-1] and err[-1].endswith("nothing was written")


def test_eagle3_sglang_layout_has_no_reference_and_says_so(tmp_path, capsys):
    """An EAGLE-3 draft's --format deepspec is SGLang's EAGLE-3 layout: nothing importable checks it here."""
    ckpt = make_ckpt(tmp_path / "ckpt", "llama", "eagle3")
    rc, out = run_verify(tmp_path, ckpt, "deepspec")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and not out.exists() and not list(tmp_path.glob(".out-*"))
    assert len(err) == 1 and "SGLang is not importable on this machine" in err[0]
    assert "round-trip test" in err[0] and err[0].endswith("nothing was written")


def test_tolerance_scales_with_the_reference_outputs():
    row = {"diff": {"logits": 5e-4, "confidence": 2e-4}, "scale": {"logits": 10.0, "confidence": 0.5}}
    result = verify.Verification("speculators", "speculators 0.9.0", 1e-4, "2 sequences", row)
    assert result.failed == ["confidence"]  # 5e-4 <= 1e-4 * 10 passes; 2e-4 > 1e-4 * max(1, 0.5) fails
    assert "FAILED confidence" in result.lines()[-1]
    clean = verify.Verification("deepspec", "DeepSpec x", 1e-4, "2 sequences",
                                {"diff": {"logits": 1e-6}, "scale": {"logits": 3.0}, "missing_keys": ["fc.weight"]})
    assert not clean.ok and clean.load_problems == ["missing_keys: ['fc.weight']"]
    teacher = verify.Verification("speculators", "s", 1e-4, "x", {"diff": {"teacher_logits": 0.5}, "scale": {}})
    assert teacher.ok and "teacher_logits 0.5" in teacher.lines()[-1]  # reported, not gating


def test_float32_target_is_restored_exactly():
    target = load_target(tiny_spec("llama"))
    target.model.to(torch.bfloat16)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    with verify.float32_target(target):
        assert target.embed.weight.dtype == torch.float32 and target.lm_head.weight.dtype == torch.float32
    after = target.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("block_size", [2, 4, 7, 16])
def test_probe_anchors_are_the_only_valid_ones_for_both_references(block_size):
    (ids,), anchors = verify.probe_inputs(block_size, vocab_size=272, sequences=1)
    T = ids.shape[1]
    assert all(a + block_size < T for a in anchors)  # speculators: a block fits before the end
    assert all(b - a >= 3 for a, b in zip(anchors, anchors[1:]))  # DeepSpec: loss_mask pairs stay apart


# ---- slow: the references themselves ------------------------------------------------------------------------
def _needs(fmt: str) -> None:
    why = verify.reference_unavailable(fmt)
    if why:
        pytest.skip(why)


def _report(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("verify: max |ours")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("head", [*HEADS, "markov-reduced"])
def test_speculators_verify_passes_for_every_head(tmp_path, capsys, head):
    _needs("speculators")
    fields = {"draft_vocab_size": 40} if head == "markov-reduced" else {}
    ckpt = make_ckpt(tmp_path / "ckpt", "llama", head.split("-")[0], **fields)
    rc, out = run_verify(tmp_path, ckpt, "speculators", "--dtype", "bf16")
    err = capsys.readouterr().err
    line = _report(err)
    assert rc == 0 and (out / "model.safetensors").is_file(), err
    assert line.endswith(": ok") and "logits" in line and ("confidence" in line) == (head != "none")
    assert float(re.search(r"logits ([0-9.e+-]+)", line).group(1)) < 1e-4
    assert "verifier weights taken from the loaded target" in err  # tiny-llama is no local folder
    if head == "markov-reduced":
        assert "d2t 0" in line and "lm_head 0" in line


@pytest.mark.slow
@pytest.mark.parametrize("fields", [{"draft_vocab_size": 40}, {}], ids=["reduced-40", "full-vocab"])
def test_speculators_verify_passes_for_eagle3(tmp_path, capsys, fields):
    _needs("speculators")
    ckpt = make_ckpt(tmp_path / "ckpt", "llama", "eagle3", **fields)
    rc, out = run_verify(tmp_path, ckpt, "speculators", "--dtype", "bf16")
    err = capsys.readouterr().err
    line = _report(err)
    assert rc == 0 and (out / "model.safetensors").is_file() and (out / "README.md").is_file(), err
    assert line.endswith(": ok") and "3 training-time-test steps" in line and "aux_hidden 0" in line
    assert max(float(d) for d in re.findall(r"logits_\d ([0-9.e+-]+)", line)) < 1e-4
    assert ("d2t 0, t2d 0, lm_head 0" in line) == bool(fields)
    assert "verifier weights taken from the loaded target" in err


@pytest.mark.slow
@pytest.mark.parametrize("head, extra", [(h, ()) for h in HEADS] + [("markov", ("--no-embeddings",))])
def test_deepspec_verify_passes_for_every_head(tmp_path, capsys, head, extra):
    _needs("deepspec")
    ckpt = make_ckpt(tmp_path / "ckpt", "qwen3", head)
    rc, out = run_verify(tmp_path, ckpt, "deepspec", "--dtype", "bf16", *extra)
    err = capsys.readouterr().err
    line = _report(err)
    assert rc == 0 and (out / "model.safetensors").is_file(), err
    assert line.endswith(": ok") and ("confidence" in line) == (head != "none")
    if extra:
        assert "taken from the loaded target" in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt, family, head", [("speculators", "llama", "markov"), ("deepspec", "qwen3", "markov"),
                                               ("speculators", "llama", "eagle3")])
def test_a_draft_the_reference_disagrees_with_is_not_written(tmp_path, capsys, monkeypatch, fmt, family, head):
    """Our side reading one weight differently (here: the first layer's attention output projection off by 1%;
    a uniform scale of ``fc`` would vanish in the RMSNorm after it) must fail the check."""
    _needs(fmt)
    module, loader = (verify_eagle3, "load_eagle3_export") if head == "eagle3" else (verify, "load_export")
    real_load = getattr(module, loader)

    def skewed(*args, **kwargs):
        draft = real_load(*args, **kwargs)
        with torch.no_grad():
            draft.layers[0].self_attn.o_proj.weight.mul_(1.01)
        return draft

    monkeypatch.setattr(module, loader, skewed)
    ckpt = make_ckpt(tmp_path / "ckpt", family, head)
    rc, out = run_verify(tmp_path, ckpt, fmt)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    assert "FAILED" in _report(err) and err.strip().splitlines()[-1].endswith("nothing was written")


@pytest.mark.slow
def test_deepspec_without_a_class_for_the_family_says_so(tmp_path, capsys):
    _needs("deepspec")
    ckpt = make_ckpt(tmp_path / "ckpt", "llama", "markov")
    rc, out = run_verify(tmp_path, ckpt, "deepspec")
    assert rc == 2 and not out.exists()
    assert "has no LlamaDSparkModel" in capsys.readouterr().err
