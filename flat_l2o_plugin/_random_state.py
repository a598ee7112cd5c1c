"""One random state for every loss evaluation of a regularizer call.

A model in train mode draws a new dropout mask (or stochastic-depth path) at every
forward pass, so the loss a regularizer sees would change between two evaluations at
the same parameters: the difference quotient of ``sharpness``, the power iteration of
``hessian_top_eigenvalue`` and the Monte-Carlo average of ``local_entropy`` would each
mix several functions. The host therefore hands regularizers a ``loss_fn`` that forks
the random state at the moment of the call and replays it on every evaluation: each
evaluation draws the same masks, and none advances the host's own random stream.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .protocols import LossFn, Params

__all__ = ["fixed_random_state"]

_MARK = "_flat_l2o_fixed_random_state"


def fixed_random_state(loss_fn: LossFn, params: Params) -> LossFn:
    """``loss_fn`` evaluated, on every call, under the random state of this moment.

    The CPU generator is replayed, and the CUDA generator of every device ``params`` live
    on. A ``loss_fn`` that is already fixed is returned as it is.
    """
    if getattr(loss_fn, _MARK, False):
        return loss_fn
    devices = _cuda_devices(params)
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
