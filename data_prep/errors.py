"""Error classes of the data_prep stage.

Every error the user can fix (a missing file, a bad row in strict mode, an unreachable server, a full disk,
a cache built for another target) is a ``DataPrepError`` whose message is one line naming the problem and
the fix. The entry point prints that line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class DataPrepError(RuntimeError):
    """Base class: an input or environment problem the user can fix."""


class SourceError(DataPrepError):
    """A prompt source cannot be read (missing file, unknown dataset, bad field mapping)."""


class BadRowError(SourceError):
    """A malformed prompt row in strict mode; the message names the file and line."""


class GenerationError(DataPrepError):
    """Response regeneration failed (server unreachable, settings differ from a run being resumed)."""


class TemplateError(DataPrepError):
    """The target's chat template cannot give assistant spans (for example it is not prefix-stable)."""


class CacheError(DataPrepError):
    """The target cache cannot be written or read."""


class CacheMismatchError(CacheError):
    """A target cache was built for a different target, tap layers or width than the one asked for."""
