"""``DraftArch``: the one typed record of a draft's architecture, shared by the draft, config.json and exports.

Written by ``checkpoint.save_pretrained`` as ``config.json``'s ``arch`` object (its version is the file's
``format_version``, with the summary keys ``native_keys`` derives beside it); read by ``checkpoint.load_draft``
and every other reader of a native config (``export_schema.native_config``: the export checks, the model card).
``DSparkDraft(arch)`` is built from it, ``draft.build_arch`` makes it from a ``DraftConfig`` and the target's
config, and the deepspec / speculators converters go through ``layer_keys`` / ``head_keys`` (writing) and
``from_public`` (reading), so no architecture field is spelled out anywhere else.

One record serves both draft architectures (``architecture``): ``dspark`` (DSpark / DFlash, ``DSparkDraft``)
and ``eagle3`` (the EAGLE-3 baseline, ``eagle3.Eagle3Draft``: one layer over the low / mid / high taps, its
own LM head, no mask token or sequential / confidence head). ``draft.draft_from_arch`` builds the module the
record names, and config.json's ``model_type`` is the architecture, so a reader is never told an EAGLE-3
draft is a DSpark one.

Versions (``format_version``): 1 is the layout config.json has had since the first release (no
``architecture`` field: a DSpark draft), so every checkpoint written so far reads as it is, and a DSpark draft
is still written as version 1 (byte for byte what older toolkits read). Version 2 adds ``arch.architecture``;
an EAGLE-3 draft is written as version 2, so an older toolkit refuses it with "upgrade" instead of building a
DSpark draft from it. A config of any other version is refused with one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from dspark_model.heads import HEAD_KINDS
from dspark_model.rope import draft_rope_parameters

log = logging.getLogger(__name__)

ARCH_VERSIONS = (1, 2)  # config.json's ``format_version``s this toolkit reads (see the module docstring)
ARCH_VERSION = ARCH_VERSIONS[-1]  # the newest
ARCHITECTURES = ("dspark", "eagle3")
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
    architecture: str = "dspark"  # one of ARCHITECTURES; absent from version-1 configs

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"draft.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "eagle3":
            _check_eagle3(self)
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
        own_head = self.train_draft_head or self.architecture == "eagle3"  # EAGLE-3 always trains its head
        for name, value in (("draft_vocab_size", K), ("train_draft_head", bool(own_head and K)),
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
    @property
    def format_version(self) -> int:
        """The oldest config version that holds this record: 1 for DSpark (no ``architecture``), else 2."""
        return 1 if self.architecture == "dspark" else 2

    def to_dict(self) -> dict:
        doc = dataclasses.asdict(self)
        if self.format_version == 1:
            del doc["architecture"]
        return doc

    def native_keys(self) -> dict:
        """The summary keys config.json states beside ``arch`` (read by people, the card and the schema check)."""
        named = {} if self.format_version == 1 else {"architecture": self.architecture}
        return {"format_version": self.format_version, **named, "tap_layer_ids": list(self.tap_layer_ids),
                "block_size": self.block_size, "mask_token_id": self.mask_token_id,
                "sequential_head": self.sequential_head, "markov_rank": self.markov_width,
                "confidence_head": self.confidence_head, "confidence_head_with_markov": self.confidence_with_markov,
                "num_layers": self.num_layers, "arch": self.to_dict()}

    @classmethod
    def from_config(cls, config, source: str | Path) -> DraftArch:
        """The record in a native config.json (parsed); ``source`` names the file in every error."""
        check_version(config, source)
        version, doc = config["format_version"], config.get("arch")
        names = {f.name for f in dataclasses.fields(cls)} - ({"architecture"} if version == 1 else set())
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        required |= {"architecture"} if version > 1 else set()
        if not isinstance(doc, dict) or set(doc) - names or required - set(doc):
            found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise DraftArchError(f"{source}: 'arch' does not match draft config version {version} (fields "
                                 f"{found}); re-save the draft with save_pretrained, or retrain it")
        try:
            arch = cls(**doc)
        except (TypeError, ValueError, KeyError) as exc:
            raise DraftArchError(f"{source}: 'arch' is invalid ({exc}); re-save the draft with save_pretrained, "
                                 f"or retrain it") from None
        if config.get("model_type", arch.architecture) != arch.architecture:
            raise DraftArchError(f"{source}: model_type {config.get('model_type')!r} but 'arch' describes a "
                                 f"{arch.architecture!r} draft; re-save the draft with save_pretrained")
        return arch

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


def eagle3_tap_layer_ids(target_taps: list[int]) -> list[int]:
    """Low / mid / high of the target's tap layers (decoder-layer ids, ascending): the taps an EAGLE-3 draft
    fuses. A very shallow (test) target with fewer than 3 taps repeats one: [0, 1] -> [0, 1, 1]."""
    taps = sorted(target_taps)
    if not taps:
        raise ValueError("an EAGLE-3 draft needs tapped target layers; the target taps none")
    return [taps[0], taps[len(taps) // 2], taps[-1]]


def _check_eagle3(a: DraftArch) -> None:
    """An EAGLE-3 record states one layer over 3 taps and none of DSpark's mask token or extra heads."""
    wrong = [f"{name}={value!r}" for name, value, ok in (
        ("num_layers", a.num_layers, a.num_layers == 1), ("tap_layer_ids", a.tap_layer_ids, len(a.tap_layer_ids) == 3),
        ("mask_token_id", a.mask_token_id, a.mask_token_id is None),
        ("sequential_head", a.sequential_head, a.sequential_head == "none"),
        ("confidence_head", a.confidence_head, not a.confidence_head)) if not ok]
    if wrong:
        raise ValueError(f"an EAGLE-3 draft has num_layers=1, 3 tap layers, no mask token, sequential_head=none "
                         f"and confidence_head=false; got {', '.join(wrong)}")


def public_head(config: dict) -> tuple[str, int]:
    """(our sequential_head, rank) of a public config's ``markov_rank`` / ``markov_head_type`` ('?': unknown)."""
    rank = int(config.get("markov_rank") or 0)
    if rank == 0:
        return "none", 0
    return HEAD_KIND_OF.get(config.get("markov_head_type"), "?"), rank


def check_version(config, source: str | Path) -> None:
    """Refuse a native config.json of another layout version, in one line naming the file and the fix."""
    version = config.get("format_version") if isinstance(config, dict) else None
    if version in ARCH_VERSIONS and not isinstance(version, bool):
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > ARCH_VERSION:
        fix = "upgrade dspark-toolkit to read it"
    else:
        fix = "re-save it with save_pretrained of this toolkit, or retrain the draft"
    raise DraftArchError(f"{source} has an unknown draft config version (format_version {version!r}; this "
                         f"toolkit reads versions {', '.join(map(str, ARCH_VERSIONS))}); {fix}")
