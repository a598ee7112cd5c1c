"""A small convolutional classifier on any image or 1-D sequence dataset, as a functional optimizee.

On images: conv3x3(C→c1) → act → 2x2 max-pool → conv3x3(c1→c2) → act → global average
pool → linear(c2→classes), where C is the dataset's channel count. On 8x8 digits with the
defaults (8, 16 channels) it has 1,418 parameters, close to the MLP 64-20-10, so the
two compare at equal size but different curvature structure. The same net runs on
MNIST (1x28x28), CIFAR-10 (3x32x32) and the generated images: global average pooling
makes its size independent of the image side.

On 1-D sequences (examples of shape ``(L,)`` and no ``image_shape``, e.g. ``mnist1d``)
the same net runs with 1-D convolutions, each example being one channel of length L:
conv1d k=3 (1→c1) → act → max-pool 2 → conv1d k=3 (c1→c2) → act → mean over length →
linear(c2→classes). With the defaults on MNIST-1D it has 602 parameters.
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
        dataset: An image dataset (one whose ``image_shape`` is set: ``digits``,
            ``mnist``, ``cifar10``, ``synthetic_images``), run with 2-D convolutions, or a
            dataset of 1-D sequences (examples of shape ``(L,)`` with ``L >= 2`` and no
            ``image_shape``, e.g. ``mnist1d``), run with 1-D convolutions on one input
            channel; the task's ``name`` then starts with ``conv1d_``.
        channels: Output channels of the two conv layers.
        activation: As for :class:`~flat_l2o_plugin.tasks.MLPTask`.
        batch_size: Training mini-batch size.
        dataset_options, train_subset, train_subset_seed, eval_batch_size: As for
            :class:`~flat_l2o_plugin.tasks.base.ClassificationTask`.

    Raises:
        ConfigError: ``dataset`` holds neither images nor 1-D sequences (the message
            names it, its example shape and the shapes accepted), or bad ``channels``
            or ``activation``.
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
        input_shape = self.data.input_shape
        if self.data.image_shape is not None:
            self.spatial_dims = 2
            self.input_layout: tuple[int, ...] = tuple(self.data.image_shape)  # (C, H, W)
        elif len(input_shape) == 1 and input_shape[0] >= 2:
            self.spatial_dims = 1
            self.input_layout = (1, input_shape[0])  # one channel of length L
        else:
            raise ConfigError(
                f"ConvTask: dataset {dataset!r} holds neither images nor 1-D sequences (examples of shape "
                f"{input_shape}); accepted: an image dataset (image_shape set: digits, mnist, cifar10, "
                f"synthetic_images) or 1-D sequences of shape (L,) with L >= 2 (e.g. mnist1d); or use an MLP")
        # image_shape stays the dataset's (C, H, W), None on the 1-D path.
        self.image_shape, self.channels, self.activation = self.data.image_shape, channels, activation
        prefix = "conv" if self.spatial_dims == 2 else "conv1d"
        self.name = f"{prefix}_{dataset}[{channels[0]}-{channels[1]},{activation}]"

    def init_params(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        c1, c2 = self.channels
        c0 = self.input_layout[0]
        classes = self.data.num_classes
        # Fan-in of a conv layer: kernel size x input channels (9·c_in for 3x3, 3·c_in for k=3).
        k = (3,) * self.spatial_dims
        taps = 3 ** self.spatial_dims
        return [linear_init(taps * c0, (c1, c0, *k), g), linear_init(taps * c0, (c1,), g),
                linear_init(taps * c1, (c2, c1, *k), g), linear_init(taps * c1, (c2,), g),
                linear_init(c2, (classes, c2), g), linear_init(c2, (classes,), g)]

    def forward(self, params: Params, x: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3 = params
        h = x.to(w1).reshape(-1, *self.input_layout)
        if self.spatial_dims == 2:
            h = F.max_pool2d(self._act(F.conv2d(h, w1, b1, padding=1)), 2)
            h = self._act(F.conv2d(h, w2, b2, padding=1)).mean(dim=(2, 3))
        else:
            h = F.max_pool1d(self._act(F.conv1d(h, w1, b1, padding=1)), 2)
            h = self._act(F.conv1d(h, w2, b2, padding=1)).mean(dim=2)
        return F.linear(h, w3, b3)
