"""Bundled data splits and the functional optimizee tasks."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin import create_task, list_tasks
from flat_l2o_plugin.tasks import load_dataset
from flat_l2o_plugin.training import train_with_torch_optimizer


def test_digits_splits_are_fixed_disjoint_and_stratified():
    data = load_dataset("digits")
    sizes = {s: data.split(s)[0].shape[0] for s in ("train", "val", "test")}
    assert sizes == {"train": 1000, "val": 397, "test": 400}
    rows = {s: {tuple(r.tolist()) for r in data.split(s)[0]} for s in sizes}
    # digits has a handful of duplicate images; the splits share at most those.
    assert len(rows["train"] & rows["test"]) <= 5 and len(rows["val"] & rows["test"]) <= 5
    assert torch.bincount(data.split("test")[1]).min() >= 38
    assert float(data.split("train")[0].max()) == 1.0


@pytest.mark.parametrize("name", list_tasks())
def test_task_contract(name):
    task = create_task(name)
    a, b = task.init_params(3), task.init_params(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, task.init_params(4)))
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    assert batch[0].shape[0] == task.batch_size
    loss = task.loss([p.requires_grad_() for p in a], batch)
    assert loss.dim() == 0 and loss.requires_grad
    assert abs(float(loss) - 2.30) < 0.3  # ~log(10) at initialisation
    metrics = task.evaluate(a, "val")
    assert set(metrics) == {"loss", "accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("name", list_tasks())
def test_adam_trains_each_task(name):
    task = create_task(name)
    run = train_with_torch_optimizer(lambda p: torch.optim.Adam(p, lr=1e-2), task, 0, 150)
    assert task.evaluate(run.params, "val")["accuracy"] > 0.6


def test_task_variants_and_their_errors():
    deeper = create_task("mlp_digits", hidden_sizes=[20, 20], activation="relu")
    assert deeper.name == "mlp_digits[64-20-20-10,relu]" and len(deeper.init_params(0)) == 6
    assert create_task("conv_digits").num_params == 1418
    with pytest.raises(ValueError, match="activation"):
        create_task("mlp_digits", activation="swish")
    with pytest.raises(ValueError, match="batch_size"):
        create_task("mlp_digits", batch_size=0)
    with pytest.raises(ValueError, match="channels"):
        create_task("conv_digits", channels=(8,))
