"""The SAM-gradient wrapper: the wrapped optimizer sees ∇f(θ + ρ·ĝ), in meta-training and at test time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer, train_with_learned_optimizer
from flat_l2o_plugin.wrappers import FlatnessAware, SAMGradient, gradient_oracle, host_step, wrap


class Recorder(torch.nn.Module):
    """A learned optimizer that records the gradients it is given and steps θ − 0.1·g."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))
        self.seen: list[list[torch.Tensor]] = []

    def init_state(self, params):
        return {"step": torch.zeros((), dtype=torch.int64)}

    def step(self, params, grads, state):
        self.seen.append([g.clone() for g in grads])
        step = state.get("step", torch.zeros((), dtype=torch.int64))
        return [p - self.scale * g for p, g in zip(params, grads)], {"step": step + 1}


def _quadratic():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]])

    def loss_fn(ps):
        (x,) = ps
        return 0.5 * x @ a @ x + (x**3).sum() / 3

    return a, loss_fn


def test_the_wrapped_optimizer_sees_the_gradient_at_the_sam_point():
    a, loss_fn = _quadratic()
    x = torch.tensor([0.7, -0.4])
    g = a @ x + x**2
    inner = Recorder()
    sam = SAMGradient(inner, rho=0.3)
    sam.step([x], [g], inner.init_state([x]), grad_fn=gradient_oracle(loss_fn))
    point = x + 0.3 * g / g.norm()
    assert torch.allclose(inner.seen[0][0], a @ point + point**2, atol=1e-6)


def test_adaptive_perturbation_is_asam():
    a, loss_fn = _quadratic()
    x = torch.tensor([0.7, -0.4])
    g = a @ x + x**2
    inner = Recorder()
    SAMGradient(inner, rho=0.3, adaptive=True).step([x], [g], {}, grad_fn=gradient_oracle(loss_fn))
    eps = 0.3 * x**2 * g / (x.abs() * g).norm()
    point = x + eps
    assert torch.allclose(inner.seen[0][0], a @ point + point**2, atol=1e-6)


def test_rho_zero_and_a_stationary_point_pass_the_plain_gradient_through():
    _, loss_fn = _quadratic()
    x, g = torch.tensor([0.7, -0.4]), torch.tensor([1.0, 2.0])
    inner = Recorder()
    SAMGradient(inner, rho=0.0).step([x], [g], {})  # no oracle needed at rho = 0
    SAMGradient(inner, rho=0.5).step([x], [torch.zeros(2)], {}, grad_fn=gradient_oracle(loss_fn))
    assert torch.equal(inner.seen[0][0], g)
    # At g = 0 there is no direction: θ itself is the SAM point.
    assert torch.allclose(inner.seen[1][0], gradient_oracle(loss_fn)([x])[0])


def test_a_loss_fn_is_enough_and_no_oracle_is_a_clear_error():
    a, loss_fn = _quadratic()
    x = torch.tensor([0.7, -0.4])
    g = a @ x + x**2
    inner = Recorder()
    SAMGradient(inner, rho=0.3).step([x], [g], {}, loss_fn=loss_fn)
    point = x + 0.3 * g / g.norm()
    assert torch.allclose(inner.seen[0][0], a @ point + point**2, atol=1e-6)
    with pytest.raises(ConfigError, match="sam_gradient: the host passed neither grad_fn"):
        SAMGradient(inner, rho=0.3).step([x], [g], {})


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1", True])
def test_bad_rho_names_the_option(bad):
    with pytest.raises(ConfigError, match="sam_gradient.rho"):
        SAMGradient(Recorder(), rho=bad)


def test_registered_and_transparent_to_checkpoints():
    bare = create_optimizer("rnnprop")
    wrapped = wrap(bare, [{"name": "sam_gradient", "rho": 0.05}])
    assert isinstance(wrapped, SAMGradient)
    assert wrapped.state_dict().keys() == bare.state_dict().keys()


