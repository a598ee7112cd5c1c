"""A multilayer perceptron classifier as a functional optimizee task.

Parameters are a plain list ``[W1, b1, W2, b2, ...]`` so that an unroll can carry them
through a learned optimizer's graph. The default, ``mlp_digits``, is the MLP 64-20-10
with sigmoid activations on scikit-learn's digits, batch 128: the protocol of the
learned-optimizer literature's MNIST MLP, scaled to bundled data. The registered
``mlp`` task is the same model on any dataset (MNIST-1D by default).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Params
from .base import ClassificationTask

__all__ = ["MLPTask", "ACTIVATIONS", "linear_init"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


def _activation(name: str):  # noqa: ANN202
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def linear_init(fan_in: int, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """PyTorch's ``nn.Linear``/``nn.Conv2d`` default: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=generator) * 2 - 1) * bound


class MLPTask(ClassificationTask):
    """Classification with an MLP on any registered dataset (images are flattened).

    Args:
        dataset: A name from :func:`flat_l2o_plugin.tasks.data.list_datasets`.
        hidden_sizes: Widths of the hidden layers, e.g. ``(20,)`` or ``(20, 20)``; empty
            for a linear classifier.
        activation: ``"sigmoid"``, ``"relu"``, ``"tanh"`` or ``"gelu"``.
        batch_size: Training mini-batch size.
        dataset_options, train_subset, train_subset_seed, eval_batch_size: As for
            :class:`~flat_l2o_plugin.tasks.base.ClassificationTask`.
    """

    def __init__(self, dataset: str = "digits", hidden_sizes: Sequence[int] = (20,),
                 activation: str = "sigmoid", batch_size: int = 128, *,
                 dataset_options: Mapping[str, Any] | None = None, train_subset: int | None = None,
                 train_subset_seed: int = 0, eval_batch_size: int = 1024) -> None:
        self._act = _activation(activation)
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in hidden_sizes):
            raise ConfigError(f"hidden_sizes must be positive, got {hidden_sizes!r}")
        super().__init__(dataset, batch_size, dataset_options=dataset_options, train_subset=train_subset,
                         train_subset_seed=train_subset_seed, eval_batch_size=eval_batch_size)
        self.hidden_sizes, self.activation = hidden_sizes, activation
        self.sizes = (self.data.num_features, *hidden_sizes, self.data.num_classes)
        self.name = f"mlp_{dataset}[{'-'.join(map(str, self.sizes))},{activation}]"

    def init_params(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        params = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            params.append(linear_init(fan_in, (fan_out, fan_in), g))
            params.append(linear_init(fan_in, (fan_out,), g))
        return params

    def forward(self, params: Params, x: Tensor) -> Tensor:
        # Matching the first weight's dtype and device lets a caller move the params
        # (to float64, to a GPU) without touching the data.
        h = x.reshape(x.shape[0], -1).to(params[0])
        n_layers = len(params) // 2
        for i in range(n_layers):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i < n_layers - 1:
                h = self._act(h)
        return h
