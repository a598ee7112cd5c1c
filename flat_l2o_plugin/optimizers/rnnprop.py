"""RNNProp: a coordinatewise LSTM optimizer fed with Adam-normalized gradients.

Lv, Jiang and Li (2017), "Learning Gradient Descent: Better Generalization and Longer
Horizons". Each coordinate i of the optimizee sees two scale-free inputs built from
Adam-style moment estimates of its gradient g_i,

    m_t = β1 m_{t-1} + (1 - β1) g_t,        v_t = β2 v_{t-1} + (1 - β2) g_t²,
    m̂_t = m_t / (1 - β1^t),                 v̂_t = v_t / (1 - β2^t),
    x_t = [ m̂_t / (√v̂_t + ε),  g_t / (√v̂_t + ε) ],

which pass through Linear(2 → H) + ELU, a stack of LSTM cells with H units, and
Linear(H → 1). The update is Δθ_i = α · tanh(out_i) and θ ← θ + Δθ: the network
chooses the sign, and α bounds every step.
"""

from __future__ import annotations

import math
from typing import Mapping, MutableMapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from . import _fused
from ._flat import check_state, flatten, layout, unflatten

__all__ = ["RNNProp", "adam_features"]


def adam_features(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """RNNProp's two input features and the updated moment estimates.

    Args:
        grad: Gradient, shape ``(N,)``.
        exp_avg: First moment m_{t-1}, shape ``(N,)``.
        exp_avg_sq: Second moment v_{t-1}, shape ``(N,)``.
        step: The 1-based index t of the step being taken (a tensor, so that no
            accelerator sync is needed for the bias correction).
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        eps: Added to √v̂ before dividing.

    Returns:
        ``(features, m_t, v_t)``: features of shape ``(N, 2)`` holding
        ``[m̂/(√v̂+ε), g/(√v̂+ε)]``, and the new moments in ``grad``'s dtype.
    """
    m = exp_avg * beta1 + grad * (1.0 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1.0 - beta2)
    t = step.to(grad.dtype)
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    inv_denom = 1.0 / (v_hat.sqrt() + eps)
    return torch.stack([m_hat * inv_denom, grad * inv_denom], dim=-1), m, v


class RNNProp(nn.Module):
    """RNNProp learned optimizer (Lv et al., 2017), one batch over all coordinates.

    Defaults follow the paper: β1 = β2 = 0.95, H = 20, two LSTM layers, and an output
    bound α = ``output_scale`` = 0.1. Open-L2O's port uses α = 0.01; we keep the paper's
    value: tanh already bounds each step by α, and with 0.01 the steps of a fresh
    optimizer are ten times smaller, so within the 10-20-step unrolls we meta-train on
    the iterate barely moves. Pass ``output_scale=0.01`` to reproduce that port.

    Weights use PyTorch's default initialisation (uniform in ±1/√fan_in). With it a
    freshly built optimizer makes small but non-zero updates (between about 0.001 and
    0.02 per coordinate with α = 0.1, depending on the seed, and nearly the same for
    every coordinate until meta-training shapes them), and every weight receives a meta-gradient
    from the start (the recurrent weights from the second optimizee step on, once the
    hidden state is non-zero).

    Random scaling (the paper's training trick, off by default): the optimizer is
    meta-trained on f_c(θ') = f(c ⊙ θ') instead of f(θ), with a random positive vector
    c drawn once per trajectory, c_i = exp(u_i), u_i ~ U(-s, s), s = ``random_scaling``.
    The host keeps working with θ = c ⊙ θ' and ∇f(θ); this module translates. It sees
    the gradient of f_c, ∇_θ' f_c = c ⊙ ∇f(θ) (moments are accumulated from it), takes
    its step Δθ' in the θ' coordinates, and returns θ + c ⊙ Δθ'. Because both input
    features are invariant to a positive rescaling of g (up to ε), in practice the
    network sees the same inputs while its steps land c_i times larger or smaller: it
    must learn step sizes that hold up across curvature scales rather than memorise the
    scale of the training problems. With ``random_scaling > 0``, c is drawn by
    :meth:`init_state` and kept in the state under ``"scale"`` (ones when built in eval
    mode), so truncated unrolls of one trajectory share it; with ``random_scaling=0``
    the state has no ``"scale"``. It is applied only while ``self.training`` is true; in
    eval mode ``"scale"`` is ignored. The paper's
    other trick (adding a convex term to the optimizee) belongs to the task, not here.

    The LSTM runs in the dtype of the module's weights; features are cast to it and the
    update is cast back to the params' dtype, so float64 optimizees work with a float32
    optimizer. Moments are kept in the params' dtype, so a float64 optimizee keeps
    float64 moment estimates (g² of a tiny gradient underflows far sooner in float32).

    State (all per-coordinate tensors have leading dimension N, the total number of
    coordinates of the params):

    - ``"step"``: int64 scalar, number of steps taken.
    - ``"exp_avg"``, ``"exp_avg_sq"``: ``(N,)`` moments m and v, params dtype.
    - ``"lstm_h_{l}"``, ``"lstm_c_{l}"`` for each layer l: ``(N, hidden_size)``,
      module dtype.
    - ``"scale"`` (only with ``random_scaling > 0``): ``(N,)`` random-scaling factors c,
      params dtype.

    That is ``2 + 2 · num_layers · hidden_size`` numbers per coordinate (82 with the
    defaults, against Adam's 2), all of which a step needs: the moments feed the inputs
    and each layer's h and c are its recurrence. The LSTM states are also what a
    deployment may keep in a lower precision (:meth:`reduced_precision_state_keys`).

    Args:
        hidden_size: Units of the input layer and of each LSTM layer.
        num_layers: Number of stacked LSTM layers.
        beta1: Decay of the first-moment estimate.
        beta2: Decay of the second-moment estimate.
        eps: Added to √v̂ in the feature denominators.
        output_scale: α, the bound on each coordinate's step.
        random_scaling: s ≥ 0, half-width of the uniform log-scale range of the
            random-scaling factors; 0 disables the trick.

    Raises:
        ConfigError: If a hyperparameter is out of range.

    Example:
        >>> opt = RNNProp()
        >>> params = [torch.randn(3, 4), torch.randn(4)]
        >>> state = opt.init_state(params)
        >>> grads = [torch.randn_like(p) for p in params]
        >>> new_params, state = opt.step(params, grads, state)
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        beta1: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-8,
        output_scale: float = 0.1,
        random_scaling: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ConfigError(
                f"RNNProp: hidden_size and num_layers must be >= 1, got "
                f"hidden_size={hidden_size}, num_layers={num_layers}"
            )
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"RNNProp: {name} must lie in [0, 1), got {beta}")
        if not eps > 0.0:
            raise ConfigError(f"RNNProp: eps must be > 0, got {eps}")
        if not (output_scale > 0.0 and math.isfinite(output_scale)):
            raise ConfigError(f"RNNProp: output_scale must be finite and > 0, got {output_scale}")
        if not (random_scaling >= 0.0 and math.isfinite(random_scaling)):
            raise ConfigError(
                f"RNNProp: random_scaling must be finite and >= 0 (0 disables it), "
                f"got {random_scaling}"
            )
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.output_scale = output_scale
        self.random_scaling = random_scaling

        self.input_layer = nn.Linear(2, hidden_size)
        self.cells = nn.ModuleList(nn.LSTMCell(hidden_size, hidden_size) for _ in range(num_layers))
        self.output_layer = nn.Linear(hidden_size, 1)

    def extra_repr(self) -> str:
        return (
            f"beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, "
            f"output_scale={self.output_scale}, random_scaling={self.random_scaling}"
        )

    def state_keys(self) -> list[str]:
        """The keys of the state dict, in the order :meth:`init_state` creates them."""
        keys = ["step", "exp_avg", "exp_avg_sq"]
        for layer in range(self.num_layers):
            keys += [f"lstm_h_{layer}", f"lstm_c_{layer}"]
        return keys + ["scale"] if self.random_scaling > 0.0 else keys

    def reduced_precision_state_keys(self) -> list[str]:
        """State a deployment may store in a lower precision: the LSTM states.

        They are squashed by the gates at every step, so rounding them between steps
        perturbs the next step's inputs by at most the rounding. The moments are running
        averages that change by (1 - β) of their value per step; rounded to bfloat16
        (relative spacing 2⁻⁸) their small increments would be lost, so they stay in the
        params' dtype.
        """
        return [f"lstm_{kind}_{layer}" for layer in range(self.num_layers) for kind in ("h", "c")]

    def init_state(
        self, params: Sequence[Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Fresh state for ``params``: zero moments and LSTM state, step 0.

        In training mode with ``random_scaling > 0`` this also draws the random-scaling
        factors c (see the class docstring); otherwise c is all ones.

        Args:
            params: The optimizee's parameters (only shapes, dtype and device are read).
            generator: Source of randomness for c; it must live on the params' device.
                Defaults to the global generator.

        Returns:
            The state dict described in the class docstring.
        """
        num, dtype, device = layout(params)
        weight_dtype = self.output_layer.weight.dtype
        state: dict[str, Tensor] = {
            "step": torch.zeros((), dtype=torch.int64, device=device),
            "exp_avg": torch.zeros(num, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(num, dtype=dtype, device=device),
        }
        for layer in range(self.num_layers):
            for kind in ("h", "c"):
                state[f"lstm_{kind}_{layer}"] = torch.zeros(
                    num, self.hidden_size, dtype=weight_dtype, device=device
                )
        if self._scaling_active():
            u = torch.rand(num, generator=generator, dtype=dtype, device=device)
            state["scale"] = torch.exp((2.0 * u - 1.0) * self.random_scaling)
        elif self.random_scaling > 0.0:
            state["scale"] = torch.ones(num, dtype=dtype, device=device)
        return state

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One optimizer step on all coordinates at once.

        Differentiable in the module's weights through the returned params and the
        LSTM state; ``grads`` are used as given (the host passes them detached, which
        drops the second-order terms as in Andrychowicz et al., 2016). Works under
        ``torch.no_grad()`` too. ``state`` is not modified.

        Args:
            params: Current parameters θ_t.
            grads: ∇f(θ_t), shaped like ``params``.
            state: The state from :meth:`init_state` or the previous ``step``.

        Returns:
            ``(new_params, new_state)``: θ_{t+1} shaped and typed like ``params``,
            and a new state dict with the same keys.
        """
        theta = flatten(params)
        grad = flatten(grads).to(theta.dtype)
        check_state(state, self.state_keys(), theta.numel(), type(self).__name__)

        scale = state["scale"].to(theta.dtype) if self._scaling_active() else None
        if scale is not None:
            grad = grad * scale  # ∇_θ' f(c ⊙ θ') = c ⊙ ∇f(θ)

        step = state["step"] + 1
        features, exp_avg, exp_avg_sq = adam_features(
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
        )

        weight_dtype = self.output_layer.weight.dtype
        new_state: dict[str, Tensor] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        x = F.elu(self.input_layer(features.to(weight_dtype)))
        for layer, cell in enumerate(self.cells):
            h, c = cell(
                x,
                (
                    state[f"lstm_h_{layer}"].to(weight_dtype),
                    state[f"lstm_c_{layer}"].to(weight_dtype),
                ),
            )
            new_state[f"lstm_h_{layer}"] = h
            new_state[f"lstm_c_{layer}"] = c
            x = h
        if "scale" in state:
            new_state["scale"] = state["scale"]

        delta = (self.output_scale * torch.tanh(self.output_layer(x).squeeze(-1))).to(theta.dtype)
        if scale is not None:
            delta = delta * scale  # θ = c ⊙ θ', so a step Δθ' moves θ by c ⊙ Δθ'
        return unflatten(theta + delta, params), new_state

    @torch.no_grad()
    def step_(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: MutableMapping[str, Tensor]) -> None:
        """:meth:`step` in place, fused, without autograd: the deployed step.

        Same mathematics as :meth:`step` to float rounding (the gates' sums run in
        another order, and compiled float32 kernels use a tanh a few ulp from
        ``torch.tanh``). Each parameter tensor runs in blocks of coordinates: the input
        features and layer, one matrix product per LSTM layer for all four gates, and
        the gate arithmetic, state writes and update fused around them (see
        :mod:`._fused`). The LSTM states may be stored in another dtype (bfloat16, say);
        they are read into the weights' dtype and rounded back when written. Not
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
        t = step.to(state["exp_avg"].dtype)
        corrections = (1.0 - self.beta1**t, 1.0 - self.beta2**t)
        weights = _fused.prepared(self, "deployed", self._deployed_weights)
        config = _RNNPropConfig(self.num_layers, self.beta1, self.beta2, self.eps, self.output_scale)
        run = _fused.kernel(_rnnprop_kernel, config, compiled_block=_BLOCK, eager_block=_EAGER_BLOCK)
        scaled = self._scaling_active()
        lstm_keys = self.reduced_precision_state_keys()
        for theta, grad, rows, commit in _fused.param_slices(params, grads, state, keys[1:], owner):
            run((theta, grad, rows["exp_avg"], rows["exp_avg_sq"], rows["scale"] if scaled else None,
                 *(rows[key] for key in lstm_keys)), (*corrections, *weights))
            commit()
        state["step"].copy_(step)

    def _deployed_weights(self) -> list[Tensor]:
        return [self.input_layer.weight.contiguous(), self.input_layer.bias, *_fused.lstm_weights(self.cells),
                self.output_layer.weight[0].contiguous(), self.output_layer.bias]

    def _scaling_active(self) -> bool:
        return self.training and self.random_scaling > 0.0


# Coordinates per block of the deployed step, compiled: a block's stacked inputs and
# gates (6·H floats a row) stay in a core's L2 cache between the matrix product and the
# gate arithmetic. Eagerly, each operator's overhead is paid per block, so blocks are larger.
_BLOCK = 2048
_EAGER_BLOCK = 1 << 14


class _RNNPropConfig(NamedTuple):
    num_layers: int
    beta1: float
    beta2: float
    eps: float
    output_scale: float


def _rnnprop_kernel(
    theta: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor | None,
    *args: Tensor,
    config: _RNNPropConfig,
    compiled: bool,
) -> None:
    """RNNProp's step on a block of coordinates, in place (see ``RNNProp.step``)."""
    c = config
    states = args[: 2 * c.num_layers]
    correction1, correction2, w_in, b_in, *rest = args[2 * c.num_layers:]
    lstm, (w_out, b_out) = rest[:-2], rest[-2:]
    dtype = exp_avg.dtype
    g = grad.to(dtype)
    if scale is not None:
        g = g * scale.to(dtype)
    exp_avg_new = exp_avg * c.beta1 + g * (1.0 - c.beta1)
    exp_avg_sq_new = exp_avg_sq * c.beta2 + g * g * (1.0 - c.beta2)
    inv_denom = 1.0 / ((exp_avg_sq_new / correction2).sqrt() + c.eps)
    momentum = ((exp_avg_new / correction1) * inv_denom).to(w_in.dtype)
    normalized = (g * inv_denom).to(w_in.dtype)
    x = _fused.elu(w_in[:, 0:1] * momentum + w_in[:, 1:2] * normalized + b_in[:, None], compiled)
    x = _fused.lstm_stack(x, states, lstm, compiled)
    out = (w_out[:, None] * x).sum(dim=0) + b_out
    delta = (c.output_scale * _fused.tanh(out, compiled)).to(dtype)
    if scale is not None:
        delta = delta * scale.to(dtype)
    theta.copy_(theta.to(dtype) + delta)
    exp_avg.copy_(exp_avg_new)
    exp_avg_sq.copy_(exp_avg_sq_new)

