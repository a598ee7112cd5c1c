"""flat-l2o-plugin: flatness-aware meta-training for learned optimizers.

Plugin authors need only ``hookimpl`` and the ``*Info`` dataclasses; host loops use
:class:`FlatL2O`. Importing this package loads no plugin: plugin managers are built
on demand by :func:`get_plugin_manager`.
"""

from __future__ import annotations

from typing import Any

from .errors import FlatL2OError
from .hookspecs import hookimpl, hookspec
from .host import FlatL2O
from .manager import get_plugin_manager
from .protocols import LearnedOptimizer, Regularizer, Task
from .registry import OptimizerInfo, PretrainedInfo, RegularizerInfo, TaskInfo, WrapperInfo

__version__ = "0.1.0"

__all__ = [
    "FlatL2O",
    "FlatL2OError",
    "LearnedOptimizer",
    "OptimizerInfo",
    "PretrainedInfo",
    "Regularizer",
    "RegularizerInfo",
    "Task",
    "TaskInfo",
    "WrapperInfo",
    "__version__",
    "create_optimizer",
    "create_regularizer",
    "create_task",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "list_optimizers",
    "list_pretrained",
    "list_regularizers",
    "list_tasks",
]


def _list(kind: str, filter: str, with_description: bool) -> list[Any]:
    import fnmatch

    registry = getattr(get_plugin_manager().components, kind)
    names = [n for n in registry.names() if not filter or fnmatch.fnmatch(n, filter)]
    if with_description:
        return [(n, registry.get(n).description) for n in names]
    return names


def list_regularizers(filter: str = "", with_description: bool = False) -> list[Any]:
    """Names of the regularizers every loaded plugin registered, sorted.

    Args:
        filter: A glob, e.g. ``"hessian_*"``.
        with_description: Return ``(name, description)`` pairs instead of names.

    Example:
        >>> "hessian_top_eigenvalue" in list_regularizers()
        True
    """
    return _list("regularizers", filter, with_description)


def list_optimizers(filter: str = "", with_description: bool = False) -> list[Any]:
    """Names of the registered learned optimizers (see :func:`list_regularizers`)."""
    return _list("optimizers", filter, with_description)


def list_pretrained(filter: str = "", with_description: bool = False) -> list[Any]:
    """Names of the pre-trained learned optimizers (see :func:`list_regularizers`)."""
    return _list("pretrained", filter, with_description)


def list_tasks(filter: str = "", with_description: bool = False) -> list[Any]:
    """Names of the registered optimizee tasks (see :func:`list_regularizers`)."""
    return _list("tasks", filter, with_description)


def create_regularizer(name: str, **options: Any) -> Regularizer:
    """Build a registered regularizer, without a host.

    Example:
        >>> reg = create_regularizer("hessian_top_eigenvalue", iters=20, warm_start=True)
        >>> value = reg(params, loss_fn)  # a scalar, differentiable in params

    Raises:
        UnknownComponentError: No loaded plugin registered ``name`` (the message lists the
            available names and the plugins that failed to load).
        ConfigError: An option the regularizer does not accept, or a bad value.
    """
    return FlatL2O(plugin_manager=get_plugin_manager()).create_regularizer(name, **options)


def _create(kind: str, name: str, options: dict[str, Any]) -> Any:
    from .errors import ConfigError

    pm = get_plugin_manager()
    registry = getattr(pm.components, kind)
    info = pm.component(kind, name)
    try:
        return info.create(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{registry.kind} {name!r} (from plugin {registry.provider(name)!r}): {exc}") from exc


def create_optimizer(name: str, **options: Any) -> Any:
    """Build a registered learned optimizer, e.g. ``create_optimizer("rnnprop")``."""
    return _create("optimizers", name, options)


def create_task(name: str, **options: Any) -> Task:
    """Build a registered optimizee task, e.g. ``create_task("mlp_digits", activation="relu")``."""
    return _create("tasks", name, options)
