"""learn2learn's meta-descent loop, with a flatness term.

learn2learn's ``LearnableOptimizer(model, transform, lr)`` learns a gradient transform
(``ModuleTransform``, ``KroneckerTransform``, ...) online, one step at a time. Its
loop is::

    loss = loss_fn(model)           # at θ_k = stopgrad(θ_{k-1}) - lr · T_φ(g_{k-1})
    loss.backward()                 # ∇θ f into the model's .grad, ∇φ f into the transforms
    meta_optimizer.step()           # update φ
    learnable_optimizer.step()      # θ_{k+1} = stopgrad(θ_k) - lr · T_φ(g_k), via update_module

So one backward serves two purposes: the gradient the transform will see next, and the
meta-gradient of φ through the differentiable update that produced θ_k. A flatness term
R(θ_k) belongs to the second only (``mode="meta_loss"``, the paper's recipe): the
transform must not see ∇R as part of the optimizee's gradient. The regularizers here are
evaluated at the model's current, transformed parameters with
``torch.func.functional_call``, so the term is differentiable in φ through θ_k(φ).

With :class:`FlatnessLearnableOptimizer` the loop changes in one line::

    flat_opt = FlatnessLearnableOptimizer(learnable_optimizer, {"hessian_trace": {"weight": 0.01}})
    ...
    flat_opt.backward(loss, loss_fn)    # instead of loss.backward()

Two things follow from learn2learn's loop:

* At the first step the model's parameters are its own leaf parameters: θ_0 was not
  produced by the transforms, so a ``meta_loss`` term there would cost its Hessian-vector
  products and send nothing to φ. It is skipped (``mode="optimizee_loss"`` terms are not:
  they change the model's gradient). Any step whose parameters carry no graph is skipped
  the same way.
* learn2learn's examples run the model in train mode, so every forward pass draws new
  dropout masks. The regularizers' loss evaluations replay one random state per call
  (as in every host route of :class:`~flat_l2o_plugin.FlatL2O`), so an estimator sees
  one function rather than one per mask.

learn2learn itself is not imported here; the objects it builds are used through their
public attributes (``info["model"]``, ``parameters()``, ``step()``, ``zero_grad()``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..host import FlatL2O
from ..manager import FlatL2OPluginManager
from ..protocols import LossFn
from ..wrappers.stack import TransparentWrapper

__all__ = ["ModelLossFn", "FlatnessLearnableOptimizer", "flatness_penalty", "model_loss_fn"]

ModelLossFn = Callable[[Callable[..., Any]], Tensor]
"""``loss_of_model(model) -> Tensor``: the scalar mini-batch loss of a callable model.

