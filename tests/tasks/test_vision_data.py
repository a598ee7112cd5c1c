"""MNIST and CIFAR-10 from tiny files written in the real on-disk formats, and the missing-file errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flat_l2o_plugin import create_task
from flat_l2o_plugin.tasks import DataFormatError, MissingDataError, load_dataset
from flat_l2o_plugin.tasks.vision_data import CIFAR10_FILES, DATA_ROOT_ENV, MNIST_FILES


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """An idx file: magic (0, 0, type 0x08 = ubyte, number of dimensions), big-endian sizes, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if compress else path.open("wb")) as handle:
        handle.write(payload)


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10, *, compress: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10}
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        write_idx(raw / (f"{name}.gz" if compress else name), array, compress=compress)
    return arrays


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 5) -> dict[str, dict]:
    """The python batches: dicts of a uint8 (n, 3072) 'data' array and a 'labels' list."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        batch = {"batch_label": f"batch {i}", "labels": [int(v) for v in rng.integers(0, 10, n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}_{j}.png" for j in range(n)]}
        # Protocol 2 as the original (Python 2) files; the test batch as a Python 3 tool writes it.
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=pickle.DEFAULT_PROTOCOL if name == "test_batch" else 2)
        batches[name] = batch
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return batches


def test_mnist_idx_files_round_trip(tmp_path):
    arrays = write_mnist(tmp_path)
    data = load_dataset("mnist", root=str(tmp_path), val_size=5)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert {s: len(data.split(s)[1]) for s in ("train", "val", "test")} == {"train": 25, "val": 5, "test": 10}
    x_test, y_test = data.split("test")
    assert x_test.dtype == torch.float32 and x_test.shape == (10, 1, 28, 28)
    assert torch.equal(x_test[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255)
    assert y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # train and val partition the source's training images.
    source = {tuple(img.flatten().tolist()) for img in torch.from_numpy(arrays["train-images-idx3-ubyte"]) / 255}
    carved = [tuple(img.flatten().tolist()) for s in ("train", "val") for img in data.split(s)[0]]
    assert len(carved) == 30 and set(carved) == source
    subset = load_dataset("mnist", root=tmp_path, val_size=5, train_samples=7)
    assert torch.equal(subset.split("train")[0], data.split("train")[0][:7])


def test_mnist_root_from_the_environment_and_a_task_on_it(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    task = create_task("conv", dataset="mnist", dataset_options={"val_size": 5}, batch_size=8)
    assert task.image_shape == (1, 28, 28)
    assert task.loss(task.init_params(0), task.sample_batch(torch.Generator().manual_seed(0))).isfinite()
    mlp = create_task("mlp", dataset="mnist", dataset_options={"val_size": 5}, hidden_sizes=(4,))
    assert mlp.sizes == (784, 4, 10)


def test_mnist_without_a_root_says_how_to_configure_one():
    with pytest.raises(MissingDataError) as error:
        load_dataset("mnist")
    message = str(error.value)
    assert DATA_ROOT_ENV in message and "root=" in message
    assert all(f"<root>{os.sep}MNIST{os.sep}raw{os.sep}{name}" in message for name in MNIST_FILES)


def test_missing_mnist_files_are_named_with_the_expected_layout(tmp_path):
    with pytest.raises(MissingDataError) as error:
        load_dataset("mnist", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert all(str(tmp_path / "MNIST" / "raw" / name) in message for name in MNIST_FILES)


def test_gzipped_mnist_files_get_a_decompression_hint(tmp_path):
    write_mnist(tmp_path, compress=True)
    with pytest.raises(MissingDataError, match=r"decompress them in place \(gunzip -k"):
        load_dataset("mnist", root=tmp_path, val_size=5)


def test_a_corrupt_mnist_file_is_a_format_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataFormatError, match="t10k-"):
        load_dataset("mnist", root=tmp_path, val_size=5)


def test_cifar10_python_batches_round_trip(tmp_path):
    batches = write_cifar10(tmp_path)
    data = load_dataset("cifar10", root=tmp_path, val_size=4)
    assert data.image_shape == (3, 32, 32) and data.class_names[0] == "airplane"
    assert {s: len(data.split(s)[1]) for s in ("train", "val", "test")} == {"train": 16, "val": 4, "test": 5}
    x_test, y_test = data.split("test")
    first = torch.from_numpy(batches["test_batch"]["data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x_test[0], first)  # channel-major rows: 1024 red, 1024 green, 1024 blue
    assert y_test.tolist() == batches["test_batch"]["labels"]
    source = sorted(label for k in range(1, 6) for label in batches[f"data_batch_{k}"]["labels"])
    assert sorted(torch.cat([data.split("train")[1], data.split("val")[1]]).tolist()) == source
    task = create_task("conv", dataset="cifar10", dataset_options={"root": str(tmp_path), "val_size": 4},
                       batch_size=4)
    assert task.image_shape == (3, 32, 32) and task.evaluate(task.init_params(0), "test")["loss"] > 0


def test_missing_cifar10_files_are_named_with_the_expected_layout(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(MissingDataError) as error:
        load_dataset("cifar10", root=tmp_path)
    message = str(error.value)
    assert "1 of its files are missing" in message and "(data_batch_3)" in message
    assert all(str(tmp_path / "cifar-10-batches-py" / name) in message for name in CIFAR10_FILES)
    assert "tar -xzf cifar-10-python.tar.gz" in message


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (os.getcwd, ())


def test_cifar10_batches_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("wb") as handle:
        pickle.dump({"data": _RunsCode(), "labels": []}, handle)
    with pytest.raises(DataFormatError, match=r"refusing to load .*getcwd.*data_batch_1|data_batch_1.*refusing"):
        load_dataset("cifar10", root=tmp_path, val_size=4)


def test_a_malformed_cifar10_batch_is_a_format_error(tmp_path):
    write_cifar10(tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as handle:
        pickle.dump({"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(DataFormatError, match=r"test_batch: 'data' must be a uint8 array of shape \(n, 3072\)"):
        load_dataset("cifar10", root=tmp_path, val_size=4)


class _Marker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_legacy_mnist_pickle_that_names_code_is_refused_naming_the_file(tmp_path):
    # torchvision reads MNIST/processed/{training,test}.pt before the raw idx files.
    write_mnist(tmp_path)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    ran = tmp_path / "code-ran"
    for name in ("training.pt", "test.pt"):
        with (processed / name).open("wb") as handle:
            pickle.dump(_Marker(ran), handle, protocol=2)
    with pytest.raises(DataFormatError) as raised:
        load_dataset("mnist", root=tmp_path, val_size=5)
    message = str(raised.value)
    assert f"refused {processed / 'training.pt'}" in message and "\n" not in message
    assert not ran.exists()
