"""An example third-party plugin: the parameter norm ‖θ‖ as a regularizer.

It uses nothing but the public contract (``hookimpl`` and ``RegularizerInfo``), which
is all a plugin author needs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from flat_l2o_plugin import RegularizerInfo, hookimpl


class ParamNorm:
    """R(θ) = sqrt(Σ‖θ_i‖² + eps), differentiable everywhere for eps > 0."""

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    def __call__(self, params: Sequence[torch.Tensor], loss_fn: Callable) -> torch.Tensor:
        return torch.sqrt(sum((p * p).sum() for p in params) + self.eps)


@hookimpl
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    register(RegularizerInfo(name="param_norm", factory=ParamNorm,
                             description="Euclidean norm of all optimizee parameters."))
