"""L2O-DM: the coordinatewise LSTM optimizer of Andrychowicz et al. (2016).

"Learning to learn by gradient descent by gradient descent". Each coordinate's gradient
is preprocessed into two features of comparable magnitude (the paper's appendix A),

    |g| ≥ e^{-p}:  ( log|g| / p,  sign g )
    |g| <  e^{-p}:  ( -1,          e^p g  )

which feed a stack of LSTM cells shared by all coordinates, followed by a linear output
layer. The update is Δθ = output_scale · out and θ ← θ + Δθ.
"""

from __future__ import annotations

import math
from typing import Mapping, MutableMapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import _fused
from ._flat import check_state, flatten, layout, unflatten

__all__ = ["L2ODM", "log_sign_preprocess"]


def log_sign_preprocess(grad: Tensor, p: float, eps: float = 0.0) -> Tensor:
    """The paper's log/sign gradient preprocessing, coordinatewise.

    With ``eps = 0`` the two branches agree at |g| = e^{-p} (both give (-1, sign g)), so
    the features are continuous in g. Some public ports compute log(|g| + ε) instead;
    ``eps`` reproduces them.

    Args:
        grad: Gradient of any shape.
        p: Controls how small gradients are treated as "small" (the paper uses 10).
        eps: Added to |g| inside the log of the large-gradient branch.

    Returns:
        A tensor of shape ``grad.shape + (2,)`` in ``grad``'s dtype.
    """
    magnitude = grad.abs()
    large = magnitude >= math.exp(-p)
    # Clamping before the log keeps the unused branch finite at g = 0, so neither the
    # value nor a gradient through it can turn into NaN.
    clamped = magnitude.clamp_min(math.exp(-p))
    log_feature = torch.where(
        large, torch.log(clamped + eps if eps else clamped) / p, torch.full_like(grad, -1.0)
    )
    sign_feature = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack([log_feature, sign_feature], dim=-1)


