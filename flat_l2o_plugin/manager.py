"""Building a plugin manager: isolated entry-point loading, allow/deny lists, strict mode.

:func:`get_plugin_manager` builds a **fresh** manager on every call; nothing is loaded
when the package is imported. Entry points of the group ``flat_l2o_plugin`` load one
at a time, in sorted order, so a plugin that fails to import is skipped with a
:class:`~flat_l2o_plugin.errors.PluginLoadWarning` naming the entry point and its
distribution while everything else keeps working.

Environment variables (comma-separated pip or entry-point names):

``FLAT_L2O_LOAD_PLUGINS``
    If set, only these third-party plugins load (set but empty: none). The package's
    own ``builtin`` plugin is not affected.
``FLAT_L2O_DISABLE_PLUGINS``
    These plugins never load (``builtin`` or ``flat-l2o-plugin`` disables ours too).
``FLAT_L2O_STRICT_PLUGINS``
    ``1``/``true``: a plugin that fails to load is an error instead of a warning.
``FLAT_L2O_TRACE_HOOKS``
    ``1``/``true``: log every hook call with its plugins (logger ``flat_l2o_plugin.hooks``).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

import pluggy

from . import hookspecs
from .errors import (DisabledComponentError, DuplicateComponentError, PluginLoadError, PluginLoadWarning,
                     PluginValidationError)
from .hookspecs import PROJECT_NAME
from .registry import ComponentInfo, OptimizerInfo, PretrainedInfo, Registry, RegularizerInfo, TaskInfo, WrapperInfo

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_PLUGIN",
    "PluginRecord",
    "Components",
    "FlatL2OPluginManager",
    "get_plugin_manager",
]

ENTRY_POINT_GROUP = PROJECT_NAME
BUILTIN_PLUGIN = "builtin"
_BUILTIN_MODULE = "flat_l2o_plugin.builtin"
_OUR_DISTRIBUTION = "flat-l2o-plugin"

ENV_LOAD = "FLAT_L2O_LOAD_PLUGINS"
ENV_DISABLE = "FLAT_L2O_DISABLE_PLUGINS"
ENV_STRICT = "FLAT_L2O_STRICT_PLUGINS"
ENV_TRACE = "FLAT_L2O_TRACE_HOOKS"

_COMPONENT_KINDS: dict[str, tuple[str, type[ComponentInfo]]] = {
    # registry attribute -> (hook name, info type)
    "regularizers": ("register_regularizers", RegularizerInfo),
    "optimizers": ("register_optimizers", OptimizerInfo),
    "wrappers": ("register_wrappers", WrapperInfo),
    "tasks": ("register_tasks", TaskInfo),
    "pretrained": ("register_pretrained", PretrainedInfo),
}

log = logging.getLogger(__name__)


def normalize_name(name: str) -> str:
    """PEP 503 normalisation, so ``My_Plugin`` and ``my-plugin`` name the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass
