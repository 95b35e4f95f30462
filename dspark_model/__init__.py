"""DSpark draft models: target adapter, draft network, checkpoints and exports.

The public surface is small on purpose::

    from dspark_model import TargetSpec, load_target, build_draft, DraftConfig
"""

__version__ = "0.1.0"

from dspark_model.config import DraftConfig, TargetSpec  # noqa: E402
from dspark_model.draft import DSparkDraft, build_draft, build_draft_for  # noqa: E402
from dspark_model.target import Target, TargetNotFoundError, default_tap_layer_ids, load_target  # noqa: E402

__all__ = [
    "DSparkDraft",
    "DraftConfig",
    "Target",
    "TargetNotFoundError",
    "TargetSpec",
    "__version__",
    "build_draft",
    "build_draft_for",
    "default_tap_layer_ids",
    "load_target",
]
