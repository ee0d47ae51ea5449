"""Alignment training (docs/design.md section 6): SFT and DPO with TRL on Ray Train + DeepSpeed ZeRO.

- config.py: the ``train`` config section. data.py: input checks (rejected rows with reasons) and the
  TRL-format tables. sft.py / dpo.py: TRL trainers and the reference log-prob precompute.
- ray_trainer.py: the TorchTrainer shell (workers, checkpoints, resume). run.py: one stage from the
  driver. export.py: the HF policy folder. metrics.py: console metrics and the per-step sample log.
"""

from __future__ import annotations

from ttpa_ray.config import DPOStageConfig, StageConfig, TrainConfig
from ttpa_ray.train.run import StageOutcome, TrainInputError, run_stage

__all__ = ["DPOStageConfig", "StageConfig", "StageOutcome", "TrainConfig", "TrainInputError", "run_stage"]
