"""LearnedCorrection: the protocol checks, then "exactly the base optimizer at init", the bound and meta-training."""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin import create_optimizer, create_task, list_optimizers
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.optimizers import LearnedCorrection
from flat_l2o_plugin.protocols import LearnedOptimizer
from flat_l2o_plugin.testing import check_learned_optimizer, isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer, train_with_learned_optimizer


def _perturbed(**options) -> LearnedCorrection:
    """A LearnedCorrection whose correction is not zero: the mirror copy re-initialised."""
    opt = LearnedCorrection(**options)
    for layer in opt.mirror:
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return opt


FACTORIES = {
    "adam": lambda: LearnedCorrection(),
    "sgd": lambda: LearnedCorrection(base="sgd"),
    "adam_perturbed": lambda: _perturbed(),
    "sgd_perturbed": lambda: _perturbed(base="sgd", grad_clip=10.0),
}
factories = pytest.mark.parametrize("make", list(FACTORIES.values()), ids=list(FACTORIES))


def test_follows_the_protocol_with_the_documented_defaults() -> None:
    opt = LearnedCorrection()
    assert isinstance(opt, LearnedOptimizer)
    assert (opt.base, opt.lr, opt.beta1, opt.beta2, opt.eps, opt.momentum) == ("adam", 1e-2, 0.9, 0.999, 1e-8, 0.9)
    assert (opt.hidden_size, opt.max_scale, opt.max_update, opt.grad_clip) == (16, 10.0, 1.0, None)
    assert opt.net[0].in_features == 4 and opt.net[0].out_features == 16 and opt.net[-1].out_features == 2


def test_is_registered_as_a_coordinatewise_optimizer() -> None:
    assert "learned_correction" in list_optimizers()
    info = isolated_plugin_manager().components.optimizers.get("learned_correction")
    assert info.coordinatewise
    assert isinstance(create_optimizer("learned_correction", base="sgd", lr=0.1), LearnedCorrection)


@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_conforms(base) -> None:
    # The default (Adam) also runs with meta-training in tests/testing/test_optimizer_conformance.py.
    check_learned_optimizer("learned_correction", options={"base": base, "grad_clip": 5.0},
                            plugin_manager=isolated_plugin_manager(), meta_training=False)


@pytest.mark.parametrize("base, keys", [("adam", ["step", "exp_avg", "exp_avg_sq"]),
                                        ("sgd", ["step", "exp_avg", "exp_avg_sq", "momentum_buffer"])])
def test_state_keys_are_stable_and_per_coordinate(checks, base, keys) -> None:
    checks.state_layout(lambda: LearnedCorrection(base=base), keys)


@factories
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_are_preserved(checks, make, dtype) -> None:
    checks.shapes_and_dtypes(make, dtype)


@factories
def test_protocol_checks(checks, make) -> None:
    checks.state_not_mutated(make)
    checks.state_round_trip(make)
    checks.differentiable(make)
    checks.no_graph_under_no_grad(make)


@factories
def test_coordinatewise(checks, make) -> None:
    checks.permutation_equivariant(make)
    checks.coordinates_independent(make)
    checks.split_invariant(make)


# ---------------------------------------------------------------------------- exactly the base at init


def _least_squares(dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=gen, dtype=dtype), torch.randn(32, 3, generator=gen, dtype=dtype)
    params = [torch.randn(5, 3, generator=gen, dtype=dtype), torch.randn(3, generator=gen, dtype=dtype)]
    x, y, params = x.to(device), y.to(device), [p.to(device) for p in params]

    def grads(ps):
        leaves = [p.detach().requires_grad_(True) for p in ps]
        loss = ((x @ leaves[0] + leaves[1] - y) ** 2).mean()
        return list(torch.autograd.grad(loss, leaves))

    return params, grads


