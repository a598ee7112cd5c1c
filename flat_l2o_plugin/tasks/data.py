"""Datasets that ship with the packages we depend on, split once and cached.

Nothing here downloads: scikit-learn's digits live inside scikit-learn. Every dataset
has fixed ``train`` / ``val`` / ``test`` splits. Meta-training draws batches from
``train`` and selects checkpoints on ``val``; only final reports touch ``test``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["Dataset", "SPLITS", "load_dataset", "list_datasets"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """Features and integer labels for each split (float32 features)."""

    name: str
    splits: dict[str, tuple[Tensor, Tensor]]
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.splits["train"][0].shape[1]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {name!r}; splits: {', '.join(self.splits)}")
        return self.splits[name]


@lru_cache(maxsize=None)
def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 16.0  # pixel intensities 0..16 -> [0, 1]
    # 1797 images: 1000 train, 397 validation, 400 test; stratified, fixed forever.
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=400, stratify=y, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, train_size=1000, stratify=y_rest, random_state=0)

    def pack(a, b):  # noqa: ANN001, ANN202
        return torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.long)

    return Dataset("digits", {"train": pack(x_train, y_train), "val": pack(x_val, y_val),
                              "test": pack(x_test, y_test)}, num_classes=10)


_LOADERS = {"digits": _digits}


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str) -> Dataset:
    """The dataset ``name`` with its fixed splits (cached after the first call)."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}") from None
    return loader()
