"""Imports of optional packages, with an error that says which extra installs them.

The core install is torch, pluggy, safetensors, numpy, PyYAML and tqdm. Everything else
comes with an extra (see ``[project.optional-dependencies]`` in pyproject.toml), and
each module that needs one imports it through :func:`import_extra` at the point of
use, so ``import flat_l2o_plugin`` and the command line work without any of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["DISTRIBUTION", "import_extra"]

DISTRIBUTION = "flat-l2o-plugin"
"""The name pip knows the package by."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise a one-line error naming the extra that provides it.

    Only a module that is not installed (``ModuleNotFoundError``) is translated: an
    installed package that fails while importing keeps its own error and traceback.

    Args:
        module: The module to import, e.g. ``"sklearn.datasets"``.
        extra: The extra (or comma-separated extras) that installs it, e.g. ``"data"``.
        feature: What needs it, for the message, e.g. ``"dataset 'digits'"``.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: ``module`` or a package it imports is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise MissingExtraError(
            f"{feature} needs {missing!r}, which is not installed: pip install '{DISTRIBUTION}[{extra}]'"
        ) from exc