def _compare_with_torch(opt: LearnedCorrection, make_torch, dtype, atol, *, steps=12, clip=None, device="cpu"):
    params, grads = _least_squares(dtype, device)
    leaves = [p.clone().requires_grad_(True) for p in params]
    reference = make_torch(leaves)
    state = opt.init_state(params)
    for _ in range(steps):
        new_params, state = opt.step(params, grads(params), state)
        for leaf, g in zip(leaves, grads(leaves)):
            leaf.grad = g if clip is None else g.clamp(-clip, clip)
        reference.step()
        for new, leaf in zip(new_params, leaves):
            assert new.dtype == dtype and new.device == leaf.device
            torch.testing.assert_close(new.detach(), leaf.detach(), rtol=atol, atol=atol)
        params = [p.detach() for p in new_params]
    moved = (params[0] - _least_squares(dtype, device)[0][0]).abs().max()
    assert moved > 50 * atol  # the comparison is not vacuous


# float32 weights on float64 params too: the zero correction must cast to exactly zero.
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("options", [{}, {"lr": 0.05, "beta1": 0.5, "beta2": 0.99, "eps": 1e-6}])
def test_fresh_adam_base_is_torch_adam(dtype, atol, options) -> None:
    torch.manual_seed(0)
    opt = LearnedCorrection(base="adam", **options)
    kwargs = {"lr": options.get("lr", 1e-2), "betas": (options.get("beta1", 0.9), options.get("beta2", 0.999)),
              "eps": options.get("eps", 1e-8)}
    _compare_with_torch(opt, lambda leaves: torch.optim.Adam(leaves, **kwargs), dtype, atol)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("lr, momentum", [(1e-2, 0.9), (0.05, 0.5), (0.05, 0.0)])
def test_fresh_sgd_base_is_torch_sgd_with_momentum(dtype, atol, lr, momentum) -> None:
    torch.manual_seed(0)
    opt = LearnedCorrection(base="sgd", lr=lr, momentum=momentum)
    _compare_with_torch(opt, lambda leaves: torch.optim.SGD(leaves, lr=lr, momentum=momentum), dtype, atol)


def test_grad_clip_clamps_each_coordinate_first() -> None:
    opt = LearnedCorrection(base="sgd", lr=0.05, grad_clip=0.3)
    _compare_with_torch(opt, lambda leaves: torch.optim.SGD(leaves, lr=0.05, momentum=0.9), torch.float64, 1e-12,
                        clip=0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fresh_adam_base_is_torch_adam_on_cuda() -> None:
    torch.manual_seed(0)
    opt = LearnedCorrection().cuda()
    _compare_with_torch(opt, lambda leaves: torch.optim.Adam(leaves, lr=1e-2), torch.float32, 1e-6, device="cuda")


def test_fresh_correction_is_exactly_zero_and_any_weights_receive_a_meta_gradient() -> None:
    torch.manual_seed(0)
    opt = LearnedCorrection()
    a, b = opt.correction(torch.randn(1000, 4) * 5)
    assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))

    # Although the correction is zero, every weight gets a meta-gradient at once: the
    # last layers, and (unlike with a zeroed last layer) the first layers too.
    params, grads = _least_squares(torch.float32)
    state = opt.init_state(params)
    for _ in range(3):
        params, state = opt.step(params, grads([p.detach() for p in params]), state)
    meta_loss = sum((p * p).sum() for p in params)
    net = dict(zip([n for n, _ in opt.net.named_parameters()], torch.autograd.grad(meta_loss, opt.net.parameters(),
                                                                                   retain_graph=True)))
    mirror = dict(zip([n for n, _ in opt.mirror.named_parameters()],
                      torch.autograd.grad(meta_loss, opt.mirror.parameters())))
    for name, grad in net.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        torch.testing.assert_close(mirror[name], -grad)  # the copies start antisymmetric


