"""A small convolutional classifier on any image dataset, as a functional optimizee.

conv3x3(C→c1) → act → 2x2 max-pool → conv3x3(c1→c2) → act → global average pool →
linear(c2→classes), where C is the dataset's channel count. On 8x8 digits with the
defaults (8, 16 channels) it has 1,418 parameters, close to the MLP 64-20-10, so the
two compare at equal size but different curvature structure. The same net runs on
MNIST (1x28x28), CIFAR-10 (3x32x32) and the generated images: global average pooling
makes its size independent of the image side.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Params
from .base import ClassificationTask
from .mlp import _activation, linear_init

__all__ = ["ConvTask"]


class ConvTask(ClassificationTask):
    """Args:
        dataset: An image dataset (one whose ``image_shape`` is set): ``digits``,
            ``mnist``, ``cifar10``, ``synthetic_images``.
        channels: Output channels of the two conv layers.
        activation: As for :class:`~flat_l2o_plugin.tasks.MLPTask`.
        batch_size: Training mini-batch size.
        dataset_options, train_subset, train_subset_seed, eval_batch_size: As for
            :class:`~flat_l2o_plugin.tasks.base.ClassificationTask`.
    """

    def __init__(self, dataset: str = "digits", channels: Sequence[int] = (8, 16), activation: str = "relu",
                 batch_size: int = 128, *, dataset_options: Mapping[str, Any] | None = None,
                 train_subset: int | None = None, train_subset_seed: int = 0, eval_batch_size: int = 1024) -> None:
        self._act = _activation(activation)
        channels = tuple(int(c) for c in channels)
        if len(channels) != 2 or any(c < 1 for c in channels):
            raise ConfigError(f"channels must be two positive integers, got {channels!r}")
        super().__init__(dataset, batch_size, dataset_options=dataset_options, train_subset=train_subset,
                         train_subset_seed=train_subset_seed, eval_batch_size=eval_batch_size)
        if self.data.image_shape is None:
            raise ConfigError(
                f"ConvTask: dataset {dataset!r} does not hold images (examples of shape {self.data.input_shape}); "
                f"use an image dataset (digits, mnist, cifar10, synthetic_images) or an MLP")
        self.image_shape, self.channels, self.activation = self.data.image_shape, channels, activation
        self.name = f"conv_{dataset}[{channels[0]}-{channels[1]},{activation}]"

    def init_params(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        c1, c2 = self.channels
        c0 = self.image_shape[0]
        classes = self.data.num_classes
        return [linear_init(9 * c0, (c1, c0, 3, 3), g), linear_init(9 * c0, (c1,), g),
                linear_init(9 * c1, (c2, c1, 3, 3), g), linear_init(9 * c1, (c2,), g),
                linear_init(c2, (classes, c2), g), linear_init(c2, (classes,), g)]

    def forward(self, params: Params, x: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3 = params
        h = x.to(w1).reshape(-1, *self.image_shape)
        h = F.max_pool2d(self._act(F.conv2d(h, w1, b1, padding=1)), 2)
        h = self._act(F.conv2d(h, w2, b2, padding=1)).mean(dim=(2, 3))
        return F.linear(h, w3, b3)
