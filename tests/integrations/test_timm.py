"""timm builds our learned optimizer by name, and it trains a real timm model."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.optim import Lookahead
from timm.optim._optim_factory import OptimInfo, OptimizerRegistry, default_registry
from torch import Tensor, nn

from flat_l2o_plugin import OptimizerInfo, create_optimizer, get_plugin_manager, hookimpl
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.integrations.timm import (
    TimmRegistrationError,
    register_installed_with_timm,
    register_with_timm,
    timm_name,
)
from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch, UntrainedOptimizerWarning
from flat_l2o_plugin.optimizers.weights import WeightsError, save_learned_optimizer


@pytest.fixture(autouse=True)
def _restore_timm_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # timm's registry is process-global and has no way to unregister: each test works
    # on a copy of its table, so no registration leaks into other tests.
    monkeypatch.setattr(default_registry, "_optimizers", dict(default_registry._optimizers))


def _tiny_convnext() -> nn.Module:
    """A real timm architecture, shrunk to 26k parameters; built locally, nothing downloaded."""
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10,
                             dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))


def _images(count: int = 512) -> tuple[Tensor, Tensor]:
    """Fixed random 32x32 images labelled by a random linear rule on their 4x4 average pooling."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, 32, 32, generator=gen)
    projection = torch.randn(3 * 4 * 4, 10, generator=gen)
    return images, (F.avg_pool2d(images, 8).flatten(1) @ projection).argmax(1)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, batch: int = 64) -> list[float]:
    images, labels = _images()
    gen = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_create_optimizer_v2_trains_a_timm_model(weights: Path) -> None:
    register_with_timm("l2o-rnnprop", weights=weights)
    model = _tiny_convnext()
    # Meta-trained on a small MLP: on a conv net its steps are too large as they come,
    # and lr (the multiplier on the learned update) is the knob that transfers it.
    optimizer = timm.optim.create_optimizer_v2(model, "l2o-rnnprop", lr=0.1, weight_decay=1e-4)

    assert isinstance(optimizer, LearnedOptimizerTorch)
    # timm's filter_bias_and_bn: biases and norm weights in a group without decay.
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-4]
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)
    losses = _train(model, optimizer, steps=30)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_timm_arguments_a_learned_optimizer_has_no_use_for_are_dropped(weights: Path) -> None:
    register_with_timm("l2o-rnnprop", weights=weights)
    model = _tiny_convnext()
    optimizer = timm.optim.create_optimizer_v2(model, "l2o-rnnprop", momentum=0.9, eps=1e-6,
                                               betas=(0.9, 0.99), foreach=True)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0]  # lr=None: as meta-trained

    # The training script's path: argparse arguments through optimizer_kwargs.
    args = argparse.Namespace(opt="l2o-rnnprop", lr=0.5, weight_decay=0.05, momentum=0.9,
                              opt_eps=1e-8, opt_betas=(0.9, 0.999), layer_decay=0.75)
    optimizer = timm.optim.create_optimizer(args, model)
    assert isinstance(optimizer, LearnedOptimizerTorch)
    assert all("lr_scale" in g for g in optimizer.param_groups)  # layer decay, applied by timm's schedulers
    _train(model, optimizer, steps=1, batch=8)


