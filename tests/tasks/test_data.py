"""The generated datasets: sizes, fixed splits, determinism, and their options' errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.tasks import list_datasets, load_dataset
from flat_l2o_plugin.tasks.data import carve_validation


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r.flatten().tolist()) for r in x}


def test_the_registered_datasets():
    assert list_datasets() == ["cifar10", "digits", "mnist", "mnist1d", "synthetic_images", "synthetic_linear"]


def test_mnist1d_has_the_requested_training_samples_and_fixed_val_and_test():
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.get_rng_state()
    default = load_dataset("mnist1d")
    # The generator reseeds NumPy and Python globally; loading must put both back.
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert torch.equal(torch.random.get_rng_state(), torch_state)

    sizes = {s: tuple(default.split(s)[0].shape) for s in ("train", "val", "test")}
    assert sizes == {"train": (1000, 40), "val": (500, 40), "test": (1000, 40)}
    assert default.num_classes == 10 and default.image_shape is None
    assert torch.bincount(default.split("train")[1], minlength=10).min() >= 70
    assert not _rows(default.split("train")[0]) & _rows(default.split("val")[0])
    assert not _rows(default.split("train")[0]) & _rows(default.split("test")[0])

    small = load_dataset("mnist1d", train_samples=200)
    assert small.split("train")[0].shape == (200, 40)
    # A smaller training set is a prefix of a larger one; val and test never move.
    assert torch.equal(small.split("train")[0], default.split("train")[0][:200])
    for split in ("val", "test"):
        assert torch.equal(small.split(split)[0], default.split(split)[0])
    assert load_dataset("mnist1d") is default  # cached
    with pytest.raises(ConfigError, match=r"train_samples must be an integer in \[1, 3500\]"):
        load_dataset("mnist1d", train_samples=4000)


def test_synthetic_images_are_deterministic_and_split_independently():
    data = load_dataset("synthetic_images", side=8, channels=2, num_classes=4, train_samples=40, val_samples=12,
                        test_samples=12, seed=3)
    assert data.split("train")[0].shape == (40, 2, 8, 8) and data.image_shape == (2, 8, 8)
    assert set(data.split("train")[1].tolist()) <= set(range(4))
    more = load_dataset("synthetic_images", side=8, channels=2, num_classes=4, train_samples=80, val_samples=12,
                        test_samples=12, seed=3)
    assert torch.equal(more.split("val")[0], data.split("val")[0])
    assert torch.equal(more.split("test")[1], data.split("test")[1])
    other = load_dataset("synthetic_images", side=8, channels=2, num_classes=4, train_samples=40, val_samples=12,
                         test_samples=12, seed=4)
    assert not torch.equal(other.split("train")[0], data.split("train")[0])
    with pytest.raises(ConfigError, match="side must be an integer >= 4"):
        load_dataset("synthetic_images", side=2)
    with pytest.raises(ConfigError, match="noise"):
        load_dataset("synthetic_images", noise=-1.0)


def test_synthetic_linear_labels_follow_the_logistic_teacher():
    data = load_dataset("synthetic_linear", features=5, num_classes=3, train_samples=2000, seed=1)
    x, y = data.split("train")
    assert x.shape == (2000, 5) and data.num_classes == 3
    # The classes are linearly separable up to the teacher's noise: least squares on one-hot
    # labels already beats chance by far.
    onehot = torch.nn.functional.one_hot(y, 3).float()
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    weights = torch.linalg.lstsq(design, onehot).solution
    assert float(((design @ weights).argmax(1) == y).float().mean()) > 0.6
    with pytest.raises(ConfigError, match="teacher_scale"):
        load_dataset("synthetic_linear", teacher_scale=0)


def test_carving_a_validation_split_is_fixed_and_disjoint():
    train, val = carve_validation(20, 5)
    again_train, again_val = carve_validation(20, 5)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(20))
    with pytest.raises(ConfigError, match="val_size"):
        carve_validation(20, 20)


def test_unknown_datasets_and_options_name_what_exists():
    with pytest.raises(ConfigError, match="available: cifar10, digits"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="its options: train_samples, seed"):
        load_dataset("mnist1d", samples=10)
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_dataset("digits").split("dev")


def test_label_noise_flips_exactly_that_fraction_of_training_labels_only():
    clean = load_dataset("digits")
    noisy = load_dataset("digits", label_noise=0.25, label_noise_seed=3)
    y, y_noisy = clean.split("train")[1], noisy.split("train")[1]
    assert int((y != y_noisy).sum()) == round(0.25 * len(y))
    assert torch.equal(clean.split("train")[0], noisy.split("train")[0])
    for split in ("val", "test"):
        assert torch.equal(clean.split(split)[1], noisy.split(split)[1])
    # Fixed by its seed, cached, and another seed flips other labels.
    assert load_dataset("digits", label_noise=0.25, label_noise_seed=3) is noisy
    other = load_dataset("digits", label_noise=0.25, label_noise_seed=4).split("train")[1]
    assert not torch.equal(other, y_noisy)
    # New labels are other classes, drawn over all of them.
    flipped = y != y_noisy
    assert set(y_noisy[flipped].tolist()) == set(range(10))
    assert load_dataset("digits", label_noise=0.0) is clean


@pytest.mark.parametrize("options, field", [({"label_noise": 1.0}, "label_noise"), ({"label_noise": -0.1}, "label_noise"),
                                            ({"label_noise": "0.1"}, "label_noise"),
                                            ({"label_noise": 0.1, "label_noise_seed": -1}, "label_noise_seed")])
def test_bad_label_noise_names_the_option(options, field):
    with pytest.raises(ConfigError, match=field):
        load_dataset("digits", **options)
