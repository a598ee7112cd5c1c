"""Component metadata and the registry that plugins fill through ``register`` callbacks.

Plugins describe each component with a frozen ``*Info`` dataclass: a name, a factory
and a one-line description, plus capability flags. The host keeps one
:class:`Registry` per component kind and records which plugin registered each name, so
that a clash can name both providers.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .errors import ConfigError, DuplicateComponentError, PluginValidationError, UnknownComponentError

__all__ = [
    "ComponentInfo",
    "RegularizerInfo",
    "OptimizerInfo",
    "WrapperInfo",
    "TaskInfo",
    "PretrainedInfo",
    "Registry",
    "REQUIRED",
]


@dataclass(frozen=True)
class ComponentInfo:
    """Fields every component shares.

    Attributes:
        name: The public name users put in configuration (e.g. ``"hessian_trace"``).
        factory: Called with the component's options as keyword arguments; returns it.
        description: One line shown by ``flat-l2o list``.
        defaults: Default options, merged under the user's options before ``factory``.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)

    _wrapped_arguments = 0
    """Leading factory arguments that are not options (a wrapper's wrapped optimizer)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(
                f"{type(self).__name__}.name must be an identifier-like string, got {self.name!r}"
            )
        if not callable(self.factory):
            raise TypeError(f"{type(self).__name__}({self.name!r}).factory must be callable")

    def create(self, **options: Any) -> Any:
        """Build the component from its defaults overridden by ``options``.

        Raises:
            ConfigError: an option the factory does not take (with the closest valid one).
        """
        self.check_options(options)
        return self.factory(**{**self.defaults, **options})

    def options(self) -> dict[str, Any] | None:
        """Every option the factory takes, with its default (``REQUIRED`` when it has none).

        The registered ``defaults`` override the factory's own. ``None`` when the factory
        accepts arbitrary keywords or its signature cannot be read.
        """
        try:
            signature = inspect.signature(self.factory)
        except (TypeError, ValueError):  # builtins and C callables
            return None
        params = list(signature.parameters.values())[self._wrapped_arguments:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        found = {p.name: REQUIRED if p.default is p.empty else p.default
                 for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {**found, **{k: v for k, v in self.defaults.items() if k in found}}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` for an option name the factory does not accept."""
        valid = self.options()
        if valid is None:
            return
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(key, list(valid), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                kind = type(self).__name__.removesuffix("Info").lower()
                raise ConfigError(f"{kind} {self.name!r} has no option {key!r}{hint}; "
                                  f"its options: {', '.join(valid) or 'none'}")


class _Required:
    """The default of an option that has none."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Marks an option without a default in :meth:`ComponentInfo.options`."""


@dataclass(frozen=True)
class RegularizerInfo(ComponentInfo):
    """A flatness regularizer.

    ``factory(**options)`` returns a callable ``reg(params, loss_fn) -> Tensor``: ``params``
    is a sequence of tensors, ``loss_fn(params)`` returns the scalar mini-batch loss at
    those params, and the result is a scalar differentiable with respect to ``params``.

    Attributes:
        needs_hvp: The regularizer uses Hessian-vector products (double backward).
        stochastic: Its value depends on random probes or samples.
    """

    needs_hvp: bool = False
    stochastic: bool = False


@dataclass(frozen=True)
class OptimizerInfo(ComponentInfo):
    """A learned optimizer: ``factory(**options)`` returns a :class:`~flat_l2o_plugin.protocols.LearnedOptimizer`.

    Attributes:
        coordinatewise: A coordinate's update depends only on that coordinate's own
            history (L2O-DM, RNNProp). ``False`` for models that pool across coordinates
            (L2O-Scale's tensor and global RNNs): their state cannot be split per tensor.
    """

    coordinatewise: bool = True


@dataclass(frozen=True)
class WrapperInfo(ComponentInfo):
    """A retrofit wrapper: ``factory(optimizer, **options)`` returns a wrapped learned optimizer.

    Its options are the factory's arguments after the first (the object it wraps).
    """

    _wrapped_arguments = 1


@dataclass(frozen=True)
class TaskInfo(ComponentInfo):
    """An optimizee task: ``factory(**options)`` returns a :class:`~flat_l2o_plugin.protocols.Task`."""


_PRETRAINED_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PretrainedInfo:
    """A meta-trained learned optimizer shipped inside a distribution: what it is and where its weights lie.

    Nothing is read when it is registered; the weights file is read, checked against
    ``sha256`` and loaded when the optimizer is used
    (:func:`~flat_l2o_plugin.optimizers.pretrained.load_pretrained`).

    Attributes:
        name: What users type: ``LearnedOptimizerTorch(params, name)``,
            ``timm.optim.create_optimizer_v2(model, name)``. Lower case letters, digits,
            ``-`` and ``.`` (timm reads ``_`` as a prefix separator).
        optimizer: The registered learned-optimizer model (the zoo name) the weights are for.
        package: The import name of the package holding the files, for ``importlib.resources``.
        weights: The weights file inside ``package`` (``"pretrained/x/weights.safetensors"``),
            written by :func:`~flat_l2o_plugin.optimizers.weights.save_learned_optimizer`.
        sha256: The SHA-256 of the weights file's bytes (what ``sha256sum`` prints).
        version: Of these weights; part of an optimizer state's identity.
        license: Of these weights (an SPDX identifier).
        options: The model's options, as meta-trained (the weights file records them too;
            they must agree).
        wrappers: The wrapper stack, innermost first, ``({"name": ..., **options}, ...)``.
        card: A model card inside ``package``: a JSON file
            (:data:`~flat_l2o_plugin.optimizers.pretrained.CARD_FIELDS`) or any text file.
        config: The config inside ``package`` that ``flat-l2o meta-train --config`` made it from.
        description: One line for ``flat-l2o list pretrained``.
    """

    name: str
    optimizer: str
    package: str
    weights: str
    sha256: str
    version: str
    license: str
    options: Mapping[str, Any] = field(default_factory=dict)
    wrappers: tuple[Mapping[str, Any], ...] = ()
    card: str | None = None
    config: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        where = f"PretrainedInfo({self.name!r})"
        if not isinstance(self.name, str) or not _PRETRAINED_NAME.fullmatch(self.name):
            raise ValueError(f"{where}.name must be lower case letters, digits, '-' or '.' (a name timm can select)")
        for key in ("optimizer", "package", "weights", "version", "license"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"{where}.{key} must be a non-empty string, got {getattr(self, key)!r}")
        if not self.weights.endswith(".safetensors"):
            raise ValueError(f"{where}.weights must be a .safetensors file (nothing else is ever loaded), "
                             f"got {self.weights!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"{where}.sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        if not isinstance(self.wrappers, tuple) or not all(
                isinstance(w, Mapping) and isinstance(w.get("name"), str) for w in self.wrappers):
            raise ValueError(f"{where}.wrappers must be a tuple of {{'name': <wrapper>, **options}} mappings")


InfoT = TypeVar("InfoT", bound=ComponentInfo)


class Registry(Generic[InfoT]):
    """Name -> info for one component kind, remembering which plugin provided each name."""

    def __init__(self, kind: str, info_type: type[InfoT]) -> None:
        self.kind = kind
        self.info_type = info_type
        self._infos: dict[str, InfoT] = {}
        self._providers: dict[str, str] = {}

    def add(self, info: InfoT, provider: str) -> None:
        if not isinstance(info, self.info_type):
            raise PluginValidationError(
                f"plugin {provider!r} registered {info!r} as a {self.kind}; "
                f"expected a {self.info_type.__name__}"
            )
        if info.name in self._infos:
            raise DuplicateComponentError(
                f"{self.kind} {info.name!r} is registered by both plugin "
                f"{self._providers[info.name]!r} and plugin {provider!r}; "
                f"disable one of them (FLAT_L2O_DISABLE_PLUGINS) or rename the component"
            )
        self._infos[info.name] = info
        self._providers[info.name] = provider

    def get(self, name: str, *, failed_plugins: Mapping[str, str] | None = None,
            disabled_plugins: Mapping[str, str] | None = None) -> InfoT:
        """The info registered as ``name``.

        Raises:
            UnknownComponentError: listing the available names, and the plugins that
                failed to load or were disabled (usually the reason a name is missing).
        """
        try:
            return self._infos[name]
        except KeyError:
            raise UnknownComponentError(self._unknown_message(name, failed_plugins, disabled_plugins)) from None

    def provider(self, name: str) -> str:
        return self._providers[name]

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[InfoT]:
        return iter(self._infos[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._infos)

    def _unknown_message(self, name: str, failed_plugins: Mapping[str, str] | None,
                         disabled_plugins: Mapping[str, str] | None) -> str:
        msg = f"unknown {self.kind} {name!r}"
        close = difflib.get_close_matches(name, self.names(), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        msg += f"; available: {', '.join(self.names()) or 'none'}"
        if failed_plugins:
            failures = "; ".join(f"{p}: {e}" for p, e in sorted(failed_plugins.items()))
            msg += f". Plugins that failed to load: {failures}"
        if disabled_plugins:
            disabled = "; ".join(f"{p} (by {by})" for p, by in sorted(disabled_plugins.items()))
            msg += f". Disabled plugins: {disabled}"
        return msg