def test_timm_scheduler_anneals_the_update_multiplier(weights: Path) -> None:
    from timm.scheduler import create_scheduler_v2

    register_with_timm("l2o-rnnprop", weights=weights)
    optimizer = timm.optim.create_optimizer_v2(_tiny_convnext(), "l2o-rnnprop", lr=1.0)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, min_lr=0.0)
    scheduler.step(5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_registering_is_idempotent_and_never_replaces(weights: Path, tmp_path: Path) -> None:
    first = register_with_timm("l2o-rnnprop", weights=weights)
    again = register_with_timm("l2o-rnnprop", weights=str(weights))
    assert again is first
    assert ("l2o-rnnprop", first.description) in timm.optim.list_optimizers("l2o-*", with_description=True)
    assert first.has_eps is first.has_momentum is first.has_betas is False

    other = save_learned_optimizer(tmp_path / "other.safetensors", create_optimizer("l2o_dm"), name="l2o_dm")
    with pytest.raises(TimmRegistrationError, match="already has an optimizer 'l2o-rnnprop'.*choose another name"):
        register_with_timm("l2o-rnnprop", weights=other)
    with pytest.raises(TimmRegistrationError, match="already has an optimizer 'adamw'"):
        register_with_timm("adamw", weights=weights)
    assert timm.optim.get_optimizer_info("l2o-rnnprop") == first
    assert timm.optim.get_optimizer_class("adamw", bind_defaults=False) is torch.optim.AdamW


@pytest.mark.parametrize(("name", "hint"), [("l2o_rnnprop", "l2o-rnnprop"), ("L2O", "l2o"), ("", None)])
def test_names_timm_could_not_select_are_refused(weights: Path, name: str, hint: str | None) -> None:
    match = "must be lower case" + (f".*try '{hint}'" if hint else "")
    with pytest.raises(TimmRegistrationError, match=match):
        register_with_timm(name, weights=weights)


def test_a_bad_configuration_fails_at_registration(tmp_path: Path) -> None:
    registry = OptimizerRegistry()
    with pytest.raises(WeightsError, match="missing.safetensors does not exist"):
        register_with_timm("l2o-missing", weights=tmp_path / "missing.safetensors", registry=registry)
    with pytest.raises(ConfigError, match="needs a learned optimizer"):
        register_with_timm("l2o-nothing", registry=registry)
    assert registry.list_optimizers() == []


def test_a_separate_registry_and_a_named_untrained_optimizer() -> None:
    registry = OptimizerRegistry()
    with pytest.warns(UntrainedOptimizerWarning):
        register_with_timm("l2o-dm-small", "l2o_dm", options={"hidden_size": 4}, registry=registry)
    with pytest.warns(UntrainedOptimizerWarning):
        optimizer = registry.create_optimizer(_tiny_convnext(), "l2o-dm-small", lr=0.5)
    assert optimizer.learned_optimizer.hidden_size == 4
    assert "l2o-dm-small" not in timm.optim.list_optimizers()


# ---------------------------------------------------------------------- every installed optimizer


def test_timm_names_of_learned_optimizers() -> None:
    assert [timm_name(n) for n in ("rnnprop", "l2o_dm", "l2o_scale", "learned_correction", "My_Opt")] == [
        "l2o-rnnprop", "l2o-dm", "l2o-scale", "l2o-learned-correction", "l2o-my-opt"]


def test_every_installed_optimizer_is_registered_and_needs_weights(weights: Path, tmp_path: Path) -> None:
    infos = register_installed_with_timm()
    assert {"l2o-rnnprop", "l2o-dm", "l2o-scale"} <= set(infos)
    assert register_installed_with_timm() == infos  # again: nothing new, nothing replaced
    assert set(infos) <= set(timm.optim.list_optimizers("l2o-*"))

    model = _tiny_convnext()
    with pytest.raises(ConfigError, match=r"'l2o-rnnprop' needs a meta-trained weights file.*--opt-kwargs weights=FILE"):
        timm.optim.create_optimizer_v2(model, "l2o-rnnprop", lr=0.1)
    optimizer = timm.optim.create_optimizer_v2(model, "l2o-rnnprop", lr=0.1, weight_decay=1e-4, weights=str(weights))
    assert isinstance(optimizer, LearnedOptimizerTorch)
    assert optimizer.learned_identity["weights_file"] == str(weights)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-4]
    # The file must hold the optimizer the name stands for.
    with pytest.raises(ConfigError, match="holds a 'rnnprop'"):
        timm.optim.create_optimizer_v2(model, "l2o-dm", weights=str(weights))


