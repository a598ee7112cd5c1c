"""Datasets with fixed train / validation / test splits, built once and cached.

Every dataset has fixed ``train`` / ``val`` / ``test`` splits. Meta-training draws
batches from ``train`` and selects checkpoints on ``val``; only final reports touch
``test``. Where a source ships only a train and a test set, the validation split is
carved out of its train set with a fixed seed, so the test set stays untouched.

Nothing here downloads. The datasets are:

========================  =============================================================
``digits``                scikit-learn's 8x8 digits (bundled with scikit-learn).
``mnist1d``               MNIST-1D, generated offline by the ``mnist1d`` package.
``mnist``, ``cifar10``    The real image sets, read from a local folder
                          (``root=`` or ``FLAT_L2O_DATA``); see :mod:`.vision_data`.
``synthetic_images``      Generated images whose class is a learnable pattern.
``synthetic_linear``      Generated features labelled by a random multinomial-logit
                          teacher: logistic regression is the true model.
========================  =============================================================

A dataset's options (``load_dataset("mnist1d", train_samples=500)``) are part of its
cache key, so tasks that share a dataset and its options share one copy in memory.
Treat the tensors as read-only for that reason.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import Tensor

from .._extras import import_extra
from ..errors import ConfigError

__all__ = [
    "SPLITS",
    "DataFormatError",
    "Dataset",
    "MissingDataError",
    "carve_validation",
    "check_split",
    "list_datasets",
    "load_dataset",
]

SPLITS = ("train", "val", "test")


class MissingDataError(ConfigError):
    """A dataset's files are not where its loader looks.

    The message names the folder, lists the files expected there (the directory
    layout) and says how to point the loader at another folder.
    """


class DataFormatError(ConfigError):
    """A dataset file exists but does not hold what its format promises; the message names it."""


@dataclass(frozen=True)
class Dataset:
    """Features and integer labels for each split.

    Attributes:
        name: The registered dataset name.
        splits: ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; ``x`` is float32
            of shape ``(n, *input_shape)``, ``y`` is int64 of shape ``(n,)``.
        num_classes: Labels lie in ``range(num_classes)``.
        image_shape: ``(channels, height, width)`` when every example is an image
            (stored flat or not), else ``None``.
        class_names: Human-readable label names, when the source provides them.
    """

    name: str
    splits: dict[str, tuple[Tensor, Tensor]]
    num_classes: int
    image_shape: tuple[int, int, int] | None = None
    class_names: tuple[str, ...] | None = field(default=None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example as stored, e.g. ``(64,)`` or ``(3, 32, 32)``."""
        return tuple(self.splits["train"][0].shape[1:])

    @property
    def num_features(self) -> int:
        """The number of scalars in one example (what an MLP's first layer sees)."""
        return math.prod(self.input_shape)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of split ``name``.

        Raises:
            ConfigError: ``name`` is not one of this dataset's splits.
        """
        if name not in self.splits:
            raise ConfigError(f"dataset {self.name!r} has no split {name!r}; splits: {', '.join(self.splits)}")
        return self.splits[name]


def check_split(owner: str, split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`; raise a :class:`ConfigError` naming ``owner`` otherwise."""
    if split not in SPLITS:
        raise ConfigError(f"{owner}: unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return split


def positive_int(owner: str, option: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``; a :class:`ConfigError` naming ``owner`` and ``option`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner}: {option} must be an integer >= {minimum}, got {value!r}")
    return value


def carve_validation(count: int, val_size: int, seed: int = 0, *, dataset: str = "") -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` that split ``range(count)`` with a fixed permutation.

    Used where a source ships only train and test sets. The permutation depends only on
    ``count`` and ``seed``, so the validation split never moves between runs, and a
    smaller training subset taken as a prefix of ``train`` is nested in a larger one.

    Raises:
        ConfigError: ``val_size`` leaves no training example.
    """
    if not isinstance(val_size, int) or isinstance(val_size, bool) or not 0 < val_size < count:
        where = f"dataset {dataset!r}: " if dataset else ""
        raise ConfigError(
            f"{where}val_size must be an integer in [1, {count - 1}] (the source's train set has {count} "
            f"examples), got {val_size!r}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


def take_train_samples(dataset: str, indices: Tensor, train_samples: int | None) -> Tensor:
    """The first ``train_samples`` of ``indices`` (all of them for ``None``), checked."""
    if train_samples is None:
        return indices
    if not isinstance(train_samples, int) or isinstance(train_samples, bool) or not 0 < train_samples <= len(indices):
        raise ConfigError(
            f"dataset {dataset!r}: train_samples must be an integer in [1, {len(indices)}] or None, "
            f"got {train_samples!r}")
    return indices[:train_samples]


def pack(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Features as a float32 tensor and labels as an int64 tensor (from arrays or tensors)."""
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


@lru_cache(maxsize=None)
def _digits() -> Dataset:
    datasets = import_extra("sklearn.datasets", "data", "dataset 'digits'")
    train_test_split = import_extra("sklearn.model_selection", "data", "dataset 'digits'").train_test_split

    x, y = datasets.load_digits(return_X_y=True)
    x = x / 16.0  # pixel intensities 0..16 -> [0, 1]
    # 1797 images: 1000 train, 397 validation, 400 test; stratified, fixed forever.
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=400, stratify=y, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, train_size=1000, stratify=y_rest, random_state=0)
    return Dataset("digits", {"train": pack(x_train, y_train), "val": pack(x_val, y_val),
                              "test": pack(x_test, y_test)}, num_classes=10, image_shape=(1, 8, 8))


# name -> the loader, or "module:function" inside this package for loaders that pull in
# heavy optional imports (mnist1d imports matplotlib, torchvision is slow to import):
# they are imported on first use only.
_LOADERS: dict[str, Callable[..., Dataset] | str] = {
    "cifar10": "vision_data:load_cifar10",
    "digits": _digits,
    "mnist": "vision_data:load_mnist",
    "mnist1d": "mnist1d_data:load_mnist1d",
    "synthetic_images": "synthetic_images:load_synthetic_images",
    "synthetic_linear": "synthetic_linear:load_synthetic_linear",
}


def list_datasets() -> list[str]:
    """The names :func:`load_dataset` accepts, sorted."""
    return sorted(_LOADERS)


def _loader(name: str) -> Callable[..., Dataset]:
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}") from None
    if isinstance(loader, str):
        module, function = loader.split(":")
        loader = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return loader


