"""TimmTask: functional_call reproduces the timm module exactly, deterministically, without downloads."""

from __future__ import annotations

import pytest
import timm
import torch

from flat_l2o_plugin import create_task
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.tasks import TimmTask
from flat_l2o_plugin.tasks.checkpoint import load_optimizee, save_optimizee
from flat_l2o_plugin.training import train_with_torch_optimizer

TINY_VIT = ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2})


@pytest.mark.parametrize(("model", "kwargs"), [("resnet10t", {}), TINY_VIT], ids=["resnet10t", "vit_tiny"])
def test_functional_call_matches_the_module_exactly(model, kwargs):
    task = TimmTask(model, kwargs, batch_size=8)
    params = [p.requires_grad_() for p in task.init_params(5)]
    x, y = task.sample_batch(torch.Generator().manual_seed(0))

    # The reference: the same architecture and seed straight from timm. In train mode its
    # BatchNorm layers normalize with batch statistics, as the task's always do.
    torch.manual_seed(5)
    module = timm.create_model(model, pretrained=False, num_classes=10, in_chans=3, **kwargs).train()
    assert [name for name, _ in module.named_parameters()] == task.param_names
    assert all(torch.equal(p, q) for p, q in zip(params, module.parameters()))

    logits = task.forward(params, x)
    fused = module(x)
    for layer in module.modules():  # the task uses explicit attention (twice differentiable)
        if hasattr(layer, "fused_attn"):
            layer.fused_attn = False
    reference = module(x)
    assert torch.equal(logits, reference)
    assert torch.allclose(logits, fused, atol=1e-5)
    loss = task.loss(params, (x, y))
    torch.nn.functional.cross_entropy(reference, y).backward()
    grads = torch.autograd.grad(loss, params)
    assert all(torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7) for g, p in zip(grads, module.parameters()))


def test_init_is_seeded_and_leaves_the_global_random_state_alone():
    task = TimmTask(*TINY_VIT, batch_size=4)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = task.init_params(1), task.init_params(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, task.init_params(2)))
    assert [tuple(p.shape) for p in a] == [tuple(p.shape) for _, p in task.create_module(0).named_parameters()]


def test_the_loss_is_pure_and_batchnorm_keeps_no_state():
    task = TimmTask("resnet10t", batch_size=8)
    norms = [m for m in task.create_module(0).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.running_mean is None and not m.track_running_stats for m in norms)
    params = task.init_params(0)
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    first = task.loss(params, batch)
    task.loss(task.init_params(1), task.sample_batch(torch.Generator().manual_seed(2)))  # another trajectory
    assert torch.equal(task.loss(params, batch), first)
    assert task.evaluate(params, "val") == task.evaluate(params, "val")


def test_adam_lowers_a_tiny_vit_loss_on_synthetic_images():
    task = create_task("timm", model=TINY_VIT[0], model_kwargs=TINY_VIT[1], batch_size=32)
    before = task.evaluate(task.init_params(0), "val")
    run = train_with_torch_optimizer(lambda p: torch.optim.Adam(p, lr=1e-3), task, 0, 25)
    after = task.evaluate(run.params, "val")
    assert after["loss"] < 0.8 * before["loss"] and after["accuracy"] > before["accuracy"] + 0.2


def test_timm_task_options_round_trip_through_a_checkpoint(tmp_path):
    options = {"model": TINY_VIT[0], "model_kwargs": TINY_VIT[1], "batch_size": 4}
    task = create_task("timm", **options)
    params = task.init_params(3)
    loaded, loaded_params = load_optimizee(save_optimizee(tmp_path / "vit.safetensors", "timm", options, params))
    assert loaded.param_names == task.param_names
    assert all(torch.equal(p, q) for p, q in zip(params, loaded_params))


def test_timm_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="no model 'resnet10'; did you mean 'resnet10t'"):
        TimmTask("resnet10")
    with pytest.raises(ConfigError, match="never downloaded"):
        TimmTask("resnet10t", {"pretrained": True})
    with pytest.raises(ConfigError, match="does not hold images"):
        TimmTask("resnet10t", dataset="mnist1d")
    with pytest.raises(ConfigError, match="img_size=16"):
        TimmTask("vit_tiny_patch16_224", {"depth": 1})
    with pytest.raises(ConfigError, match="rejects model_kwargs"):
        TimmTask("resnet10t", {"no_such_option": 1})


def test_curvature_regularizers_differentiate_through_a_vit():
    # Fused attention kernels have no double backward; the task must not use them.
    from flat_l2o_plugin import create_regularizer, create_task

    task = create_task("timm", model="test_vit", model_kwargs={"img_size": 16, "patch_size": 4},
                       dataset_options={"side": 16}, batch_size=8)
    params = [p.requires_grad_(True) for p in task.init_params(0)]
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    value = create_regularizer("hessian_top_eigenvalue", iters=3, seed=0)(params, lambda p: task.loss(p, batch))
    grads = torch.autograd.grad(value, params, allow_unused=True)
    assert torch.isfinite(value) and any(g is not None and g.abs().sum() > 0 for g in grads)
