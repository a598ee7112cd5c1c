"""How retrofit wrappers nest: the transparent wrapper base and :func:`wrap`.

A wrapper *is* a learned optimizer that wraps a learned optimizer, so wrappers nest.
What makes them safe to retrofit onto pretrained models is that a wrapper is
transparent as a module: it shares the wrapped module's parameters, buffers and
submodules instead of owning the wrapped module as a child. Its ``state_dict()`` keys,
``named_parameters()`` names and ``.to()`` / ``.train()`` behaviour are exactly those
of the wrapped module, so a checkpoint saved from the bare model loads into the wrapped
one and back, however deep the stack.

:func:`wrap` builds a stack from configuration::

    optimizer = wrap(user_module, [
        {"name": "foreign", "inputs": ["log_sign"], "hidden": [["zeros", 20], ["zeros", 20]]},
        {"name": "flatness_aware", "regularizers": {"hessian_trace": {"weight": 0.01}}},
    ])

The **first entry is the innermost** wrapper: it wraps the object passed in, the second
wraps the first, and the last entry is the object returned.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, FlatL2OError, UnknownComponentError
from ..manager import FlatL2OPluginManager, get_plugin_manager
from ..protocols import LossFn, Params

__all__ = ["TransparentWrapper", "LearnedOptimizerWrapper", "wrap", "unwrap", "host_step", "gradient_oracle",
           "GradFn"]

GradFn = Callable[[Params], list[Tensor]]
"""``grad_fn(params)``: the current mini-batch's gradient at any point, detached."""

# The parts of an nn.Module that make up its weights. Sharing these dicts (rather than
# registering the wrapped module as a child) is what keeps state_dict keys unprefixed.
_SHARED_MODULE_DICTS = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


