"""Tiny random targets for tests and the ``target=tiny`` config: no downloads, CPU, milliseconds.

The tokenizer is byte-level (every string round-trips) with ChatML special tokens and a ChatML chat
template, so data_prep and eval exercise the same code paths as on a real instruct model. The model is a
randomly initialised ``transformers`` causal LM of any supported family, built from its own config class.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TOKENIZER_SIZE = 256 + len(SPECIAL_TOKENS)  # bytes + specials
TINY_VOCAB_SIZE = 272  # embedding rows: a few spare rows beyond the tokenizer (mask-token candidates)

_FAMILIES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "gemma3": "Gemma3TextConfig",  # per-layer-type attention and RoPE (sliding / full)
}


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_config(family: str = "llama", **overrides):
    """A small config of the given family (2 layers, width 64) with any field overridden."""
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(_FAMILIES)}")
    fields = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True, eos_token_id=256, pad_token_id=257, bos_token_id=None)
    if family in ("qwen3", "gemma3"):
        fields["head_dim"] = 16
    fields.update(overrides)
    return getattr(transformers, _FAMILIES[family])(**fields)


def build_tiny_model(family: str = "llama", seed: int = 0, vocab_size: int | None = None, **overrides):
    """A random causal LM of ``family``; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
