"""One random state for every loss evaluation of a regularizer call.

A model in train mode draws a new dropout mask (or stochastic-depth path) at every
forward pass, so the loss a regularizer sees would change between two evaluations at
the same parameters: the difference quotient of ``sharpness``, the power iteration of
``hessian_top_eigenvalue`` and the Monte-Carlo average of ``local_entropy`` would each
mix several functions. The host therefore hands regularizers a ``loss_fn`` that forks
the random state at the moment of the call and replays it on every evaluation: each
evaluation draws the same masks, and none advances the host's own random stream.

A host that hands its own loss (or gradient) at the iterate to the regularizers must
have computed it from that same function: :func:`evaluate_replayable` evaluates the loss
once, as a plain call would, and returns a ``loss_fn`` that replays that evaluation's
random state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .protocols import LossFn, Params

__all__ = ["evaluate_replayable", "fixed_random_state", "is_host_evaluation"]

_MARK = "_flat_l2o_fixed_random_state"
_HOST_MARK = "_flat_l2o_host_evaluation"


def fixed_random_state(loss_fn: LossFn, params: Params) -> LossFn:
    """``loss_fn`` evaluated, on every call, under the random state of this moment.

    The CPU generator is replayed, and the CUDA generator of every device ``params`` live
    on. A ``loss_fn`` that is already fixed is returned as it is.
    """
    if getattr(loss_fn, _MARK, False):
        return loss_fn
    return _replaying(loss_fn, _cuda_devices(params))


def evaluate_replayable(loss_fn: LossFn, params: Params) -> tuple[Tensor, LossFn]:
    """``loss_fn(params)``, and a ``loss_fn`` that replays the random state of that evaluation.

    The evaluation itself is a plain call: it advances the host's random stream exactly
    as ``loss_fn(params)`` would. Every call of the returned function draws what that
    evaluation drew (the same dropout masks), so a loss or gradient the host computed
    from the first is of the very function the regularizers evaluate.
    """
    if getattr(loss_fn, _HOST_MARK, False):
        return loss_fn(params), loss_fn
    fixed = _replaying(loss_fn, _cuda_devices(params))
    setattr(fixed, _HOST_MARK, True)
    return loss_fn(params), fixed


def is_host_evaluation(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` came from :func:`evaluate_replayable`, so a host's loss is of its function."""
    return bool(getattr(loss_fn, _HOST_MARK, False))


def _replaying(loss_fn: LossFn, devices: list[int]) -> LossFn:
    """``loss_fn`` under the random state of this moment, which it never advances."""
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(device) for device in devices]

    def fixed(ps: Params) -> Tensor:
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for device, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, device)
            return loss_fn(ps)

    setattr(fixed, _MARK, True)
    return fixed


def _cuda_devices(params: Sequence[Tensor]) -> list[int]:
    return sorted({p.device.index if p.device.index is not None else torch.cuda.current_device()
                   for p in params if isinstance(p, Tensor) and p.device.type == "cuda"})
