"""``calibration.json``: the one typed record of a draft's confidence calibration, shared by writer and readers.

Written by eval's calibration stage (``eval/calibration_report.run_calibration``; ``eval/report.calibrate``
writes the same record beside the checkpoint that was evaluated). Read by checkpoint loading
(``checkpoint.load_draft``), export (which copies it and converts it to the engine files of ``serving.py``),
the model card (``card.py``) and the Hub upload (``hub.py``).

Temperatures are fitted to one set of draft weights, so the record carries ``weights_sha256``, the sha256 of
the ``model.safetensors`` they were fitted on (``None`` when the evaluated draft was never saved). The file
beside a folder's weights is trusted only while that hash matches the weights there (``read_beside``):

* loading drops a calibration fitted on other weights, with a warning (``load_beside``);
* export, the model card and the Hub upload refuse to publish one (``StaleCalibrationError``), and say to
  calibrate again.

Export writes the draft's weights in another layout or dtype; the copy it writes beside them is bound to the
exported file (``bound_to``) after the checkpoint's calibration was checked against the checkpoint's weights.

``schema_version`` changes whenever the layout does; a file of any other version (version 1 had no
``weights_sha256`` and called its version ``version``) is refused with one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from dspark_model.atomic import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
CALIBRATION_NAME = "calibration.json"
WEIGHTS_NAME = "model.safetensors"  # the weights file of a checkpoint and of every export format
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CalibrationError(ValueError):
    """A calibration.json cannot be used as it is; the message names the file and the fix."""


class StaleCalibrationError(CalibrationError):
    """A calibration.json was fitted on weights other than the ones beside it."""


# the fix for an export folder: it was made from a checkpoint, which is what eval calibrates
REEXPORT_HINT = "re-run eval calibration on the checkpoint (`python -m eval draft=<checkpoint>`) and export it again"


def recalibrate_hint(folder: str | Path) -> str:
    """How to refit: ``folder`` is named as the draft only when it is a checkpoint (has a config.json); an eval
    report's calibration folder is not one."""
    draft = folder if (Path(folder) / "config.json").is_file() else "<the draft checkpoint these were fitted on>"
    return f"re-run eval calibration on these weights (`python -m eval draft={draft}`)"


@dataclass
class Calibration:
    """Sequential Temperature Scaling of the confidence head, and everything needed to judge and reuse it.

    ``temperatures``: one per draft position (gamma of them). ``target``: the target it was fitted with
    (``identity.identity_record``: id, revision, weights fingerprint). ``split``, ``metrics``, ``threshold``,
    ``threshold_sweep``, ``sps``, ``scheduler``, ``simulation``, ``figures``: the groups ``run_calibration``
    documents; the five scalars below them are its headline numbers (held-out, after STS unless named).
    """

    gamma: int
    temperatures: list[float]
    weights_sha256: str | None
    target: dict | None = None
    n_bins: int = 15
    split: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    threshold: dict = field(default_factory=dict)
    threshold_sweep: list = field(default_factory=list)
    sps: dict | None = None
    scheduler: dict = field(default_factory=dict)
    simulation: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    ece_before: float | None = None
    ece_after: float | None = None
    auroc: float | None = None
    brier: float | None = None
    scheduler_vs_best_fixed: float | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc, source: str | Path) -> Calibration:
        """The record in ``doc`` (parsed calibration.json); ``source`` names the file in every error."""
        fix = f"delete it and {recalibrate_hint(Path(source).parent)}"
        if not isinstance(doc, dict):
            raise CalibrationError(f"{source} does not hold a calibration record (a JSON object); {fix}")
        version = doc.get("schema_version", doc.get("version"))
        if version != SCHEMA_VERSION:
            age = "an older" if isinstance(version, int) and version < SCHEMA_VERSION else "an unknown"
            raise CalibrationError(f"{source} has {age} calibration schema (version {version!r}; this toolkit "
                                   f"reads version {SCHEMA_VERSION}); {fix}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(doc) - names), [n for n in ("gamma", "temperatures") if n not in doc]
        if unknown or missing:
            raise CalibrationError(f"{source} does not match calibration schema {SCHEMA_VERSION} (unknown fields "
                                   f"{unknown}, missing {missing}); {fix}")
        record = cls(**doc)
        problem = record._problem()
        if problem:
            raise CalibrationError(f"{source}: {problem}; {fix}")
        return record

    def _problem(self) -> str | None:
        if not isinstance(self.gamma, int) or isinstance(self.gamma, bool) or self.gamma < 1:
            return f"gamma must be a positive integer, got {self.gamma!r}"
        temps = self.temperatures
        if not isinstance(temps, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                  for t in temps):
            return "temperatures must be a list of numbers"
        if self.weights_sha256 is not None and not (isinstance(self.weights_sha256, str)
                                                    and _SHA256.fullmatch(self.weights_sha256)):
            return f"weights_sha256 must be a sha256 hex digest, got {self.weights_sha256!r}"
        return None

    @classmethod
    def read(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it and "
                                   f"{recalibrate_hint(path.parent)}") from None
        return cls.from_dict(doc, path)

    def write(self, path: str | Path) -> None:
        """Strict JSON (NaN and infinities are written by the writer as null), atomically."""
        atomic_write_json(path, self.to_dict(), allow_nan=False)

    def bound_to(self, weights: str | Path) -> Calibration:
        """This record re-bound to ``weights`` (a conversion of the weights it was checked against)."""
        return dataclasses.replace(self, weights_sha256=file_sha256(weights))

    def stale_reason(self, weights: str | Path) -> str | None:
        """Why this record does not belong to ``weights`` (a phrase), or None when it does."""
        if self.weights_sha256 is None:
            return "it records no weights hash (it was fitted on a draft that was never saved)"
        found = file_sha256(weights)
        if found != self.weights_sha256:
            return (f"it was fitted on other weights (sha256 {self.weights_sha256[:12]}... recorded, "
                    f"{Path(weights).name} is {found[:12]}...)")
        return None


def read_beside(folder: str | Path, fix: str | None = None) -> Calibration | None:
    """The calibration in ``folder``, checked against the weights file there; None when it has none.

    Raises CalibrationError for an unreadable file or another schema version, StaleCalibrationError when it
    was fitted on other weights (``fix``: what the message tells the user to do; default: calibrate again)."""
    folder = Path(folder)
    path = folder / CALIBRATION_NAME
    if not path.is_file():
        return None
    record = Calibration.read(path)
    reason = record.stale_reason(folder / WEIGHTS_NAME)
    if reason:
        raise StaleCalibrationError(f"{path} does not belong to the weights beside it: {reason}; "
                                    f"{fix or recalibrate_hint(folder)}")
    return record


def load_beside(folder: str | Path) -> Calibration | None:
    """``read_beside`` for using a draft: a calibration fitted on other weights is dropped with a warning."""
    try:
        return read_beside(folder)
    except StaleCalibrationError as exc:
        log.warning("ignoring the calibration: %s", exc)
        return None
