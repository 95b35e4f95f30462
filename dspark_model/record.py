"""The shape shared by the JSON records the stages hand each other (``data_prep.manifest.DataManifest``,
``CacheManifest``, ``eval.report.EvalReport``): a dataclass whose file starts with a format string naming its
layout and version, read strictly, so a file of another version or layout fails with one line naming the file
and the fix instead of a guessed key further on. (``Calibration`` and ``DraftArch`` predate this base and keep
their own integer versions.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from dspark_model.atomic import atomic_write_json


class RecordError(ValueError):
    """A record file cannot be used as it is; the message names the file and the fix."""


@dataclasses.dataclass
class JsonRecord:
    """Subclasses are dataclasses and set FORMAT (written as ``"format"``, first), WHAT and FIX."""

    FORMAT: ClassVar[str]  # e.g. "dspark-data/1": layout name / version
    WHAT: ClassVar[str]  # what the file is, in errors: "data manifest"
    FIX: ClassVar[str]  # how to get a current one
    UNVERSIONED_IS_CURRENT: ClassVar[bool] = False  # a file with no "format" key predates the record: read it

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, doc, source: str | Path):
        """The record in ``doc`` (the parsed file); ``source`` names the file in every error."""
        if not isinstance(doc, dict):
            raise RecordError(f"{source} does not hold a {cls.WHAT} (a JSON object); {cls.FIX}")
        if doc.get("format", cls.FORMAT if cls.UNVERSIONED_IS_CURRENT else None) != cls.FORMAT:
            raise RecordError(f"{source} is a {cls.WHAT} of another version (format {doc.get('format')!r}; this "
                              f"toolkit reads {cls.FORMAT!r}); {cls.FIX}")
        fields = dataclasses.fields(cls)
        body = {k: v for k, v in doc.items() if k != "format"}
        unknown = sorted(set(body) - {f.name for f in fields})
        missing = [f.name for f in fields if f.name not in body and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if unknown or missing:
            raise RecordError(f"{source} does not match {cls.WHAT} format {cls.FORMAT!r} (unknown fields "
                              f"{unknown}, missing {missing}); {cls.FIX}")
        return cls(**body)

    @classmethod
    def read(cls, path: str | Path):
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RecordError(f"{path} cannot be read ({type(exc).__name__}: {exc}); {cls.FIX}") from None
        return cls.from_dict(doc, path)

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())
