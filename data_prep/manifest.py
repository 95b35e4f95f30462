"""The two records data_prep hands to training, defined once for writer and readers.

* ``DataManifest``: ``<out_dir>/manifest.json``, written by ``pipeline.run`` (``store.save_tokenized``), read
  by ``store.load_tokenized`` (train/data.py), the model card (``dspark_model/card.py``) and
  ``benchmarks/reference_report.py``.
* ``CacheManifest``: ``<cache_dir>/manifest.json`` of the offline target cache, written by
  ``cache.write_cache``, read by ``cache.TargetCache`` (train/data.py).

A file of another format version fails with one line naming it and the fix (``dspark_model/record.py``).
Groups whose inner keys are documented where they are made stay dicts (``sources``: sources.py,
``generation``: pipeline.generation_settings, ``token_counts``: store.save_token_counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark_model.record import JsonRecord
from dspark_model.target import FINAL_HIDDEN_CONVENTION, TAP_CONVENTION

MANIFEST_FORMAT = "dspark-data/1"
CACHE_FORMAT = "dspark-target-cache/1"


@dataclass
class DataManifest(JsonRecord):
    """What a data_prep output holds and how it was made.

    ``target``: id, revision, path, chat_template_sha256, tokenizer_sha256 (train compares the last two with
    its own tokenizer). ``sources``: one entry per prompt source (name, location, rows_read, rows_valid,
    rows_used, hashes). ``counts``: prompts, skipped, generated, rows, prompt_cut, truncated, dropped.
    ``tokens``: total, loss, generated. ``fingerprint``: sha256 of the tokenized rows (store.dataset_fingerprint).
    ``cache``: the target cache's manifest (``CacheManifest.to_dict``) when one was written."""

    FORMAT = MANIFEST_FORMAT
    WHAT = "data_prep manifest"
    FIX = "regenerate the data with this version of data_prep (`python -m data_prep`)"

    name: str
    target: dict
    sources: list
    prompts_config: str | None
    generation: dict
    max_length: int
    min_loss_tokens: int
    truncation_policy: str
    counts: dict
    tokens: dict
    fingerprint: str
    token_counts: dict | None = None  # store.save_token_counts; absent from data written before it
    cache: dict | None = None


@dataclass
class CacheManifest(JsonRecord):
    """The offline target cache (layout: data_prep/cache.py). ``target``: id and revision it was made with;
    ``shards``: [{file, row_start, row_end, tokens}]; ``compute_dtype``: the dtype the target ran in (bfloat16
    on a bf16 target: its states differ from a float32 forward's by more than the storage rounding);
    ``complete``: every shard written."""

    FORMAT = CACHE_FORMAT
    WHAT = "target cache manifest"
    FIX = "rebuild the cache (`python -m data_prep cache.enabled=true cache.overwrite=true`)"

    target: dict
    tap_layer_ids: list[int]
    dtype: str
    hidden_size: int
    num_taps: int
    rows: int
    tokens: int
    bytes_per_token: int
    dataset_fingerprint: str
    shards: list[dict]
    bytes_per_shard: int = 0  # per-shard constant (float8 scales); caches written before it had none
    tap_layer_convention: str = TAP_CONVENTION
    final_hidden: str = FINAL_HIDDEN_CONVENTION
    int8_scales: str | None = None
    float8_scales: str | None = None
    compute_dtype: str | None = None  # the target's dtype in the forward that made the states; None: before it
    complete: bool = False
