"""L2O-Scale: the hierarchical RNN optimizer of Wichrowska et al. (2017).

"Learned Optimizers that Scale and Generalize". Three levels of GRUs share the work:

- a **parameter RNN** (one small GRU, shared, run on every coordinate) reads scale-free
  gradient features and writes the update;
- a **tensor RNN** (one state per parameter tensor) reads the mean of the parameter
  RNN's hidden states over its tensor;
- a **global RNN** (one state) reads the mean of the tensor RNNs' states.

Each level's state is fed back down, one step later, as an additive bias on the input
projection of the level below, so that a coordinate's update can depend on what the
rest of its tensor, and the rest of the model, is doing. The parameter RNN's output is a
step direction, normalized by its RMS over the tensor, times a learned per-coordinate
learning rate η, and θ ← θ + η · d̂.

All N coordinates run as one batch. Per-tensor means use a segment index (the tensor
each coordinate belongs to), built from the params' sizes and cached, so a step issues
the same kernels whether the optimizee has one tensor or a thousand.
"""

from __future__ import annotations

import math
from typing import Mapping, MutableMapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, FlatL2OError
from . import _fused
from ._flat import check_state, flatten, layout, unflatten

__all__ = ["L2OScale", "multiscale_features", "segment_mean", "gru_with_input_bias"]

# Squared-magnitude floor inside the log of the relative-magnitude features; keeps
# log(0) out of a coordinate whose gradient has always been exactly zero.
_LOG_FLOOR = 1e-16
# Floor inside the RMS of the direction, for a tensor whose directions are all zero.
_RMS_FLOOR = 1e-16


def segment_mean(values: Tensor, segment: Tensor, counts: Tensor) -> Tensor:
    """Mean of ``values`` over the coordinates of each segment (tensor).

    Args:
        values: Shape ``(N, ...)``.
        segment: ``(N,)`` int64, the segment of each row, in ``[0, T)``.
        counts: ``(T,)`` rows per segment in ``values``' dtype, at least 1 (an empty
            tensor then gets a mean of 0 rather than NaN).

    Returns:
        Shape ``(T, ...)``. Differentiable in ``values`` (``index_add`` is out of place).
    """
    sums = values.new_zeros((counts.shape[0], *values.shape[1:])).index_add(0, segment, values)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