class TransparentWrapper(nn.Module):
    """An ``nn.Module`` whose weights are those of the module it wraps.

    The wrapper shares the wrapped module's parameter, buffer and submodule tables, so:

    * ``state_dict()`` / ``load_state_dict()`` / ``named_parameters()`` use the wrapped
      module's own names (no ``inner.`` prefix), also when the wrapper sits inside a
      larger module;
    * ``.to()``, ``.double()``, ``.cuda()`` move the wrapped module's tensors;
    * ``.train()`` / ``.eval()`` set the wrapped module's mode as well as the wrapper's;
    * attributes the wrapper does not define are looked up on the wrapped module
      (``wrapper.hidden_size`` reads the model's ``hidden_size``).

    The wrapped module is available as :attr:`inner`. A wrapper cannot own parameters or
    submodules of its own: they would land in the wrapped module's tables.

    Args:
        module: The module to wrap.

    Raises:
        ConfigError: If ``module`` is not an ``nn.Module``.
    """

    inner: nn.Module

    _copy_by_reference: tuple[str, ...] = ()
    """Attributes that ``copy.deepcopy`` shares instead of copying (e.g. a facade that
    holds a plugin manager, which cannot be copied)."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"{type(self).__name__}: expected an nn.Module to wrap, got {type(module).__name__}; "
                f"wrap the torch module that holds the learned optimizer's weights"
            )
        super().__init__()
        for name in _SHARED_MODULE_DICTS:
            self.__dict__[name] = module.__dict__[name]
        # Stored outside the module tables on purpose: as a registered child it would
        # prefix every state_dict key with "inner.".
        self.__dict__["inner"] = module
        # load_state_dict reads a module's version from the checkpoint metadata under the
        # wrapper's prefix, which is the wrapped module's prefix.
        self.__dict__["_version"] = getattr(module, "_version", 1)
        self.training = module.training

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, (nn.Module, nn.Parameter)) and "inner" in self.__dict__:
            raise FlatL2OError(
                f"{type(self).__name__} shares its weights with the wrapped "
                f"{type(self.inner).__name__} and cannot own {type(value).__name__} {name!r}; "
                f"add it to the wrapped module instead"
            )
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> TransparentWrapper:
        for name in self._copy_by_reference:
            if name in self.__dict__:
                memo.setdefault(id(self.__dict__[name]), self.__dict__[name])
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        # One memo for every attribute, so the copy shares its tables with the copy of
        # the wrapped module exactly as the original does.
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    # ------------------------------------------------------------------ delegation

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped module's ``state_dict`` (same keys, same hooks)."""
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load into the wrapped module; a checkpoint of the bare module fits as is."""
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Reached when a parent module loads a checkpoint recursively: the wrapped
        # module's own loading logic (extra state, version upgrades) must run.
        self.inner._load_from_state_dict(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return self.inner.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Tensor]]:
        return self.inner.named_buffers(*args, **kwargs)

    def train(self, mode: bool = True) -> TransparentWrapper:
        """Set training mode on the wrapped module (and so on its submodules) and the wrapper."""
        self.inner.train(mode)
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"wrapping {type(self.inner).__name__}"

    def __repr__(self) -> str:
        body = repr(self.inner).replace("\n", "\n  ")
        return f"{type(self).__name__}({self.extra_repr()})(\n  {body}\n)"


class LearnedOptimizerWrapper(TransparentWrapper):
    """A transparent wrapper around a learned optimizer: by default it changes nothing.

    Subclasses override :meth:`step` and call :meth:`inner_step` to run the wrapped
    optimizer. Keyword arguments a host passes to ``step`` (``loss_fn``, ``step_index``,
    ...) travel down the stack to every wrapper; the innermost, unwrapped optimizer is
    called with the protocol's three arguments only.

    Args:
        optimizer: A learned optimizer: an ``nn.Module`` with ``init_state(params)`` and
            ``step(params, grads, state)``.

    Raises:
        ConfigError: If ``optimizer`` lacks ``init_state`` or ``step``.
    """

    needs_grad_fn: bool = False
    """True when :meth:`step` needs the host's gradient oracle (``grad_fn=`` or ``loss_fn=``):
    hosts without one (``LearnedOptimizerTorch.step()`` without a closure) refuse such a
    stack before they change anything."""

    def __init__(self, optimizer: nn.Module) -> None:
        missing = [m for m in ("init_state", "step") if not callable(getattr(optimizer, m, None))]
        if missing:
            raise ConfigError(
                f"{type(self).__name__}: {type(optimizer).__name__} has no {' or '.join(missing)}(), so it "
                f"is not a learned optimizer; to use an nn.Module that maps gradient features to "
                f"updates, adapt it first with the 'foreign' wrapper (flat_l2o_plugin.wrappers.ForeignAdapter)"
            )
        super().__init__(optimizer)

    def init_state(self, params: Params, **kwargs: Any) -> dict[str, Tensor]:
        """The wrapped optimizer's initial state (wrappers add no state of their own)."""
        return self.inner.init_state(params, **kwargs)

    def step(self, params: Params, grads: Params, state: Mapping[str, Tensor],
             **host_info: Any) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step of the wrapped optimizer (see :meth:`inner_step`)."""
        return self.inner_step(params, grads, state, **host_info)

    def inner_step(self, params: Params, grads: Params, state: Mapping[str, Tensor],
                   **host_info: Any) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Run the wrapped optimizer, forwarding ``host_info`` only to wrappers."""
        if isinstance(self.inner, LearnedOptimizerWrapper):
            return self.inner.step(params, grads, state, **host_info)
        return self.inner.step(params, grads, state)


def gradient_oracle(loss_fn: LossFn) -> GradFn:
    """``grad_fn`` for a mini-batch loss: the detached gradient of ``loss_fn`` at any point."""

    def grad_fn(params: Params) -> list[Tensor]:
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in params]
            return [g.detach() for g in torch.autograd.grad(loss_fn(leaves), leaves)]

    return grad_fn


