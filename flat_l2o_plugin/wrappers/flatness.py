"""The flatness-aware wrapper: activated regularizers become part of meta-training.

Any learned optimizer obeying the protocol (ours, a user's, one adapted with the
``foreign`` adapter) is wrapped without touching its code, and its meta-loss gains

    Σ_r α_r Σ_{t∈S_r} R_r(θ_t)

for the regularizers the activation config turns on (the config :class:`FlatL2O`
takes: weight, schedule, weighting and mode per regularizer).

The protocol's ``step(params, grads, state)`` carries no loss, so a host hands the
wrapper what it needs in one of two documented ways:

1. **Explicit** (any hand-written loop): pass ``loss_fn=`` (and, for schedules,
   ``step_index=`` / ``horizon=``) to :meth:`FlatnessAware.step`. The wrapper evaluates
   the due ``mode="meta_loss"`` terms at the iterate it produced and keeps their sum;
   the host adds :meth:`FlatnessAware.pop_penalty` to its meta-loss once per unroll.
   ``mode="optimizee_loss"`` terms are evaluated at the incoming iterate and their
   gradient is added to the grads the wrapped optimizer sees.
2. **Through a FlatL2O host** (such as :class:`~flat_l2o_plugin.training.MetaTrainer`,
   which calls ``flat.flatness_terms(..., optimizer=...)`` at every iterate):
   :meth:`FlatnessAware.attach` registers a ``flatness_terms`` implementation on the
   host's facade that returns this wrapper's terms whenever the host is training a stack
   that contains it. Nothing accumulates in ``step`` then.

With every weight at 0 the wrapper never evaluates a regularizer and never touches the
grads, so updates and meta-gradients are bit-identical to the unwrapped optimizer.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._random_state import evaluate_replayable
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..host import ActiveRegularizer, FlatL2O
from ..manager import FlatL2OPluginManager
from ..protocols import LossFn, Params
from .stack import LearnedOptimizerWrapper, unwrap

__all__ = ["FlatnessAware"]


class FlatnessAware(LearnedOptimizerWrapper):
    """Make a learned optimizer's meta-training flatness-aware, without editing it.

    The wrapper is transparent as a module (see
    :class:`~flat_l2o_plugin.wrappers.stack.TransparentWrapper`): ``state_dict()`` keys
    and parameter names are the wrapped optimizer's, so pretrained weights load into
    either. ``init_state`` is the wrapped optimizer's; the wrapper keeps no state of its
    own in the optimizer state.

    Explicit host protocol::

        wrapped = FlatnessAware(create_optimizer("rnnprop"),
                                {"hessian_trace": {"weight": 0.01, "start_fraction": 0.5}})
        for t in range(unroll):
            loss = loss_fn(params)
            grads = [g.detach() for g in torch.autograd.grad(loss, params)]
            params, state = wrapped.step(params, grads, state, loss_fn=loss_fn,
                                         step_index=t0 + t, horizon=T, loss=loss)
            meta_loss = meta_loss + loss_fn(params)
        meta_loss = meta_loss + wrapped.pop_penalty()

    Args:
        optimizer: The learned optimizer to wrap.
        regularizers: The activation config (``{name: {"weight": α, ...}}``, the format
            :class:`~flat_l2o_plugin.FlatL2O` takes), or a ``FlatL2O`` built from one.
            ``None`` activates nothing.
        plugin_manager: Where regularizer names are looked up when ``regularizers`` is
            a config (default: a fresh :func:`~flat_l2o_plugin.get_plugin_manager`).
        horizon: The trajectory length T used by ``at="last"`` and ``start_fraction``
            schedules when a host does not pass ``horizon``.

    Raises:
        ConfigError: ``optimizer`` is not a learned optimizer, a bad activation option,
            or ``plugin_manager`` given with a ``FlatL2O`` instance.
        UnknownComponentError: A regularizer name that no loaded plugin registered.
    """

    def __init__(self, optimizer: nn.Module,
                 regularizers: Mapping[str, Mapping[str, Any]] | FlatL2O | None = None, *,
                 plugin_manager: FlatL2OPluginManager | None = None, horizon: int | None = None) -> None:
        super().__init__(optimizer)
        if isinstance(regularizers, FlatL2O):
            if plugin_manager is not None and plugin_manager is not regularizers.pm:
                raise ConfigError("flatness_aware: plugin_manager is only used to build a FlatL2O from a "
                                  "config; pass the config instead of a FlatL2O, or drop plugin_manager")
            flat = regularizers
        elif regularizers is None or isinstance(regularizers, Mapping):
            flat = FlatL2O(regularizers, plugin_manager=plugin_manager)
        else:
            raise ConfigError(f"flatness_aware.regularizers must be a table {{name: {{'weight': ...}}}} or a "
                              f"FlatL2O, got {type(regularizers).__name__}")
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
            raise ConfigError(f"flatness_aware.horizon must be an integer >= 1, got {horizon!r}")
        self.flat = flat
        self.horizon = horizon
        self._pending: dict[str, Tensor] = {}
        self._attached_to: list[FlatL2O] = []

    # The facade holds a plugin manager (modules, hooks): copies share it, and start
    # with nothing pending and attached to no host.
    _copy_by_reference = ("flat", "_pending", "_attached_to")

    def __deepcopy__(self, memo: dict[int, Any]) -> FlatnessAware:
        new = super().__deepcopy__(memo)
        new._pending, new._attached_to = {}, []
        return new

    def extra_repr(self) -> str:
        active = ", ".join(f"{n}={a.weight:g}" for n, a in self.flat.active.items()) or "none"
        return f"wrapping {type(self.inner).__name__}, regularizers: {active}"

    @property
    def active(self) -> dict[str, ActiveRegularizer]:
        """The activated regularizers, by name (weights, schedules, modes)."""
        return self.flat.active

    # ------------------------------------------------------------------ the step

    def step(self, params: Params, grads: Params, state: Mapping[str, Tensor], *,
             loss_fn: LossFn | None = None, step_index: int | None = None, horizon: int | None = None,
             loss: Tensor | None = None, initial_loss: float | None = None,
             **host_info: Any) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step of the wrapped optimizer, with the due flatness terms.

        Without ``loss_fn`` this is exactly the wrapped optimizer's step (deployment,
        evaluation, or a host reached through :meth:`attach`).

        Args:
            params: The iterate θ_t.
            grads: ∇f(θ_t), as the host computed them (usually detached).
            state: The wrapped optimizer's state.
            loss_fn: ``loss_fn(params)``, the scalar mini-batch loss. Regularizers are
                evaluated on it: ``mode="optimizee_loss"`` ones at θ_t (their gradient is
                added to ``grads``), ``mode="meta_loss"`` ones at the produced θ_{t+1}
                (kept for :meth:`pop_penalty`).
            step_index: t, the index of the incoming iterate in its trajectory (0 at
                the optimizee's initialisation). Defaults to the wrapped optimizer's
                ``state["step"]`` (the number of steps it has taken), which every model
                of the zoo and the ``foreign`` adapter keep.
            horizon: The trajectory length T (default: the wrapper's ``horizon``).
            loss: f(θ_t) if the host has it (saves a forward pass for ``after_loss_drop``
                schedules).
            initial_loss: f(θ_0) of the trajectory, for ``after_loss_drop`` schedules.
            **host_info: Passed on to wrappers nested inside this one.

        Returns:
            ``(new_params, new_state)`` from the wrapped optimizer.

        Raises:
            ConfigError: No ``step_index`` and no integer ``state["step"]`` to infer it
                from, or a schedule that needs ``horizon`` / ``initial_loss``.
        """
        forwarded = {"loss_fn": loss_fn, "step_index": step_index, "horizon": horizon, "loss": loss,
                     "initial_loss": initial_loss, **host_info}
        if loss_fn is None or not any(a.weight != 0.0 for a in self.flat.active.values()):
            return self.inner_step(params, grads, state, **forwarded)
        t = step_index if step_index is not None else _steps_taken(state, type(self.inner).__name__)
        horizon = horizon if horizon is not None else self.horizon
        grads = self._add_optimizee_penalty(params, grads, loss_fn, t, loss=loss, horizon=horizon,
                                            initial_loss=initial_loss)
        new_params, new_state = self.inner_step(params, grads, state, **forwarded)
        if not self._attached_to:
            for name, term in self.meta_terms(new_params, loss_fn, t + 1, horizon=horizon,
                                              initial_loss=initial_loss).items():
                self._pending[name] = self._pending[name] + term if name in self._pending else term
        return new_params, new_state

    def _add_optimizee_penalty(self, params: Params, grads: Params, loss_fn: LossFn, step: int, *,
                               loss: Tensor | None, horizon: int | None,
                               initial_loss: float | None) -> list[Tensor] | Params:
        candidates = {n: a for n, a in self.flat.active.items() if a.mode == "optimizee_loss" and a.weight != 0}
        if not candidates:
            return grads
        # The penalty's gradient joins the host's (detached) gradient: it is taken at a
        # detached copy of θ_t, so it adds no path from the meta-loss into the host's graph.
        probe = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            # The host's loss is not in the graph of the probe, and a regularizer may
            # differentiate the loss it is handed: the loss at the probe is evaluated when
            # needed, from the function the regularizers then evaluate.
            probe_loss = None
            if loss is None and any(a.schedule.after_loss_drop > 0 for a in candidates.values()):
                probe_loss, loss_fn = evaluate_replayable(loss_fn, probe)
                loss = probe_loss
            due = self.flat.due(step, mode="optimizee_loss", horizon=horizon, loss=loss, initial_loss=initial_loss)
            if not due:
                return grads
            if probe_loss is None and any(a.weighting == "scale_free" or "loss" in a.accepts for a in due.values()):
                probe_loss, loss_fn = evaluate_replayable(loss_fn, probe)
            penalty = torch.stack([act(probe, loss_fn, probe_loss) for act in due.values()]).sum()
            extra = torch.autograd.grad(penalty, probe, allow_unused=True)
        return [g if e is None else g + e.to(g.dtype) for g, e in zip(grads, extra)]

    def meta_terms(self, params: Params, loss_fn: LossFn, step: int, *, loss: Tensor | None = None,
                   horizon: int | None = None, initial_loss: float | None = None,
                   grads: Params | None = None) -> dict[str, Tensor]:
        """The weighted ``mode="meta_loss"`` terms due at the iterate ``params`` (θ_step).

        Args:
            params: The iterate, in the graph of the optimizer's weights.
            loss_fn: ``loss_fn(params)``, the scalar mini-batch loss.
            step: The iterate's index in its trajectory.
            loss: f(params) if known, computed by ``loss_fn`` and in the graph of ``params``
                (as the ``flatness_terms`` hook hands it).
            horizon: T (default: the wrapper's ``horizon``).
            initial_loss: f(θ_0), for ``after_loss_drop``.
            grads: ∇f(params) built with ``create_graph=True`` from ``loss``, if known.

        Returns:
            ``{name: 0-dim tensor}``; empty when nothing is due (nothing is evaluated).
        """
        horizon = horizon if horizon is not None else self.horizon
        candidates = {n: a for n, a in self.flat.active.items() if a.mode == "meta_loss" and a.weight != 0}
        if not candidates:
            return {}
        if loss is None and any(a.schedule.after_loss_drop > 0 for a in candidates.values()):
            loss, loss_fn = evaluate_replayable(loss_fn, params)
        # Evaluated directly rather than through the wrapper's own flatness_terms hook:
        # the wrapper answers that hook for a host (attach), and must never re-enter it.
        due = self.flat.due(step, mode="meta_loss", horizon=horizon, loss=loss, initial_loss=initial_loss)
        return {name: act(params, loss_fn, loss, grads) for name, act in due.items()}

    # ------------------------------------------------------------------ the host side

    def pop_terms(self) -> dict[str, Tensor]:
        """The meta-loss terms accumulated since the last pop, by name, and forget them.

        Includes the terms of flatness-aware wrappers nested inside this one (a name
        used by two of them is summed).
        """
        terms: dict[str, Tensor] = {}
        for layer in unwrap(self):
            if isinstance(layer, FlatnessAware):
                for name, value in layer._pending.items():
                    terms[name] = terms[name] + value if name in terms else value
                layer._pending = {}
        return terms

    def pop_penalty(self) -> Tensor:
        """The sum of :meth:`pop_terms`, for the host to add to its meta-loss.

        A 0-dim zero tensor (with no graph) when nothing was due, so that
        ``meta_loss + wrapped.pop_penalty()`` is always valid and, with every weight at
        0, changes neither the meta-loss nor its gradient.
        """
        terms = self.pop_terms()
        if not terms:
            return torch.zeros(())
        return torch.stack(list(terms.values())).sum()

    def stats(self) -> dict[str, float]:
        """Latest raw value of each activated regularizer (``name/value``), for logging."""
        return self.flat.stats()

    def attach(self, host: FlatL2O) -> str:
        """Deliver this wrapper's meta-loss terms through a host's ``flatness_terms`` call.

        For hosts built on :class:`~flat_l2o_plugin.FlatL2O` that never pass ``loss_fn``
        to ``step``, e.g. ``MetaTrainer(wrapped, ..., flat=host)``. The host calls
        ``host.flatness_terms(params, loss_fn, t, optimizer=<its optimizer>, loss=...)``
        at every iterate; when ``<its optimizer>`` is this wrapper or a stack containing
        it, this wrapper's due terms join the host's sum (and its ``term/<name>`` logs).
        From then on :meth:`step` accumulates nothing, so nothing is counted twice.

        The hook carries no trajectory length: set the wrapper's ``horizon`` for
        ``at="last"`` / ``start_fraction`` schedules (the reference trainer passes its own).

        The host reports this wrapper's regularizers as its own
        (:meth:`FlatL2O.evaluated <flat_l2o_plugin.FlatL2O.evaluated>`, :meth:`FlatL2O.stats
        <flat_l2o_plugin.FlatL2O.stats>`), so the reference trainer keeps their estimator
        state per trajectory slot and in its checkpoints, exactly as for the same
        regularizers in its own config: the two routes give the same run. Attach before
        building the trainer.

        Args:
            host: The host's facade.

        Returns:
            The plugin name registered on ``host.pm`` (unregister it to detach).

        Raises:
            ConfigError: The host activates a regularizer this wrapper activates too
                (it would be counted twice), or the wrapper has a
                ``mode="optimizee_loss"`` regularizer (the host, not passing
                ``loss_fn`` to ``step``, could not apply it: activate it in the host's
                own config instead).
        """
        shared = sorted(set(host.active) & set(self.flat.active))
        if shared:
            raise ConfigError(f"flatness_aware.attach: the host already activates {', '.join(shared)}; "
                              f"activate each regularizer in one place only (the host's config or the wrapper's)")
        optimizee = sorted(n for n, a in self.flat.active.items() if a.mode == "optimizee_loss")
        if optimizee:
            raise ConfigError(f"flatness_aware.attach: {', '.join(optimizee)} has mode='optimizee_loss', which an "
                              f"attached host cannot apply (it does not pass loss_fn to step); move it to the "
                              f"host's own FlatL2O config")
        name = f"flatness_aware.{id(self):x}"
        if not host.pm.has_plugin(name):
            host.pm.register(_AttachedTerms(self), name=name)
            self._attached_to.append(host)
        return name