class PluginRecord:
    """What the manager knows about one plugin, loaded or not.

    ``status`` is ``"loaded"``, ``"failed"`` or ``"disabled"``. ``disabled_by`` names the
    setting that disabled it (an environment variable, or the ``get_plugin_manager`` argument).
    ``conflicts`` describes each component name this plugin registered that another
    loaded plugin registered too, and how to resolve it.
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    value: str | None = None
    status: str = "loaded"
    error: str | None = None
    disabled_by: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "distribution": self.distribution, "version": self.version,
            "value": self.value, "status": self.status, "error": self.error,
            "disabled_by": self.disabled_by, "hooks": list(self.hooks),
            "components": {k: list(v) for k, v in self.components.items()},
            "conflicts": list(self.conflicts),
        }


@dataclass
class Components:
    """One registry per component kind, filled by the registration hooks."""

    regularizers: Registry[RegularizerInfo]
    optimizers: Registry[OptimizerInfo]
    wrappers: Registry[WrapperInfo]
    tasks: Registry[TaskInfo]
    pretrained: Registry[PretrainedInfo]


class FlatL2OPluginManager(pluggy.PluginManager):
    """A pluggy manager that records where each plugin came from and what it registered."""

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.strict = strict
        self.records: dict[str, PluginRecord] = {}
        self._components: Components | None = None
        self._conflicts: list[str] = []
        if _env_flag(ENV_TRACE):
            self._enable_hook_trace()

    # ------------------------------------------------------------------ loading

    def add_plugin(
        self, plugin: Any, name: str, *, distribution: str | None = None,
        version: str | None = None, value: str | None = None,
    ) -> bool:
        """Register ``plugin`` under ``name`` and validate its hooks.

        Returns ``True`` on success. A plugin whose hooks do not match the contract is
        unregistered and recorded as failed (or raises in strict mode).
        """
        record = PluginRecord(name=name, distribution=distribution, version=version, value=value)
        where = _describe(record)
        if name in self.records and self.records[name].status == "loaded":
            # Two distributions with one entry-point name: keep the first working and
            # record the second under a name of its own.
            other = self.records[name]
            record.name = f"{name} ({distribution or value or 'duplicate'})"
            self._fail(record, f"{where} has the same name as already loaded {_describe(other)}; "
                               f"rename one entry point or disable one plugin")
            return False
        if isinstance(plugin, type) and not isinstance(plugin, ModuleType):
            self._fail(record, f"{where} is a class; register an instance. Have you forgotten the `()`?",
                       error_type=PluginValidationError)
            return False
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            self._fail(record, f"{where} does not match the hook contract: {exc}", exc,
                       error_type=PluginValidationError)
            return False
        except ValueError as exc:
            self._fail(record, f"{where} could not be registered: {exc}", exc)
            return False
        unknown = [c.name for c in self.get_hookcallers(plugin) or [] if c.spec is None]
        if unknown:
            self.unregister(plugin)
            hints = []
            for hook in unknown:
                close = difflib.get_close_matches(hook, self._spec_names(), n=1)
                hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            self._fail(record, f"{where} implements unknown hook(s) {', '.join(hints)}",
                       error_type=PluginValidationError)
            return False
        record.hooks = sorted(c.name for c in self.get_hookcallers(plugin) or [])
        self.records[name] = record
        self._components = None
        return True

    def load_entry_points(
        self, *, load: Sequence[str] | None = None, disable: Sequence[str] | Mapping[str, str] = (),
        disabled_by: str = ENV_DISABLE, allowed_by: str = ENV_LOAD, builtins: bool = True,
    ) -> None:
        """Load every entry point of the group, one at a time, in sorted order.

        ``load``, when not ``None``, is an allow-list of third-party plugins (pip or
        entry-point names); ``disable`` is a deny-list that also applies to ``builtin``:
        names, or a mapping from name to the setting that disabled it (default
        ``disabled_by``), which records and error messages then cite.
        """
        deny = ({normalize_name(n): by for n, by in disable.items()} if isinstance(disable, Mapping)
                else {normalize_name(n): disabled_by for n in disable})
        allow = None if load is None else {normalize_name(n) for n in load}
        seen: set[tuple[str, str]] = set()
        builtin_found = False
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP),
                         key=lambda e: (e.name, _dist_name(e) or "", e.value)):
            dist = _dist_name(ep)
            if (ep.name, ep.value) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            is_builtin = ep.value == _BUILTIN_MODULE
            builtin_found |= is_builtin
            names = {normalize_name(ep.name)} | ({normalize_name(dist)} if dist else set())
            record = PluginRecord(name=ep.name, distribution=dist, version=_dist_version(ep),
                                  value=ep.value)
            if is_builtin and not builtins:
                continue
            if names & deny.keys():
                self._disable(record, deny[sorted(names & deny.keys())[0]])
                continue
            if allow is not None and not is_builtin and not names & allow:
                self._disable(record, allowed_by)
                continue
            self._load_one(ep, record)
        if builtins and not builtin_found:
            # Running from a source tree that was never installed: no entry point exists,
            # but our own plugin is still ours to load.
            record = PluginRecord(name=BUILTIN_PLUGIN, distribution=_OUR_DISTRIBUTION,
                                  version=_our_version(), value=_BUILTIN_MODULE)
            if {BUILTIN_PLUGIN, _OUR_DISTRIBUTION} & deny.keys():
                self._disable(record, deny[sorted({BUILTIN_PLUGIN, _OUR_DISTRIBUTION} & deny.keys())[0]])
            else:
                self._load_one(lambda: importlib.import_module(_BUILTIN_MODULE), record)

    def _load_one(self, ep: Any, record: PluginRecord) -> None:
        try:
            plugin = ep.load() if hasattr(ep, "load") else ep()
        except Exception as exc:  # any import-time failure is the plugin's, not ours
            self._fail(record, f"Error importing {_describe(record)}: {type(exc).__name__}: {exc}", exc)
            return
        self.add_plugin(plugin, record.name, distribution=record.distribution,
                        version=record.version, value=record.value)

    def _fail(self, record: PluginRecord, message: str, exc: BaseException | None = None,
              error_type: type[Exception] = PluginLoadError) -> None:
        record.status, record.error = "failed", message
        self.records[record.name] = record
        if self.strict:
            raise error_type(f"{message} (strict mode: unset {ENV_STRICT} to skip it)") from exc
        warnings.warn(f"{message}; the plugin is skipped", PluginLoadWarning, stacklevel=3)

    def _disable(self, record: PluginRecord, by: str) -> None:
        record.status, record.disabled_by = "disabled", by
        self.records[record.name] = record

    # ------------------------------------------------------------------ inspection

    @property
    def failures(self) -> dict[str, str]:
        """Plugin name -> error, for every plugin that failed to load or register."""
        return {n: r.error or "" for n, r in self.records.items() if r.status == "failed"}

    @property
    def disabled(self) -> dict[str, str]:
        """Plugin name -> the setting that disabled it."""
        return {n: r.disabled_by or "" for n, r in self.records.items() if r.status == "disabled"}

    def loaded_plugins(self) -> list[str]:
        """Names of loaded plugins in load order."""
        return [n for n, r in self.records.items() if r.status == "loaded"]

    def check_pending(self) -> None:
        """Fail if any registered plugin implements a hook that has no spec."""
        try:
            super().check_pending()
        except pluggy.PluginValidationError as exc:
            hook = str(exc).split("unknown hook", 1)[-1].strip().split()[0].strip("'\"")
            close = difflib.get_close_matches(hook, self._spec_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginValidationError(f"{exc}{hint}") from exc

    def _spec_names(self) -> list[str]:
        return [name for name, caller in vars(self.hook).items()
                if isinstance(caller, pluggy.HookCaller) and caller.spec is not None]

    # ------------------------------------------------------------------ components

    def component(self, kind: str, name: str) -> ComponentInfo:
        """The info registered as ``name`` in the ``kind`` registry (``"regularizers"``, ...).

        Raises:
            DisabledComponentError: ``name`` belongs to a plugin that a setting disabled
                (known for our own ``builtin`` plugin, whose names we can read without
                loading it); the message names the setting.
            UnknownComponentError: otherwise, listing what is available, the plugins that
                failed to load and the plugins that were disabled.
        """
        registry = getattr(self.components, kind)
        if name not in registry and BUILTIN_PLUGIN in self.disabled and name in _builtin_names(kind):
            raise DisabledComponentError(
                f"{registry.kind} {name!r} belongs to plugin {BUILTIN_PLUGIN!r}, which was disabled by "
                f"{self.disabled[BUILTIN_PLUGIN]}; remove it from that setting to use it")
        return registry.get(name, failed_plugins=self.failures, disabled_plugins=self.disabled)

    @property
    def components(self) -> Components:
        """The component registries, built on first use from the registration hooks.

        Raises:
            DuplicateComponentError: Two loaded plugins registered one name; the message
                names both and the setting that resolves it.
        """
        components = self.collect_components()
        if self._conflicts:
            more = f" (and {len(self._conflicts) - 1} more clash(es): run `flat-l2o plugins`)" \
                if len(self._conflicts) > 1 else ""
            raise DuplicateComponentError(self._conflicts[0] + more)
        return components

    @property
    def conflicts(self) -> list[str]:
        """Every clash between two plugins' component names, each with how to resolve it."""
        self.collect_components()
        return list(self._conflicts)

    def collect_components(self) -> Components:
        """The registries and each record's components, without raising on a clash.

        For inspection (``flat-l2o plugins``): a name two plugins register keeps the
        first (in load order) and the clash is recorded in :attr:`conflicts` and on both
        plugins' records. Everything else uses :attr:`components`, which refuses a clash.
        """
        if self._components is None:
            self._conflicts = []
            self._components = self._collect_components()
        return self._components

    def _collect_components(self) -> Components:
        registries: dict[str, Registry[Any]] = {kind: Registry(kind.rstrip("s"), info)
                                                for kind, (_, info) in _COMPONENT_KINDS.items()}
        registries["pretrained"].kind = "pretrained optimizer"
        for record in self.records.values():
            record.conflicts = []
        for name in self.loaded_plugins():
            record, plugin = self.records[name], self.get_plugin(name)
            record.components = {}
            others = [p for p in self.get_plugins() if p is not plugin]
            # All of a plugin's registrations are staged, then committed together: a plugin
            # that raises in one registration hook contributes nothing and is unregistered.
            staged: list[tuple[str, ComponentInfo]] = []
            try:
                for kind, (hook_name, _) in _COMPONENT_KINDS.items():
                    if hook_name in record.hooks:
                        caller = self.subset_hook_caller(hook_name, remove_plugins=others)
                        caller(register=lambda info, kind=kind: staged.append((kind, info)))
            except Exception as exc:
                self.unregister(plugin)
                self._fail(record, f"{_describe(record)} raised in {hook_name}: {type(exc).__name__}: {exc}", exc)
                continue
            for kind, info in staged:
                if info.name in registries[kind]:
                    first = self.records[registries[kind].provider(info.name)]
                    self._record_conflict(registries[kind], info.name, first, record)
                    continue
                # One name, one thing: LearnedOptimizerTorch(params, name) takes either kind.
                other = {"optimizers": "pretrained", "pretrained": "optimizers"}.get(kind)
                if other is not None and info.name in registries[other]:
                    first = self.records[registries[other].provider(info.name)]
                    self._record_conflict(registries[kind], info.name, first, record,
                                          what=f"{registries[other].kind} and {registries[kind].kind}")
                    continue
                registries[kind].add(info, provider=name)
                record.components.setdefault(kind, []).append(info.name)
        return Components(**registries)

    def _record_conflict(self, registry: Registry[Any], name: str, first: PluginRecord, second: PluginRecord,
                         what: str | None = None) -> None:
        # Suggest switching off a third-party plugin by the name pip knows it by.
        culprit = second if first.name == BUILTIN_PLUGIN or second.name != BUILTIN_PLUGIN else first
        off = culprit.distribution or culprit.name
        message = (f"{what or registry.kind} {name!r} is registered by both {_describe(first)} and {_describe(second)}; "
                   f"disable one to resolve it: {ENV_DISABLE}={off} (or [plugins] disable = [{off!r}]), "
                   f"or rename the component in its plugin")
        self._conflicts.append(message)
        for record in (first, second):
            record.conflicts.append(message)

    def _enable_hook_trace(self) -> None:
        trace_log = logging.getLogger("flat_l2o_plugin.hooks")

        def before(hook_name: str, impls: list[pluggy.HookImpl], kwargs: dict) -> None:
            trace_log.info("hook %s -> %s", hook_name, [i.plugin_name for i in impls])

        def after(outcome: Any, hook_name: str, impls: list[pluggy.HookImpl], kwargs: dict) -> None:
            if outcome.exception is not None:
                trace_log.info("hook %s raised %r", hook_name, outcome.exception)

        self.add_hookcall_monitoring(before, after)


