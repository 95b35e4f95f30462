"""One metrics logger for training: a JSONL file always, TensorBoard and wandb when asked.

Every sink is optional except JSONL, and no sink can stop training: a sink that raises is reported once and
switched off. Only rank 0 creates a real logger; other ranks get ``NullLogger``. A resumed run first drops
the records an earlier run logged beyond the resumed step, so ``metrics.jsonl`` holds each step once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from dspark_model.atomic import atomic_write_text

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def trim_jsonl(path: Path, start_step: int) -> int:
    """Keep the records of steps <= ``start_step`` (the step a run starts or resumes from), so that a resumed
    run logs each step once; unreadable lines go too. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None
        if isinstance(step, int) and step <= start_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
        log.info("%s: dropped %d record(s) beyond step %d, which this run logs again", path, dropped, start_step)
    return dropped


class _JsonlSink:
    def __init__(self, path: Path, start_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        trim_jsonl(path, start_step)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        self.f.write(json.dumps({"step": step, **clean}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _TensorBoardSink:
    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier events of the steps this run logs again
        self.w = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class _WandbSink:
    def __init__(self, out_dir: Path, project: str, mode: str | None, name: str | None, config: dict):
        import wandb

        kwargs = {"mode": mode} if mode else {}
        self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config, **kwargs)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fan metric records out to the configured sinks; failures disable a sink, never training."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "dspark", wandb_mode: str | None = None, wandb_run_name: str | None = None,
                 config: dict | None = None, start_step: int = 0):
        """``start_step``: the step the run starts from (a resume's step); records logged beyond it by an
        earlier run in ``out_dir`` are dropped, so each step appears once."""
        out_dir = Path(out_dir)
        self.sinks: dict[str, object] = {}
        self._add("jsonl", lambda: _JsonlSink(out_dir / "metrics.jsonl", start_step))
        if tensorboard:
            self._add("tensorboard", lambda: _TensorBoardSink(out_dir / "tensorboard", start_step))
        if wandb and os.environ.get("WANDB_MODE") != "disabled":
            self._add("wandb", lambda: _WandbSink(out_dir, wandb_project, wandb_mode, wandb_run_name,
                                                  config or {}))

    def _add(self, name: str, make) -> None:
        try:
            self.sinks[name] = make()
        except ImportError as exc:
            log.info("metrics sink %s is off (%s is not installed)", name, exc.name)
        except Exception as exc:  # a sink must never stop training
            log.warning("metrics sink %s is off: %s", name, exc)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name in list(self.sinks):
            try:
                self.sinks[name].write(step, metrics)
            except Exception as exc:
                log.warning("metrics sink %s failed and is now off: %s", name, exc)
                self.sinks.pop(name, None)

    def close(self) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing metrics sink %s failed: %s", name, exc)
        self.sinks.clear()
