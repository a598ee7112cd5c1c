"""MNIST and CIFAR-10 read from a local folder, in their original on-disk formats.

Nothing is downloaded. The data root is the ``root`` option, or else the folder named
by the environment variable ``FLAT_L2O_DATA``; it holds one sub-folder per dataset,
laid out as torchvision lays them out::

    <root>/MNIST/raw/train-images-idx3-ubyte
    <root>/MNIST/raw/train-labels-idx1-ubyte
    <root>/MNIST/raw/t10k-images-idx3-ubyte
    <root>/MNIST/raw/t10k-labels-idx1-ubyte
    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5
    <root>/cifar-10-batches-py/test_batch
    <root>/cifar-10-batches-py/batches.meta

MNIST is read by ``torchvision.datasets.MNIST(root, train=..., download=False)``, which
needs the idx files decompressed. CIFAR-10's python batches are read here, in the same
format torchvision reads, for two reasons: torchvision's ``CIFAR10`` refuses any file
whose MD5 differs from the official archive's (so a subset, or a converted copy, never
loads), and it unpickles with the full ``pickle`` module, which runs whatever code a
file names. Our unpickler accepts only the NumPy array constructors the batches need.

Pixels are scaled to [0, 1]; images are stored as ``(n, channels, height, width)``.
Both sources ship a train and a test set only, so ``val`` is carved out of the train
set with a fixed permutation (``val_size`` images, 5,000 by default); the test set is
never touched.
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._extras import import_extra
from .data import DataFormatError, Dataset, MissingDataError, carve_validation, take_train_samples

__all__ = [
    "CIFAR10_FILES",
    "CIFAR10_FOLDER",
    "DATA_ROOT_ENV",
    "MNIST_FILES",
    "MNIST_FOLDER",
    "load_cifar10",
    "load_mnist",
    "resolve_data_root",
]

DATA_ROOT_ENV = "FLAT_L2O_DATA"
"""The environment variable naming the data root when no ``root`` option is given."""

MNIST_FOLDER = Path("MNIST", "raw")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
MNIST_LEGACY_FOLDER = Path("MNIST", "processed")  # torchvision's old format (training.pt, test.pt): read first
CIFAR10_FOLDER = Path("cifar-10-batches-py")
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def _layout(root: str | Path, folder: Path, files: tuple[str, ...]) -> str:
    return "\n".join(f"  {Path(root, folder, name)}" for name in files)


def resolve_data_root(root: str | os.PathLike[str] | None, dataset: str, folder: Path,
                      files: tuple[str, ...]) -> Path:
    """The absolute data root: ``root``, else ``$FLAT_L2O_DATA``.

    Raises:
        MissingDataError: Neither is set; the message shows the layout ``dataset`` needs.
    """
    if root is None or root == "":
        root = os.environ.get(DATA_ROOT_ENV) or None
    if root is None:
        raise MissingDataError(
            f"dataset {dataset!r} is read from a local folder and none is configured: pass "
            f"root='/path/to/data' (a task's dataset_options={{'root': ...}}) or set "
            f"{DATA_ROOT_ENV}=/path/to/data. Nothing is downloaded; the folder must hold:\n"
            f"{_layout('<root>', folder, files)}")
    return Path(root).expanduser().resolve()


def _check_files(root: Path, dataset: str, folder: Path, files: tuple[str, ...], hint: str) -> None:
    missing = [name for name in files if not (root / folder / name).is_file()]
    if not missing:
        return
    message = (f"dataset {dataset!r}: {len(missing)} of its files are missing under {root / folder} "
               f"({', '.join(missing)}). Expected layout:\n{_layout(root, folder, files)}\n{hint}")
    gzipped = [name for name in missing if (root / folder / f"{name}.gz").is_file()]
    if gzipped:
        message += (f"\nFound {', '.join(f'{name}.gz' for name in gzipped)}: decompress them in place "
                    f"(gunzip -k {root / folder}/*.gz).")
    raise MissingDataError(message)


def _split(dataset: str, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, val_size: int,
           train_samples: int | None, class_names: tuple[str, ...] | None = None) -> Dataset:
    train_pool, val_idx = carve_validation(len(y), val_size, dataset=dataset)
    train_idx = take_train_samples(dataset, train_pool, train_samples)
    return Dataset(dataset, {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
                             "test": (x_test, y_test)}, num_classes=10,
                   image_shape=tuple(x.shape[1:]), class_names=class_names)  # type: ignore[arg-type]


def _check_labels(dataset: str, where: Path, images: Tensor, labels: Tensor) -> None:
    if len(images) != len(labels):
        raise DataFormatError(f"dataset {dataset!r}: {where} holds {len(images)} images but {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataFormatError(f"dataset {dataset!r}: {where} holds labels outside 0..9")


# ------------------------------------------------------------------------------ MNIST


def load_mnist(root: str | os.PathLike[str] | None = None, val_size: int = 5000,
               train_samples: int | None = None) -> Dataset:
    """MNIST from ``<root>/MNIST/raw/`` (the four decompressed idx files).

    Args:
        root: The data root; ``None`` reads ``$FLAT_L2O_DATA``.
        val_size: Training images set aside as ``val`` (fixed permutation, seed 0).
        train_samples: Keep only this many of the remaining training images (``None``:
            all 55,000 with the defaults).

    Raises:
        MissingDataError: No root configured, or files missing (the message lists them).
        DataFormatError: A file is not a valid idx file.
    """
    path = resolve_data_root(root, "mnist", MNIST_FOLDER, MNIST_FILES)
    return _mnist(path, val_size, train_samples)


@lru_cache(maxsize=None)
def _mnist(root: Path, val_size: int, train_samples: int | None) -> Dataset:
    _check_files(root, "mnist", MNIST_FOLDER, MNIST_FILES,
                 "They are the four files of the MNIST distribution, decompressed.")
    MNIST = import_extra("torchvision.datasets", "data", "dataset 'mnist'").MNIST  # noqa: N806 - a class

    parts = []
    legacy = root / MNIST_LEGACY_FOLDER
    for train in (True, False):
        legacy_file = legacy / ("training.pt" if train else "test.pt")
        try:
            source = MNIST(str(root), train=train, download=False)
        except (pickle.UnpicklingError, EOFError, AssertionError, RuntimeError, TypeError, ValueError, KeyError,
                AttributeError, ImportError) as exc:
            reason = " ".join(str(exc).split())[:200]
            if (legacy / "training.pt").is_file() and (legacy / "test.pt").is_file():
                # torchvision prefers its old processed files to the raw idx files when both exist.
                raise DataFormatError(
                    f"dataset 'mnist': refused {legacy_file}: torchvision reads this legacy file before the raw "
                    f"idx files, and it is not a plain tensor file ({type(exc).__name__}: {reason}); nothing in it "
                    f"ran. Remove {legacy} to read the raw files") from exc
            which = "train-*" if train else "t10k-*"
            raise DataFormatError(
                f"dataset 'mnist': {root / MNIST_FOLDER}/{which} could not be read as idx files "
                f"({type(exc).__name__}: {reason}); replace them with the original MNIST files") from exc
        images, labels = source.data, source.targets
        _check_labels("mnist", root / MNIST_FOLDER, images, labels)
        parts += [images.unsqueeze(1).to(torch.float32) / 255.0, labels.to(torch.long)]
    return _split("mnist", *parts, val_size=val_size, train_samples=train_samples)


# --------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays, and nothing that could run code.

    The original batches were pickled by Python 2 with NumPy; copies re-saved by
    Python 3 (any protocol) need the same few constructors.
    """

    _ALLOWED = frozenset({
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
                       "numpy")
        for name in ("_reconstruct", "_frombuffer", "scalar", "ndarray", "dtype")
    } | {
        # Python 3 writes bytes under protocol 2 as _codecs.encode(text, "latin1"); it only
        # converts text, and codec lookup imports nothing outside the encodings package.
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            # The batches were written by Python 2; latin1 maps their byte strings 1:1.
            content = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataFormatError(
            f"dataset 'cifar10': {path} is not a CIFAR-10 python batch ({exc}); "
            f"replace it with the file of the same name from cifar-10-python.tar.gz") from exc
    if not isinstance(content, dict):
        raise DataFormatError(f"dataset 'cifar10': {path} holds a {type(content).__name__}, expected a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    batch = _read_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(
            f"dataset 'cifar10': {path}: 'data' must be a uint8 array of shape (n, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels is None:
        raise DataFormatError(f"dataset 'cifar10': {path} has no 'labels' entry")
    # Rows are 1024 red, then green, then blue values of a 32x32 image in row-major order.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    _check_labels("cifar10", path, images, targets)
    return images, targets


def load_cifar10(root: str | os.PathLike[str] | None = None, val_size: int = 5000,
                 train_samples: int | None = None) -> Dataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (the python version's batches).

    Args:
        root: The data root; ``None`` reads ``$FLAT_L2O_DATA``.
        val_size: Training images set aside as ``val`` (fixed permutation, seed 0).
        train_samples: Keep only this many of the remaining training images (``None``:
            all 45,000 with the defaults).

    Raises:
        MissingDataError: No root configured, or files missing (the message lists them).
        DataFormatError: A file is not a CIFAR-10 python batch.
    """
    path = resolve_data_root(root, "cifar10", CIFAR10_FOLDER, CIFAR10_FILES)
    return _cifar10(path, val_size, train_samples)


@lru_cache(maxsize=None)
def _cifar10(root: Path, val_size: int, train_samples: int | None) -> Dataset:
    _check_files(root, "cifar10", CIFAR10_FOLDER, CIFAR10_FILES,
                 "They are the contents of cifar-10-python.tar.gz: tar -xzf cifar-10-python.tar.gz -C <root>.")
    folder = root / CIFAR10_FOLDER
    names = _read_pickle(folder / "batches.meta").get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataFormatError(f"dataset 'cifar10': {folder / 'batches.meta'} must list 10 'label_names'")
    train = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_batch(folder / "test_batch")
    return _split("cifar10", torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test,
                  val_size=val_size, train_samples=train_samples, class_names=tuple(map(str, names)))
