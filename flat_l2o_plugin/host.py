"""The typed facade a host meta-training loop calls: :class:`FlatL2O`.

A host never calls ``pm.hook.*`` itself. It builds one facade from the activation
config, asks it for the flatness terms at every unrolled step, adds their sum to the
meta-loss, and reports the end of each unroll::

    flat = FlatL2O({"hessian_top_eigenvalue": {"weight": 0.1, "start_fraction": 0.5}})
    ...
    meta_loss = meta_loss + flat.penalty(params, loss_fn, step=t, loss=loss, horizon=T)
    ...
    flat.after_unroll(step=k, meta_loss=meta_loss, logs=logs)

A host that has the loss at the iterate, and can build its gradient graph, hands both
over so that no regularizer repeats that forward and backward pass (the gradient also
serves the host's next step)::

    loss, loss_fn = flat.evaluate_loss(loss_fn, params)
    grads = None
    if flat.wants_gradient(t, loss=loss, horizon=T):
        grads = torch.autograd.grad(loss, params, create_graph=True)
    meta_loss = meta_loss + flat.penalty(params, loss_fn, step=t, loss=loss, grads=grads, horizon=T)

The weight, the schedule and the weighting of each regularizer live here, in the
activation config, not in the estimator.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, MutableMapping

import torch
from torch import Tensor

from ._random_state import evaluate_replayable, fixed_random_state, is_host_evaluation
from .activation import ACTIVATION_KEYS, ActiveRegularizer, Schedule, is_finite_number
from .errors import ConfigError, DuplicateComponentError, FlatL2OError, PluginHookError
from .hookspecs import hookimpl
from .manager import FlatL2OPluginManager, get_plugin_manager
from .protocols import LossFn, Params, Regularizer

__all__ = ["Schedule", "ActiveRegularizer", "FlatL2O"]

_MODES = ("meta_loss", "optimizee_loss")
_WEIGHTINGS = ("fixed", "scale_free")


class _ActiveRegularizersPlugin:
    """The host's own ``flatness_terms`` implementation: evaluates the activated regularizers.

    Registered regularizers from any plugin are applied here, so a plugin that only
    registers a regularizer needs no runtime hook at all.
    """

    name = "flat_l2o.active_regularizers"

    @hookimpl
    def flatness_terms(self, params: Params, loss_fn: LossFn, active: Mapping[str, ActiveRegularizer],
                       loss: Tensor | None, grads: Params | None) -> dict[str, Tensor]:
        return {name: act(params, loss_fn, loss, grads) for name, act in active.items()}


class FlatL2O:
    """What a host meta-training loop holds: activated regularizers plus the runtime hooks.

    Args:
        regularizers: The activation config: ``{name: {"weight": α, "every": k,
            "at": "all"|"last", "warmup": n, "start_fraction": s, "after_loss_drop": d,
            "weighting": "fixed"|"scale_free", "mode": "meta_loss"|"optimizee_loss",
            **estimator_options}}``. Names come from any loaded plugin.
        plugin_manager: Defaults to a fresh :func:`get_plugin_manager`.

    Raises:
        UnknownComponentError: A name no loaded plugin registered.
        ConfigError: A bad weight, schedule or estimator option (the message names it).
    """

    def __init__(self, regularizers: Mapping[str, Mapping[str, Any]] | None = None, *,
                 plugin_manager: FlatL2OPluginManager | None = None) -> None:
        self.pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        if not self.pm.has_plugin(_ActiveRegularizersPlugin.name):
            self.pm.register(_ActiveRegularizersPlugin(), name=_ActiveRegularizersPlugin.name)
        self.pm.check_pending()
        self.active: dict[str, ActiveRegularizer] = {}
        for name, spec in (regularizers or {}).items():
            self.active[name] = self._activate(name, spec)
        self._callers: dict[str, Any] | None = None

    # ------------------------------------------------------------------ components

    @property
    def components(self):  # noqa: ANN201 - see FlatL2OPluginManager.components
        return self.pm.components

    def create_regularizer(self, name: str, **options: Any) -> Regularizer:
        """Build the registered regularizer ``name`` with ``options`` (no weight, no schedule)."""
        info = self._regularizer_info(name)
        who = f"regularizer {name!r} (from plugin {self.components.regularizers.provider(name)!r})"
        try:
            info.check_options(options)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"regularizer {name!r}", who, 1)) from None
        try:
            return info.create(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{who}: {exc}") from exc

    def _regularizer_info(self, name: str):  # noqa: ANN202
        return self.pm.component("regularizers", name)

    def _activate(self, name: str, spec: Mapping[str, Any]) -> ActiveRegularizer:
        if not isinstance(spec, Mapping):
            raise ConfigError(f"regularizers.{name}: expected a table of options, got {spec!r}")
        options = {k: v for k, v in spec.items() if k not in ACTIVATION_KEYS}
        weight = spec.get("weight", 1.0)
        if not is_finite_number(weight) or weight < 0:
            # A negative weight would reward sharpness: never what a flatness term is for.
            raise ConfigError(f"regularizers.{name}.weight must be a finite number >= 0, got {weight!r}")
        weighting = spec.get("weighting", "fixed")
        if weighting not in _WEIGHTINGS:
            raise ConfigError(f"regularizers.{name}.weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        mode = spec.get("mode", "meta_loss")
        if mode not in _MODES:
            raise ConfigError(f"regularizers.{name}.mode must be one of {_MODES}, got {mode!r}")
        momentum = spec.get("scale_momentum", 0.9)
        if not is_finite_number(momentum) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"regularizers.{name}.scale_momentum must be in [0, 1), got {momentum!r}")
        try:
            schedule = Schedule(**{k: spec[k] for k in spec if k in {f.name for f in fields(Schedule)}})
        except ConfigError as exc:
            raise ConfigError(f"regularizers.{name}.{exc}") from None
        return ActiveRegularizer(name, self.create_regularizer(name, **options), weight=weight,
                                 schedule=schedule, weighting=weighting, mode=mode, scale_momentum=momentum,
                                 provider=self.components.regularizers.provider(name))

    # ------------------------------------------------------------------ runtime hooks

    def due(self, step: int, *, mode: str = "meta_loss", horizon: int | None = None,
            loss: Tensor | float | None = None, initial_loss: float | None = None) -> dict[str, ActiveRegularizer]:
        """The activated regularizers of ``mode`` whose schedule is due at ``step``."""
        loss_value = float(loss.detach()) if isinstance(loss, Tensor) else loss
        return {n: a for n, a in self.active.items()
                if a.mode == mode and a.due(step, horizon=horizon, loss=loss_value, initial_loss=initial_loss)}

    def flatness_terms(self, params: Params, loss_fn: LossFn, step: int, *, optimizer: Any = None,
                       loss: Tensor | None = None, horizon: int | None = None,
                       initial_loss: float | None = None, grads: Params | None = None) -> dict[str, Tensor]:
        """Named, weighted meta-loss terms at the iterate ``params`` (trajectory step ``step``).

        Calls the ``flatness_terms`` hook of every plugin, one at a time so that an
        error names the plugin. Returns ``{}`` when nothing is due (no HVP is spent).

        Plugins and regularizers get a ``loss_fn`` that replays the random state of this
        call on every evaluation, so a model in train mode shows them one function (the
        same dropout masks) and their evaluations leave the host's random stream as it was.
        A ``loss_fn`` from :meth:`evaluate_loss` is passed as it is: it replays the state
        of the host's own evaluation, whose ``loss`` and ``grads`` the regularizers may
        then use. With any other ``loss_fn``, ``grads`` is dropped and ``loss`` serves
        schedules and weighting only.

        Args:
            params: The iterate θ_t.
            loss_fn: The mini-batch loss at any params.
            step: t.
            optimizer: The learned optimizer being meta-trained.
            loss: f(θ_t) as the host computed it, in the graph of ``params``.
            horizon: The trajectory length T.
            initial_loss: f(θ_0) of this trajectory.
            grads: ∇f(θ_t), built from ``loss`` with ``create_graph=True``, if the host has
                it (see :meth:`wants_gradient`) and got ``loss`` and ``loss_fn`` from
                :meth:`evaluate_loss`: regularizers that take it skip their own forward
                and backward pass.
        """
        active = self.due(step, horizon=horizon, loss=loss, initial_loss=initial_loss)
        if not is_host_evaluation(loss_fn):
            # Nothing ties the gradient to the function the plugins will evaluate.
            grads = None
        # One random state for every plugin's evaluations at this iterate, hook plugins included.
        loss_fn = fixed_random_state(loss_fn, params)
        terms: dict[str, Tensor] = {}
        owners: dict[str, str] = {}
        for plugin_name, caller in self._hook_callers().items():
            if not active and plugin_name == _ActiveRegularizersPlugin.name:
                continue
            try:
                results = caller(params=params, loss_fn=loss_fn, step=step, optimizer=optimizer,
                                 active=active, loss=loss, horizon=horizon, initial_loss=initial_loss,
                                 grads=grads)
            except PluginHookError as exc:
                raise PluginHookError(f"{exc} (hook flatness_terms, optimizee step {step})") from exc.__cause__
            except FlatL2OError:
                raise
            except Exception as exc:
                raise PluginHookError(f"plugin {plugin_name!r} raised in hook flatness_terms at optimizee step "
                                      f"{step}: {type(exc).__name__}: {exc}") from exc
            for result in results:
                for term, value in (result or {}).items():
                    if term in terms:
                        raise DuplicateComponentError(
                            f"flatness term {term!r} returned by both plugin {owners[term]!r} "
                            f"and plugin {plugin_name!r}")
                    if not isinstance(value, Tensor) or value.dim() != 0:
                        raise PluginHookError(f"plugin {plugin_name!r} returned flatness term {term!r} "
                                              f"that is not a 0-dim tensor: {value!r}")
                    terms[term], owners[term] = value, plugin_name
        return terms

    def penalty(self, params: Params, loss_fn: LossFn, step: int, **kwargs: Any) -> Tensor:
        """The sum of :meth:`flatness_terms` (a zero tensor when nothing is due)."""
        terms = self.flatness_terms(params, loss_fn, step, **kwargs)
        if not terms:
            return torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        return torch.stack(list(terms.values())).sum()

    def optimizee_penalty(self, params: Params, loss_fn: LossFn, step: int, *, loss: Tensor | None = None,
                          horizon: int | None = None, initial_loss: float | None = None,
                          grads: Params | None = None) -> Tensor | None:
        """The summed terms of regularizers in ``mode="optimizee_loss"``, or ``None``.

        The host adds this to the optimizee's loss before taking the gradient it feeds to
        the learned optimizer. ``loss`` and ``grads`` as for :meth:`flatness_terms`.
        """
        due = self.due(step, mode="optimizee_loss", horizon=horizon, loss=loss, initial_loss=initial_loss)
        if not due:
            return None
        try:
            return torch.stack([act(params, loss_fn, loss, grads) for act in due.values()]).sum()
        except PluginHookError as exc:
            raise PluginHookError(f"{exc} (optimizee loss, optimizee step {step})") from exc.__cause__

    def wants_gradient(self, step: int, *, mode: str = "meta_loss", horizon: int | None = None,
                       loss: Tensor | float | None = None, initial_loss: float | None = None) -> bool:
        """Whether a regularizer due at ``step`` takes the host's gradient graph (``grads``).

        Every regularizer this facade evaluates counts, its own and those wrappers attached
        to it (:meth:`evaluated`). When true, a host that builds ``grads =
        torch.autograd.grad(loss, params, create_graph=True)`` and passes it saves those
        regularizers a forward and a backward pass each, and can use ``grads`` (detached)
        as its own next gradient.
        """
        loss_value = float(loss.detach()) if isinstance(loss, Tensor) else loss
        return any(a.mode == mode and a.wants_gradient
                   and a.due(step, horizon=horizon, loss=loss_value, initial_loss=initial_loss)
                   for a in self.evaluated().values())

    @staticmethod
    def evaluate_loss(loss_fn: LossFn, params: Params) -> tuple[Tensor, LossFn]:
        """The host's loss at ``params``, and a ``loss_fn`` replaying the random state it used.

        The evaluation advances the host's random stream as ``loss_fn(params)`` would.
        Pass the returned ``loss_fn`` with ``loss`` (and a gradient built from it) to
        :meth:`flatness_terms`: the regularizers then see the very function the host's
        loss came from (the same dropout masks), so they can use what the host computed.
        """
        return evaluate_replayable(loss_fn, params)

    def after_unroll(self, step: int, meta_loss: Tensor, logs: MutableMapping[str, Any]) -> None:
        """Report the end of an unroll to every observer plugin."""
        for plugin_name, caller in self._hook_callers("after_unroll").items():
            try:
                caller(step=step, meta_loss=meta_loss, logs=logs)
            except FlatL2OError:
                raise
            except Exception as exc:
                raise PluginHookError(f"plugin {plugin_name!r} raised in hook after_unroll at step "
                                      f"{step}: {type(exc).__name__}: {exc}") from exc

    def stats(self) -> dict[str, float]:
        """Latest raw value of each regularizer it evaluates, for logging (``name/value``)."""
        return {f"{n}/value": a.last_value for n, a in self.evaluated().items() if a.last_value is not None}

    def evaluated(self) -> dict[str, ActiveRegularizer]:
        """Every activated regularizer this facade's ``flatness_terms`` evaluates, by name.

        Its own (:attr:`active`), and those a plugin on its manager evaluates on its behalf
        and exposes as ``attached_regularizers`` (a ``{name: ActiveRegularizer}`` mapping),
        as :meth:`FlatnessAware.attach <flat_l2o_plugin.wrappers.FlatnessAware.attach>`
        registers. A host that keeps estimator state per trajectory (the reference
        trainer) keeps theirs too, so a term behaves the same whichever route activated it.

        Raises:
            ConfigError: Two of them share a name (each term must come from one place).
        """
        found = dict(self.active)
        owners = {name: "the host's config" for name in found}
        for plugin_name, plugin in self.pm.list_name_plugin():
            attached = getattr(plugin, "attached_regularizers", None)
            if not isinstance(attached, Mapping):
                continue
            for name, active in attached.items():
                if name in found and found[name] is not active:
                    raise ConfigError(f"regularizer {name!r} is activated by both {owners[name]} and plugin "
                                      f"{plugin_name!r}; activate each regularizer in one place")
                found[name], owners[name] = active, f"plugin {plugin_name!r}"
        return found

    def _hook_callers(self, hook: str = "flatness_terms") -> dict[str, Any]:
        # One subset caller per implementing plugin, so that an error names the plugin.
        # Rebuilt whenever the manager's plugins change.
        plugins = self.pm.get_plugins()
        key = (hook, frozenset(id(p) for p in plugins))
        if self._callers is None or key not in self._callers:
            callers = {}
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                others = [p for p in plugins if p is not impl.plugin]
                callers[impl.plugin_name] = self.pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers = {**(self._callers or {}), key: dict(sorted(callers.items()))}
        return self._callers[key]