def test_host_step_gives_wrappers_an_oracle_and_bare_optimizers_three_arguments():
    _, loss_fn = _quadratic()
    x = torch.tensor([0.7, -0.4])
    g = gradient_oracle(loss_fn)([x])[0]
    inner = Recorder()
    host_step(inner, [x], [g], {"step": torch.zeros((), dtype=torch.int64)}, loss_fn=loss_fn)
    assert torch.equal(inner.seen[0][0], g)
    # Nested under a flatness-aware wrapper with nothing active, the oracle still arrives.
    stack = SAMGradient(FlatnessAware(Recorder()), rho=0.2)
    host_step(stack, [x], [g], {"step": torch.zeros((), dtype=torch.int64)}, loss_fn=loss_fn)
    assert not torch.equal(stack.inner.inner.seen[0][0], g)


def test_evaluation_and_meta_training_run_through_the_wrapper():
    task = create_task("mlp_digits")
    sam = SAMGradient(create_optimizer("rnnprop"), rho=0.05)
    calls = {"n": 0}
    original = sam.sam_gradient

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    sam.sam_gradient = counting
    run = train_with_learned_optimizer(sam, task, seed=0, steps=5)
    assert calls["n"] == 5 and run.diverged_at is None

    before = {k: v.clone() for k, v in sam.state_dict().items()}
    config = MetaTrainConfig(meta_steps=2, unroll=3, horizon=6, val_every=0, seed=0)
    trainer = MetaTrainer(sam, lambda gen: (task, 1000), flat=FlatL2O({}), config=config)
    trainer.train()
    assert calls["n"] == 5 + 2 * 3
    assert any(not torch.equal(before[k], v) for k, v in sam.state_dict().items())


def test_meta_gradient_differs_from_the_plain_gradient_path():
    """Meta-training through the wrapper trains φ on SAM gradients, not on plain ones."""
    torch.manual_seed(0)
    x0 = torch.tensor([0.7, -0.4])
    _, loss_fn = _quadratic()

    def meta_grad(optimizer):
        params = [x0.clone().requires_grad_(True)]
        state = optimizer.init_state(params)
        total = 0.0
        for _ in range(3):
            grads = [g.detach() for g in torch.autograd.grad(loss_fn(params), params)]
            params, state = host_step(optimizer, params, grads, state, loss_fn=loss_fn)
            total = total + loss_fn(params)
        return torch.autograd.grad(total, [optimizer.scale])[0]

    plain, sam_inner = Recorder(), Recorder()
    assert not torch.allclose(meta_grad(plain), meta_grad(SAMGradient(sam_inner, rho=0.3)))
    assert F.mse_loss(torch.stack(plain.seen[0]), torch.stack(sam_inner.seen[0])) > 0


def test_the_torch_optim_face_takes_the_oracle_from_the_closure():
    from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch

    a, loss_fn = _quadratic()
    x0, o0 = torch.tensor([0.7, -0.4]), torch.tensor([2.0, -1.0])
    param, other = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(o0.clone())
    # Two groups, stepped one after the other, and a loss that couples them.
    opt = LearnedOptimizerTorch([{"params": [param]}, {"params": [other]}], SAMGradient(Recorder(), rho=0.3))
    recorded = opt.learned_optimizer.inner

    def coupled(x, o):
        return loss_fn([x]) + ((o - x) ** 2).sum() * (1 + x.sum() ** 2)

    def closure():
        opt.zero_grad()
        loss = coupled(param, other)
        loss.backward()
        return loss

    with pytest.raises(ConfigError, match=r"needs optimizer\.step\(closure\)"):
        closure()
        opt.step()
    recorded.seen.clear()
    with torch.no_grad():
        param.copy_(x0), other.copy_(o0)
    opt.step(closure)

    def grad_at(x, o):
        x, o = x.clone().requires_grad_(True), o.clone().requires_grad_(True)
        return torch.autograd.grad(coupled(x, o), [x, o])

    gx, go = grad_at(x0, o0)
    px = x0 + 0.3 * gx / gx.norm()
    po = o0 + 0.3 * go / go.norm()
    # Each group sees the gradient at its SAM point, the other group held at the step's start.
    assert torch.allclose(recorded.seen[0][0], grad_at(px, o0)[0], atol=1e-5)
    assert torch.allclose(recorded.seen[1][0], grad_at(x0, po)[1], atol=1e-5)
    assert torch.allclose(param.detach(), x0 - 0.1 * recorded.seen[0][0], atol=1e-6)
    assert torch.allclose(other.detach(), o0 - 0.1 * recorded.seen[1][0], atol=1e-6)