def load_dataset(name: str, **options: Any) -> Dataset:
    """The dataset ``name`` with its fixed splits, built on first use and cached.

    Args:
        name: One of :func:`list_datasets`.
        **options: The dataset's options, e.g. ``train_samples=500`` for ``mnist1d`` or
            ``root="/data"`` for ``mnist``. Each distinct set of options is built once.
            Every dataset also takes ``label_noise`` (a fraction in [0, 1) of the
            ``train`` labels replaced by another class; ``val`` and ``test`` stay clean)
            and ``label_noise_seed`` (which labels, and their new classes; default 0).

    Raises:
        ConfigError: Unknown dataset or option (the message lists the accepted ones).
        MissingDataError: The dataset's files are not on disk (the message gives the
            expected layout).

    Example:
        >>> x, y = load_dataset("mnist1d", train_samples=1000).split("train")
        >>> x.shape
        torch.Size([1000, 40])
    """
    loader = _loader(name)
    noise = options.pop("label_noise", None)
    noise_seed = options.pop("label_noise_seed", 0)
    signature = inspect.signature(loader)
    try:
        bound = signature.bind(**options)
    except TypeError:
        accepted = ", ".join(signature.parameters) or "none"
        unknown = sorted(set(options) - set(signature.parameters))
        raise ConfigError(
            f"dataset {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options: {accepted}"
        ) from None
    # Each loader caches what it builds under its own canonical key (a data root, for
    # instance, is resolved first, so two spellings of one folder share an entry).
    dataset = loader(**bound.arguments)
    if noise is None or noise == 0:
        return dataset
    return _with_label_noise(dataset, noise, noise_seed)


def _with_label_noise(dataset: Dataset, fraction: Any, seed: Any) -> Dataset:
    """``dataset`` with a ``fraction`` of its ``train`` labels replaced by another class.

    Exactly ``round(fraction · n)`` training examples, chosen by ``seed``, get a label
    drawn uniformly from the *other* classes, so that fraction of the training set is
    wrong. ``val`` and ``test`` keep their true labels: the noise models a corrupted
    training set, and every score is still measured against the truth.
    """
    owner = f"dataset {dataset.name!r}"
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ConfigError(f"{owner}: label_noise must be a fraction in [0, 1), got {fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{owner}: label_noise_seed must be a non-negative integer, got {seed!r}")
    key = (id(dataset), float(fraction), seed)
    if key not in _NOISY:
        # The clean dataset is kept alongside, so its id cannot be reused while cached.
        _NOISY[key] = (dataset, _noisy(dataset, float(fraction), seed))
    return _NOISY[key][1]


_NOISY: dict[tuple[int, float, int], tuple[Dataset, Dataset]] = {}


def _noisy(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    x, y = dataset.splits["train"]
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(y), generator=generator)[: round(fraction * len(y))]
    # An offset in [1, C-1] added modulo C moves a label to a uniformly drawn other class.
    offsets = torch.randint(1, dataset.num_classes, (len(flipped),), generator=generator)
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + offsets) % dataset.num_classes
    return replace(dataset, splits={**dataset.splits, "train": (x, noisy)})
