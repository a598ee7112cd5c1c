"""The exceptions raised by flat-l2o-plugin.

Every error the package raises on purpose is a :class:`FlatL2OError`, so a host can
catch one class. Each message names what is wrong (plugin, component, field or file)
and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "FlatL2OError",
    "PluginLoadError",
    "PluginValidationError",
    "PluginHookError",
    "DuplicateComponentError",
    "UnknownComponentError",
    "DisabledComponentError",
    "ConfigError",
    "MissingExtraError",
    "PluginLoadWarning",
    "UnregisteredParametersWarning",
]


class FlatL2OError(Exception):
    """Base class of every error raised by flat-l2o-plugin."""


class PluginLoadError(FlatL2OError):
    """An entry-point plugin failed to import or to register (raised in strict mode)."""


class PluginValidationError(FlatL2OError):
    """A plugin implements a hook that does not exist, or with arguments the spec lacks."""


class PluginHookError(FlatL2OError):
    """A plugin raised inside a hook; the message names the plugin and the hook."""


class DuplicateComponentError(FlatL2OError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownComponentError(FlatL2OError, KeyError):
    """A component name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DisabledComponentError(UnknownComponentError):
    """A component whose plugin is installed but disabled (the message names the setting)."""


class ConfigError(FlatL2OError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class MissingExtraError(FlatL2OError, ImportError):
    """A feature needs a package of an optional extra that is not installed.

    The message names the feature, the missing module and the command that installs
    the extra (``pip install 'flat-l2o-plugin[timm]'``). It is an ``ImportError`` too,
    so code that already falls back on a failed import keeps working.
    """


class PluginLoadWarning(UserWarning):
    """A plugin failed to load and was skipped (see ``FLAT_L2O_STRICT_PLUGINS``)."""


class UnregisteredParametersWarning(UserWarning):
    """A wrapped module computes with weights that its ``parameters()`` does not list.

    Such weights (submodules kept in a plain Python list, tensors that are not
    ``nn.Parameter``) receive meta-gradients but are never trained or saved.
    """