# ---------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("base", ["adam", "sgd"])
@pytest.mark.parametrize("max_scale, max_update", [(10.0, 1.0), (3.0, 0.0), (1.0, 0.5)])
def test_no_weights_can_push_a_step_past_the_bound(base, max_scale, max_update) -> None:
    torch.manual_seed(0)
    opt = LearnedCorrection(base=base, max_scale=max_scale, max_update=max_update).double()
    reference = LearnedCorrection(base=base, max_scale=max_scale, max_update=max_update).double()
    with torch.no_grad():  # huge last-layer weights: tanh saturates, exp(log·tanh) hits its bound
        for layer in (opt.net[-1], opt.mirror[-1]):
            layer.weight.copy_(torch.randn_like(layer.weight) * 1e4)
            layer.bias.copy_(torch.randn_like(layer.bias) * 1e4)
    gen = torch.Generator().manual_seed(1)
    # Gradient magnitudes from 1e-6 to 1e6; d depends on them only, not on the iterates.
    magnitudes = 10.0 ** torch.linspace(-6, 6, 200, dtype=torch.float64)
    theta = [torch.zeros(200, dtype=torch.float64)]
    state, ref_state = opt.init_state(theta), reference.init_state(theta)
    worst = 0.0
    with torch.no_grad():
        for _ in range(10):
            grads = [magnitudes * torch.randn(200, generator=gen, dtype=torch.float64)]
            (new,), state = opt.step(theta, grads, state)
            (ref_new,), ref_state = reference.step(theta, grads, ref_state)
            direction = -ref_new / opt.lr  # a fresh optimizer steps -lr·d from theta = 0
            bound = opt.lr * (max_scale * direction.abs() + max_update)
            assert torch.isfinite(new).all()
            assert (new.abs() <= bound * (1 + 1e-9)).all()
            worst = max(worst, float((new.abs() / bound).max()))
    assert worst > 0.99  # the saturated network does reach the bound


def test_random_weights_never_blow_up_the_optimizee() -> None:
    task = create_task("mlp_digits")
    torch.manual_seed(0)
    opt = _perturbed()
    with torch.no_grad():
        for w in opt.parameters():
            w.mul_(100.0)
    run = train_with_learned_optimizer(opt, task, 0, 100, eval_every=10)
    assert run.diverged_at is None and all(math.isfinite(x) for x in run.train_loss)
    assert max(run.train_loss) < 10 * run.train_loss[0]


# ---------------------------------------------------------------------------- meta-training


@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_short_meta_training_lowers_the_validation_loss(base) -> None:
    task = create_task("mlp_digits")
    torch.manual_seed(0)
    opt = create_optimizer("learned_correction", base=base)

    def val_loss() -> float:
        runs = [train_with_learned_optimizer(opt, task, seed, 50, eval_every=50) for seed in (0, 1)]
        losses = [task.evaluate(r.params, "val")["loss"] if r.diverged_at is None else math.inf for r in runs]
        return sum(losses) / len(losses)

    before = val_loss()
    config = MetaTrainConfig(meta_steps=20, unroll=5, horizon=25, meta_lr=1e-2, seed=0, val_every=0)
    result = MetaTrainer(opt, lambda g: (task, 1000 + int(torch.randint(0, 10**6, (1,), generator=g))),
                         config=config).train()
    after = val_loss()
    assert result.skipped == 0
    assert math.isfinite(after)
    # Measured: Adam 1.22 -> 0.16, SGD-momentum 2.28 -> 0.55 (meta-seeds 0-3).
    assert after < 0.6 * before, (before, after)


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs", [
    {"lr": 0.0}, {"lr": math.inf}, {"beta1": 1.0}, {"beta2": -0.1}, {"eps": 0.0}, {"momentum": 1.0},
    {"hidden_size": 0}, {"hidden_size": 2.5}, {"hidden_size": True}, {"max_scale": 0.5}, {"max_scale": math.inf},
    {"max_update": -1.0}, {"max_update": math.nan}, {"grad_clip": 0.0}, {"grad_clip": math.nan},
], ids=lambda kw: f"{next(iter(kw))}={next(iter(kw.values()))}")
def test_bad_options_name_the_option(kwargs) -> None:
    with pytest.raises(ConfigError, match=f"LearnedCorrection: {next(iter(kwargs))} "):
        LearnedCorrection(**kwargs)


def test_unknown_base_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"base must be one of 'adam', 'sgd', got 'adma' \(did you mean 'adam'\?\)"):
        create_optimizer("learned_correction", base="adma")
    with pytest.raises(ConfigError, match=r"base must be one of 'adam', 'sgd', got 'lbfgs'$"):
        LearnedCorrection(base="lbfgs")
