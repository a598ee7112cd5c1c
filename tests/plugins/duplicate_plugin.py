"""A plugin that registers a regularizer under a name the built-ins already use."""

from __future__ import annotations

import torch

from flat_l2o_plugin import RegularizerInfo, hookimpl


def _zero(params, loss_fn) -> torch.Tensor:
    return params[0].new_zeros(())


@hookimpl
def register_regularizers(register) -> None:
    register(RegularizerInfo(name="hessian_top_eigenvalue", factory=lambda: _zero,
                             description="Shadows the built-in of the same name."))
