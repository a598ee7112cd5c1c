"""Every zoo optimizer's deployed ``step_`` against its reference ``step``.

``step_`` must compute what ``step`` computes, in place, to float rounding: eager and
compiled, float32 and float64, mixed parameter dtypes, odd tensors (a scalar, an empty
one, a non-contiguous one), and with the recurrent state stored in bfloat16.

Tolerances. float64 networks differ from the reference only in the order of sums:
1e-10 relative. float32 networks also use a tanh within 8 ulp (compiled), and their
differences pass through four recurrent steps whose gates do not amplify them
(|σ'| ≤ 1/4, |tanh'| ≤ 1): a few hundred ulp of 2^-24 at most, so 1e-4 relative
(about 1700 ulp) leaves a margin without hiding a wrong term, which moves an update by
far more. With bfloat16 state, a value that float32 rounding puts on the other side of a
bfloat16 rounding boundary is stored one bfloat16 spacing (2^-8) away; such flips feed
the next steps, so states and updates are compared to 2^-5 relative.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from flat_l2o_plugin.errors import FlatL2OError
from flat_l2o_plugin.optimizers import L2ODM, L2OScale, LearnedCorrection, RNNProp
from flat_l2o_plugin.optimizers._fused import COMPILE_ENV


def _correction(**options) -> LearnedCorrection:
    torch.manual_seed(0)
    opt = LearnedCorrection(hidden_size=3, **options)
    for layer in opt.mirror:  # a correction that is not zero
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return opt


def _scale() -> L2OScale:
    torch.manual_seed(0)
    opt = L2OScale(hidden_size=3, tensor_hidden_size=4, global_hidden_size=4)
    with torch.no_grad():  # context from the other tensors, and a per-coordinate learning rate
        for weight in [*opt.context_weights(), opt.log_lr_head.weight]:
            weight.normal_(0.0, 0.5)
    return opt


def _seeded(cls, **options) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return cls(hidden_size=3, **options)
    return make


ZOO: dict[str, Callable[[], nn.Module]] = {
    "learned_correction": _correction,
    "learned_correction_sgd": lambda: _correction(base="sgd", grad_clip=0.5),
    "rnnprop": _seeded(RNNProp),
    "rnnprop_random_scaling": lambda: _seeded(RNNProp, random_scaling=1.0)().train(),
    "l2o_dm": _seeded(L2ODM),
    "l2o_scale": _scale,
}
COMPILED = ("learned_correction", "rnnprop", "l2o_dm", "l2o_scale")


def _params(dtypes: tuple[torch.dtype, ...]) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    shapes = [(37,), (5, 7), (), (0,), (6, 4)]
    params = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtypes[i % len(dtypes)])
              for i, shape in enumerate(shapes)]
    params[-1] = params[-1].t()  # a non-contiguous parameter
    return params


def _round(state: dict[str, Tensor], keys: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The state as a deployment stores it: ``keys`` rounded to ``dtype``."""
    return {k: v.to(dtype) if dtype is not None and k in keys else v for k, v in state.items()}


def _compare(make: Callable[[], nn.Module], dtypes: tuple[torch.dtype, ...], weights: torch.dtype,
             state_dtype: torch.dtype | None = None, steps: int = 4) -> None:
    opt = make().to(weights)
    keys = opt.reduced_precision_state_keys()
    reference, deployed = _params(dtypes), [p.clone() for p in _params(dtypes)]
    gen = torch.Generator().manual_seed(2)
    ref_state = _round(opt.init_state(reference), keys, state_dtype)
    state = {k: v.clone() for k, v in ref_state.items()}
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in reference]
        before = [p.clone() for p in deployed]
        with torch.no_grad():
            new_reference, ref_state = opt.step(reference, grads, ref_state)
        ref_state = _round(ref_state, keys, state_dtype)
        opt.step_(deployed, grads, state)
        for old, ref_new, new in zip(before, new_reference, deployed):
            assert new.dtype == old.dtype and new.shape == old.shape
            _assert_close(new.double() - old.double(), ref_new.double() - old.double(), weights, state_dtype)
        reference = list(new_reference)
        # The next step starts from the same iterate (differences still compound through
        # the state); copy_ keeps the non-contiguous parameter non-contiguous.
        for d, r in zip(deployed, reference):
            d.copy_(r)
    assert not deployed[-1].is_contiguous()
    assert list(state) == list(ref_state)
    for key in state:
        assert state[key].dtype == ref_state[key].dtype, key
        _assert_close(state[key].double(), ref_state[key].double(), weights, state_dtype, key)


