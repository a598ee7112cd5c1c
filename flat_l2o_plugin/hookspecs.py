"""The plugin contract: hook specifications of the ``flat_l2o_plugin`` project.

A plugin is a module (or an object) with functions marked ``@hookimpl`` whose names
are the hooks below. It is published through the entry-point group
``flat_l2o_plugin``::

    [project.entry-points.flat_l2o_plugin]
    my_plugin = "my_package.flat_l2o_hooks"

Rules every hook follows:

* Arguments are passed by keyword, and an implementation may accept any **subset** of
  a spec's arguments. Hooks gain arguments over time; they are never renamed.
* Installing a plugin makes its components *available*; only configuration
  *activates* them. A plugin must never change a meta-loss merely by being installed.
* No hook is ``firstresult``: every implementation runs, and results are combined in
  a way that does not depend on plugin order (registrations are de-duplicated by
  name, flatness terms are summed).

Registration hooks run once per plugin manager, when its component registries are
first needed. Runtime hooks are called by a host meta-training loop through the typed
facade :class:`flat_l2o_plugin.FlatL2O`, never through ``pm.hook`` directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, MutableMapping, Sequence

import pluggy

if TYPE_CHECKING:
    from torch import Tensor

    from .activation import ActiveRegularizer
    from .protocols import LossFn, Params
    from .registry import OptimizerInfo, PretrainedInfo, RegularizerInfo, TaskInfo, WrapperInfo

__all__ = ["PROJECT_NAME", "hookspec", "hookimpl"]

PROJECT_NAME = "flat_l2o_plugin"
"""The pluggy project name, which is also the entry-point group."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin function as the implementation of the hook of the same name."""


# --------------------------------------------------------------------------- registration


@hookspec
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    """Register flatness regularizers.

    Called once per plugin manager, the first time its regularizer registry is needed
    (``create_regularizer``, ``list_regularizers``, ``FlatL2O``, ``flat-l2o list``).

    Args:
        register: Call it once per regularizer with a
            :class:`~flat_l2o_plugin.RegularizerInfo`. ``info.factory(**options)`` must
            return a callable ``reg(params, loss_fn) -> Tensor`` where ``params`` is a
            sequence of tensors and ``loss_fn(params)`` is the scalar mini-batch loss at
            those params. The result is a 0-dim tensor differentiable with respect to
            ``params`` (so that a meta-gradient reaches the learned optimizer through
            the iterates). A regularizer may keep state across calls (a warm-started
            probe) and may expose ``last_value`` for logging.

            What the host already has at the iterate reaches a regularizer that asks for
            it, by naming it as a parameter of its call (``**kwargs`` does not ask);
            each is passed when the host has it, by keyword, and left out otherwise, so
            a regularizer must still work without it::

                def __call__(self, params, loss_fn, *, loss=None, grads=None): ...

            * ``loss``: ``loss_fn(params)`` as the host computed it, in the graph of
              ``params`` (it may be differentiated, and is also in the meta-loss).
            * ``grads``: ∇ ``loss`` with respect to ``params``, built with
              ``create_graph=True``: Hessian-vector products and their derivatives
              work on it. The reference host builds it only when a due regularizer
              asks (:meth:`FlatL2O.wants_gradient`), and reuses it, detached, as the
              gradient of its next step, so a regularizer that takes it saves a forward
              and a backward pass per call.

            They are passed only when the host evaluated its loss through
            :meth:`FlatL2O.evaluate_loss`, whose ``loss_fn`` replays that evaluation's
            random state: they are then of the very function ``loss_fn`` evaluates
            (the same dropout masks). A regularizer written as ``reg(params, loss_fn)``
            gets neither and runs as it always did.

    A name registered twice, by the same or different plugins, raises
    :class:`~flat_l2o_plugin.errors.DuplicateComponentError` naming both plugins.
    The weight and the schedule are not the regularizer's business: the host applies
    them from the activation config.
    """


@hookspec
def register_optimizers(register: Callable[[OptimizerInfo], None]) -> None:
    """Register learned-optimizer models (the zoo).

    Args:
        register: Call it with an :class:`~flat_l2o_plugin.OptimizerInfo` whose
            ``factory(**options)`` returns an ``nn.Module`` following
            :class:`~flat_l2o_plugin.protocols.LearnedOptimizer`: ``init_state(params)``
            and ``step(params, grads, state) -> (new_params, state)``, differentiable in
            the module's own weights and coordinatewise over all parameters.
    """


@hookspec
def register_wrappers(register: Callable[[WrapperInfo], None]) -> None:
    """Register retrofit wrappers for learned optimizers.

    Args:
        register: Call it with a :class:`~flat_l2o_plugin.WrapperInfo` whose
            ``factory(optimizer, **options)`` returns a learned optimizer wrapping
            ``optimizer``. Wrappers nest in the order the configuration lists them.
    """


