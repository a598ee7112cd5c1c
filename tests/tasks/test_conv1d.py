"""ConvTask on 1-D sequences (MNIST-1D) with 1-D convolutions; its 2-D path on images unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin import create_task
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.tasks import ConvTask
from flat_l2o_plugin.tasks import data as data_module
from flat_l2o_plugin.tasks.data import Dataset
from flat_l2o_plugin.tasks.mlp import linear_init

SMALL = {"train_samples": 200}


def _mnist1d(**options) -> ConvTask:
    return create_task("conv", dataset="mnist1d", dataset_options=SMALL, **options)


def test_shapes_param_count_and_name_on_mnist1d():
    task = _mnist1d()
    assert task.name == "conv1d_mnist1d[8-16,relu]"
    assert task.image_shape is None and task.data.input_shape == (40,)
    params = task.init_params(0)
    assert [tuple(p.shape) for p in params] == [(8, 1, 3), (8,), (16, 8, 3), (16,), (10, 16), (10,)]
    assert task.num_params == 8 * 3 + 8 + 16 * 8 * 3 + 16 + 10 * 16 + 10 == 602
    x, _ = task.full_batch("val")
    assert task.forward(params, x[:7]).shape == (7, 10)
    # The conv_digits registration takes the same dataset override.
    other = create_task("conv_digits", dataset="mnist1d", dataset_options=SMALL, channels=(4, 6), activation="tanh")
    assert other.name == "conv1d_mnist1d[4-6,tanh]"
    assert [tuple(p.shape) for p in other.init_params(0)][:3] == [(4, 1, 3), (4,), (6, 4, 3)]


def test_init_uses_the_fan_in_of_a_kernel_3_conv():
    task = _mnist1d(channels=(5, 7))
    g = torch.Generator().manual_seed(11)
    expected = [linear_init(3, (5, 1, 3), g), linear_init(3, (5,), g), linear_init(15, (7, 5, 3), g),
                linear_init(15, (7,), g), linear_init(7, (10, 7), g), linear_init(7, (10,), g)]
    params = task.init_params(11)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))
    assert float(params[0].abs().max()) <= 1 / math.sqrt(3)
    assert float(params[2].abs().max()) <= 1 / math.sqrt(15)


class _Reference1d(nn.Module):
    def __init__(self, c1: int, c2: int, classes: int, act: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, c1, 3, padding=1), act, nn.MaxPool1d(2),
                                      nn.Conv1d(c1, c2, 3, padding=1), act)
        self.head = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).mean(dim=2))


@pytest.mark.parametrize("activation, module", [("relu", nn.ReLU()), ("tanh", nn.Tanh()), ("gelu", nn.GELU()),
                                                ("sigmoid", nn.Sigmoid())])
def test_forward_matches_a_torch_nn_reference_exactly(activation, module):
    task = _mnist1d(channels=(6, 9), activation=activation)
    params = task.init_params(3)
    reference = _Reference1d(6, 9, 10, module)
    with torch.no_grad():
        for target, source in zip([reference.features[0].weight, reference.features[0].bias,
                                   reference.features[3].weight, reference.features[3].bias,
                                   reference.head.weight, reference.head.bias], params):
            target.copy_(source)
    x, _ = task.full_batch("test")
    with torch.no_grad():
        assert torch.equal(task.forward(params, x[:64]), reference(x[:64]))
        assert torch.equal(task.forward(params, x), reference(x))  # the whole split, one pass


def test_forward_follows_the_params_dtype():
    task = _mnist1d()
    params = [p.double() for p in task.init_params(0)]
    assert task.forward(params, task.full_batch("val")[0][:4]).dtype == torch.float64


def test_a_few_adam_steps_lower_the_loss():
    task = _mnist1d()
    params = [p.requires_grad_() for p in task.init_params(0)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    full = task.full_batch("train")
    before = float(task.loss(params, full).detach())
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        optimizer.zero_grad()
        task.loss(params, task.sample_batch(generator)).backward()
        optimizer.step()
    after = float(task.loss(params, full).detach())
    assert after < 0.9 * before, (before, after)


def test_evaluate_returns_loss_and_accuracy_on_val_and_test():
    task = _mnist1d()
    params = task.init_params(0)
    for split, size in (("val", 500), ("test", 1000)):
        metrics = task.evaluate(params, split)
        assert set(metrics) == {"loss", "accuracy"}
        x, y = task.full_batch(split)
        assert len(y) == size
        logits = task.forward(params, x)
        assert metrics["accuracy"] == float((logits.argmax(-1) == y).float().mean())
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    chunked = create_task("conv", dataset="mnist1d", dataset_options=SMALL, eval_batch_size=64)
    assert chunked.evaluate(params, "test")["accuracy"] == task.evaluate(params, "test")["accuracy"]


@pytest.mark.parametrize("name, options, c0", [
    ("conv_digits", {}, 1),
    ("conv", {"dataset_options": {"side": 12, "channels": 3}, "channels": (2, 3), "activation": "tanh"}, 3),
])
def test_the_2d_path_is_unchanged(name, options, c0):
    task = create_task(name, **options)
    c1, c2 = task.channels
    assert task.name.startswith("conv_") and "conv1d" not in task.name
    assert task.image_shape == task.data.image_shape and task.image_shape[0] == c0
    # Init: the same draws, in the same order, with fan-in 9·c_in.
    g = torch.Generator().manual_seed(7)
    expected = [linear_init(9 * c0, (c1, c0, 3, 3), g), linear_init(9 * c0, (c1,), g),
                linear_init(9 * c1, (c2, c1, 3, 3), g), linear_init(9 * c1, (c2,), g),
                linear_init(c2, (10, c2), g), linear_init(c2, (10,), g)]
    params = task.init_params(7)
    assert len(params) == 6 and all(torch.equal(p, e) for p, e in zip(params, expected))
    # Forward: the 2-D reference, bit for bit.
    act = {"relu": torch.relu, "tanh": torch.tanh}[task.activation]
    x, _ = task.full_batch("val")
    x = x[:32]
    w1, b1, w2, b2, w3, b3 = params
    h = x.reshape(-1, *task.image_shape)
    h = F.max_pool2d(act(F.conv2d(h, w1, b1, padding=1)), 2)
    h = act(F.conv2d(h, w2, b2, padding=1)).mean(dim=(2, 3))
    assert torch.equal(task.forward(params, x), F.linear(h, w3, b3))


def test_conv_digits_keeps_its_name_and_size():
    task = create_task("conv_digits")
    assert task.name == "conv_digits[8-16,relu]" and task.num_params == 1418


def test_a_dataset_of_neither_shape_is_a_config_error(monkeypatch):
    # Length-1 "sequences": nothing to pool.
    with pytest.raises(ConfigError, match=r"dataset 'synthetic_linear'.*\(1,\).*image dataset.*\(L,\) with L >= 2"):
        create_task("conv", dataset="synthetic_linear", dataset_options={"features": 1})
    # Examples of rank 2 that are not images.
    x, y = torch.zeros(6, 2, 5), torch.zeros(6, dtype=torch.long)
    table = Dataset("table2d", {s: (x, y) for s in ("train", "val", "test")}, num_classes=2)
    monkeypatch.setitem(data_module._LOADERS, "table2d", lambda: table)
    with pytest.raises(ConfigError, match=r"dataset 'table2d'.*\(2, 5\).*image dataset.*mnist1d"):
        create_task("conv", dataset="table2d", batch_size=2)