class L2ODM(nn.Module):
    """The L2O-DM learned optimizer, one batch over all coordinates.

    Architecture as in the paper: log/sign preprocessing with p = 10, two LSTM layers
    of 20 units, a linear output. The paper does not state an output multiplier; the
    authors' released code scales the output by 0.01 on MNIST/CIFAR (with a clamped
    variant of the preprocessing, k = 5) and by 1 on its quadratic. We default to 0.1,
    the value our RNNProp uses: with PyTorch's default initialisation (uniform in
    ±1/√fan_in, which we keep) a fresh optimizer then takes steps of about 0.001 to 0.02
    per coordinate, enough to move the iterate within a 10-20-step unroll and give the
    meta-gradient something to work with; 0.01 makes them ten times smaller. Pass
    ``output_scale=0.01`` to match the released MNIST setting. Unlike RNNProp's tanh
    bound, the output is linear and unbounded, as in the paper.

    The LSTM runs in the dtype of the module's weights; features are cast to it and the
    update is cast back to the params' dtype.

    State (per-coordinate tensors have leading dimension N, the total number of
    coordinates of the params):

    - ``"step"``: int64 scalar, number of steps taken.
    - ``"lstm_h_{l}"``, ``"lstm_c_{l}"`` for each layer l: ``(N, hidden_size)``,
      module dtype.

    That is ``2 · num_layers · hidden_size`` numbers per coordinate (80 with the
    defaults), each layer's recurrence; a deployment may keep them in a lower precision
    (:meth:`reduced_precision_state_keys`).

    Args:
        hidden_size: Units of each LSTM layer.
        num_layers: Number of stacked LSTM layers.
        preprocess_p: p of the log/sign preprocessing.
        output_scale: Multiplier of the linear output.

    Raises:
        ConfigError: If a hyperparameter is out of range.

    Example:
        >>> opt = L2ODM()
        >>> params = [torch.randn(3, 4), torch.randn(4)]
        >>> state = opt.init_state(params)
        >>> grads = [torch.randn_like(p) for p in params]
        >>> new_params, state = opt.step(params, grads, state)
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ConfigError(
                f"L2ODM: hidden_size and num_layers must be >= 1, got "
                f"hidden_size={hidden_size}, num_layers={num_layers}"
            )
        if not (preprocess_p > 0.0 and math.isfinite(preprocess_p)):
            raise ConfigError(f"L2ODM: preprocess_p must be finite and > 0, got {preprocess_p}")
        if not (output_scale > 0.0 and math.isfinite(output_scale)):
            raise ConfigError(f"L2ODM: output_scale must be finite and > 0, got {output_scale}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess_p = preprocess_p
        self.output_scale = output_scale

        self.cells = nn.ModuleList(
            nn.LSTMCell(2 if layer == 0 else hidden_size, hidden_size)
            for layer in range(num_layers)
        )
        self.output_layer = nn.Linear(hidden_size, 1)

    def extra_repr(self) -> str:
        return f"preprocess_p={self.preprocess_p}, output_scale={self.output_scale}"

    def state_keys(self) -> list[str]:
        """The keys of the state dict, in the order :meth:`init_state` creates them."""
        keys = ["step"]
        for layer in range(self.num_layers):
            keys += [f"lstm_h_{layer}", f"lstm_c_{layer}"]
        return keys

    def reduced_precision_state_keys(self) -> list[str]:
        """State a deployment may store in a lower precision: all of it but the step count.

        The LSTM states are squashed by the gates at every step, so rounding them
        between steps perturbs the next step's inputs by at most the rounding.
        """
        return self.state_keys()[1:]

    def init_state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Fresh state for ``params``: zero LSTM state, step 0.

        Args:
            params: The optimizee's parameters (only shapes, dtype and device are read).

        Returns:
            The state dict described in the class docstring.
        """
        num, _, device = layout(params)
        weight_dtype = self.output_layer.weight.dtype
        state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.int64, device=device)}
        for layer in range(self.num_layers):
            for kind in ("h", "c"):
                state[f"lstm_{kind}_{layer}"] = torch.zeros(
                    num, self.hidden_size, dtype=weight_dtype, device=device
                )
        return state

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One optimizer step on all coordinates at once.

        Differentiable in the module's weights through the returned params and the
        LSTM state; ``grads`` are used as given (the host passes them detached, dropping
        second-order terms as in the paper). Works under ``torch.no_grad()`` too.
        ``state`` is not modified.

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

        weight_dtype = self.output_layer.weight.dtype
        new_state: dict[str, Tensor] = {"step": state["step"] + 1}
        x = log_sign_preprocess(grad, self.preprocess_p).to(weight_dtype)
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

        delta = (self.output_scale * self.output_layer(x).squeeze(-1)).to(theta.dtype)
        return unflatten(theta + delta, params), new_state

    @torch.no_grad()
    def step_(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: MutableMapping[str, Tensor]) -> None:
        """:meth:`step` in place, fused, without autograd: the deployed step.

        Same mathematics as :meth:`step` to float rounding (the gates' sums run in
        another order, and compiled float32 kernels use a tanh a few ulp from
        ``torch.tanh``). Each parameter tensor runs in blocks of coordinates: the
        preprocessing, one matrix product per LSTM layer for all four gates, and the
        gate arithmetic, state writes and update fused around them (see
        :mod:`._fused`). The LSTM states may be stored in another dtype (bfloat16, say).
        Not differentiable: use :meth:`step` for meta-training.

        Args:
            params: Updated in place.
            grads: ∇f(θ_t), shaped like ``params``.
            state: From :meth:`init_state` for ``params``; updated in place.
        """
        owner = type(self).__name__
        keys = self.state_keys()
        check_state(state, keys, sum(p.numel() for p in params), owner)
        weights = _fused.prepared(self, "deployed", self._deployed_weights)
        # The reference works in the dtype the params promote to; so does the kernel.
        config = _L2ODMConfig(self.num_layers, self.preprocess_p, self.output_scale, layout(params)[1])
        run = _fused.kernel(_l2o_dm_kernel, config, compiled_block=_BLOCK, eager_block=_EAGER_BLOCK)
        for theta, grad, rows, commit in _fused.param_slices(params, grads, state, keys[1:], owner):
            run((theta, grad, *(rows[key] for key in keys[1:])), weights)
            commit()
        state["step"].add_(1)

    def _deployed_weights(self) -> list[Tensor]:
        return [*_fused.lstm_weights(self.cells), self.output_layer.weight[0].contiguous(), self.output_layer.bias]


# Coordinates per block of the deployed step (see rnnprop's).
_BLOCK = 2048
_EAGER_BLOCK = 1 << 14


class _L2ODMConfig(NamedTuple):
    num_layers: int
    preprocess_p: float
    output_scale: float
    dtype: torch.dtype


def _l2o_dm_kernel(theta: Tensor, grad: Tensor, *args: Tensor, config: _L2ODMConfig, compiled: bool) -> None:
    """L2O-DM's step on a block of coordinates, in place (see ``L2ODM.step``)."""
    states, weights = args[: 2 * config.num_layers], args[2 * config.num_layers:]
    lstm, (w_out, b_out) = weights[:-2], weights[-2:]
    dtype = config.dtype
    features = log_sign_preprocess(grad.to(dtype), config.preprocess_p).to(lstm[0].dtype)
    x = _fused.lstm_stack(features.t(), states, lstm, compiled)
    out = (w_out[:, None] * x).sum(dim=0) + b_out
    theta.copy_(theta.to(dtype) + (config.output_scale * out).to(dtype))
