"""Flatness regularizers: callables ``reg(params, loss_fn) -> Tensor``, differentiable in params."""

from __future__ import annotations

from .hessian import HessianTopEigenvalue, hessian_eigenpairs
from .hessian_trace import HessianTrace
from .local_entropy import LocalEntropy
from .sharpness import Sharpness

__all__ = ["HessianTopEigenvalue", "HessianTrace", "LocalEntropy", "Sharpness", "hessian_eigenpairs"]
