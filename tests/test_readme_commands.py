"""The README's data_prep and train commands for one target agree on the data folder (no path typed between)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.test_configs import _compose

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands(stage: str, target: str) -> list[list[str]]:
    """Hydra overrides of every README code-block line that runs ``-m <stage> target=<target>``."""
    found, in_code = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        line = line.split("#")[0]
        if not in_code:
            continue
        if re.search(rf"-m {stage}\b", line) and f"target={target}" in line:
            args = shlex.split(line)
            found.append([a for a in args[args.index(stage) + 1:] if "=" in a and not a.startswith("-")])
    return found


@pytest.mark.parametrize("target", ["qwen2.5-7b"])
def test_readme_train_reads_what_readme_data_prep_writes(target):
    from data_prep.pipeline import resolve_out_dir
    from data_prep.store import default_data_dir

    preps, trains = _commands("data_prep", target), _commands("train", target)
    assert preps and len(trains) >= 2, "the README lost its GPU commands"
    written = {resolve_out_dir(_compose("data_prep", o)) for o in preps}
    for overrides in trains:
        job = _compose("train", overrides)
        read = Path(job.data.path) if job.data.path else default_data_dir(job.data.prompts, job.target.id)
        assert read in written, f"`python -m train {' '.join(overrides)}` reads {read}, data_prep writes {written}"


@pytest.mark.parametrize("target", ["qwen2.5-7b"])
def test_readme_gpu_commands_make_and_read_reference_length_rows(target):
    """The README's GPU data_prep writes rows of the reference length (4096 tokens, answers long enough to
    fill them) and its train commands read those rows whole; the CPU defaults stay as the demo needs them."""
    preps, trains = _commands("data_prep", target), _commands("train", target)
    for overrides in preps:
        job = _compose("data_prep", overrides)
        assert job.max_length == 4096 and job.generation.max_new_tokens >= 2048, overrides
        for train_overrides in trains:
            assert _compose("train", train_overrides).data.max_length >= job.max_length, train_overrides
    cpu = _compose("data_prep", [])  # scripts/demo.sh, benchmarks/reference.py and `python -m data_prep`
    assert (cpu.max_length, cpu.generation.max_new_tokens, cpu.generation.max_batch_tokens) == (2048, 256, 32768)
    for recipe in ("train=demo", "train=reference"):
        assert _compose("train", [recipe]).data.max_length == 1024
