"""Every registered task honours the Task contract; the classifiers' variants and errors."""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin import Task, create_task, list_tasks
from flat_l2o_plugin.errors import ConfigError, FlatL2OError
from flat_l2o_plugin.tasks import SPLITS, load_dataset
from flat_l2o_plugin.training import train_with_torch_optimizer

# Adam steps each task gets in test_adam_trains_each_task: enough to move well away from
# the initial loss, few enough to keep the suite fast (the conv nets cost the most).
ADAM_STEPS = {"conv": 40, "timm": 15}


def _is_classifier(task) -> bool:  # noqa: ANN001
    return hasattr(task, "data") and hasattr(task.data, "num_classes")


def _same(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


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
    assert isinstance(task, Task) and isinstance(task.name, str)

    # Init: a pure function of the seed that leaves the global random state alone.
    rng = torch.random.get_rng_state()
    a, b = task.init_params(3), task.init_params(3)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert _same(a, b)
    assert not all(torch.equal(x, y) for x, y in zip(a, task.init_params(4)))

    # Batches: a pure function of the generator's state.
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    assert _same(batch, task.sample_batch(torch.Generator().manual_seed(0)))

    # Loss: a finite scalar in the params' graph, the same on every call.
    loss = task.loss([p.clone().requires_grad_() for p in a], batch)
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert float(task.loss(a, batch)) == float(loss.detach())

    # Evaluation on every split; on a whole split it is the loss of that split as one batch.
    for split in SPLITS:
        metrics = task.evaluate(a, split)
        assert "loss" in metrics and all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    metrics = task.evaluate(a, "val")
    assert metrics["loss"] == pytest.approx(float(task.loss(a, task.full_batch("val"))), rel=1e-5)
    with pytest.raises(ConfigError, match="split"):
        task.evaluate(a, "holdout")

    if _is_classifier(task):
        # Near chance at initialisation: a loss of about log(classes) and an accuracy in [0, 1].
        assert 0.0 <= metrics["accuracy"] <= 1.0
        chance = math.log(task.data.num_classes)
        assert abs(metrics["loss"] - chance) < 0.35 * chance, (metrics, chance)
        assert batch[0].shape[0] == task.batch_size


@pytest.mark.parametrize("name", list_tasks())
def test_a_gradient_step_lowers_the_loss(name):
    task = create_task(name)
    params = [p.requires_grad_() for p in task.init_params(0)]
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    loss = task.loss(params, batch)
    grads = torch.autograd.grad(loss, params)
    squared_norm = float(sum(g.pow(2).sum() for g in grads))
    initial = float(loss.detach())
    assert squared_norm > 0
    # Backtracking from step 1: a true gradient gives an Armijo decrease for some step.
    for halvings in range(40):
        step = 0.5**halvings
        new = [p.detach() - step * g for p, g in zip(params, grads)]
        if float(task.loss(new, batch)) <= initial - 0.5 * step * squared_norm:
            return
    pytest.fail(f"{name}: no step along -grad lowered the loss (|g|^2 = {squared_norm:.3g})")


@pytest.mark.parametrize("name", list_tasks())
def test_adam_trains_each_task(name):
    task = create_task(name)
    before = task.evaluate(task.init_params(0), "val")
    run = train_with_torch_optimizer(lambda p: torch.optim.Adam(p, lr=1e-2), task, 0, ADAM_STEPS.get(name, 150))
    after = task.evaluate(run.params, "val")
    if _is_classifier(task):
        assert after["loss"] < 0.85 * before["loss"]
        assert after["accuracy"] > 1.0 / task.data.num_classes + 0.2
    else:
        assert after["loss"] < 0.5 * before["loss"]


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


def test_mlp_and_conv_run_on_any_dataset_of_the_right_kind():
    linear = create_task("mlp", dataset="synthetic_linear", hidden_sizes=(), batch_size=16)
    assert linear.name == "mlp_synthetic_linear[20-2,relu]"
    images = create_task("mlp", dataset="synthetic_images", dataset_options={"side": 8, "channels": 2},
                         hidden_sizes=(5,))
    assert [tuple(p.shape) for p in images.init_params(0)][0] == (5, 128)  # flattened 2x8x8 images
    conv = create_task("conv", dataset_options={"side": 12, "channels": 3}, channels=(2, 3))
    assert [tuple(p.shape) for p in conv.init_params(0)][0] == (2, 3, 3, 3)
    assert conv.forward(conv.init_params(0), conv.full_batch("val")[0][:4]).shape == (4, 10)
    assert create_task("conv", dataset="mnist1d", dataset_options={"train_samples": 200}).name \
        == "conv1d_mnist1d[8-16,relu]"
    with pytest.raises(ConfigError, match="neither images nor 1-D sequences"):
        create_task("conv", dataset="synthetic_linear", dataset_options={"features": 1})
    with pytest.raises(ConfigError, match="unknown dataset 'mnist2d'"):
        create_task("mlp", dataset="mnist2d")
    with pytest.raises(ConfigError, match="has no option.*'side'"):
        create_task("mlp", dataset="digits", dataset_options={"side": 8})


def test_a_train_subset_is_the_task_training_set():
    task = create_task("mlp_digits", train_subset=50, train_subset_seed=1)
    x, y = task.full_batch("train")
    assert x.shape == (50, 64)
    rows = {tuple(r.tolist()) for r in load_dataset("digits").split("train")[0]}
    assert all(tuple(r.tolist()) in rows for r in x)
    batch_x, _ = task.sample_batch(torch.Generator().manual_seed(0))
    assert all(any(torch.equal(r, s) for s in x) for r in batch_x[:5])
    other = create_task("mlp_digits", train_subset=50, train_subset_seed=2).full_batch("train")[0]
    assert not torch.equal(x, other)
    assert torch.equal(task.full_batch("val")[0], load_dataset("digits").split("val")[0])
    with pytest.raises(ConfigError, match="train_subset=5000 exceeds"):
        create_task("mlp_digits", train_subset=5000)


def test_evaluation_in_chunks_matches_one_pass():
    task = create_task("mlp_digits")
    chunked = create_task("mlp_digits", eval_batch_size=64)
    params = task.init_params(0)
    one, many = task.evaluate(params, "test"), chunked.evaluate(params, "test")
    assert one["accuracy"] == many["accuracy"]
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-6)


def test_task_errors_are_flat_l2o_errors():
    for options in ({"batch_size": 0}, {"dataset": "nope"}, {"eval_batch_size": -1}):
        with pytest.raises(FlatL2OError):
            create_task("mlp_digits", **options)
