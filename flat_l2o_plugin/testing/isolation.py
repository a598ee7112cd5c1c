"""A plugin manager that ignores whatever happens to be installed on the machine."""

from __future__ import annotations

from typing import Any

from ..manager import FlatL2OPluginManager, get_plugin_manager

__all__ = ["isolated_plugin_manager"]


def isolated_plugin_manager(*plugins: Any, builtins: bool = True, strict: bool = True) -> FlatL2OPluginManager:
    """A fresh manager with only our built-ins (optional) and ``plugins``.

    No entry point is discovered, no ``FLAT_L2O_*`` variable is read, and a plugin that
    does not match the contract raises (``strict``), so a plugin's tests see exactly the
    plugins they name. Each of ``plugins`` is a module, an instance, or ``(name, plugin)``.
    """
    return get_plugin_manager(entry_points=False, plugins=plugins, builtins=builtins, strict=strict,
                              load=None, disable=[])
