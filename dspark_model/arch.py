"""``DraftArch``: the one typed record of a draft's architecture, shared by the draft, config.json and exports.

Written by ``checkpoint.save_pretrained`` as ``config.json``'s ``arch`` object (its version is the file's
``format_version``, with the summary keys ``native_keys`` derives beside it); read by ``checkpoint.load_draft``
and every other reader of a native config (``export_schema.native_config``: the export checks, the model card).
``DSparkDraft(arch)`` is built from it, ``draft.build_arch`` makes it from a ``DraftConfig`` and the target's
config, and the deepspec / speculators converters go through ``layer_keys`` / ``head_keys`` (writing) and
``from_public`` (reading), so no architecture field is spelled out anywhere else.

Version 1 is the layout config.json has had since the first release, so every checkpoint written so far reads
as it is. A config of any other version is refused with one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from dspark_model.heads import HEAD_KINDS
from dspark_model.rope import draft_rope_parameters

log = logging.getLogger(__name__)

ARCH_VERSION = 1  # config.json's ``format_version``
# markov_head_type in the public formats <-> our sequential_head names.
HEAD_TYPE_OF = {"markov": "vanilla", "gated": "gated", "rnn": "rnn"}
HEAD_KIND_OF = {v: k for k, v in HEAD_TYPE_OF.items()}


class DraftArchError(ValueError):
    """A config.json's architecture cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class DraftArch:
    """Everything that shapes a ``DSparkDraft`` (sizes from the target's config, choices from ``DraftConfig``).

    Normalised on construction: a ``draft_vocab_size`` >= ``vocab_size`` is the full vocabulary (None), a
    trainable draft head exists only with a reduced vocabulary, and ``rope_config`` holds the draft's flat
    RoPE set (``rope.draft_rope_parameters``)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    vocab_size: int
    tap_layer_ids: list[int]
    block_size: int
    mask_token_id: int | None
    sequential_head: str
    markov_rank: int
    confidence_head: bool
    rope_config: dict
    initializer_range: float = 0.02
    draft_vocab_size: int | None = None
    train_draft_head: bool = False

    def __post_init__(self):
        if self.sequential_head not in HEAD_KINDS:
            raise ValueError(f"draft.sequential_head must be one of {HEAD_KINDS}, got {self.sequential_head!r}")
        if self.block_size < 1:
            raise ValueError(f"draft.block_size must be >= 1, got {self.block_size}")
        K = self.draft_vocab_size
        if K is not None and K < 1:
            raise ValueError(f"draft.draft_vocab_size must be >= 1, or null for the full vocabulary, got {K}")
        if K is not None and K >= self.vocab_size:
            if K > self.vocab_size:
                log.info("draft.draft_vocab_size=%d >= the target's %d tokens: the full vocabulary is used",
                         K, self.vocab_size)
            K = None  # K >= V is the full vocabulary: no mapping, the target's own head
        rope = dict(self.rope_config, rope_parameters=draft_rope_parameters(self.rope_config["rope_parameters"]))
        for name, value in (("draft_vocab_size", K), ("train_draft_head", bool(self.train_draft_head and K)),
                            ("tap_layer_ids", list(self.tap_layer_ids)), ("rope_config", rope)):
            object.__setattr__(self, name, value)

    # ---- derived facts ------------------------------------------------------------------------------------
    @property
    def markov_width(self) -> int:
        """Rank of the sequential head actually built (0: none, a DFlash draft)."""
        return self.markov_rank if self.sequential_head != "none" else 0

    @property
    def confidence_with_markov(self) -> bool:
        """The confidence head reads the Markov table ([h_k ; W1[x_{k-1}]]) whenever both exist."""
        return bool(self.confidence_head and self.markov_width)

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size is not None

    @property
    def out_vocab_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    # ---- native config.json -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def native_keys(self) -> dict:
        """The summary keys config.json states beside ``arch`` (read by people, the card and the schema check)."""
        return {"format_version": ARCH_VERSION, "tap_layer_ids": list(self.tap_layer_ids),
                "block_size": self.block_size, "mask_token_id": self.mask_token_id,
                "sequential_head": self.sequential_head, "markov_rank": self.markov_width,
                "confidence_head": self.confidence_head, "confidence_head_with_markov": self.confidence_with_markov,
                "num_layers": self.num_layers, "arch": self.to_dict()}

    @classmethod
    def from_config(cls, config, source: str | Path) -> DraftArch:
        """The record in a native config.json (parsed); ``source`` names the file in every error."""
        check_version(config, source)
        doc = config.get("arch")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if not isinstance(doc, dict) or set(doc) - names or required - set(doc):
            found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise DraftArchError(f"{source}: 'arch' does not match draft config version {ARCH_VERSION} (fields "
                                 f"{found}); re-save the draft with save_pretrained, or retrain it")
        try:
            return cls(**doc)
        except (TypeError, ValueError, KeyError) as exc:
            raise DraftArchError(f"{source}: 'arch' is invalid ({exc}); re-save the draft with save_pretrained, "
                                 f"or retrain it") from None

    # ---- the public formats (deepspec, speculators) ---------------------------------------------------------------
    def layer_keys(self) -> dict:
        """The draft decoder layers, HF-config style (deepspec's config, speculators' transformer_layer_config)."""
        return dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                    rms_norm_eps=self.rms_norm_eps, hidden_act=self.hidden_act, vocab_size=self.vocab_size,
                    max_position_embeddings=self.rope_config["max_position_embeddings"])

    def head_keys(self) -> dict:
        """Block and head keys both public formats state alike."""
        return {"block_size": self.block_size, "mask_token_id": self.mask_token_id,
                "markov_rank": self.markov_width,
                "markov_head_type": HEAD_TYPE_OF.get(self.sequential_head, "vanilla"),
                "enable_confidence_head": self.confidence_head,
                "confidence_head_with_markov": self.confidence_with_markov}

    @classmethod
    def from_public(cls, layer_config: dict, config: dict, tap_layer_ids: list[int]) -> DraftArch:
        """Inverse of ``layer_keys`` + ``head_keys`` (taps already in decoder-layer ids). A reduced vocabulary
        travels with its K-row head in the weights, so it loads as a trainable head."""
        lc = layer_config
        kind, rank = public_head(config)
        K = config.get("draft_vocab_size")
        reduced = K is not None and K != lc["vocab_size"]
        return cls(hidden_size=lc["hidden_size"], num_layers=lc["num_hidden_layers"],
                   num_attention_heads=lc["num_attention_heads"], num_key_value_heads=lc["num_key_value_heads"],
                   head_dim=lc["head_dim"], intermediate_size=lc["intermediate_size"],
                   rms_norm_eps=lc["rms_norm_eps"], hidden_act=lc["hidden_act"], vocab_size=lc["vocab_size"],
                   tap_layer_ids=list(tap_layer_ids), block_size=config["block_size"],
                   mask_token_id=config["mask_token_id"], sequential_head=kind, markov_rank=rank,
                   confidence_head=bool(config["enable_confidence_head"]),
                   rope_config={"rope_parameters": dict(lc["rope_parameters"]),
                                "max_position_embeddings": lc["max_position_embeddings"]},
                   initializer_range=lc.get("initializer_range", 0.02), draft_vocab_size=K if reduced else None,
                   train_draft_head=reduced)


def public_head(config: dict) -> tuple[str, int]:
    """(our sequential_head, rank) of a public config's ``markov_rank`` / ``markov_head_type`` ('?': unknown)."""
    rank = int(config.get("markov_rank") or 0)
    if rank == 0:
        return "none", 0
    return HEAD_KIND_OF.get(config.get("markov_head_type"), "?"), rank


def check_version(config, source: str | Path) -> None:
    """Refuse a native config.json of another layout version, in one line naming the file and the fix."""
    version = config.get("format_version") if isinstance(config, dict) else None
    if version == ARCH_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > ARCH_VERSION:
        fix = "upgrade dspark-toolkit to read it"
    else:
        fix = "re-save it with save_pretrained of this toolkit, or retrain the draft"
    raise DraftArchError(f"{source} has an unknown draft config version (format_version {version!r}; this "
                         f"toolkit reads version {ARCH_VERSION}); {fix}")