def _builtin_names(kind: str) -> list[str]:
    """What our own plugin registers as ``kind``, asked through the contract of a private manager.

    The loader knows no component by name; our own plugin is safe to import even when a
    setting disabled it, so a manager of its own can ask it, for error messages only.
    """
    shadow = FlatL2OPluginManager(strict=False)
    shadow._load_one(lambda: importlib.import_module(_BUILTIN_MODULE),
                     PluginRecord(name=BUILTIN_PLUGIN, distribution=_OUR_DISTRIBUTION, value=_BUILTIN_MODULE))
    return getattr(shadow.components, kind).names()


def _describe(record: PluginRecord) -> str:
    where = f"plugin {record.name!r}"
    if record.value:
        where += f" ({record.value})"
    if record.distribution:
        where += f" from distribution {record.distribution!r}"
    return where


def _dist_name(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.metadata["Name"]


def _dist_version(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.version


def _our_version() -> str | None:
    try:
        return metadata.version(_OUR_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def get_plugin_manager(
    *,
    strict: bool | None = None,
    load: Sequence[str] | None = None,
    disable: Sequence[str] | Mapping[str, str] | None = None,
    plugins: Iterable[Any] = (),
    entry_points: bool = True,
    builtins: bool = True,
) -> FlatL2OPluginManager:
    """Build a fresh plugin manager with the installed plugins loaded.

    Args:
        strict: Raise on a plugin that fails to load (default: ``FLAT_L2O_STRICT_PLUGINS``).
        load: Allow-list of third-party plugins, by pip or entry-point name (default:
            ``FLAT_L2O_LOAD_PLUGINS``; ``None`` loads all).
        disable: Deny-list (default: ``FLAT_L2O_DISABLE_PLUGINS``), or a mapping from
            name to the setting that disabled it, for messages.
        plugins: Extra plugin objects (modules or instances) to register after the
            entry points, e.g. a host's own hooks. A ``(name, plugin)`` pair sets the name.
        entry_points: Discover installed entry points. ``False`` gives a manager with
            only the built-ins and ``plugins``, for tests isolated from the machine.
        builtins: Load the package's own plugin.

    Example:
        >>> pm = get_plugin_manager()
        >>> "hessian_top_eigenvalue" in pm.components.regularizers
        True
    """
    pm = FlatL2OPluginManager(strict=_env_flag(ENV_STRICT) if strict is None else strict)
    load_from_env, disable_from_env = load is None, disable is None
    if load is None:
        load = _env_list(ENV_LOAD)
    if disable is None:
        disable = _env_list(ENV_DISABLE) or []
    if entry_points:
        pm.load_entry_points(
            load=load, disable=disable, builtins=builtins,
            disabled_by=ENV_DISABLE if disable_from_env else "get_plugin_manager(disable=...)",
            allowed_by=ENV_LOAD if load_from_env else "get_plugin_manager(load=...)",
        )
    elif builtins and not {BUILTIN_PLUGIN, _OUR_DISTRIBUTION} & {normalize_name(n) for n in disable}:
        pm._load_one(lambda: importlib.import_module(_BUILTIN_MODULE),
                     PluginRecord(name=BUILTIN_PLUGIN, distribution=_OUR_DISTRIBUTION,
                                  version=_our_version(), value=_BUILTIN_MODULE))
    for item in plugins:
        name, plugin = item if isinstance(item, tuple) else (_plugin_name(item), item)
        pm.add_plugin(plugin, name)
    return pm


def _plugin_name(plugin: Any) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return getattr(plugin, "name", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"