@hookspec
def register_tasks(register: Callable[[TaskInfo], None]) -> None:
    """Register optimizee tasks.

    Args:
        register: Call it with a :class:`~flat_l2o_plugin.TaskInfo` whose
            ``factory(**options)`` returns a :class:`~flat_l2o_plugin.protocols.Task`
            (functional ``init_params`` / ``sample_batch`` / ``loss`` / ``evaluate``).
    """


@hookspec
def register_pretrained(register: Callable[[PretrainedInfo], None]) -> None:
    """Register pre-trained learned optimizers: meta-trained weights shipped inside a distribution.

    Args:
        register: Call it with a :class:`~flat_l2o_plugin.PretrainedInfo` per optimizer:
            its name, the zoo model and options, the wrapper stack, the weights file
            inside the plugin's package (read with ``importlib.resources``), that file's
            SHA-256, a version, a license and a model card.

    Registration reads no file. Using the optimizer reads the weights (safetensors only,
    nothing is unpickled) and refuses them, with an error naming the file and the
    plugin, when their SHA-256 is not the registered one; other components keep
    working. A name registered twice, or equal to a learned-optimizer model's name, is
    an error naming both plugins.
    """


# --------------------------------------------------------------------------- runtime


@hookspec
def flatness_terms(
    params: Params,
    loss_fn: LossFn,
    step: int,
    optimizer: Any,
    active: Mapping[str, ActiveRegularizer],
    loss: Tensor | None,
    horizon: int | None,
    initial_loss: float | None,
    grads: Sequence[Tensor] | None,
) -> Mapping[str, Tensor] | None:
    """Return named, already-weighted penalty terms for the meta-loss at one iterate.

    Called by the host once per unrolled step ``t`` (through
    :meth:`FlatL2O.flatness_terms`), at the optimizee iterate θ_t that the learned
    optimizer produced. The host **sums** every returned term into the meta-loss, so
    the order of plugins cannot change the result. A name returned by two plugins is an
    error.

    Args:
        params: The iterate θ_t, one tensor per optimizee weight. Inside meta-training
            these are non-leaf tensors in the graph of the learned optimizer's weights:
            keep them in the graph so the term's gradient reaches φ.
        loss_fn: ``loss_fn(params)`` returns the scalar mini-batch loss at ``params``
            (the same batch the host uses for the meta-loss at this step). Every call
            replays one random state, so a model in train mode draws the same dropout
            masks at each evaluation, and the evaluations leave the host's random stream
            as it was: the state of the host's own evaluation when the host got
            ``loss_fn`` from :meth:`FlatL2O.evaluate_loss`, else the state when the
            facade was asked for the terms.
        step: The step index t within the optimizee's trajectory (0-based, counted from
            the optimizee's initialisation, not from the start of the unroll).
        optimizer: The learned optimizer being meta-trained (may be ``None``).
        active: The regularizers the configuration activated **and** whose schedule is
            due at this step, by name. Each is an
            :class:`~flat_l2o_plugin.activation.ActiveRegularizer`; ``active[name](params,
            loss_fn, loss, grads)`` returns its weighted term. An implementation
            computing its own terms must return them only when its configuration
            activated them.
        loss: The mini-batch loss at ``params`` if the host already computed it, else
            ``None``, in the graph of ``params``. It is of the very function ``loss_fn``
            evaluates (the same random state) when the host got both from
            :meth:`FlatL2O.evaluate_loss`; otherwise use it for schedules only.
        horizon: The trajectory length T, if the host knows it (θ_T is the last iterate).
        initial_loss: f(θ_0) of this trajectory, if the host knows it.
        grads: ∇ ``loss`` with respect to ``params``, built with ``create_graph=True``
            (so in the graph of ``params``, and of φ through them), if the host built
            it from a loss it got from :meth:`FlatL2O.evaluate_loss`, else ``None``. A
            host builds it when a due regularizer asks for it
            (:meth:`FlatL2O.wants_gradient`); an implementation that needs the gradient
            graph and gets ``None`` computes its own.

    Returns:
        A mapping from term name to a 0-dim tensor, or ``None`` for no terms.
    """


@hookspec
def after_unroll(step: int, meta_loss: Tensor, logs: MutableMapping[str, Any]) -> None:
    """Observe the end of one truncated unroll, before the meta-gradient step.

    For loggers, schedules and diagnostics. Called by the host after the meta-loss of
    an unroll is complete (and before ``backward``), every unroll, including unrolls
    that were dropped as non-finite (``logs["skipped"]`` is then true).

    Args:
        step: The meta-training step (number of unrolls so far, 0-based).
        meta_loss: The unroll's meta-loss (do not call ``backward`` on it).
        logs: The host's metrics for this unroll (``meta_loss``, each flatness term by
            name, estimates such as ``hessian_top_eigenvalue/value``). Observers may read
            it; adding keys is allowed and they are logged with the rest.
    """
