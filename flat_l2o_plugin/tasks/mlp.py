"""A multilayer perceptron classifier as a functional optimizee task.

Parameters are a plain list ``[W1, b1, W2, b2, ...]`` so that an unroll can carry them
through a learned optimizer's graph. The default, ``mlp_digits``, is the MLP 64-20-10
with sigmoid activations on scikit-learn's digits, batch 128: the protocol of the
learned-optimizer literature's MNIST MLP, scaled to bundled data.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..protocols import Params
from .data import load_dataset

__all__ = ["MLPTask", "ACTIVATIONS"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


class MLPTask:
    """Classification with an MLP on a bundled dataset.

    Args:
        dataset: A name from :func:`flat_l2o_plugin.tasks.data.list_datasets`.
        hidden_sizes: Widths of the hidden layers, e.g. ``(20,)`` or ``(20, 20)``.
        activation: ``"sigmoid"``, ``"relu"``, ``"tanh"`` or ``"gelu"``.
        batch_size: Training mini-batch size.
    """

    def __init__(self, dataset: str = "digits", hidden_sizes: Sequence[int] = (20,),
                 activation: str = "sigmoid", batch_size: int = 128) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {hidden_sizes!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.data = load_dataset(dataset)
        self.hidden_sizes, self.activation, self.batch_size = hidden_sizes, activation, batch_size
        self.sizes = (self.data.num_features, *hidden_sizes, self.data.num_classes)
        self.name = f"mlp_{dataset}[{'-'.join(map(str, self.sizes))},{activation}]"
        self._act = ACTIVATIONS[activation]

    def __repr__(self) -> str:
        return f"MLPTask({self.name})"

    @property
    def num_params(self) -> int:
        return sum(i * o + o for i, o in zip(self.sizes[:-1], self.sizes[1:]))

    def init_params(self, seed: int) -> list[Tensor]:
        """PyTorch's ``nn.Linear`` default: U(±1/√fan_in) for weights and biases."""
        g = torch.Generator().manual_seed(int(seed))
        params = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            params.append((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound)
            params.append((torch.rand(fan_out, generator=g) * 2 - 1) * bound)
        return params

    def forward(self, params: Params, x: Tensor) -> Tensor:
        h = x.to(params[0].dtype)
        n_layers = len(params) // 2
        for i in range(n_layers):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i < n_layers - 1:
                h = self._act(h)
        return h

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.data.split("train")
        idx = torch.randperm(x.shape[0], generator=generator)[: self.batch_size]
        return x[idx], y[idx]

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.forward(params, x), y)

    def full_batch(self, split: str = "train") -> tuple[Tensor, Tensor]:
        return self.data.split(split)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test") -> dict[str, float]:
        x, y = self.data.split(split)
        logits = self.forward([p.detach() for p in params], x)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).float().mean())}