class _AttachedTerms:
    """The ``flatness_terms`` implementation :meth:`FlatnessAware.attach` registers on a host."""

    def __init__(self, wrapper: FlatnessAware) -> None:
        self.wrapper = wrapper

    @property
    def attached_regularizers(self) -> dict[str, ActiveRegularizer]:
        """The wrapper's regularizers, which the host reports and keeps state for as its own."""
        return self.wrapper.flat.active

    @hookimpl
    def flatness_terms(self, params: Params, loss_fn: LossFn, step: int, optimizer: Any,
                       loss: Tensor | None, horizon: int | None, initial_loss: float | None,
                       grads: Params | None) -> dict[str, Tensor] | None:
        # A host that names no optimizer attached us on purpose; one that names another
        # optimizer is training something else with the same facade.
        if optimizer is not None and not any(layer is self.wrapper for layer in unwrap(optimizer)):
            return None
        return self.wrapper.meta_terms(params, loss_fn, step, loss=loss, horizon=horizon, initial_loss=initial_loss,
                                       grads=grads)


def _steps_taken(state: Mapping[str, Tensor], owner: str) -> int:
    step = state.get("step") if isinstance(state, Mapping) else None
    if not isinstance(step, Tensor) or step.dim() != 0 or step.dtype.is_floating_point:
        raise ConfigError(f"flatness_aware: cannot tell the trajectory step, since {owner}'s state has no integer "
                          f"'step' entry; pass step_index=t (the index of the incoming iterate) to step()")
    return int(step)
