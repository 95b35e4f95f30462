"""Local regeneration with a tiny random target: resume equality, multi-turn conditioning, batching."""

from __future__ import annotations

import json

import pytest
import torch

from data_prep.chat import build_messages, generation_prompt_ids, stop_token_ids
from data_prep.errors import GenerationError
from data_prep.generate import derive_seed, generate_ids
from data_prep.manifest import DataManifest
from data_prep.pipeline import run
from data_prep.store import check_settings, load_tokenized
from dspark_model.target import load_target

from .conftest import make_cfg, tiny_spec


def _lines(path):
    return path.read_text().splitlines()


def test_resume_after_interruption_gives_identical_dataset(prompt_file, tmp_path):
    ref = run(make_cfg(prompt_file, tmp_path / "ref", temperature=1.0, top_p=0.9))
    out = tmp_path / "resumed"
    cfg = make_cfg(prompt_file, out, temperature=1.0, top_p=0.9)
    run(cfg)
    log = out / "generations.jsonl"
    lines = _lines(log)
    assert len(lines) == 5
    # Interrupt: three complete lines (the second batch half done) and half of the fourth line.
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    for name in ("manifest.json",):
        (out / name).unlink()
    resumed = run(cfg)
    assert resumed.fingerprint == ref.fingerprint
    new_lines = _lines(log)
    assert new_lines[:3] == lines[:3] and len(new_lines) == 5  # only missing rows were appended
    assert sorted(json.loads(x)["row_id"] for x in new_lines) == sorted(json.loads(x)["row_id"] for x in lines)
    ds_ref, _ = load_tokenized(tmp_path / "ref")
    ds_res, _ = load_tokenized(out)
    assert ds_ref.to_dict() == ds_res.to_dict()


def test_different_seed_changes_samples(prompt_file, tmp_path):
    a = make_cfg(prompt_file, tmp_path / "a", temperature=1.0)
    b = make_cfg(prompt_file, tmp_path / "b", temperature=1.0)
    b.seed = 1
    assert run(a).fingerprint != run(b).fingerprint


def test_multi_turn_is_conditioned_on_generated_turns(prompt_file, tmp_path):
    cfg = make_cfg(prompt_file, tmp_path / "mt", temperature=1.0, batch_size=1)
    run(cfg)
    records = {r["row_id"]: r for r in map(json.loads, _lines(tmp_path / "mt" / "generations.jsonl"))}
    rec = records["p:2"]
    assert rec["turns"] == ["Name a colour.", "Now another one."] and len(rec["responses"]) == 2
    target = load_target(tiny_spec())
    tok = target.tokenizer
    ids = generation_prompt_ids(tok, build_messages(None, rec["turns"], rec["responses"][:1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, ["p:2"], 1))
        [(tokens, finish)] = generate_ids(target.model, [ids], tok.pad_token_id, stop_token_ids(tok), 6, 1.0, 1.0)
    body = tokens[:-1] if finish == "stop" else tokens
    assert tok.decode(body, skip_special_tokens=True) == rec["responses"][1]
    # The system message of a messages-shaped row reaches the generation prompt; its old answer does not.
    assert records["p:4"]["system"] == "Be short." and records["p:4"]["turns"] == ["Why?", "Really?"]


def test_greedy_is_independent_of_batch_size(prompt_file, tmp_path):
    one = run(make_cfg(prompt_file, tmp_path / "b1", batch_size=1, max_new_tokens=5))
    three = run(make_cfg(prompt_file, tmp_path / "b3", batch_size=3, max_new_tokens=5))
    assert one.fingerprint == three.fingerprint  # left padding + attention mask are right


def test_loss_mask_covers_exactly_the_generated_responses(prompt_file, tmp_path):
    run(make_cfg(prompt_file, tmp_path / "m", temperature=1.0))
    ds, manifest = load_tokenized(tmp_path / "m")
    records = {r["row_id"]: r for r in map(json.loads, _lines(tmp_path / "m" / "generations.jsonl"))}
    tok = load_target(tiny_spec()).tokenizer
    for row in ds:
        rec = records[row["row_id"]]
        want = "".join(r + ("<|im_end|>" if f == "stop" else "") for r, f in
                       zip(rec["responses"], rec["finish_reasons"]))
        assert tok.decode([i for i, m in zip(row["input_ids"], row["loss_mask"]) if m]) == want
    assert manifest.counts["rows"] == len(ds) == 5
    assert manifest.tokens["loss"] == sum(sum(r["loss_mask"]) for r in ds)


def test_resume_with_other_settings_is_refused(tmp_path):
    check_settings(tmp_path, {"max_new_tokens": 8, "seed": 0})
    check_settings(tmp_path, {"max_new_tokens": 8, "seed": 0})  # same settings: resume
    with pytest.raises(GenerationError, match="max_new_tokens: 8 there, 16 now"):
        check_settings(tmp_path, {"max_new_tokens": 16, "seed": 0})
    (tmp_path / "generations.jsonl").write_text("{}\n")
    check_settings(tmp_path, {"max_new_tokens": 16, "seed": 0}, overwrite=True)
    assert not (tmp_path / "generations.jsonl").exists()


def test_a_run_from_before_target_dtype_was_recorded_resumes_and_a_new_dtype_is_refused(tmp_path):
    check_settings(tmp_path, {"max_new_tokens": 8})  # written before the key existed
    check_settings(tmp_path, {"max_new_tokens": 8, "target_dtype": "float32"})
    check_settings(tmp_path / "b", {"max_new_tokens": 8, "target_dtype": "float32"})
    with pytest.raises(GenerationError, match="target_dtype: 'float32' there, 'bfloat16' now"):
        check_settings(tmp_path / "b", {"max_new_tokens": 8, "target_dtype": "bfloat16"})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_worker_threads_give_the_same_dataset(prompt_file, tmp_path, temperature):
    """workers=2 decodes batches at once on threads; every batch keeps its own seeded generator, so
    greedy and sampled datasets equal the one-worker ones, and the folder can be resumed with either."""
    one = run(make_cfg(prompt_file, tmp_path / "w1", batch_size=1, temperature=temperature))
    cfg = make_cfg(prompt_file, tmp_path / "w2", batch_size=1, temperature=temperature)
    cfg.workers = 2
    two = run(cfg)
    assert one.fingerprint == two.fingerprint
    assert load_tokenized(tmp_path / "w1")[0].to_dict() == load_tokenized(tmp_path / "w2")[0].to_dict()


def test_model_card_data_table_reads_the_manifest_data_prep_writes(prompt_file, tmp_path):
    """The card's provenance table is filled from a manifest written by the real data_prep (not a hand-made
    one): every source row names its location, rows used of rows read, and hash."""
    from dspark_model.card import _data_section

    run(make_cfg(prompt_file, tmp_path / "d"))
    manifest = DataManifest.read(tmp_path / "d" / "manifest.json")
    rows = [line for line in _data_section(manifest).splitlines() if line.startswith("| p |")]
    (source,) = manifest.sources
    assert rows == [f"| p | {source['location']} | {source['rows_used']} of {source['rows_read']} | "
                    f"sha256={source['sha256']} |"]
    assert source["location"] and source["rows_used"] > 0
