"""What the activation config makes of a registered regularizer: its weight, schedule and weighting.

These types are part of the contract: a plugin's ``flatness_terms`` hook receives the
activated regularizers as :class:`ActiveRegularizer` objects. They depend on nothing
above the contract (no plugin manager, no facade); :mod:`.host` builds them from the
configuration.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

from torch import Tensor

from ._random_state import fixed_random_state, is_host_evaluation
from .errors import ConfigError, FlatL2OError, PluginHookError
from .protocols import LossFn, Params, Regularizer

__all__ = ["ACTIVATION_KEYS", "HOST_VALUES", "ActiveRegularizer", "Schedule", "accepted_host_values",
           "is_finite_number"]

HOST_VALUES = ("loss", "grads")
"""What a host may hand a regularizer at the iterate, as keyword arguments it names."""


def accepted_host_values(regularizer: Any) -> frozenset[str]:
    """Which of :data:`HOST_VALUES` ``regularizer`` takes, by the names in its call signature.

    A regularizer written as ``reg(params, loss_fn)`` takes none and is called exactly so.
    Only parameters with these names count: ``**kwargs`` does not, so that a regularizer
    forwarding its keywords elsewhere never receives what it did not ask for.
    """
    try:
        parameters = inspect.signature(regularizer).parameters
    except (TypeError, ValueError):  # builtins and C callables: call them the classic way
        return frozenset()
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(v for v in HOST_VALUES if v in named)


def _gradient_of(params: Params, grads: Sequence[Tensor | None] | None) -> list[Tensor] | None:
    """The host's ``grads`` as one tensor per parameter; ``None`` entries (``allow_unused``) are zeros."""
    if grads is None:
        return None
    grads = list(grads)
    if len(grads) != len(params):
        raise ConfigError(f"grads: the host handed {len(grads)} gradient tensors for {len(params)} params")
    return [p.new_zeros(p.shape) if g is None else g for g, p in zip(grads, params)]