def host_step(optimizer: Any, params: Params, grads: Params, state: Mapping[str, Tensor], *,
              loss_fn: LossFn | None = None, grad_fn: GradFn | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
    """How a host calls a learned optimizer that may be a wrapper stack.

    A bare learned optimizer gets the protocol's three arguments. A wrapper also gets
    ``grad_fn``, the gradient oracle of the current mini-batch (for wrappers that look
    at other points, such as ``sam_gradient``). ``loss_fn`` itself is not passed: it
    switches the flatness-aware wrapper to its explicit protocol, which a host that
    collects terms through ``flatness_terms`` must not do.

    Args:
        optimizer: The learned optimizer or wrapper stack.
        params, grads, state: As for ``step``.
        loss_fn: The current mini-batch loss, ``loss_fn(params)``; the oracle is its gradient.
        grad_fn: The oracle itself, for hosts that have no functional loss (the
            torch.optim face builds one from its closure). With neither, wrappers get no
            oracle.
    """
    if isinstance(optimizer, LearnedOptimizerWrapper):
        oracle = grad_fn if grad_fn is not None else gradient_oracle(loss_fn) if loss_fn is not None else None
        if oracle is not None:
            return optimizer.step(params, grads, state, grad_fn=oracle)
    return optimizer.step(params, grads, state)


def unwrap(optimizer: nn.Module) -> list[nn.Module]:
    """The stack from the outside in: ``[optimizer, optimizer.inner, ..., bare model]``."""
    chain = [optimizer]
    while isinstance(chain[-1], TransparentWrapper):
        chain.append(chain[-1].inner)
    return chain


def wrap(optimizer: Any, wrappers: Sequence[Mapping[str, Any]], *,
         plugin_manager: FlatL2OPluginManager | None = None) -> Any:
    """Nest registered wrappers around ``optimizer``, the first entry innermost.

    Each entry is a table ``{"name": <registered wrapper>, **options}``, the options
    written flat next to the name, exactly as in a ``[[wrappers]]`` table of a config
    file. Option names are checked against the factory's (with the closest valid one
    suggested); the factory is then called as ``factory(previous, **defaults, **options)``.
    A factory that accepts ``plugin_manager`` and is not given one receives
    ``plugin_manager``, so a wrapper resolves component names (regularizers) among the
    same plugins as the stack.

    Args:
        optimizer: What the first wrapper wraps (a learned optimizer, or for ``foreign``
            the user's ``nn.Module``).
        wrappers: The entries, innermost first. An empty list returns ``optimizer``.
        plugin_manager: Where wrapper names are looked up (default: a fresh
            :func:`~flat_l2o_plugin.get_plugin_manager`).

    Returns:
        The outermost wrapper.

    Raises:
        UnknownComponentError: An entry names no registered wrapper (the message starts
            with ``wrappers[i]`` and lists the available names).
        ConfigError: An entry is not a table, has no ``name``, names an option the
            wrapper does not have, or its options are rejected by the wrapper (the
            message starts with ``wrappers[i]``).

    Example:
        >>> wrapped = wrap(create_optimizer("rnnprop"),
        ...                [{"name": "flatness_aware", "regularizers": {"sharpness": {"weight": 0.1}}}])
    """
    if isinstance(wrappers, (str, bytes, Mapping)) or not isinstance(wrappers, Sequence):
        raise ConfigError(f"wrappers must be a list of tables like [{{'name': 'flatness_aware', ...}}], "
                          f"got {wrappers!r}")
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    registry = pm.components.wrappers
    result = optimizer
    for index, entry in enumerate(wrappers):
        where = f"wrappers[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table with a 'name' key, got {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}: missing 'name' (a registered wrapper; available: "
                              f"{', '.join(registry.names()) or 'none'})")
        try:
            info = registry.get(name, failed_plugins=pm.failures, disabled_plugins=pm.disabled)
        except UnknownComponentError as exc:
            raise UnknownComponentError(f"{where}: {exc}") from None
        given = {k: v for k, v in entry.items() if k != "name"}
        described = f"{where} ({name!r}, from plugin {registry.provider(name)!r})"
        try:
            info.check_options(given)
        except ConfigError as exc:
            hint = "; a wrapper's options are written flat in its entry, next to 'name', not under 'options'" \
                if "options" in given else ""
            raise ConfigError(f"{described}: {exc}{hint}") from None
        options = {**info.defaults, **given}
        if "plugin_manager" not in options and _accepts_keyword(info.factory, "plugin_manager"):
            options["plugin_manager"] = pm
        try:
            result = info.factory(result, **options)
        except FlatL2OError as exc:
            raise type(exc)(f"{described}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{described}: {exc}") from exc
    return result


def _accepts_keyword(factory: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters and parameters[name].kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
