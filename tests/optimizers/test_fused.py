"""What the deployed kernels share: the tanh they compile, compilation with a fallback, caches."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from flat_l2o_plugin.optimizers import L2ODM, L2OScale, LearnedCorrection, RNNProp, _fused
from flat_l2o_plugin.optimizers._fused import (
    COMPILE_ENV,
    FusedCompileWarning,
    Kernel,
    inplace_step,
    prepared,
    rational_tanh,
    row_blocks,
)
from flat_l2o_plugin.wrappers import wrap


def _float32_grid() -> torch.Tensor:
    """Dense float32 inputs: a fine uniform grid, a geometric one near 0, and the edges."""
    uniform = torch.linspace(-12.0, 12.0, 2_000_001, dtype=torch.float64)
    tiny = torch.logspace(-30, 1, 200_001, dtype=torch.float64)
    x = torch.cat([uniform, tiny, -tiny, torch.tensor([0.0, 9.1, -9.1, 1e30, -1e30], dtype=torch.float64)])
    return x.float()


def _ulps(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|approx - exact| in units of the float32 spacing at ``exact`` (float64 reference)."""
    spacing = (torch.nextafter(exact.float().abs(), torch.tensor(math.inf)).double()
               - exact.float().abs().double()).clamp_min(2.0**-149)
    return (approx.double() - exact).abs() / spacing


def test_rational_tanh_is_within_a_few_float32_ulp_of_tanh() -> None:
    # The fit's own error is 0.4 ulp; Horner's rule with positive terms in P and Q, the
    # square, the product and the division add at most about 20 ulp of rounding. Every
    # float32 input was checked once: the largest error is 6.03 ulp.
    x = _float32_grid()
    error = _ulps(rational_tanh(x), torch.tanh(x.double()))
    assert error.max() <= 8.0
    assert rational_tanh(x).abs().max() <= 1.0  # bounded like tanh, which the bounded steps rely on
    assert _ulps(rational_tanh(x, bounded=False), torch.tanh(x.double())).max() <= 8.0
    special = rational_tanh(torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0]))
    assert special[:2].tolist() == [1.0, -1.0] and math.isnan(special[2]) and special[3:].eq(0).all()


def test_compiled_elu_follows_the_torch_function() -> None:
    x = _float32_grid()
    exact_elu = torch.nn.functional.elu(x.double())
    # 2t / (1 - t) with 1 - t in [1, 2]: the tanh's relative error, a few ulp more.
    assert _ulps(_fused.elu(x, compiled=True), exact_elu).max() <= 12.0
    assert torch.equal(_fused.elu(x, compiled=False), torch.nn.functional.elu(x))
    # float64 kernels keep the torch functions even when compiled.
    x64 = x.double()
    assert torch.equal(_fused.tanh(x64, compiled=True), torch.tanh(x64))
    assert torch.equal(_fused.elu(x64, compiled=True), torch.nn.functional.elu(x64))


def test_row_blocks_cover_every_row_once_and_leave_no_single_row_tail() -> None:
    for rows, block in [(10, 4), (9, 4), (8, 4), (1, 4), (5, 5), (6, 5)]:
        blocks = list(row_blocks(rows, block))
        assert [i for b in blocks for i in range(b.start, b.stop)] == list(range(rows))
        if len(blocks) > 1:
            assert min(b.stop - b.start for b in blocks) >= 2


def _axpy(x, y, scale, *, config, compiled):
    y.copy_(y + config * scale * x)


def test_a_kernel_that_cannot_compile_warns_once_and_runs_eagerly(monkeypatch) -> None:
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise RuntimeError("no working C++ compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(_fused.torch, "compile", broken_compile)
    kernel = Kernel(_axpy, 2.0, compiled_block=None, eager_block=3)
    x, y = torch.arange(7.0), torch.ones(7)
    with pytest.warns(FusedCompileWarning, match="could not be compiled.*RuntimeError: no working C.. compiler found"):
        kernel((x, y), (torch.tensor(0.5),))
    assert torch.equal(y, 1.0 + x)
    assert isinstance(kernel.failed, RuntimeError) and len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel((x, y), (torch.tensor(0.5),))  # no second attempt, no second warning
    assert torch.equal(y, 1.0 + 2 * x) and len(calls) == 1


def test_compilation_is_skipped_when_switched_off(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile must not be called")

    monkeypatch.setattr(_fused.torch, "compile", refuse)
    monkeypatch.setenv(COMPILE_ENV, "0")
    kernel = Kernel(_axpy, 1.0, compiled_block=None, eager_block=None)
    y = torch.zeros(4)
    kernel((torch.ones(4), y), (torch.tensor(3.0),))
    assert torch.equal(y, torch.full((4,), 3.0)) and kernel.failed is None


def test_a_kernel_compiles_and_computes_what_it_computes_eagerly() -> None:
    kernel = Kernel(_axpy, 2.0, compiled_block=5, eager_block=None)
    x, y = torch.randn(11), torch.randn(11)
    expected = y + 2.0 * 0.25 * x
    kernel((x, y), (torch.tensor(0.25),))
    assert kernel.failed is None
    torch.testing.assert_close(y, expected)


def test_inplace_step_is_offered_only_where_it_mirrors_step() -> None:
    for cls in (LearnedCorrection, RNNProp, L2ODM, L2OScale):
        module = cls()
        assert inplace_step(module) == module.step_

    class Tweaked(RNNProp):
        def step(self, params, grads, state):  # other mathematics: step_ would not follow
            return super().step(params, [2 * g for g in grads], state)

    class Renamed(RNNProp):  # inherits both, so step_ still mirrors step
        pass

    assert inplace_step(Tweaked()) is None
    assert inplace_step(Renamed()) is not None
    assert inplace_step(wrap(RNNProp(), [{"name": "sam_gradient", "rho": 0.05}])) is None
    assert inplace_step(nn.Linear(2, 2)) is None


def test_prepared_weights_follow_in_place_changes() -> None:
    module = nn.Linear(3, 2)
    builds = []

    def build():
        builds.append(1)
        return module.weight.sum().item()

    first = prepared(module, "sum", build)
    assert prepared(module, "sum", build) == first and len(builds) == 1
    with torch.no_grad():
        module.weight.add_(1.0)
    assert prepared(module, "sum", build) == pytest.approx(first + 6.0) and len(builds) == 2
    module.weight = nn.Parameter(torch.zeros(2, 3))
    assert prepared(module, "sum", build) == 0.0 and len(builds) == 3
