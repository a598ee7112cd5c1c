"""MNIST-1D (Greydanus, 2020), generated offline by the ``mnist1d`` package.

The generator's default arguments (5,000 sequences of length 40, seed 42) reproduce the
reference dataset, and its own 80/20 split gives 4,000 training and 1,000 test
sequences. We keep its 1,000 test sequences as ``test``, carve 500 validation sequences
out of its 4,000 training ones with a fixed permutation, and take the first
``train_samples`` (default 1,000) of the remaining 3,500 as ``train``. A smaller
``train_samples`` is therefore a subset of a larger one, and ``val`` and ``test`` never
depend on it.

Only ``mnist1d.data.make_dataset`` is called: the package's ``get_dataset`` downloads a
pickle from the internet and writes a cache file into the working folder.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .._extras import import_extra
from ..errors import ConfigError
from .data import DataFormatError, Dataset, carve_validation, pack, take_train_samples

__all__ = ["MNIST1D_VAL_SIZE", "load_mnist1d"]

MNIST1D_VAL_SIZE = 500
"""Validation sequences carved out of the generator's training part."""


def load_mnist1d(train_samples: int = 1000, seed: int = 42) -> Dataset:
    """MNIST-1D with ``train_samples`` training sequences and fixed val / test splits.

    Args:
        train_samples: Training sequences, 1 to 3,500 (``None``: all 3,500).
        seed: The generator's seed; 42 reproduces the reference dataset.

    Returns:
        A :class:`~flat_l2o_plugin.tasks.data.Dataset` of 40-step sequences (standardized
        by the generator), 10 classes, 500 validation and 1,000 test sequences.

    Raises:
        ConfigError: ``train_samples`` or ``seed`` out of range.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"dataset 'mnist1d': seed must be a non-negative integer, got {seed!r}")
    # Checked before generating (seconds of work) against the generator's fixed sizes.
    take_train_samples("mnist1d", torch.arange(_GENERATED_TRAIN - MNIST1D_VAL_SIZE), train_samples)
    return _build(train_samples, seed)


_GENERATED_TRAIN = 4000  # the generator's defaults: 5,000 sequences, 80% of them for training


@lru_cache(maxsize=None)
def _build(train_samples: int, seed: int) -> Dataset:
    x, y, x_test, y_test = _generate(seed)
    train_pool, val_idx = carve_validation(len(y), MNIST1D_VAL_SIZE)
    train_idx = take_train_samples("mnist1d", train_pool, train_samples)
    return Dataset("mnist1d", {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
                               "test": (x_test, y_test)}, num_classes=10)


@lru_cache(maxsize=None)
def _generate(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mnist1d = import_extra("mnist1d.data", "data", "dataset 'mnist1d'")

    args = mnist1d.get_dataset_args()
    args.seed = seed
    # make_dataset reseeds Python's and NumPy's global generators; put them back so that
    # building a dataset never changes what the rest of the program draws.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = mnist1d.make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    if len(generated["y"]) != _GENERATED_TRAIN:
        raise DataFormatError(
            f"dataset 'mnist1d': the installed mnist1d package generated {len(generated['y'])} training "
            f"sequences, expected {_GENERATED_TRAIN}; its default arguments changed, pin mnist1d>=0.0.2 "
            f"to a version that keeps them")
    return (*pack(generated["x"], generated["y"]), *pack(generated["x_test"], generated["y_test"]))