It receives a stand-in for the model (call it as the model: ``model(x)``), so the same
function gives the loss at the model's own parameters and at the probes a regularizer
evaluates, e.g. ``lambda model: F.cross_entropy(model(x), y)``.
"""

_MODES = ("meta_loss", "optimizee_loss")


def model_loss_fn(model: nn.Module, loss_of_model: ModelLossFn) -> tuple[list[str], list[Tensor], LossFn]:
    """The model's current parameters and a ``loss_fn(params)`` over them.

    Args:
        model: The optimizee. Its parameters may be non-leaf tensors (after
            ``learn2learn.update_module``); they are used as they are, in the graph.
        loss_of_model: See :data:`ModelLossFn`.

    Returns:
        ``(names, params, loss_fn)`` where ``loss_fn(ps)`` runs the model with ``ps`` in
        place of its parameters (``torch.func.functional_call``; buffers unchanged).
    """
    named = [(name, p) for name, p in model.named_parameters() if p is not None]
    names = [name for name, _ in named]

    def loss_fn(params: Any) -> Tensor:
        replaced = dict(zip(names, params))

        def run(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, replaced, args, kwargs)

        return loss_of_model(run)

    return names, [p for _, p in named], loss_fn


def flatness_penalty(model: nn.Module, loss_of_model: ModelLossFn, flat: FlatL2O, step: int, *,
                     mode: str = "meta_loss", loss: Tensor | None = None, horizon: int | None = None,
                     initial_loss: float | None = None) -> Tensor:
    """The activated regularizers' weighted sum at the model's current parameters.

    In learn2learn's loop the model's parameters are the output of the transform, so
    the result is differentiable in the transform's parameters: adding it to the
    meta-loss sends a gradient into them.

    Args:
        model: The optimizee, as the learnable optimizer left it.
        loss_of_model: See :data:`ModelLossFn`.
        flat: The activation config, as a facade.
        step: The iterate's index k in the model's trajectory.
        mode: Which regularizers: ``"meta_loss"`` or ``"optimizee_loss"`` ones.
        loss: The loss at the current parameters, if known.
        horizon: T, for ``at="last"`` / ``start_fraction`` schedules.
        initial_loss: The first loss of the run, for ``after_loss_drop``.

    Returns:
        A 0-dim tensor; a zero with no graph when nothing is due (nothing is evaluated).

    learn2learn's loop has a single backward, which also fills the model's ``.grad``
    that the transform reads next: adding this penalty to ``loss`` before
    ``loss.backward()`` therefore trains the model on f + R as well (the
    ``optimizee_loss`` behaviour). :meth:`FlatnessLearnableOptimizer.backward` keeps a
    ``meta_loss`` term out of the model's gradient.

    A ``meta_loss`` penalty at parameters that carry no graph (the model's own leaf
    parameters, before the first update) is a zero with no graph: it could not reach
    the transforms, so nothing is evaluated.
    """
    if mode not in _MODES:
        raise ConfigError(f"flatness_penalty: mode must be one of {_MODES}, got {mode!r}")
    _, params, loss_fn = model_loss_fn(model, loss_of_model)
    if mode == "meta_loss" and not _produced_by_an_update(params):
        return torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    with _grads_preserved(params):
        if mode == "meta_loss":
            return flat.penalty(params, loss_fn, step, loss=loss, horizon=horizon, initial_loss=initial_loss)
        penalty = flat.optimizee_penalty(params, loss_fn, step, loss=loss, horizon=horizon,
                                         initial_loss=initial_loss)
    return penalty if penalty is not None else torch.zeros((), dtype=params[0].dtype, device=params[0].device)


def _produced_by_an_update(params: list[Tensor]) -> bool:
    """Whether some parameter is the output of an update (has a graph that may reach φ).

    learn2learn's ``update_module`` replaces the model's parameters by non-leaf tensors
    computed from the transforms; before the first ``step()`` they are leaf parameters.
    """
    return any(p.grad_fn is not None for p in params)


@contextlib.contextmanager
def _grads_preserved(params: list[Tensor]) -> Iterator[None]:
    """Restore the params' ``.grad`` on exit.

    learn2learn calls ``retain_grad()`` on the model's (non-leaf) parameters, and a
    retained gradient is written whenever *any* backward pass goes through the tensor:
    the regularizer's own ``autograd.grad`` calls (batched ones under ``vmap``
    included) and the meta-term's backward into the transforms. The model's ``.grad``
    is what the transform reads at the next step, so none of that may stay there.
    """
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


class FlatnessLearnableOptimizer(TransparentWrapper):
    """learn2learn's ``LearnableOptimizer`` whose meta-gradient includes flatness terms.

    Transparent as a module: ``parameters()`` are the transforms' (hand them to the
    meta-optimizer as before) and ``state_dict()`` keys are the learnable optimizer's.
    ``step()`` and ``zero_grad()`` are learn2learn's.

    :meth:`backward` replaces ``loss.backward()``. With ``mode="meta_loss"`` terms (the
    default) the term's gradient reaches only the transforms' parameters; the model's
    ``.grad``, which the transform reads at the next ``step()``, holds ∇f alone. With
    ``mode="optimizee_loss"`` terms the model is trained on f + βR, so the model's
    ``.grad`` and the meta-gradient both include the term, as in the original release.
    With every weight at 0 :meth:`backward` is ``loss.backward()``. ``meta_loss`` terms
    are skipped at the first step, whose parameters the transforms did not produce.

    Args:
        learnable_optimizer: A ``learn2learn.optim.LearnableOptimizer``.
        regularizers: The activation config (the format :class:`~flat_l2o_plugin.FlatL2O`
            takes) or a ``FlatL2O``.
        plugin_manager: Where regularizer names are looked up (with a config).
        horizon: T, for ``at="last"`` / ``start_fraction`` schedules.

    Raises:
        ConfigError: ``learnable_optimizer`` does not look like learn2learn's, or a bad
            activation option.

    Example:
        >>> metaopt = l2l.optim.LearnableOptimizer(model, l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear))
        >>> flat_opt = FlatnessLearnableOptimizer(metaopt, {"sharpness": {"weight": 0.1}})
        >>> opt = torch.optim.Adam(flat_opt.parameters(), lr=1e-3)
        >>> for x, y in batches:
        ...     flat_opt.zero_grad(); opt.zero_grad()
        ...     loss_of_model = lambda m: F.cross_entropy(m(x), y)
        ...     loss = loss_of_model(model)
        ...     flat_opt.backward(loss, loss_of_model)
        ...     opt.step(); flat_opt.step()
    """

    _copy_by_reference = ("flat",)  # a facade holds a plugin manager; copies share it

    def __init__(self, learnable_optimizer: nn.Module,
                 regularizers: Mapping[str, Mapping[str, Any]] | FlatL2O | None = None, *,
                 plugin_manager: FlatL2OPluginManager | None = None, horizon: int | None = None) -> None:
        info = getattr(learnable_optimizer, "info", None)
        if not isinstance(info, Mapping) or not isinstance(info.get("model"), nn.Module) \
                or not callable(getattr(learnable_optimizer, "step", None)):
            raise ConfigError(
                f"FlatnessLearnableOptimizer: expected a learn2learn.optim.LearnableOptimizer, got "
                f"{type(learnable_optimizer).__name__}; build one with "
                f"learn2learn.optim.LearnableOptimizer(model, transform, lr)"
            )
        super().__init__(learnable_optimizer)
        if isinstance(regularizers, FlatL2O):
            if plugin_manager is not None and plugin_manager is not regularizers.pm:
                raise ConfigError("FlatnessLearnableOptimizer: plugin_manager is only used with a config; "
                                  "pass the config instead of a FlatL2O, or drop plugin_manager")
            self.flat = regularizers
        else:
            self.flat = FlatL2O(regularizers, plugin_manager=plugin_manager)
        self.horizon = horizon
        self.steps_taken = 0
        self.last_terms: dict[str, float] = {}

    @property
    def model(self) -> nn.Module:
        """The optimizee the learnable optimizer updates."""
        return self.inner.info["model"]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """learn2learn's step: the model moves by the transformed gradient, differentiably."""
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """learn2learn's ``zero_grad``: resets the *model's* gradients (not the transforms').

        ``set_to_none`` is accepted for ``nn.Module`` compatibility and ignored:
        learn2learn replaces each gradient by a zero tensor, on purpose.
        """
        self.inner.zero_grad()

    def backward(self, loss: Tensor, loss_of_model: ModelLossFn, *, step: int | None = None,
                 horizon: int | None = None, initial_loss: float | None = None) -> dict[str, float]:
        """``loss.backward()`` plus the due flatness terms at the model's current parameters.

        Args:
            loss: The model's loss at its current parameters (the meta-loss of the
                previous update), as learn2learn's loop computes it.
            loss_of_model: The same loss as a function of a callable model (see
                :data:`ModelLossFn`), evaluated by the regularizers.
            step: The iterate's index k (default: the number of earlier ``backward``
                calls, learn2learn's loop being one long trajectory).
            horizon: T (default: the wrapper's ``horizon``).
            initial_loss: The run's first loss, for ``after_loss_drop``.

        Returns:
            The value of each term added, by name (empty when nothing was due).
        """
        k = self.steps_taken if step is None else step
        horizon = horizon if horizon is not None else self.horizon
        self.steps_taken = k + 1
        self.last_terms = {}
        if not any(a.weight != 0.0 for a in self.flat.active.values()):
            loss.backward()
            return {}
        schedule = {"loss": loss, "horizon": horizon, "initial_loss": initial_loss}
        _, params, loss_fn = model_loss_fn(self.model, loss_of_model)
        with _grads_preserved(params):
            # θ_k not produced by the transforms (the first step): a term there cannot reach φ.
            meta_terms = self.flat.flatness_terms(params, loss_fn, k, optimizer=self, **schedule) \
                if _produced_by_an_update(params) else {}
            optimizee = self.flat.optimizee_penalty(params, loss_fn, k, **schedule)
            if meta_terms:
                meta = torch.stack(list(meta_terms.values())).sum()
                # Only the transforms receive this gradient: the model's .grad must stay
                # ∇f, the gradient the transform is meant to see at the next step.
                transform_params = [p for p in self.inner.parameters() if p.requires_grad]
                if meta.requires_grad and transform_params:
                    meta.backward(inputs=transform_params, retain_graph=True)
                self.last_terms.update({name: float(t.detach()) for name, t in meta_terms.items()})
        if optimizee is not None:
            loss = loss + optimizee
            self.last_terms["optimizee_penalty"] = float(optimizee.detach())
        loss.backward()
        return dict(self.last_terms)
