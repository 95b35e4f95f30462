"""The calibration and cost files serving engines read for DSpark adaptive verification, made from ours.

``eval`` writes ``calibration.json`` beside a draft (the ``Calibration`` record of ``calibration.py``): the
Sequential Temperature Scaling temperatures (one per draft position) and the SPS table it profiled (target forward
steps per second vs batch tokens B, the non-increasing envelope in ``sps.steps_per_s``). A deepspec or
speculators export of a calibrated draft gets, in ``serving/``:

* ``sglang_sts.json``        SGLang ``--speculative-dspark-confidence-sts-path``
* ``sglang_sps.json``        SGLang ``--speculative-dspark-sps-table-path``
* ``trtllm_sts.json``        TensorRT-LLM confidence calibration path
* ``trtllm_cost_table.json`` TensorRT-LLM cost table path (step time in ms = 1000 / steps per second)
* ``manifest.json``          which file goes to which option, the engine versions checked, what was not
                             written and why

vLLM's ``enable_adaptive_verification`` reads no file. The engines' schemas (field names, types, rules, the
source files and commits they were read from) are data in ``engine_schemas.json``; ``validate_engine_file``
checks a file against them. All four engines' readers apply a temperature as sigmoid(logit / T), which is
what ``eval.calibration.temper`` fits, and count B as requests + verified draft tokens, as our SPS table does.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from dspark_model import __version__
from dspark_model.atomic import atomic_write_json
from dspark_model.calibration import Calibration

SCHEMAS_PATH = Path(__file__).with_name("engine_schemas.json")
SERVING_DIR = "serving"
MANIFEST_NAME = "manifest.json"
_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


@lru_cache(maxsize=1)
def schemas() -> dict:
    return json.loads(SCHEMAS_PATH.read_text())


# ---- validation -------------------------------------------------------------------------------------------
def _type_ok(value, kind: str) -> bool:
    if kind.startswith("list["):
        return isinstance(value, list) and all(_type_ok(v, kind[5:-1]) for v in value)
    ok = isinstance(value, _TYPES[kind]) and not isinstance(value, bool)
    return ok and (kind != "float" or math.isfinite(value))


def _rule_problem(rule: str, name: str, value, content: dict, gamma: int) -> str | None:
    values = value if isinstance(value, list) else [value]
    what, _, arg = rule.partition(":")
    if what == "positive" and not all(v > 0 for v in values):
        return f"{name} must be > 0"
    if what == "nonnegative" and not all(v >= 0 for v in values):
        return f"{name} must be >= 0"
    if what == "min1" and not all(v >= 1 for v in values):
        return f"{name} must be >= 1"
    if what == "increasing" and not all(b > a for a, b in zip(values, values[1:])):
        return f"{name} must be strictly increasing"
    if what == "len_gamma" and len(values) != gamma:
        return f"{name} needs one value per draft position ({gamma}), has {len(values)}"
    if what == "eq_gamma" and value != gamma:
        return f"{name} must equal the draft's block_size {gamma}, is {value}"
    if what == "len_as" and isinstance(content.get(arg), list) and len(values) != len(content[arg]):
        return f"{name} must have as many values as {arg}"
    if what == "ge_last" and isinstance(content.get(arg), list) and content[arg] and value < content[arg][-1]:
        return f"{name} must be >= the last {arg} ({content[arg][-1]})"
    return None


def validate_engine_file(name: str, content, gamma: int) -> list[str]:
    """Problems of one engine file (``name`` = its file name in ``engine_schemas.json``) for a draft whose
    block_size is ``gamma``."""
    schema = schemas()["files"][name]
    if not isinstance(content, dict):
        return [f"{name}: must be a JSON object"]
    fields = schema["fields"]
    problems = [f"{name}: {k} is required ({schema['engine']} reads it)" for k, f in fields.items()
                if f["required"] and k not in content]
    problems += [f"{name}: {k} must not appear (it selects another {schema['engine']} reader)"
                 for k in schema.get("forbidden_fields", []) if k in content]
    for key, value in content.items():
        spec = fields.get(key)
        if spec is None:
            continue  # the readers ignore unknown fields; we never write any
        if not _type_ok(value, spec["type"]):
            problems.append(f"{name}: {key} must be {spec['type']}")
            continue
        problems += [f"{name}: {p}" for p in (_rule_problem(r, key, value, content, gamma) for r in spec["rules"])
                     if p]
    return problems


def validate_serving_folder(export_dir: str | Path, gamma: int) -> list[str]:
    """Problems of the engine files present in ``export_dir/serving`` (none there: no problems)."""
    folder = Path(export_dir) / SERVING_DIR
    problems = []
    for name in schemas()["files"]:
        path = folder / name
        if path.is_file():
            try:
                content = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                problems.append(f"{SERVING_DIR}/{name} is not valid JSON ({exc})")
                continue
            problems += [f"{SERVING_DIR}/{p}" for p in validate_engine_file(name, content, gamma)]
    return problems


# ---- conversion from calibration.json ---------------------------------------------------------------------
def _finite_list(values) -> list[float] | None:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def _sts_files(calib: Calibration, gamma: int) -> dict[str, dict]:
    temps = [float(t) for t in calib.temperatures]
    split = calib.split or {}
    sglang = {"temperatures": temps,
              "dataset": f"dspark toolkit eval rounds, {split.get('n_calib_prompts', '?')} calibration prompts",
              "num_samples": int(split.get("n_calib_rounds", 0))}
    metrics = calib.metrics or {}
    before = _finite_list(((metrics.get("before") or {}).get("per_position") or {}).get("ece"))
    after = _finite_list(((metrics.get("after") or {}).get("per_position") or {}).get("ece"))
    if before and after and len(before) == len(after) == gamma:  # held-out prefix-survival ECE per position
        sglang.update(ece_before=before, ece_after=after)
    return {"sglang_sts.json": sglang, "trtllm_sts.json": {"sts_temperatures": temps, "max_draft_len": gamma}}


def _sps_files(sps: dict) -> dict[str, dict]:
    batch = [int(b) for b in sps["batch_tokens"]]
    steps = [float(s) for s in sps["steps_per_s"]]  # the envelope Algorithm 1 is costed with
    return {"sglang_sps.json": {"sample_batch_tokens": batch, "sample_steps_per_sec": steps,
                                "max_batch_tokens": batch[-1]},
            "trtllm_cost_table.json": {"token_counts": batch, "step_time_ms": [1000.0 / s for s in steps],
                                       "fixed_overhead_ms": 0.0}}


def engine_files(calibration: Calibration, gamma: int, confidence_head: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """({file name: content}, {file or group: why it was not written}) for a draft of block_size ``gamma``."""
    if not confidence_head:
        why = "the draft has no confidence head: engines schedule verification from its confidences"
        return {}, {"all": why}
    files, skipped = {}, {}
    temps = calibration.temperatures
    if _finite_list(temps) and len(temps) == gamma and all(t > 0 for t in temps):
        files.update(_sts_files(calibration, gamma))
    else:
        skipped["sts"] = (f"calibration.json has {len(temps) if isinstance(temps, list) else 'no'} temperatures; "
                          f"the engines need one positive temperature per draft position ({gamma})")
    sps = calibration.sps or {}
    batch, steps = sps.get("batch_tokens"), _finite_list(sps.get("steps_per_s"))
    if isinstance(batch, list) and batch and steps and len(steps) == len(batch):
        files.update(_sps_files(sps))
    else:
        skipped["sps"] = "calibration.json has no SPS table (sps.batch_tokens / sps.steps_per_s)"
    return files, skipped


def _manifest(files: dict, skipped: dict, calibration: Calibration, gamma: int) -> dict:
    recorded = schemas()
    return {"toolkit_version": __version__, "block_size": gamma,
            "written": {name: {"engine": recorded["files"][name]["engine"],
                               "option": recorded["files"][name]["option"],
                               "schema_source": recorded["files"][name]["source"]} for name in files},
            "not_written": skipped, "reads_no_file": recorded["reads_no_file"],
            "from_calibration": {"schema_version": calibration.schema_version, "gamma": calibration.gamma,
                                 "weights_sha256": calibration.weights_sha256,
                                 "sps_hardware": (calibration.sps or {}).get("hardware"),
                                 "target": calibration.target},
            "note": "the SPS / cost table is the one eval profiled (this toolkit's transformers forward on the eval "
                    "machine); profile on the serving hardware with the engine's own profiler for production"}


def write_engine_files(export_dir: str | Path, calibration: Calibration, gamma: int, confidence_head: bool) -> list[str]:
    """Write ``serving/`` (engine files + manifest) into ``export_dir``; returns the engine file names written.
    Every file is checked against its recorded schema first (ValueError on a problem)."""
    files, skipped = engine_files(calibration, gamma, confidence_head)
    problems = [p for name, content in files.items() for p in validate_engine_file(name, content, gamma)]
    if problems:
        raise ValueError("internal error: engine files do not match their schemas: " + "; ".join(problems))
    folder = Path(export_dir) / SERVING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        atomic_write_json(folder / name, content, indent=1)
    atomic_write_json(folder / MANIFEST_NAME, _manifest(files, skipped, calibration, gamma), indent=1)
    return sorted(files)