def _assert_close(actual: Tensor, expected: Tensor, weights: torch.dtype, state_dtype: torch.dtype | None,
                  what: str = "update") -> None:
    if state_dtype is not None:
        rtol = 2.0**-5
    else:
        rtol = 1e-10 if weights == torch.float64 else 1e-4
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "0")


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("dtypes, weights", [
    ((torch.float32,), torch.float32),
    ((torch.float64,), torch.float64),
    ((torch.float64,), torch.float32),
    ((torch.float32, torch.float64), torch.float32),
], ids=["float32", "float64", "float64-params", "mixed-params"])
def test_eager_deployed_step_is_the_reference_step(eager, name, dtypes, weights) -> None:
    _compare(ZOO[name], dtypes, weights)


@pytest.mark.parametrize("name", [n for n in ZOO if ZOO[n]().reduced_precision_state_keys()])
def test_bfloat16_state_is_the_reference_step_rounded_after_each_step(eager, name) -> None:
    _compare(ZOO[name], (torch.float32,), torch.float32, state_dtype=torch.bfloat16)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_deployed_step_is_the_reference_step(name) -> None:
    _compare(ZOO[name], (torch.float32,), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_deployed_step_in_float64_and_bfloat16_state(name) -> None:
    _compare(ZOO[name], (torch.float64,), torch.float64)
    if ZOO[name]().reduced_precision_state_keys():
        _compare(ZOO[name], (torch.float32,), torch.float32, state_dtype=torch.bfloat16)


def test_a_fresh_learned_correction_deploys_as_its_base_exactly(eager) -> None:
    # The mirror copy equals the net, so every hidden unit cancels: nothing is left to run.
    opt = LearnedCorrection()
    w1, b1, w2, b2 = opt._merged_mlp()
    assert w1.shape[0] == 0 and torch.equal(b2, torch.zeros(2))
    adam_params = [nn.Parameter(p.clone()) for p in _params((torch.float64,))[:2]]
    adam = torch.optim.Adam(adam_params, lr=opt.lr)
    params = [p.detach().clone() for p in adam_params]
    state = opt.init_state(params)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for p, g in zip(adam_params, grads):
            p.grad = g.clone()
        adam.step()
        opt.step_(params, grads, state)
    for p, q in zip(params, adam_params):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-14)


def test_deployed_step_refuses_a_state_for_other_params(eager) -> None:
    for name, make in ZOO.items():
        opt = make()
        state = opt.init_state([torch.zeros(5)])
        with pytest.raises(FlatL2OError, match=r"init_state\(params\)"):
            opt.step_([torch.zeros(6)], [torch.zeros(6)], state)


@pytest.mark.parametrize("name", ["rnnprop", "l2o_dm", "l2o_scale"])
def test_deployed_step_keeps_per_coordinate_matrices_feature_major(name) -> None:
    """A row-major state (as ``init_state`` and the reference step build it) is re-laid
    once, values intact, and then written in place; the steps match a state that
    started feature-major bit for bit."""
    opt = ZOO[name]()
    params = [torch.randn(300, generator=torch.Generator().manual_seed(4)), torch.randn(7, 5)]
    row_major = opt.init_state(params)
    coordinates = sum(p.numel() for p in params)
    matrices = [k for k, v in row_major.items() if v.dim() == 2 and v.shape[0] == coordinates and v.shape[1] > 1]
    assert matrices and all(row_major[k].is_contiguous() for k in matrices)
    feature_major = {k: v.t().contiguous().t() if k in matrices else v.clone() for k, v in row_major.items()}
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        opt.step_(a, grads, row_major)
        held = {k: row_major[k] for k in matrices}
        opt.step_(b, grads, feature_major)
        for k in matrices:
            assert row_major[k].t().is_contiguous(), k
            assert torch.equal(row_major[k], feature_major[k]), (step, k)
        for x, y in zip(a, b):
            assert torch.equal(x, y), step
    opt.step_(a, grads, row_major)
    assert all(row_major[k] is held[k] for k in matrices)  # no second copy