def multiscale_features(
    grad: Tensor,
    grad_avg: Tensor,
    grad_sq_avg: Tensor,
    step: Tensor,
    decays: Tensor,
    *,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Momentum at several timescales and the relative log gradient magnitudes.

    For each timescale s with decay β_s (all in one ``(N, S)`` batch)::

        m_s = β_s m_s + (1 - β_s) g,      v_s = β_s v_s + (1 - β_s) g²,
        m̂_s = m_s / (1 - β_s^t),          v̂_s = v_s / (1 - β_s^t),
        momentum_s = m̂_s / (√v̂_s + ε),
        magnitude_s = log(v̂_s + 1e-16) - mean_s' log(v̂_s' + 1e-16).

    Both are invariant to a positive rescaling of g (up to ε): the first is Adam's
    normalized momentum at timescale 1/(1 - β_s), the second says whether the gradient
    has recently been larger or smaller than over the other timescales.

    Args:
        grad: ``(N,)`` gradient.
        grad_avg: ``(N, S)`` previous m.
        grad_sq_avg: ``(N, S)`` previous v.
        step: 1-based index t of the step being taken (a tensor: no accelerator sync).
        decays: ``(S,)`` the β_s, in ``grad``'s dtype.
        eps: ε added to √v̂.

    Returns:
        ``(momentum, magnitude, m, v)``, each ``(N, S)`` in ``grad``'s dtype.
    """
    g = grad.unsqueeze(-1)
    m = grad_avg * decays + g * (1.0 - decays)
    v = grad_sq_avg * decays + (g * g) * (1.0 - decays)
    correction = 1.0 - decays ** step.to(grad.dtype)
    m_hat = m / correction
    v_hat = v / correction
    momentum = m_hat / (v_hat.sqrt() + eps)
    log_v = torch.log(v_hat + _LOG_FLOOR)
    magnitude = log_v - log_v.mean(dim=-1, keepdim=True)
    return momentum, magnitude, m, v


def gru_with_input_bias(cell: nn.GRUCell, x: Tensor, h: Tensor, input_bias: Tensor | None) -> Tensor:
    """One step of ``cell`` with an extra additive bias on its input projection.

    Computes exactly ``nn.GRUCell``'s update (PyTorch's gate layout r, z, n) with
    ``W_ih x + b_ih + input_bias`` in place of ``W_ih x + b_ih``. This is how context
    from a higher level of the hierarchy reaches a lower one: it shifts all three gates.

    Args:
        cell: Holds the weights; its ``forward`` is not called.
        x: ``(B, input_size)``.
        h: ``(B, hidden_size)``.
        input_bias: ``(B, 3 * hidden_size)``, broadcastable to it, or ``None``.

    Returns:
        The new hidden state, ``(B, hidden_size)``.
    """
    gates_x = F.linear(x, cell.weight_ih, cell.bias_ih)
    if input_bias is not None:
        gates_x = gates_x + input_bias
    gates_h = F.linear(h, cell.weight_hh, cell.bias_hh)
    x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
    h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
    reset = torch.sigmoid(x_r + h_r)
    keep = torch.sigmoid(x_z + h_z)
    candidate = torch.tanh(x_n + reset * h_n)
    return candidate + keep * (h - candidate)


class L2OScale(nn.Module):
    """The hierarchical L2O-Scale optimizer, one batch over all coordinates.

    **Inputs of the parameter RNN** (per coordinate, 2S + 1 features): the normalized
    momentum and the relative log gradient magnitude at each of the S timescales
    ``momentum_decays`` (see :func:`multiscale_features`), and the relative learning
    rate, log η_{t-1} minus its mean over the coordinate's tensor.

    **Hierarchy**: the parameter GRU (``hidden_size`` units) gets, as a bias on its
    input projection, ``A_T s^T_{t-1}[tensor] + A_G s^G_{t-1}``; the tensor GRU
    (``tensor_hidden_size``) reads the tensor's mean of the new parameter states, with
    bias ``B_G s^G_{t-1}``; the global GRU (``global_hidden_size``) reads the mean of the
    new tensor states. ``A_T``, ``A_G``, ``B_G`` are the *context weights*
    (``tensor_to_param``, ``global_to_param``, ``global_to_tensor``): with them at zero,
    one tensor's gradients cannot change another tensor's update.

    **Output**: a direction ``d = w_d·h + w_s·momentum`` (the second term is the
    gradient shortcut, below), divided by its RMS over the tensor; a log learning rate
    ``log η_t = b_η + u_t``, a learned base rate plus a per-coordinate offset smoothed
    with momentum β_η, ``u_t = β_η u_{t-1} + (1 - β_η) w_η·h``; and ``θ ← θ + η_t d̂``.
    Because d̂ has unit RMS over each tensor, η is the typical per-coordinate step
    length, as in Adam.

    **Initialisation**: ``w_η = 0`` and ``b_η = log(init_lr)``, so a fresh optimizer's
    learning rate is ``init_lr`` for every coordinate at every step until meta-training
    moves it. The shortcut starts at ``w_s = -1/S`` (the negative mean of the normalized
    momenta), so a fresh optimizer is a descent method close to Adam with learning rate
    ``init_lr``, perturbed by the GRU term ``w_d·h`` (small random ``w_d``). The default
    ``init_lr = 3e-3`` is the geometric middle of 1e-3..1e-2, the range of hand-tuned
    rates the paper initialises near; it was not tuned on our tasks. GRU weights keep
    PyTorch's default initialisation.

    **Deviations from the paper**, all deliberate:

    - *Timescales are fixed.* In the paper and the authors' released code, the
      parameter RNN emits the decay of its shortest momentum timescale, each longer one
      being the square root of the one before, and the averaged gradients are
      normalized by a running RMS with another learned decay. We fix the decays
      (default 0.5, 0.9, 0.99: about 2, 10 and 100 steps) and normalize each momentum by
      the RMS of the gradient at its own timescale, with Adam's bias correction, so that
      every feature is a closed-form function of the gradient history (and testable as
      one).
    - *The log learning rate is a base rate plus a bounded offset.* The paper's
      ``log η_t = log η_{t-1} + (1 - β_η) ψ_t`` (ψ = w_η·h + b_η) accumulates ψ, a random
      walk whose drift grows with the horizon, from log-uniformly drawn initial rates.
      We split off the bias as a base rate that applies from the first step of every
      trajectory (a meta-trained rate needs no warm-up, and the bias gets the full
      meta-gradient), and smooth only the per-coordinate part, with a fixed
      ``β_η = lr_momentum`` instead of a learned one; |u| ≤ ‖w_η‖₁ however long the run.
      Every coordinate starts at ``init_lr``.
    - *Gradient shortcut on.* The released code's optional learned linear path from the
      normalized momenta to the direction is on by default (``gradient_shortcut``) and
      initialised to a descent direction, so that our small meta-training budgets start
      from a working optimizer rather than from a random RNN.
    - *Omitted extras*: the "attention" mechanism (gradients evaluated at a learned
      look-ahead point, which needs the host to evaluate the loss away from the iterate)
      and training-time random scaling of the problem. Meta-training on the log of the
      loss is the meta-trainer's business, not the optimizer's.
    - *Details*: hidden states start at zero (the released code learns initial states,
      which under truncated backpropagation would never receive a gradient); the tensor
      GRU reads only the mean of the parameter states (the code can also append the mean
      input features); the tensor GRU has 20 units by default, as fixed in our design,
      where the paper's text gives 30 (pass ``tensor_hidden_size=30``).

    **Coordinatewise?** No: through the tensor and global RNNs, the direction RMS and the
    relative learning rate, a coordinate's update depends on other coordinates, so it is
    registered with ``coordinatewise=False``. It is still equivariant to permutations of
    the coordinates within a tensor, and its cost does not grow with the number of
    tensors.

    The networks run in the dtype of the module's weights; features are cast to it and
    the update is cast back to the params' dtype. Momentum estimates are kept in the
    params' dtype.

    State (N is the number of coordinates, T the number of tensors, S the number of
    timescales):

    - ``"step"``: int64 scalar, the number of steps taken.
    - ``"grad_avg"``, ``"grad_sq_avg"``: ``(N, S)`` m and v at each timescale, params
      dtype.
    - ``"lr_offset"``: ``(N,)`` u, the per-coordinate part of log η, module dtype.
    - ``"param_h"``: ``(N, hidden_size)``, ``"tensor_h"``: ``(T, tensor_hidden_size)``,
      ``"global_h"``: ``(1, global_hidden_size)``; module dtype.

    That is ``2S + 1 + hidden_size`` numbers per coordinate (17 with the defaults); each
    is a running average or a recurrence a step reads. Which coordinates form a tensor
    is read from the params' sizes at each step, not stored. A deployment may keep
    ``param_h`` in a lower precision (:meth:`reduced_precision_state_keys`).

    Args:
        hidden_size: Units of the parameter GRU, the network run on every coordinate
            (the zoo's other models call their per-coordinate width ``hidden_size`` too).
        tensor_hidden_size: Units of the tensor GRU.
        global_hidden_size: Units of the global GRU.
        momentum_decays: The S ≥ 1 decays β_s, each in [0, 1).
        eps: ε of the normalized momentum.
        init_lr: The learning rate of a fresh optimizer (``b_η = log(init_lr)``).
        lr_momentum: β_η in [0, 1); 0 makes the offset the network's output at each step.
        normalize_direction: Divide the direction by its RMS over the tensor (the
            paper's dynamic output scaling); without it the step is η times the raw d.
        relative_lr: Include the relative log learning rate among the inputs.
        gradient_shortcut: Add the learned linear path from the normalized momenta to
            the direction.

    Raises:
        ConfigError: If a hyperparameter is out of range.

    Example:
        >>> opt = L2OScale()
        >>> params = [torch.randn(3, 4), torch.randn(4)]
        >>> state = opt.init_state(params)
        >>> grads = [torch.randn_like(p) for p in params]
        >>> new_params, state = opt.step(params, grads, state)
    """

    def __init__(
        self,
        hidden_size: int = 10,
        tensor_hidden_size: int = 20,
        global_hidden_size: int = 20,
        momentum_decays: Sequence[float] = (0.5, 0.9, 0.99),
        eps: float = 1e-8,
        init_lr: float = 3e-3,
        lr_momentum: float = 0.9,
        normalize_direction: bool = True,
        relative_lr: bool = True,
        gradient_shortcut: bool = True,
    ) -> None:
        super().__init__()
        for name, size in (("hidden_size", hidden_size), ("tensor_hidden_size", tensor_hidden_size),
                           ("global_hidden_size", global_hidden_size)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"L2OScale: {name} must be an integer >= 1, got {size!r}")
        decays = tuple(float(b) for b in momentum_decays)
        if not decays or not all(0.0 <= b < 1.0 for b in decays):
            raise ConfigError(
                f"L2OScale: momentum_decays must be one or more values in [0, 1), got {momentum_decays!r}"
            )
        if not (eps > 0.0 and math.isfinite(eps)):
            raise ConfigError(f"L2OScale: eps must be finite and > 0, got {eps}")
        if not (init_lr > 0.0 and math.isfinite(init_lr)):
            raise ConfigError(f"L2OScale: init_lr must be finite and > 0, got {init_lr}")
        if not 0.0 <= lr_momentum < 1.0:
            raise ConfigError(f"L2OScale: lr_momentum must lie in [0, 1), got {lr_momentum}")
        self.hidden_size = hidden_size
        self.tensor_hidden_size = tensor_hidden_size
        self.global_hidden_size = global_hidden_size
        self.momentum_decays = decays
        self.eps = eps
        self.init_lr = init_lr
        self.lr_momentum = lr_momentum
        self.normalize_direction = normalize_direction
        self.relative_lr = relative_lr
        self.gradient_shortcut = gradient_shortcut

        timescales = len(decays)
        self.num_features = 2 * timescales + int(relative_lr)
        self.param_cell = nn.GRUCell(self.num_features, hidden_size)
        self.tensor_cell = nn.GRUCell(hidden_size, tensor_hidden_size)
        self.global_cell = nn.GRUCell(tensor_hidden_size, global_hidden_size)
        # Context weights. No biases: a constant bias would duplicate the cells' own.
        self.tensor_to_param = nn.Linear(tensor_hidden_size, 3 * hidden_size, bias=False)
        self.global_to_param = nn.Linear(global_hidden_size, 3 * hidden_size, bias=False)
        self.global_to_tensor = nn.Linear(global_hidden_size, 3 * tensor_hidden_size, bias=False)
        # No bias on the direction either: a constant drift that ignores the gradient
        # is never a good step, and the RMS normalization would magnify it.
        self.direction = nn.Linear(hidden_size, 1, bias=False)
        self.log_lr_head = nn.Linear(hidden_size, 1)
        self.shortcut = nn.Linear(timescales, 1, bias=False) if gradient_shortcut else None

        with torch.no_grad():
            # Small enough that the shortcut's descent direction dominates a fresh
            # optimizer's step, large enough that every GRU weight gets a meta-gradient.
            self.direction.weight.normal_(0.0, 0.1 / math.sqrt(hidden_size))
            self.log_lr_head.weight.zero_()
            self.log_lr_head.bias.fill_(math.log(init_lr))
            if self.shortcut is not None:
                self.shortcut.weight.fill_(-1.0 / timescales)
        self._decay_cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._segment_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"momentum_decays={self.momentum_decays}, eps={self.eps}, init_lr={self.init_lr}, "
            f"lr_momentum={self.lr_momentum}, normalize_direction={self.normalize_direction}, "
            f"relative_lr={self.relative_lr}, gradient_shortcut={self.gradient_shortcut}"
        )

    def state_keys(self) -> list[str]:
        """The keys of the state dict, in the order :meth:`init_state` creates them."""
        return ["step", "grad_avg", "grad_sq_avg", "lr_offset", "param_h", "tensor_h", "global_h"]

    def reduced_precision_state_keys(self) -> list[str]:
        """State a deployment may store in a lower precision: the parameter GRU's state.

        A GRU state is a convex mix of its last value and a tanh, so rounding it between
        steps perturbs the next step's inputs by at most the rounding. The moments and
        the smoothed learning-rate offset are running averages whose per-step increments
        ((1 - β) of their value) a 2⁻⁸-spaced bfloat16 would lose, so they stay as they are.
        """
        return ["param_h"]

    def context_weights(self) -> list[nn.Parameter]:
        """The weights through which other tensors reach a coordinate's update."""
        return [self.tensor_to_param.weight, self.global_to_param.weight, self.global_to_tensor.weight]

    def init_state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Fresh state for ``params``: zero moments, RNN states and lr offsets, step 0.

        Args:
            params: The optimizee's parameters (only shapes, dtype and device are read).

        Returns:
            The state dict described in the class docstring.
        """
        num, dtype, device = layout(params)
        weight_dtype = self.log_lr_head.weight.dtype
        timescales = len(self.momentum_decays)
        return {
            "step": torch.zeros((), dtype=torch.int64, device=device),
            "grad_avg": torch.zeros(num, timescales, dtype=dtype, device=device),
            "grad_sq_avg": torch.zeros(num, timescales, dtype=dtype, device=device),
            "lr_offset": torch.zeros(num, dtype=weight_dtype, device=device),
            "param_h": torch.zeros(num, self.hidden_size, dtype=weight_dtype, device=device),
            "tensor_h": torch.zeros(len(params), self.tensor_hidden_size, dtype=weight_dtype, device=device),
            "global_h": torch.zeros(1, self.global_hidden_size, dtype=weight_dtype, device=device),
        }

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One optimizer step on all coordinates at once.

        Differentiable in the module's weights through the returned params and state;
        ``grads`` are used as given (the host passes them detached). Works under
        ``torch.no_grad()``. ``state`` is not modified.

        Args:
            params: Current parameters θ_t, the same tensors (in number and size) that
                :meth:`init_state` saw.
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
        owner = type(self).__name__
        self._check_state(state, params, theta.numel(), "step")
        num_tensors = len(params)

        weight_dtype = self.log_lr_head.weight.dtype
        segment = self._segment(params, theta.device)
        # index_add into a buffer of known size, not bincount, which reads the largest
        # index back to the host. An empty tensor counts as 1 so that its (unused) mean
        # is 0, not NaN, and cannot poison the tensor and global RNNs.
        ones = torch.ones(segment.shape[0], dtype=weight_dtype, device=segment.device)
        counts = ones.new_zeros(num_tensors).index_add(0, segment, ones).clamp_min(1.0)

        step = state["step"] + 1
        momentum, magnitude, grad_avg, grad_sq_avg = multiscale_features(
            grad, state["grad_avg"], state["grad_sq_avg"], step, self._decays(theta), eps=self.eps
        )
        features = [momentum.to(weight_dtype), magnitude.to(weight_dtype)]
        lr_offset_prev = state["lr_offset"].to(weight_dtype)
        if self.relative_lr:
            # log η = b_η + u and b_η is shared, so u's deviation is log η's deviation.
            relative = lr_offset_prev - segment_mean(lr_offset_prev, segment, counts)[segment]
            features.append(relative.unsqueeze(-1))
        inputs = torch.cat(features, dim=-1)

        # Context flows down from the previous step's tensor and global states.
        tensor_h = state["tensor_h"].to(weight_dtype)
        global_h = state["global_h"].to(weight_dtype)
        param_context = self.tensor_to_param(tensor_h) + self.global_to_param(global_h)
        param_h = gru_with_input_bias(
            self.param_cell, inputs, state["param_h"].to(weight_dtype), param_context[segment]
        )
        new_tensor_h = gru_with_input_bias(
            self.tensor_cell, segment_mean(param_h, segment, counts), tensor_h,
            self.global_to_tensor(global_h),
        )
        new_global_h = gru_with_input_bias(
            self.global_cell, new_tensor_h.mean(dim=0, keepdim=True), global_h, None
        )

        direction = self.direction(param_h).squeeze(-1)
        if self.shortcut is not None:
            direction = direction + self.shortcut(momentum.to(weight_dtype)).squeeze(-1)
        if self.normalize_direction:
            mean_square = segment_mean(direction * direction, segment, counts)
            direction = direction * torch.rsqrt(mean_square + _RMS_FLOOR)[segment]
        # The bias acts at once on every step; only the per-coordinate part is smoothed.
        lr_offset = self.lr_momentum * lr_offset_prev + (1.0 - self.lr_momentum) * F.linear(
            param_h, self.log_lr_head.weight
        ).squeeze(-1)
        log_lr = self.log_lr_head.bias + lr_offset

        delta = (torch.exp(log_lr) * direction).to(theta.dtype)
        new_state = {
            "step": step,
            "grad_avg": grad_avg,
            "grad_sq_avg": grad_sq_avg,
            "lr_offset": lr_offset,
            "param_h": param_h,
            "tensor_h": new_tensor_h,
            "global_h": new_global_h,
        }
        return unflatten(theta + delta, params), new_state

    @torch.no_grad()
    def step_(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: MutableMapping[str, Tensor]) -> None:
        """:meth:`step` in place, fused, without autograd: the deployed step.

        Same mathematics as :meth:`step` to float rounding (sums in another order, and
        compiled float32 kernels use a rational tanh a few ulp from ``torch.tanh``). Each tensor runs in blocks of coordinates: the multiscale
        features, one matrix product for the parameter GRU's gates and its arithmetic
        fused around it, writing the new state and the raw direction; then the tensor
        and global GRUs on the per-tensor means, and a second pass scales the direction
        by its RMS and the learned rate into the params (see :mod:`._fused`). The
        parameter GRU's state may be stored in another dtype. Not differentiable: use
        :meth:`step` for meta-training.

        Args:
            params: Updated in place, the same tensors :meth:`init_state` saw.
            grads: ∇f(θ_t), shaped like ``params``.
            state: From :meth:`init_state` for ``params``; updated in place.
        """
        num = sum(p.numel() for p in params)
        self._check_state(state, params, num, "step_")
        weight_dtype = self.log_lr_head.weight.dtype
        step = state["step"] + 1
        dtype = state["grad_avg"].dtype
        decays = self._decays(state["grad_avg"])
        corrections = 1.0 - decays ** step.to(dtype)
        w = _fused.prepared(self, "deployed", self._deployed_weights)
        tensor_h, global_h = state["tensor_h"].to(weight_dtype), state["global_h"].to(weight_dtype)
        # Context from the previous step's tensor and global states, one row per tensor,
        # laid out as the kernel's gate rows: [r, z | input part of n | hidden part of n].
        context = self.tensor_to_param(tensor_h) + self.global_to_param(global_h)
        rz, n = context.split([2 * self.hidden_size, self.hidden_size], dim=1)
        biases = torch.cat([w.bias_rz + rz, w.bias_xn + n, w.bias_hn.expand_as(n)], dim=1)
        config = _ScaleConfig(len(self.momentum_decays), self.eps, self.lr_momentum, self.relative_lr,
                              self.gradient_shortcut)
        first = _fused.kernel(_l2o_scale_state_kernel, config, compiled_block=_BLOCK, eager_block=_EAGER_BLOCK)
        second = _fused.kernel(_l2o_scale_update_kernel, None)
        keys = ["grad_avg", "grad_sq_avg", "lr_offset", "param_h"]
        slices = list(_fused.param_slices(params, grads, state, keys, type(self).__name__))
        directions = torch.empty(num, dtype=weight_dtype, device=state["param_h"].device)
        sums = torch.zeros(len(params), self.hidden_size, dtype=weight_dtype, device=directions.device)
        mean_squares = torch.zeros(len(params), dtype=weight_dtype, device=directions.device)
        offset = 0
        for index, (theta, grad, rows, _) in enumerate(slices):
            count = theta.numel()
            direction = directions[offset:offset + count]
            offset += count
            if count == 0:
                continue  # its mean stays 0, as in step()
            # The relative learning rate compares each offset with its tensor's mean.
            lr_mean = rows["lr_offset"].to(weight_dtype).mean()
            first((grad, rows["grad_avg"], rows["grad_sq_avg"], rows["lr_offset"], rows["param_h"], direction),
                  (decays, corrections, lr_mean, biases[index], w.gates, w.head, w.shortcut))
            sums[index] = rows["param_h"].to(weight_dtype).sum(dim=0)
            if self.normalize_direction:
                mean_squares[index] = torch.dot(direction, direction) / count
        counts = torch.tensor([max(p.numel(), 1) for p in params], dtype=weight_dtype, device=sums.device)
        new_tensor_h = gru_with_input_bias(self.tensor_cell, sums / counts[:, None], tensor_h,
                                           self.global_to_tensor(global_h))
        new_global_h = gru_with_input_bias(self.global_cell, new_tensor_h.mean(dim=0, keepdim=True), global_h, None)
        scales = torch.rsqrt(mean_squares + _RMS_FLOOR) if self.normalize_direction else torch.ones_like(mean_squares)
        offset = 0
        for index, (theta, _, rows, commit) in enumerate(slices):
            count = theta.numel()
            second((theta, directions[offset:offset + count], rows["lr_offset"]),
                   (scales[index], self.log_lr_head.bias[0]))
            offset += count
            commit()
        state["tensor_h"].copy_(new_tensor_h)
        state["global_h"].copy_(new_global_h)
        state["step"].copy_(step)

    def _deployed_weights(self) -> _ScaleWeights:
        h = self.hidden_size
        cell = self.param_cell
        w_ih, w_hh = cell.weight_ih, cell.weight_hh
        # One matrix for the gates of a block, [x; h] -> [r, z | W_in x | W_hn h]: r and z
        # sum both parts, while n needs them apart (n = tanh(x_n + r * h_n)).
        gates = torch.zeros(4 * h, w_ih.shape[1] + h, dtype=w_ih.dtype, device=w_ih.device)
        gates[: 2 * h, : w_ih.shape[1]] = w_ih[: 2 * h]
        gates[: 2 * h, w_ih.shape[1]:] = w_hh[: 2 * h]
        gates[2 * h: 3 * h, : w_ih.shape[1]] = w_ih[2 * h:]
        gates[3 * h:, w_ih.shape[1]:] = w_hh[2 * h:]
        shortcut = (self.shortcut.weight[0] if self.shortcut is not None
                    else w_ih.new_zeros(len(self.momentum_decays)))
        return _ScaleWeights(
            gates=gates,
            bias_rz=cell.bias_ih[: 2 * h] + cell.bias_hh[: 2 * h],
            bias_xn=cell.bias_ih[2 * h:],
            bias_hn=cell.bias_hh[2 * h:],
            head=torch.stack([self.direction.weight[0], self.log_lr_head.weight[0]]),
            shortcut=shortcut.contiguous(),
        )

    def _check_state(self, state: Mapping[str, Tensor], params: Sequence[Tensor], num: int, method: str) -> None:
        owner = type(self).__name__
        check_state(state, ["step", "grad_avg", "grad_sq_avg", "lr_offset", "param_h"], num, owner)
        for key in ("tensor_h", "global_h"):
            if key not in state:
                raise FlatL2OError(
                    f"{owner}.{method}(): state has no {key!r} (keys: {sorted(state)}); "
                    f"build it with {owner}.init_state(params)"
                )
        if state["tensor_h"].shape[0] != len(params):
            raise FlatL2OError(
                f"{owner}.{method}(): the state was built for {state['tensor_h'].shape[0]} tensors but got "
                f"{len(params)}; call {owner}.init_state(params) for these params"
            )

    def _segment(self, params: Sequence[Tensor], device: torch.device) -> Tensor:
        """The index of each coordinate's tensor, cached for the last few layouts."""
        key = (tuple(p.numel() for p in params), device)
        segment = self._segment_cache.pop(key, None)
        if segment is None:
            sizes = torch.tensor(key[0], dtype=torch.int64, device=device)
            # output_size spares an accelerator the sync that would compute it.
            segment = torch.repeat_interleave(torch.arange(len(params), device=device), sizes, output_size=sum(key[0]))
        self._segment_cache[key] = segment  # most recent last
        while len(self._segment_cache) > _SEGMENT_CACHE_SIZE:
            self._segment_cache.pop(next(iter(self._segment_cache)))
        return segment

    def _decays(self, like: Tensor) -> Tensor:
        # Built once per dtype and device: a fresh host-to-device copy on every step
        # would stall an accelerator's queue.
        key = (like.dtype, like.device)
        decays = self._decay_cache.get(key)
        if decays is None:
            decays = torch.tensor(self.momentum_decays, dtype=like.dtype, device=like.device)
            self._decay_cache[key] = decays
        return decays


# Layouts whose segment index is kept: a meta-training run cycles through a few tasks.
_SEGMENT_CACHE_SIZE = 4
# Coordinates per block of the deployed step's first pass (see rnnprop's). Its gates are
# half as many as an LSTM's, so twice as many rows fit the cache and fewer calls pay
# the compiled call's overhead.
_BLOCK = 4096
_EAGER_BLOCK = 1 << 14


class _ScaleConfig(NamedTuple):
    timescales: int
    eps: float
    lr_momentum: float
    relative_lr: bool
    gradient_shortcut: bool


class _ScaleWeights(NamedTuple):
    gates: Tensor  # (4H, F + H), rows [r, z | x_n | h_n]
    bias_rz: Tensor
    bias_xn: Tensor
    bias_hn: Tensor
    head: Tensor  # (2, H): direction and log-lr weights
    shortcut: Tensor  # (S,), zeros without the shortcut


def _l2o_scale_state_kernel(
    grad: Tensor,
    grad_avg: Tensor,
    grad_sq_avg: Tensor,
    lr_offset: Tensor,
    param_h: Tensor,
    direction: Tensor,
    decays: Tensor,
    corrections: Tensor,
    lr_mean: Tensor,
    bias: Tensor,
    gates: Tensor,
    head: Tensor,
    shortcut: Tensor,
    *,
    config: _ScaleConfig,
    compiled: bool,
) -> None:
    """First pass of L2O-Scale's step on a block of one tensor, in place (see ``L2OScale.step``).

    Writes the moments, the parameter GRU's state, the smoothed lr offset and the raw
    (unnormalized) direction.
    """
    c = config
    dtype = grad_avg.dtype
    weight_dtype = gates.dtype
    g = grad.to(dtype)[:, None]
    m = grad_avg * decays + g * (1.0 - decays)
    v = grad_sq_avg * decays + (g * g) * (1.0 - decays)
    m_hat = m / corrections
    v_hat = v / corrections
    momentum = m_hat / (v_hat.sqrt() + c.eps)
    log_v = torch.log(v_hat + _LOG_FLOOR)
    magnitude = log_v - log_v.mean(dim=-1, keepdim=True)
    lr_prev = lr_offset.to(weight_dtype)
    features = [momentum.to(weight_dtype).t(), magnitude.to(weight_dtype).t()]
    if c.relative_lr:
        features.append((lr_prev - lr_mean)[None, :])
    h = param_h.to(weight_dtype).t()
    hidden = h.shape[0]
    pre = torch.addmm(bias[:, None], gates, torch.cat([*features, h], dim=0))
    reset = torch.sigmoid(pre[:hidden])
    keep = torch.sigmoid(pre[hidden: 2 * hidden])
    candidate = _fused.tanh(pre[2 * hidden: 3 * hidden] + reset * pre[3 * hidden:], compiled, bounded=False)
    h_new = candidate + keep * (h - candidate)
    raw = (head[0][:, None] * h_new).sum(dim=0)
    if c.gradient_shortcut:
        raw = raw + (shortcut[:, None] * features[0]).sum(dim=0)
    lr_new = c.lr_momentum * lr_prev + (1.0 - c.lr_momentum) * (head[1][:, None] * h_new).sum(dim=0)
    grad_avg.copy_(m)
    grad_sq_avg.copy_(v)
    param_h.copy_(h_new.t())
    lr_offset.copy_(lr_new)
    direction.copy_(raw)


def _l2o_scale_update_kernel(
    theta: Tensor, direction: Tensor, lr_offset: Tensor, scale: Tensor, log_lr_bias: Tensor,
    *, config: None, compiled: bool,
) -> None:
    """Second pass: θ += exp(b_η + u) · d / RMS(d) on a block of one tensor."""
    dtype = theta.dtype
    delta = (torch.exp(log_lr_bias + lr_offset.to(direction.dtype)) * (direction * scale)).to(dtype)
    theta.copy_(theta + delta)
