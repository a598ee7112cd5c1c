"""The reference host: meta-training and evaluation loops built on the public facade."""

from __future__ import annotations

from typing import Any

from .checkpoint import Checkpoint, TrainingCheckpointError, load_checkpoint, save_checkpoint
from .distributed import DistributedContext, ReplicaMismatchError, init_distributed, shutdown_distributed
from .evaluate import TrainResult, train_with_learned_optimizer, train_with_torch_optimizer
from .lr_schedule import META_LR_SCHEDULES, meta_learning_rate
from .meta_trainer import MetaTrainConfig, MetaTrainer, MetaTrainResult
from .metrics import MetricsLog, read_metrics

__all__ = ["META_LR_SCHEDULES", "Checkpoint", "DistributedContext", "MetaTrainConfig", "MetaTrainResult",
           "MetaTrainer", "MetricsLog", "ReplicaMismatchError", "TrainResult", "TrainingCheckpointError",
           "init_distributed", "load_checkpoint", "meta_learning_rate", "read_metrics", "run_meta_training",
           "save_checkpoint", "shutdown_distributed", "train_with_learned_optimizer", "train_with_torch_optimizer"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``python -m flat_l2o_plugin.training.runner`` does not
    # find the runner already imported by its own package.
    if name == "run_meta_training":
        from .runner import run_meta_training

        return run_meta_training
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
