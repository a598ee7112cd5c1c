"""The regularizer conformance check: what every registered regularizer must do."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..activation import accepted_host_values
from ..manager import FlatL2OPluginManager

__all__ = ["check_regularizer", "tiny_problem"]


def tiny_problem(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[list[Tensor], Callable]:
    """A 4-6-3 tanh classifier on 32 fixed points: params and ``loss_fn(params)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    params = [torch.randn(6, 4, generator=g, dtype=dtype) * 0.5, torch.zeros(6, dtype=dtype),
              torch.randn(3, 6, generator=g, dtype=dtype) * 0.5, torch.zeros(3, dtype=dtype)]

    def loss_fn(ps: list[Tensor]) -> Tensor:
        hidden = torch.tanh(x @ ps[0].T + ps[1])
        return torch.nn.functional.cross_entropy(hidden @ ps[2].T + ps[3], y)

    return params, loss_fn


def check_regularizer(name_or_factory: str | Callable[..., Any], *, options: dict[str, Any] | None = None,
                      plugin_manager: FlatL2OPluginManager | None = None,
                      dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> None:
    """Assert that a regularizer follows the contract; raises ``AssertionError`` naming the failure.

    Checked, for each dtype: the value is a finite 0-dim tensor of the params' dtype; it
    is differentiable in ``params`` with a finite, non-zero gradient; the gradient also
    reaches weights upstream of the params (as the learned optimizer's weights are in
    meta-training); and two instances built after the same ``torch.manual_seed`` give the
    same value. A regularizer that names ``loss`` or ``grads`` must give, in float64, the
    same value and gradient when the host hands them over as when it computes its own
    (up to the order in which the gradient sums the same terms).

    Args:
        name_or_factory: A registered name, or the factory itself.
        options: Passed to the factory.
        plugin_manager: Where to look the name up (default: a fresh manager).
        dtypes: The dtypes to check on the CPU.
    """
    options = dict(options or {})
    if isinstance(name_or_factory, str):
        from ..host import FlatL2O

        flat = FlatL2O(plugin_manager=plugin_manager)
        label = name_or_factory
        make = lambda: flat.create_regularizer(name_or_factory, **options)  # noqa: E731
    else:
        label = getattr(name_or_factory, "__name__", repr(name_or_factory))
        make = lambda: name_or_factory(**options)  # noqa: E731

    for dtype in dtypes:
        where = f"regularizer {label!r} ({dtype})"
        params, loss_fn = tiny_problem(dtype)

        leaves = [p.clone().requires_grad_(True) for p in params]
        torch.manual_seed(0)
        value = make()(leaves, loss_fn)
        assert isinstance(value, Tensor) and value.dim() == 0, f"{where}: must return a 0-dim tensor, got {value!r}"
        assert value.dtype == dtype, f"{where}: returned {value.dtype} for {dtype} params"
        assert math.isfinite(float(value.detach())), f"{where}: value is not finite ({float(value.detach())})"
        assert value.requires_grad, f"{where}: not differentiable in params (the value has no graph)"
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        assert any(g is not None for g in grads), f"{where}: not differentiable in params"
        flat_grad = torch.cat([g.reshape(-1) for g in grads if g is not None])
        assert torch.isfinite(flat_grad).all(), f"{where}: gradient is not finite"
        assert flat_grad.abs().sum() > 0, f"{where}: gradient is identically zero"

        # Params as a learned optimizer produces them: non-leaf, downstream of weights φ.
        phi = torch.full((), 0.9, dtype=dtype, requires_grad=True)
        torch.manual_seed(0)
        upstream = make()([phi * p for p in params], loss_fn)
        (dphi,) = torch.autograd.grad(upstream, phi, allow_unused=True)
        assert dphi is not None and math.isfinite(float(dphi)) and float(dphi) != 0.0, \
            f"{where}: no gradient reaches weights upstream of the params (got {dphi})"

        torch.manual_seed(1)
        first = float(make()([p.clone().requires_grad_(True) for p in params], loss_fn).detach())
        torch.manual_seed(1)
        second = float(make()([p.clone().requires_grad_(True) for p in params], loss_fn).detach())
        assert first == second, f"{where}: not deterministic under torch.manual_seed ({first} != {second})"

        if dtype == torch.float64:
            _check_host_values(make, params, loss_fn, where)


def _check_host_values(make: Callable[[], Any], params: list[Tensor], loss_fn: Callable, where: str) -> None:
    """The host's loss and gradient graph, handed over, change nothing but the cost."""
    torch.manual_seed(2)
    reg = make()
    accepts = accepted_host_values(reg)
    if not accepts:
        return
    leaves = [p.clone().requires_grad_(True) for p in params]
    own = reg(leaves, loss_fn)
    own_grad = torch.autograd.grad(own, leaves, allow_unused=True)
    torch.manual_seed(2)
    reg = make()
    leaves = [p.clone().requires_grad_(True) for p in params]
    loss = loss_fn(leaves)
    host = {"loss": loss, "grads": list(torch.autograd.grad(loss, leaves, create_graph=True))}
    given = reg(leaves, loss_fn, **{k: v for k, v in host.items() if k in accepts})
    given_grad = torch.autograd.grad(given, leaves, allow_unused=True)
    assert torch.allclose(given.detach(), own.detach(), rtol=1e-12, atol=0.0), \
        f"{where}: the value changes when the host hands over {sorted(accepts)} ({float(given)} != {float(own)})"
    for a, b in zip(given_grad, own_grad):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        assert a is None or torch.allclose(a, b, rtol=1e-9, atol=1e-12), \
            f"{where}: the gradient changes when the host hands over {sorted(accepts)}"
