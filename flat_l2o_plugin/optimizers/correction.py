"""LearnedCorrection: a hand-designed optimizer plus a bounded, learned correction.

A stability-first learned optimizer. The base direction d is Adam's
``m̂ / (√v̂ + ε)`` (bias-corrected moments) or SGD's momentum buffer
``buf ← μ buf + g``; a small MLP run on every coordinate reads scale-free features and
emits two numbers (a, b), and

    Δθ = -lr · ( exp(log(max_scale) · tanh(a)) · d  +  max_update · tanh(b) ).

So the learned multiplicative factor lies in [1/max_scale, max_scale] and the learned
additive term in ±lr·max_update, however wild the weights: every step obeys
``|Δθ| ≤ lr · (max_scale · |d| + max_update)``. With (a, b) = (0, 0) the step is
exactly the base optimizer's, and that is where a fresh optimizer starts (see
:class:`LearnedCorrection`), so an untrained model never blows up the optimizee.
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Mapping, MutableMapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import _fused
from ._flat import check_state, flatten, layout, unflatten

__all__ = ["BASES", "LearnedCorrection"]

BASES = ("adam", "sgd")
"""The hand-designed optimizers a :class:`LearnedCorrection` can start from."""

NUM_FEATURES = 4
# Bound on the ratio features: |g|/√v̂ can reach 1/√(1-β2) ≈ 32 on a first large
# gradient, and the network should not see inputs far outside its usual range.
_FEATURE_CLIP = 10.0


class LearnedCorrection(nn.Module):
    """A base optimizer (Adam or SGD with momentum) with a learned, bounded correction.

    **Features** (per coordinate, all invariant to a positive rescaling of the
    gradient, up to ε; the first three clamped to ±10): ``g/√(v̂+ε²)``,
    ``m̂/√(v̂+ε²)``, the base direction in Adam's units (Adam: d itself; SGD:
    ``(1-μ)·buf/√(v̂+ε²)``, the buffer as an average rather than a sum), and the sign
    agreement ``sign(g)·sign(m)``. m̂ and v̂ are Adam's bias-corrected moments with
    ``beta1``/``beta2``, tracked for the features whatever the base. There is no
    step-count feature: the horizon is unknown to a deployed optimizer.

    **Network**: ``Linear(4 → H)``, tanh, ``Linear(H → 2)``, run on all coordinates as
    one batch, so the optimizer is coordinatewise.

    **Initialisation**: the correction is the difference of two copies of that MLP,
    ``(a, b) = net(x) - mirror(x)``, and ``mirror`` starts as an exact copy of
    ``net`` (the antisymmetric "doubling trick" of Chizat, Oyallon and Bach, 2019).
    The two copies compute bit-identical outputs, so (a, b) is exactly zero for every
    input and a fresh optimizer *is* its base optimizer. A single MLP with a zeroed
    last layer would do the same, but then no meta-gradient would reach its first
    layer until the last one had moved; here every weight gets one from the first
    meta-step, and both copies keep PyTorch's default initialisation.

    **Units**: ``max_update`` is in units of lr, as is the base step. With Adam,
    |d| ≲ 1, so 1.0 allows a correction as large as one Adam step; with SGD, d is in
    gradient units and the additive term is not scale-free.

    The MLP runs in the dtype of the module's weights; features are cast to it and
    (a, b) are cast back to the params' dtype, so float64 params with float32 weights
    still follow the base optimizer to float64 precision at initialisation. Moments
    are kept in the params' dtype.

    State (N is the number of coordinates):

    - ``"step"``: int64 scalar, the number of steps taken.
    - ``"exp_avg"``, ``"exp_avg_sq"``: ``(N,)`` Adam's m and v, params dtype.
    - ``"momentum_buffer"`` (SGD only): ``(N,)`` buf, params dtype.

    Args:
        base: ``"adam"`` or ``"sgd"`` (SGD with momentum, no dampening, no Nesterov,
            as ``torch.optim.SGD(momentum=μ)``).
        lr: The base optimizer's learning rate (the same default for both bases).
        beta1: Decay of m (Adam's β1; for SGD, only a feature).
        beta2: Decay of v (Adam's β2; for SGD, only a feature).
        eps: Adam's ε, added to √v̂ (ε² is added to v̂ in the features).
        momentum: μ of the SGD base; ignored by Adam.
        hidden_size: H, the width of the MLP's hidden layer.
        max_scale: Bound (≥ 1) on the learned factor on d; 1 turns the factor off.
        max_update: Bound (≥ 0) on the additive correction, in units of lr; 0 turns
            it off.
        grad_clip: Clamp each gradient coordinate to ±grad_clip before anything else,
            moments included; ``None`` (the default) leaves gradients as they are.

    Raises:
        ConfigError: If an option is out of range, naming it.

    Example:
        >>> opt = LearnedCorrection(base="adam", lr=1e-2)
        >>> params = [torch.randn(3, 4), torch.randn(4)]
        >>> state = opt.init_state(params)
        >>> grads = [torch.randn_like(p) for p in params]
        >>> new_params, state = opt.step(params, grads, state)
    """

    def __init__(
        self,
        base: str = "adam",
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        momentum: float = 0.9,
        hidden_size: int = 16,
        max_scale: float = 10.0,
        max_update: float = 1.0,
        grad_clip: float | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if base not in BASES:
            close = difflib.get_close_matches(str(base), BASES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{owner}: base must be one of {', '.join(map(repr, BASES))}, got {base!r}{hint}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
            raise ConfigError(f"{owner}: hidden_size must be an integer >= 1, got {hidden_size!r}")
        for name, value in (("beta1", beta1), ("beta2", beta2), ("momentum", momentum)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{owner}: {name} must lie in [0, 1), got {value}")
        for name, value in (("lr", lr), ("eps", eps)):
            if not (value > 0.0 and math.isfinite(value)):
                raise ConfigError(f"{owner}: {name} must be finite and > 0, got {value}")
        if not (max_scale >= 1.0 and math.isfinite(max_scale)):
            raise ConfigError(f"{owner}: max_scale must be finite and >= 1 (1 disables the factor), got {max_scale}")
        if not (max_update >= 0.0 and math.isfinite(max_update)):
            raise ConfigError(f"{owner}: max_update must be finite and >= 0 (0 disables it), got {max_update}")
        if grad_clip is not None and not (grad_clip > 0.0 and math.isfinite(grad_clip)):
            raise ConfigError(f"{owner}: grad_clip must be finite and > 0, or None to disable it, got {grad_clip}")
        self.base = base
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.momentum = momentum
        self.hidden_size = hidden_size
        self.max_scale = max_scale
        self.max_update = max_update
        self.grad_clip = grad_clip

        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 2))
        # An exact copy: net(x) - mirror(x) is then exactly zero for every x.
        self.mirror = copy.deepcopy(self.net)

    def extra_repr(self) -> str:
        return (
            f"base={self.base!r}, lr={self.lr}, beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, "
            f"momentum={self.momentum}, max_scale={self.max_scale}, max_update={self.max_update}, "
            f"grad_clip={self.grad_clip}"
        )

    def state_keys(self) -> list[str]:
        """The keys of the state dict, in the order :meth:`init_state` creates them."""
        keys = ["step", "exp_avg", "exp_avg_sq"]
        return keys + ["momentum_buffer"] if self.base == "sgd" else keys

    def reduced_precision_state_keys(self) -> list[str]:
        """State a deployment may store in a lower precision: none.

        The state is Adam's moments (and SGD's momentum), running averages that change
        by (1 - β) of their value per step: with β2 = 0.999, bfloat16's 2⁻⁸ spacing
        would round each increment of v away, so it would stop following the gradient.
        """
        return []

    def init_state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Fresh state for ``params``: zero moments (and momentum buffer), step 0.

        Args:
            params: The optimizee's parameters (only shapes, dtype and device are read).

        Returns:
            The state dict described in the class docstring.
        """
        num, dtype, device = layout(params)
        state = {"step": torch.zeros((), dtype=torch.int64, device=device)}
        for key in self.state_keys()[1:]:
            state[key] = torch.zeros(num, dtype=dtype, device=device)
        return state

    def correction(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The network's raw outputs (a, b) for ``(N, 4)`` features, in the weights' dtype."""
        x = features.to(self.net[0].weight.dtype)
        out = self.net(x) - self.mirror(x)
        return out[:, 0], out[:, 1]

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One optimizer step on all coordinates at once.

        Differentiable in the module's weights through the returned params (the state
        holds only gradient statistics, which do not depend on them). ``grads`` are used
        as given. Works under ``torch.no_grad()``. ``state`` is not modified.

        Args:
            params: Current parameters θ_t.
            grads: ∇f(θ_t), shaped like ``params``.
            state: The state from :meth:`init_state` or the previous ``step``.

        Returns:
            ``(new_params, new_state)``: θ_{t+1} shaped and typed like ``params``, and a
            new state dict with the same keys.

        Raises:
            FlatL2OError: If ``state`` was built for other params.
        """
        theta = flatten(params)
        grad = flatten(grads).to(theta.dtype)
        check_state(state, self.state_keys(), theta.numel(), type(self).__name__)
        if self.grad_clip is not None:
            grad = grad.clamp(-self.grad_clip, self.grad_clip)

        step = state["step"] + 1
        t = step.to(theta.dtype)
        exp_avg = state["exp_avg"] * self.beta1 + grad * (1.0 - self.beta1)
        exp_avg_sq = state["exp_avg_sq"] * self.beta2 + grad * grad * (1.0 - self.beta2)
        m_hat = exp_avg / (1.0 - self.beta1**t)
        v_hat = exp_avg_sq / (1.0 - self.beta2**t)
        inv_rms = torch.rsqrt(v_hat + self.eps**2)
        new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if self.base == "adam":
            direction = m_hat / (v_hat.sqrt() + self.eps)
            direction_feature = direction
        else:
            direction = state["momentum_buffer"] * self.momentum + grad
            direction_feature = direction * ((1.0 - self.momentum) * inv_rms)
            new_state["momentum_buffer"] = direction

        clip = _FEATURE_CLIP
        features = torch.stack(
            [
                (grad * inv_rms).clamp(-clip, clip),
                (m_hat * inv_rms).clamp(-clip, clip),
                direction_feature.clamp(-clip, clip),
                torch.sign(grad) * torch.sign(exp_avg),
            ],
            dim=-1,
        )
        a, b = (out.to(theta.dtype) for out in self.correction(features))
        # tanh bounds both terms, so no weight value can make a step unbounded.
        factor = torch.exp(math.log(self.max_scale) * torch.tanh(a))
        delta = -self.lr * (factor * direction + self.max_update * torch.tanh(b))
        return unflatten(theta + delta, params), new_state

    @torch.no_grad()
    def step_(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: MutableMapping[str, Tensor]) -> None:
        """:meth:`step` in place, fused, without autograd: the deployed step.

        Same mathematics as :meth:`step` to float rounding (the hidden layer's sums run in
        another order, and compiled float32 kernels use a tanh a few ulp from
        ``torch.tanh``). The two mirrored MLPs run as one of twice the width,
        ``[W1; W1']`` then ``[W2, -W2']``; hidden units that the two copies still share
        cancel exactly and are dropped, so a fresh optimizer costs what its base costs.
        Each parameter tensor is one compiled loop (see :mod:`._fused`). Not
        differentiable: use :meth:`step` for meta-training.

        Args:
            params: Updated in place.
            grads: ∇f(θ_t), shaped like ``params``.
            state: From :meth:`init_state` for ``params``; updated in place.
        """
        owner = type(self).__name__
        keys = self.state_keys()
        check_state(state, keys, sum(p.numel() for p in params), owner)
        step = state["step"] + 1
        dtype = state["exp_avg"].dtype
        t = step.to(dtype)
        # The reference computes the bias corrections in the state's dtype; so do we.
        corrections = (1.0 - self.beta1**t, 1.0 - self.beta2**t)
        weights = _fused.prepared(self, "merged_mlp", self._merged_mlp)
        run = _fused.kernel(_correction_kernel, self._kernel_config(), eager_block=_EAGER_BLOCK)
        for theta, grad, rows, commit in _fused.param_slices(params, grads, state, keys[1:], owner):
            run((theta, grad, rows["exp_avg"], rows["exp_avg_sq"], rows.get("momentum_buffer")),
                (*corrections, *weights))
            commit()
        state["step"].copy_(step)

    def _kernel_config(self) -> _CorrectionConfig:
        return _CorrectionConfig(self.base, self.lr, self.beta1, self.beta2, self.eps, self.momentum,
                                 math.log(self.max_scale), self.max_update, self.grad_clip)

    def _merged_mlp(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``net(x) - mirror(x)`` as one MLP: first-layer weights, biases, output weights, bias."""
        w1 = torch.cat([self.net[0].weight, self.mirror[0].weight])
        b1 = torch.cat([self.net[0].bias, self.mirror[0].bias])
        w2 = torch.cat([self.net[2].weight, -self.mirror[2].weight], dim=1)
        b2 = self.net[2].bias - self.mirror[2].bias
        # Units with the same input weights compute the same activation: merge them by
        # adding their output weights, and drop those whose output weights cancel.
        units, inverse = torch.unique(torch.cat([w1, b1[:, None]], dim=1), dim=0, return_inverse=True)
        merged = w2.new_zeros(2, units.shape[0]).index_add_(1, inverse, w2)
        keep = (merged != 0).any(dim=0)
        units, merged = units[keep], merged[:, keep]
        return units[:, :NUM_FEATURES].contiguous(), units[:, NUM_FEATURES].contiguous(), merged.contiguous(), b2


# Coordinates per block when the kernel runs eagerly: large enough that per-operator
# overhead does not show, small enough that the hidden layer of a block stays in cache.
# Compiled, a tensor is one loop with no intermediates, so it is not split.
_EAGER_BLOCK = 1 << 16


class _CorrectionConfig(NamedTuple):
    base: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    momentum: float
    log_max_scale: float
    max_update: float
    grad_clip: float | None


def _correction_kernel(
    theta: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    momentum_buffer: Tensor | None,
    correction1: Tensor,
    correction2: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    config: _CorrectionConfig,
    compiled: bool,
) -> None:
    """LearnedCorrection's step on a block of coordinates, in place (see ``step``)."""
    c = config
    dtype = exp_avg.dtype
    g = grad.to(dtype)
    if c.grad_clip is not None:
        g = g.clamp(-c.grad_clip, c.grad_clip)
    exp_avg_new = exp_avg * c.beta1 + g * (1.0 - c.beta1)
    exp_avg_sq_new = exp_avg_sq * c.beta2 + g * g * (1.0 - c.beta2)
    m_hat = exp_avg_new / correction1
    v_hat = exp_avg_sq_new / correction2
    inv_rms = torch.rsqrt(v_hat + c.eps**2)
    if c.base == "adam":
        direction = m_hat / (v_hat.sqrt() + c.eps)
        direction_feature = direction
    else:
        direction = momentum_buffer * c.momentum + g
        direction_feature = direction * ((1.0 - c.momentum) * inv_rms)
    clip = _FEATURE_CLIP
    features = [
        (g * inv_rms).clamp(-clip, clip).to(w1.dtype),
        (m_hat * inv_rms).clamp(-clip, clip).to(w1.dtype),
        direction_feature.clamp(-clip, clip).to(w1.dtype),
        (torch.sign(g) * torch.sign(exp_avg_new)).to(w1.dtype),
    ]
    if compiled:
        # Unit by unit with scalar weights: inductor fuses the whole MLP into the loop
        # over coordinates, with no hidden-layer tensor.
        a, b = b2[0], b2[1]
        for j in range(w1.shape[0]):
            pre = b1[j] + w1[j, 0] * features[0] + w1[j, 1] * features[1] + w1[j, 2] * features[2]
            hidden = _fused.tanh(pre + w1[j, 3] * features[3], compiled, bounded=False)
            a = a + w2[0, j] * hidden
            b = b + w2[1, j] * hidden
        a = a.expand_as(features[0])
        b = b.expand_as(features[0])
    else:
        hidden = torch.tanh(torch.addmm(b1, torch.stack(features, dim=-1), w1.t()))
        out = torch.addmm(b2, hidden, w2.t())
        a, b = out[:, 0], out[:, 1]
    factor = torch.exp(c.log_max_scale * _fused.tanh(a.to(dtype), compiled))
    delta = -c.lr * (factor * direction + c.max_update * _fused.tanh(b.to(dtype), compiled))
    theta.copy_(theta.to(dtype) + delta)
    exp_avg.copy_(exp_avg_new)
    exp_avg_sq.copy_(exp_avg_sq_new)
    if momentum_buffer is not None:
        momentum_buffer.copy_(direction)
