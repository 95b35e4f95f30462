"""An untrusted draft checkpoint may name its target, never choose how it is loaded.

The payload is a model folder whose custom modeling code (``auto_map``) writes a marker file when it is
imported; a draft's config.json points at it with ``trust_remote_code: true``. eval's and export's target
resolution must not import it, and a checkpoint asking for ``allow_download`` must not reach the network.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dspark_model.card import discover_sources
from dspark_model.checkpoint import read_draft_config, save_pretrained, target_spec_from_checkpoint
from dspark_model.config import TargetSpec
from dspark_model.draft import build_draft_for
from dspark_model.export import export_draft
from tests.conftest import tiny_draft_config, tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def payload_folder(tmp_path: Path) -> tuple[Path, Path]:
    """(model folder with marker-writing remote code, marker path)."""
    folder, marker = tmp_path / "evil-model", tmp_path / "MARKER"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_llm", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilForCausalLM"}}))
    (folder / "evil_code.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("the checkpoint's code ran")
        from transformers import PretrainedConfig, PreTrainedModel

        class EvilConfig(PretrainedConfig):
            model_type = "evil_llm"

        class EvilForCausalLM(PreTrainedModel):
            config_class = EvilConfig
        """))
    return folder, marker


def hostile_checkpoint(ckpt_dir: Path, tiny_target, **target_fields) -> Path:
    """A real tiny draft whose config.json asks for a target of the attacker's choosing."""
    torch.manual_seed(0)
    ckpt = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), ckpt_dir, tiny_spec("llama"))
    config = json.loads((ckpt / "config.json").read_text())
    config["target"] = {"id": "attacker/evil-target", "revision": "v1", "num_layers": 4, "hidden_size": 64,
                        "vocab_size": 272, **target_fields}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_saved_config_names_the_target_without_loading_settings(tmp_path, tiny_target):
    spec = TargetSpec(id="org/model", revision="abc", path="/models/m", allow_download=True, trust_remote_code=True)
    ckpt = save_pretrained(build_draft_for(tiny_target, tiny_draft_config()), tmp_path / "c", spec)
    named = read_draft_config(ckpt)["target"]
    assert named["id"] == "org/model" and named["revision"] == "abc" and named["num_layers"] == 4
    assert not {"path", "allow_download", "trust_remote_code"} & set(named)


def test_checkpoint_target_is_loaded_locally_without_remote_code(tmp_path, tiny_target, caplog):
    folder, _ = payload_folder(tmp_path)
    ckpt = hostile_checkpoint(tmp_path / "c", tiny_target, path=str(folder), trust_remote_code=True,
                              allow_download=True, dtype="float16",
                              chat_template_kwargs={"enable_thinking": False, "chat_template": "{{ x }}"})
    with caplog.at_level(logging.WARNING, logger="dspark_model.checkpoint"):
        spec = target_spec_from_checkpoint(ckpt)
    assert (spec.id, spec.revision, spec.dtype) == ("attacker/evil-target", "v1", "float16")
    assert (spec.path, spec.allow_download, spec.trust_remote_code, spec.random) == (None, False, False, None)
    assert spec.tap_layer_ids == [0, 1, 2]
    assert spec.chat_template_kwargs == {"enable_thinking": False}  # a variable, not a replacement template
    assert "ignored" in caplog.text and "trust_remote_code" in caplog.text


def test_the_users_target_decides_how_it_loads(tmp_path, tiny_target):
    ckpt = hostile_checkpoint(tmp_path / "c", tiny_target, path="/elsewhere", trust_remote_code=True)
    user = TargetSpec(id="mine", path="/my/model", trust_remote_code=False, allow_download=False)
    spec = target_spec_from_checkpoint(ckpt, user)
    assert (spec.id, spec.path, spec.trust_remote_code) == ("mine", "/my/model", False)
    assert spec.tap_layer_ids == [0, 1, 2] and user.tap_layer_ids is None  # the draft's taps; user's spec intact


