"""``python -m train target=<name>``: distil a DSpark draft (train/README.md has the launch commands)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from train.schema import TrainJob  # registers train_schema in the ConfigStore

log = logging.getLogger("train")


def output_dir(job: TrainJob) -> Path:
    """train.output_dir, else runs/train/<target>-<draft> (one sub-folder per job in a --multirun sweep)."""
    if job.train.output_dir:
        return Path(job.train.output_dir)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    name = f"{hc.runtime.choices.get('target', 'target')}-{hc.runtime.choices.get('draft', 'draft')}"
    if hc.mode == RunMode.MULTIRUN:
        name += f"-{hc.job.num}"
    return Path("runs") / "train" / name


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from data_prep.errors import DataPrepError
    from dspark_model.checkpoint import CheckpointMismatchError
    from dspark_model.cli_errors import run_stage
    from dspark_model.output_lock import OutputLockedError
    from dspark_model.target import TargetNotFoundError
    from train.checkpointing import CheckpointCorruptError, CheckpointRunError, checkpoint_size_hint
    from train.data import DataError
    from train.loop import train
    from train.schema import TrainConfigError

    job: TrainJob = OmegaConf.to_object(cfg)
    if job.train.estimate_memory:  # config only: no weights, no data, no output folder
        from train.memory import estimate_memory
        from train.schema import validate

        def estimate():
            validate(job)
            print(estimate_memory(job, job.train.estimate_processes).format())

        return run_stage(estimate, (TargetNotFoundError, TrainConfigError), folder=".", resume="nothing to resume")
    out = output_dir(job)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    user_errors = (TargetNotFoundError, DataError, DataPrepError, TrainConfigError, CheckpointMismatchError,
                   CheckpointRunError, CheckpointCorruptError, OutputLockedError, FileNotFoundError)
    metrics = run_stage(lambda: train(job, out, resolved), user_errors, folder=out,
                        resume=f"checkpoints in {out / 'checkpoints'} are intact (each is written whole or not "
                               f"at all); rerun the same command to continue from the newest one",
                        space_needed=lambda: checkpoint_size_hint(out / "checkpoints"))
    if metrics:
        log.info("done: step loss %.4f, expected acceptance %.3f; draft in %s", metrics.get("loss", float("nan")),
                 metrics.get("expected_accept", float("nan")), out / "final")


if __name__ == "__main__":
    main()
