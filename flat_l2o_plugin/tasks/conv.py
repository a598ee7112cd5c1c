"""A small convolutional classifier on 8x8 digit images, as a functional optimizee.

conv3x3(1→c1) → act → 2x2 max-pool → conv3x3(c1→c2) → act → global average pool →
linear(c2→10). With the defaults (8, 16 channels) it has 1,418 parameters, close to the
MLP 64-20-10, so the two compare at equal size but different curvature structure.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..protocols import Params
from .base import ClassificationTask
from .mlp import _activation, linear_init

__all__ = ["ConvTask"]


class ConvTask(ClassificationTask):
    """Args:
        dataset: An image dataset whose features are square single-channel images.
        channels: Output channels of the two conv layers.
        activation: As for :class:`~flat_l2o_plugin.tasks.MLPTask`.
        batch_size: Training mini-batch size.
    """

    def __init__(self, dataset: str = "digits", channels: Sequence[int] = (8, 16), activation: str = "relu",
                 batch_size: int = 128) -> None:
        self._act = _activation(activation)
        channels = tuple(int(c) for c in channels)
        if len(channels) != 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be two positive integers, got {channels!r}")
        super().__init__(dataset, batch_size)
        side = int(round(self.data.num_features ** 0.5))
        if side * side != self.data.num_features:
            raise ValueError(f"dataset {dataset!r} does not hold square images ({self.data.num_features} features)")
        self.side, self.channels, self.activation = side, channels, activation
        self.name = f"conv_{dataset}[{channels[0]}-{channels[1]},{activation}]"

    def init_params(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        c1, c2 = self.channels
        classes = self.data.num_classes
        return [linear_init(9, (c1, 1, 3, 3), g), linear_init(9, (c1,), g),
                linear_init(9 * c1, (c2, c1, 3, 3), g), linear_init(9 * c1, (c2,), g),
                linear_init(c2, (classes, c2), g), linear_init(c2, (classes,), g)]

    def forward(self, params: Params, x: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3 = params
        h = x.to(w1.dtype).view(-1, 1, self.side, self.side)
        h = F.max_pool2d(self._act(F.conv2d(h, w1, b1, padding=1)), 2)
        h = self._act(F.conv2d(h, w2, b2, padding=1)).mean(dim=(2, 3))
        return F.linear(h, w3, b3)
