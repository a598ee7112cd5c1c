"""Faces of a meta-trained learned optimizer for the tools practitioners already use.

Each integration lives in its own module and imports its host library (timm,
learn2learn) only when used, so importing this package imports none of them:
``from flat_l2o_plugin.integrations import register_with_timm`` loads timm at that
moment, not before. Without timm installed that import names the extra to install.
``flat_l2o_plugin.integrations.timm_train`` is imported for its effect, not its names:
it registers every installed learned optimizer in timm (for timm's ``train.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it.
_EXPORTS = {
    "LearnedOptimizerTorch": "torch_optim",
    "OptimizerStateError": "torch_optim",
    "StepMultiplierWarning": "torch_optim",
    "UntrainedOptimizerWarning": "torch_optim",
    "TimmRegistrationError": "timm",
    "register_installed_with_timm": "timm",
    "register_with_timm": "timm",
    "timm_name": "timm",
    "FlatnessLearnableOptimizer": "learn2learn",
    "flatness_penalty": "learn2learn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