@dataclass(frozen=True)
class Schedule:
    """When a regularizer takes part in the meta-loss, along one optimizee trajectory.

    The optimizee's starting plateau is the flattest place on its trajectory: a penalty
    applied from step 0 with a large weight rewards a learned optimizer that never
    moves. ``warmup``, ``start_fraction`` and ``after_loss_drop`` keep the penalty away
    from the start.

    Steps count iterates: θ_0 is the initialisation and θ_t the iterate after t updates,
    so a trajectory of ``horizon`` T updates ends at θ_T.

    Attributes:
        every: Apply at every k-th iterate (t % every == 0).
        at: ``"all"`` iterates, or only the ``"last"`` one, θ_T (needs the host to pass
            ``horizon``).
        warmup: Off for θ_0 .. θ_warmup: the first ``warmup`` updates go unpenalized.
        start_fraction: Off before θ_t with t < ``start_fraction * horizon`` ("late in
            the trajectory"; needs ``horizon``).
        after_loss_drop: Off until the loss has fallen to ``(1 - after_loss_drop)`` times
            the trajectory's initial loss (needs the host to pass ``initial_loss``).
    """

    every: int = 1
    at: str = "all"
    warmup: int = 0
    start_fraction: float = 0.0
    after_loss_drop: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {self.every!r}")
        if self.at not in ("all", "last"):
            raise ConfigError(f"at must be 'all' or 'last', got {self.at!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not is_finite_number(self.start_fraction) or not 0.0 <= self.start_fraction <= 1.0:
            raise ConfigError(f"start_fraction must be in [0, 1], got {self.start_fraction!r}")
        if not is_finite_number(self.after_loss_drop) or not 0.0 <= self.after_loss_drop < 1.0:
            raise ConfigError(f"after_loss_drop must be in [0, 1), got {self.after_loss_drop!r}")

    def due(self, step: int, horizon: int | None = None, loss: float | None = None,
            initial_loss: float | None = None) -> bool:
        if (self.warmup and step <= self.warmup) or step % self.every:
            return False
        needs_horizon = self.at == "last" or self.start_fraction > 0
        if needs_horizon and horizon is None:
            raise ConfigError("a schedule with at='last' or start_fraction needs the host to pass horizon")
        if self.at == "last" and step != horizon:
            return False
        if self.start_fraction > 0 and step < self.start_fraction * horizon:  # type: ignore[operator]
            return False
        if self.after_loss_drop > 0:
            if loss is None or initial_loss is None:
                raise ConfigError("a schedule with after_loss_drop needs the host to pass loss and initial_loss")
            if loss > (1.0 - self.after_loss_drop) * initial_loss:
                return False
        return True


class ActiveRegularizer:
    """A regularizer the configuration activated, with its weight, schedule and weighting.

    ``weighting="fixed"`` gives ``weight * R``. ``weighting="scale_free"`` gives
    ``weight * R / stopgrad(R̄) * stopgrad(f)``, where R̄ is a running mean of |R|: the
    term is then ``weight`` times the loss in size, whatever the curvature scale of the
    task, so one ``weight`` transfers across tasks.

    ``mode="meta_loss"`` (the default, the paper's recipe) adds the term to the learned
    optimizer's meta-loss. ``mode="optimizee_loss"`` (the original release's
    alternative) adds it to the optimizee's own loss, so the learned optimizer sees the
    gradient of ``f + weight * R``.
    """

    def __init__(self, name: str, regularizer: Regularizer, *, weight: float = 1.0,
                 schedule: Schedule | None = None, weighting: str = "fixed",
                 mode: str = "meta_loss", scale_momentum: float = 0.9, provider: str | None = None) -> None:
        self.name = name
        self.provider = provider
        self.regularizer = regularizer
        self.weight = float(weight)
        self.schedule = schedule or Schedule()
        self.weighting = weighting
        self.mode = mode
        self.scale_momentum = scale_momentum
        self._scale: float | None = None
        self.last_raw: float | None = None
        self.accepts = accepted_host_values(regularizer)

    def due(self, step: int, **trajectory: Any) -> bool:
        return self.weight != 0.0 and self.schedule.due(step, **trajectory)

    @property
    def wants_gradient(self) -> bool:
        """The regularizer takes the host's gradient graph (``grads``) when there is one."""
        return "grads" in self.accepts

    def __call__(self, params: Params, loss_fn: LossFn, loss: Tensor | None = None,
                 grads: Sequence[Tensor] | None = None) -> Tensor:
        """The weighted term at ``params``.

        ``loss`` and ``grads`` are what the host has at this iterate (see the
        ``flatness_terms`` hook): the regularizer receives those its signature names and
        that are not ``None``, provided ``loss_fn`` comes from the host's own evaluation
        (:func:`~flat_l2o_plugin.FlatL2O.evaluate_loss`). Otherwise nothing says they are
        of the function ``loss_fn`` evaluates (a model with dropout draws new masks at
        each plain call), and the regularizer computes its own; ``loss`` then only serves
        the ``scale_free`` weighting.
        """
        shareable = is_host_evaluation(loss_fn)
        # Every evaluation inside the estimator sees the same dropout masks (see _random_state).
        loss_fn = fixed_random_state(loss_fn, params)
        given = {"loss": loss, "grads": _gradient_of(params, grads)} if shareable else {}
        extra = {k: v for k, v in given.items() if k in self.accepts and v is not None}
        try:
            raw = self.regularizer(params, loss_fn, **extra)
        except FlatL2OError:
            raise
        except Exception as exc:
            raise PluginHookError(f"regularizer {self.name!r} (from plugin {self.provider!r}) raised: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(raw, Tensor) or raw.dim() != 0:
            raise FlatL2OError(f"regularizer {self.name!r} must return a 0-dim tensor, got {raw!r}")
        self.last_raw = float(raw.detach())
        if self.weighting == "fixed":
            return self.weight * raw
        magnitude = abs(self.last_raw)
        if math.isfinite(magnitude):
            self._scale = magnitude if self._scale is None else (
                self.scale_momentum * self._scale + (1 - self.scale_momentum) * magnitude)
        if loss is None:
            loss = loss_fn(params)
        scale = max(self._scale or 0.0, 1e-12)
        return self.weight * raw / scale * loss.detach()

    @property
    def last_value(self) -> float | None:
        """The estimator's own latest estimate (e.g. the eigenvalue), if it reports one."""
        return getattr(self.regularizer, "last_value", self.last_raw)


ACTIVATION_KEYS = {"weight", "weighting", "mode", "scale_momentum"} | {f.name for f in fields(Schedule)}


def is_finite_number(x: Any) -> bool:
    """A real number (not a bool), finite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
