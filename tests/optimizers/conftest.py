"""Protocol checks shared by the learned optimizers of the zoo.

Each check takes a zero-argument factory, so every check starts from freshly built,
seeded weights and nothing leaks between tests. The optimizer-specific test modules
call them and add their own checks of the maths.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from flat_l2o_plugin.testing.optimizers import quadratic_meta_losses

Factory = Callable[[], nn.Module]




def separable_grads(params: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
    """Detached gradient of ½‖θ - target‖², which is coordinatewise like the optimizers."""
    return [(p.detach() - t) for p, t in zip(params, targets)]


def run(
    opt: nn.Module,
    params: Sequence[Tensor],
    targets: Sequence[Tensor],
    steps: int,
    state: dict[str, Tensor] | None = None,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """``steps`` optimizer steps on ½‖θ - target‖², from ``state`` or a fresh one."""
    params = list(params)
    if state is None:
        state = opt.init_state(params)
    for _ in range(steps):
        params, state = opt.step(params, separable_grads(params, targets), state)
    return params, state


class OptimizerChecks:
    """The behaviour every coordinatewise learned optimizer must show."""

    @staticmethod
    def shapes_and_dtypes(make: Factory, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        opt = make()
        params = [
            torch.randn(3, 4, dtype=dtype),
            torch.randn(5, dtype=dtype),
            torch.randn((), dtype=dtype),
        ]
        targets = [torch.zeros_like(p) for p in params]
        new_params, _ = run(opt, params, targets, steps=2)
        assert len(new_params) == len(params)
        for new, old in zip(new_params, params):
            assert new.shape == old.shape
            assert new.dtype == dtype
            assert new.device == old.device
        moved = max((n - o).abs().max().item() for n, o in zip(new_params, params))
        # A fresh optimizer takes small but real steps.
        assert 0.0 < moved < 1.0

    @staticmethod
    def state_layout(make: Factory, expected_keys: Sequence[str]) -> None:
        torch.manual_seed(0)
        opt = make()
        params = [torch.randn(2, 3), torch.randn(7, dtype=torch.float64)]
        num = 13
        state = opt.init_state(params)
        assert list(state) == list(expected_keys)
        assert state["step"].shape == () and state["step"].dtype == torch.int64
        assert int(state["step"]) == 0
        targets = [torch.zeros_like(p) for p in params]
        new_params, state = run(opt, params, targets, steps=3, state=state)
        # Mixed dtypes share one promoted batch and come back in their own dtypes.
        assert [p.dtype for p in new_params] == [torch.float32, torch.float64]
        assert list(state) == list(expected_keys)
        assert int(state["step"]) == 3
        for key, value in state.items():
            assert isinstance(value, Tensor), key
            if key != "step":
                assert value.shape[0] == num, (key, value.shape)

    @staticmethod
    def state_not_mutated(make: Factory) -> None:
        torch.manual_seed(0)
        opt = make()
        params = [torch.randn(4, 5)]
        targets = [torch.randn(4, 5)]
        _, state = run(opt, params, targets, steps=2)
        before = {k: v.detach().clone() for k, v in state.items()}
        objects = dict(state)
        params_before = [p.detach().clone() for p in params]
        _, new_state = opt.step(params, separable_grads(params, targets), state)
        assert torch.equal(params[0], params_before[0])  # nor the params
        assert new_state is not state
        assert list(state) == list(before)
        for key in before:
            assert state[key] is objects[key], key
            assert torch.equal(state[key], before[key]), key

    @staticmethod
    def state_round_trip(make: Factory) -> None:
        """Saving the state with safetensors and resuming gives the same trajectory."""
        torch.manual_seed(0)
        opt = make()
        params = [torch.randn(6, 3), torch.randn(4)]
        targets = [torch.randn(6, 3), torch.randn(4)]
        with torch.no_grad():
            mid_params, mid_state = run(opt, params, targets, steps=3)
            straight_params, straight_state = run(opt, mid_params, targets, 3, mid_state)

            loaded = load_safetensors(save_safetensors(mid_state))
            resumed_params, resumed_state = run(opt, mid_params, targets, 3, loaded)

        for a, b in zip(straight_params, resumed_params):
            assert torch.equal(a, b)
        assert set(loaded) == set(mid_state)
        assert set(straight_state) == set(resumed_state)
        for key in straight_state:
            assert torch.equal(straight_state[key], resumed_state[key]), key

    @staticmethod
    def differentiable(make: Factory) -> None:
        torch.manual_seed(0)
        opt = make()
        params = [torch.randn(3, 4), torch.randn(6)]
        targets = [torch.randn(3, 4), torch.randn(6)]
        # Two steps: on the first the LSTM state is zero, so the recurrent weights
        # only receive a gradient through the second.
        new_params, _ = run(opt, params, targets, steps=2)
        assert all(p.requires_grad for p in new_params)
        meta_loss = sum(p.sum() for p in new_params)
        names, weights = zip(*opt.named_parameters())
        grads = torch.autograd.grad(meta_loss, weights)
        for name, grad in zip(names, grads):
            assert torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, name

        # The meta-gradient is the whole derivative, not a truncated one: a graph cut
        # anywhere (a detached hidden or cell state, say) shows up as a mismatch with
        # a central finite difference along a random direction in weight space.
        opt = opt.double()
        params = [p.double() for p in params]
        direction = [torch.randn_like(w) for w in opt.parameters()]
        # Gradients fixed in advance: with gradients of the iterates (detached, as the
        # protocol asks) the finite difference would also see the dropped second-order
        # path and disagree by design.
        grad_sequence = [[torch.randn_like(p) for p in params] for _ in range(3)]

        def meta_objective() -> Tensor:
            new_params, state = list(params), opt.init_state(params)
            for grads in grad_sequence:
                new_params, state = opt.step(new_params, grads, state)
            return sum((p * p).sum() for p in new_params)

        weight_grads = torch.autograd.grad(meta_objective(), list(opt.parameters()))
        analytic = sum((g * d).sum() for g, d in zip(weight_grads, direction))
        h = 1e-6
        with torch.no_grad():
            values = []
            for sign in (1.0, -1.0):
                for w, d in zip(opt.parameters(), direction):
                    w.add_(sign * h * d)
                values.append(meta_objective())
                for w, d in zip(opt.parameters(), direction):
                    w.sub_(sign * h * d)
        numeric = (values[0] - values[1]) / (2 * h)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)

    @staticmethod
    def no_graph_under_no_grad(make: Factory) -> None:
        torch.manual_seed(0)
        opt = make()
        params = [torch.randn(3, 4), torch.randn(6)]
        targets = [torch.randn(3, 4), torch.randn(6)]
        with_graph, with_graph_state = run(opt, params, targets, steps=3)
        with torch.no_grad():
            without, without_state = run(opt, params, targets, steps=3)
        for p in without:
            assert not p.requires_grad and p.grad_fn is None
        for key, value in without_state.items():
            assert not value.requires_grad, key
        for a, b in zip(with_graph, without):
            assert torch.equal(a.detach(), b)
        for key in with_graph_state:
            assert torch.equal(with_graph_state[key].detach(), without_state[key]), key

    @staticmethod
    def permutation_equivariant(make: Factory) -> None:
        torch.manual_seed(0)
        opt = make()
        theta, target = torch.randn(40), torch.randn(40)
        perm = torch.randperm(40)
        with torch.no_grad():
            (plain,), _ = run(opt, [theta], [target], steps=4)
            (permuted,), _ = run(opt, [theta[perm]], [target[perm]], steps=4)
        # Row order may change the blocking of the batched matmuls, so allow rounding.
        torch.testing.assert_close(permuted, plain[perm])
        assert not torch.allclose(plain, plain[perm])  # the check can tell orders apart

    @staticmethod
    def coordinates_independent(make: Factory) -> None:
        """Changing one coordinate's gradients changes that coordinate's iterate only.

        Permutation equivariance alone would also accept couplings through symmetric
        statistics (a mean over coordinates, say); this rules them out.
        """
        torch.manual_seed(0)
        opt = make()
        theta, target = torch.randn(30), torch.randn(30)
        nudged = target.clone()
        nudged[7] += 1.0
        with torch.no_grad():
            (plain,), _ = run(opt, [theta], [target], steps=4)
            (other,), _ = run(opt, [theta], [nudged], steps=4)
        changed = (plain != other).nonzero().flatten().tolist()
        assert changed == [7]

    @staticmethod
    def split_invariant(make: Factory) -> None:
        torch.manual_seed(0)
        opt = make()
        theta, target = torch.randn(24), torch.randn(24)
        with torch.no_grad():
            (whole,), _ = run(opt, [theta], [target], steps=4)
            halves, _ = run(
                opt,
                [theta[:12].reshape(3, 4), theta[12:]],
                [target[:12].reshape(3, 4), target[12:]],
                steps=4,
            )
        assert torch.equal(whole, torch.cat([h.reshape(-1) for h in halves]))

    @staticmethod
    def meta_training_losses(
        make: Factory, iterations: int = 32, unroll: int = 15, lr: float = 1e-2, seed: int = 0
    ) -> list[float]:
        """Meta-train with Adam on random 20-d quadratics; return each iteration's meta-loss.

        The meta-loss is the mean of f(θ_t) - f* over the unroll. Problems cycle through
        a pool of four, so the first and last four iterations see the same problems.
        """
        torch.manual_seed(seed)
        return quadratic_meta_losses(make(), iterations=iterations, unroll=unroll, lr=lr, seed=seed)


@pytest.fixture
def checks() -> OptimizerChecks:
    return OptimizerChecks()