def test_random_recipe_keeps_numbers_only_and_default_id_uses_the_packaged_target(tmp_path, tiny_target):
    ckpt = hostile_checkpoint(tmp_path / "c", tiny_target, random={
        "family": "llama", "num_hidden_layers": 4, "seed": 0, "attn_implementation": "kernels-community/evil"})
    assert target_spec_from_checkpoint(ckpt).random == {"family": "llama", "num_hidden_layers": 4, "seed": 0}
    default = hostile_checkpoint(tmp_path / "d", tiny_target, id=TargetSpec.id, revision=None,
                                 path="/somewhere/else.gguf")
    assert target_spec_from_checkpoint(default).path == TargetSpec.path


def test_native_export_drops_the_loading_settings(tmp_path, tiny_target):
    ckpt = hostile_checkpoint(tmp_path / "c", tiny_target, path="/x", trust_remote_code=True, allow_download=True,
                              random={"family": "llama", "num_hidden_layers": 4, "seed": 0})
    out = export_draft(ckpt, tmp_path / "out", "native", target=tiny_target)
    named = json.loads((out / "config.json").read_text())["target"]
    assert named["id"] == "attacker/evil-target"
    assert not {"path", "allow_download", "trust_remote_code"} & set(named)


def test_card_reads_no_file_outside_the_checkpoint(tmp_path, tiny_target):
    ckpt = hostile_checkpoint(tmp_path / "c", tiny_target)
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"secret_plan": "not for the Hub"}))
    config = json.loads((ckpt / "config.json").read_text())
    config.update(train_config=str(private), data_manifest="../private.json")
    (ckpt / "config.json").write_text(json.dumps(config))
    sources = discover_sources(ckpt)
    assert sources.train_config is None and sources.data_manifest is None


# Runs eval's CLI and export's CLI on both hostile checkpoints in one process with the network cut off.
DRIVER = r"""
import json, runpy, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from dspark_model import export
out = sys.argv[3]
results = {}
for name, ckpt in (("code", sys.argv[1]), ("download", sys.argv[2])):
    sys.argv = ["eval", f"draft={ckpt}", "device=cpu", f"out_dir={out}/eval-{name}"]
    try:
        runpy.run_module("eval", run_name="__main__", alter_sys=True)
        results["eval_" + name] = 0
    except SystemExit as exc:
        results["eval_" + name] = exc.code
    except Exception as exc:  # a crash is a result too: the marker check comes first
        results["eval_" + name] = type(exc).__name__
    try:
        results["export_" + name] = export.main([ckpt, "--out", f"{out}/export-{name}"])
    except Exception as exc:
        results["export_" + name] = type(exc).__name__
results["network"] = sorted(set(attempts))[:5]
print("RESULTS " + json.dumps(results))
"""
# The same payload loaded the way the checkpoint asked (the user's own trust_remote_code): it does run.
CONTROL = r"""
import sys
from dspark_model.config import TargetSpec
from dspark_model.target import load_target
try:
    load_target(TargetSpec(id="evil", path=sys.argv[1], trust_remote_code=True))
except Exception:
    pass
"""


def test_eval_and_export_of_a_hostile_checkpoint_run_no_code_and_reach_no_network(tmp_path, tiny_target):
    folder, marker = payload_folder(tmp_path)
    code = hostile_checkpoint(tmp_path / "code", tiny_target, path=str(folder), trust_remote_code=True)
    download = hostile_checkpoint(tmp_path / "download", tiny_target, path=None, allow_download=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(code), str(download), str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    assert lines, proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    assert not marker.exists(), "the checkpoint's remote code was imported"
    assert results == {"eval_code": 2, "export_code": 2, "eval_download": 2, "export_download": 2,
                       "network": []}, proc.stderr[-3000:]
    assert "the checkpoint only names its target" in proc.stderr and "Traceback" not in proc.stderr
    control = subprocess.run([sys.executable, "-c", CONTROL, str(folder)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert marker.exists(), "the payload is inert, so the test above proves nothing: " + control.stderr[-2000:]
