"""Exports loaded by the reference implementations themselves (slow; each test skips when its reference is
not importable, as on CI, which has no network).

* DeepSpec (github.com/deepseek-ai/DeepSpec): put the root of the repository or of an archive of it on
  PYTHONPATH (``git archive`` of the commit in dspark_model/reference_layouts.json).
* speculators (PyPI): ``pip install --no-deps --target DIR speculators==0.9.0 hs-connectors==0.9.0`` plus
  ``openai loguru pydantic-settings python-dotenv``, DIR on PYTHONPATH.

The fast tests (test_reference_layouts.py) check every export against the layouts recorded from these
references; here the recorded layouts are re-derived from the code that is loaded, and every head type is
loaded and run by the reference and compared with our draft (benchmarks/check_deepspec.py,
benchmarks/check_speculators.py).
"""

from __future__ import annotations

import pytest

from dspark_model.reference import layouts

pytestmark = pytest.mark.slow


def _deepspec():
    pytest.importorskip("deepspec.modeling.dspark", reason="DeepSpec's modeling code is not on PYTHONPATH")


def _speculators():
    pytest.importorskip("speculators.models.dspark", reason="speculators is not on PYTHONPATH")


def test_recorded_deepspec_layout_is_what_its_code_declares():
    _deepspec()
    from benchmarks.record_reference_layouts import deepspec_layout

    fresh, recorded = deepspec_layout(), layouts()["deepspec"]
    assert fresh["weights"] == recorded["weights"]
    assert fresh["config"] == recorded["config"]


def test_deepspec_loads_every_export_and_computes_the_same(tmp_path):
    """No missing / unexpected keys; same block logits and confidences (training forward, cached greedy
    loop round by round); same proposed tokens; greedy output identical to the target's."""
    _deepspec()
    from benchmarks.check_deepspec import run

    rows = run(tmp_path)
    assert not {name: row for name, row in rows.items() if not row["ok"]}
    assert rows["markov-accepted"]["greedy"]["tokens_per_round"] > 2  # accepted blocks: cache rollback exercised


def test_recorded_speculators_layout_is_what_its_code_declares():
    _speculators()
    from benchmarks.record_reference_layouts import speculators_layout

    fresh, recorded = speculators_layout(), layouts()["speculators"]
    for key in ("version", "weights", "only_with_reduced_vocab", "omitted_on_save", "omitted_on_save_reduced_vocab",
                "saved_config"):
        assert fresh[key] == recorded[key], key


def test_speculators_loads_every_head_and_computes_the_same(tmp_path):
    _speculators()
    from benchmarks.check_speculators import DRAFTS, build_target, check_draft

    spec, target = build_target(tmp_path / "verifier")
    for seed, (name, fields) in enumerate(DRAFTS.items()):
        row = check_draft(name, fields, target, spec, tmp_path, tmp_path / "verifier", seed)
        assert row["ok"], (name, row)
