"""data_prep: the training data of a draft is its target's own answers to real prompts.

Stages: prompt sources (``sources``) -> response regeneration by the target (``generate``: the target in
this process, decoded by ``decode``, or an OpenAI-compatible server; resumable) -> chat template with an
assistant-only loss mask (``chat``) -> Arrow dataset + answer-token counts + manifest (``store``) ->
optional offline target cache (``cache``).

Public API used by other stages::

    from data_prep.sources import PromptSource, PromptsConfig, load_prompts
    from data_prep.store import load_tokenized          # (datasets.Dataset, manifest)
    from data_prep.store import load_token_counts       # int64 (vocab_size,): answer-token counts
    from data_prep.cache import TargetCache, CacheMismatchError
"""
