"""``python -m data_prep``: prompts -> target-regenerated conversations -> tokenized data (-> target cache).

Examples::

    python -m data_prep                                       # SmolLM2 on the packaged demo prompts
    python -m data_prep target=tiny num_prompts=4 generation.max_new_tokens=32
    python -m data_prep prompts=shared-train generation.backend=openai generation.base_url=http://host:8000/v1
    python -m data_prep cache.enabled=true cache.dtype=int8
"""

from __future__ import annotations

import hydra
from omegaconf import OmegaConf

from data_prep.schema import DataPrepConfig, register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="data_prep")
def main(dict_cfg) -> None:
    from data_prep.errors import DataPrepError
    from data_prep.pipeline import resolve_out_dir, run
    from dspark_model.cli_errors import run_stage
    from dspark_model.output_lock import OutputLockedError
    from dspark_model.target import TargetNotFoundError

    cfg: DataPrepConfig = OmegaConf.to_object(dict_cfg)
    out = resolve_out_dir(cfg)
    run_stage(lambda: run(cfg), (DataPrepError, TargetNotFoundError, OutputLockedError), folder=out,
              resume=f"generations so far are kept in {out / 'generations.jsonl'}; rerun the same command to "
                     f"continue where it stopped")


if __name__ == "__main__":
    main()