def test_registering_installed_optimizers_keeps_existing_names(weights: Path) -> None:
    mine = register_with_timm("l2o-rnnprop", weights=weights)
    infos = register_installed_with_timm()
    assert "l2o-rnnprop" not in infos and timm.optim.get_optimizer_info("l2o-rnnprop") is mine

    registry = OptimizerRegistry()
    registry.register(OptimInfo(name="l2o-dm", opt_class=torch.optim.SGD, description="someone else's"))
    with pytest.warns(UserWarning, match="timm's own optimizer 'l2o-dm' is kept"):
        infos = register_installed_with_timm(registry=registry)
    assert "l2o-dm" not in infos and registry.get_optimizer_info("l2o-dm").opt_class is torch.optim.SGD

    # A plugin's name that differs from another only in '_' and '-' cannot have its own.
    pm = get_plugin_manager(entry_points=False, plugins=[("twins", _TwinNames())])
    with pytest.warns(UserWarning, match="'l2o-rnnprop' already stands for learned optimizer 'rnnprop'; "
                                         "'RNNProp' is not registered"):
        infos = register_installed_with_timm(registry=OptimizerRegistry(), plugin_manager=pm)
    assert infos["l2o-rnnprop"].defaults["optimizer"] == "rnnprop"


class _TwinNames:
    @hookimpl
    def register_optimizers(self, register) -> None:
        register(OptimizerInfo(name="RNNProp", factory=lambda: create_optimizer("rnnprop")))


# ---------------------------------------------------------------------- Lookahead


def test_lookahead_keeps_its_slow_weights_apart_from_the_learned_state(weights: Path) -> None:
    register_with_timm("l2o-rnnprop", weights=weights)
    model = _tiny_convnext()
    reference = copy.deepcopy(model)
    optimizer = timm.optim.create_optimizer_v2(model, "lookahead_l2o-rnnprop", lr=0.3)
    assert isinstance(optimizer, Lookahead)
    plain = timm.optim.create_optimizer_v2(reference, "l2o-rnnprop", lr=0.3)  # the same groups

    # 13 steps: two Lookahead syncs (k=6). The reference syncs by hand, as Lookahead
    # does; the learned optimizer must see exactly the state it would see alone.
    _train(model, optimizer, steps=13, batch=16)
    images, labels = _images()
    gen = torch.Generator().manual_seed(1)
    slow = None
    reference.train()
    for step in range(1, 14):
        idx = torch.randint(0, images.shape[0], (16,), generator=gen)
        plain.zero_grad()
        F.cross_entropy(reference(images[idx]), labels[idx]).backward()
        plain.step()
        if step % 6 == 0:
            with torch.no_grad():
                # timm starts the slow weights at the fast ones, at the first sync.
                slow = slow or [p.detach().clone() for p in reference.parameters()]
                for s, p in zip(slow, reference.parameters()):
                    s.add_(p - s, alpha=0.5)
                    p.copy_(s)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    state = optimizer.state_dict()["state"][0]
    assert "lookahead_slow_buff" in state and set(plain.state_dict()["state"][0]) == set(state) - {"lookahead_slow_buff"}


# ---------------------------------------------------------------------- the train.py launcher


def test_launcher_runs_a_script_as_main_with_its_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flat_l2o_plugin.integrations import timm_train

    script = tmp_path / "train.py"
    script.write_text("import sys, timm.optim\n"
                      "print(__name__, sys.argv[1:], 'l2o-rnnprop' in timm.optim.list_optimizers())\n")
    register_installed_with_timm()  # what importing the module did, undone after each test here
    saved_argv, saved_path0 = sys.argv, sys.path[0]
    try:
        assert timm_train.main([str(script), "--opt", "l2o-rnnprop"]) == 0
        assert sys.argv == [str(script), "--opt", "l2o-rnnprop"] and sys.path[0] == str(tmp_path)
    finally:
        sys.argv, sys.path[0] = saved_argv, saved_path0
    assert capsys.readouterr().out == "__main__ ['--opt', 'l2o-rnnprop'] True\n"

    assert timm_train.main([str(tmp_path / "missing.py")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert timm_train.main([]) == 2
    assert "usage:" in capsys.readouterr().err
