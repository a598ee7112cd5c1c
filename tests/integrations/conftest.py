"""A meta-trained learned optimizer for the integration tests, as a module and as a file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from flat_l2o_plugin import create_optimizer, create_task
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer


@pytest.fixture(scope="module")
def meta_trained() -> nn.Module:
    """RNNProp meta-trained for 30 short unrolls on the digits MLP (about a second)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    learned = create_optimizer("rnnprop")
    task = create_task("mlp_digits")
    config = MetaTrainConfig(meta_steps=30, unroll=10, horizon=50, meta_lr=1e-2, val_every=0, seed=0)
    MetaTrainer(learned, lambda gen: (task, int(torch.randint(1000, 10**6, (1,), generator=gen))),
                config=config).train()
    torch.set_num_threads(previous)
    return learned.eval()


@pytest.fixture(scope="module")
def weights(meta_trained: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``meta_trained`` saved to a weights file."""
    return save_learned_optimizer(tmp_path_factory.mktemp("weights") / "rnnprop.safetensors", meta_trained,
                                  name="rnnprop")
