"""The reference host: meta-training and evaluation loops built on the public facade."""

from __future__ import annotations

from .evaluate import TrainResult, train_with_learned_optimizer, train_with_torch_optimizer
from .meta_trainer import MetaTrainConfig, MetaTrainer, MetaTrainResult

__all__ = ["MetaTrainConfig", "MetaTrainResult", "MetaTrainer", "TrainResult",
           "train_with_learned_optimizer", "train_with_torch_optimizer"]
