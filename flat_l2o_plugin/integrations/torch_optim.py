"""A meta-trained learned optimizer behind the ``torch.optim.Optimizer`` interface.

With it, any ``nn.Module`` trains in the usual loop::

    opt = LearnedOptimizerTorch(model.parameters(), weights="rnnprop.safetensors")
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Each step runs the learned optimizer once per parameter group, on all of that group's
coordinates flattened into one batch, under ``torch.no_grad()``: no graph is kept and
the learned optimizer's own weights are frozen. With one group and the default options
the parameters follow, bit for bit, the trajectory of calling the learned optimizer's
``step(params, grads, state)`` directly, as the meta-trainer's validation does.

Group options (each parameter group may set its own; the constructor sets defaults):

- ``lr``: a multiplier on the learned update. The learned optimizer proposes
  θ' = step(θ, g); the parameters become θ + lr·(θ' − θ). ``lr=1.0`` (the default)
  applies the update as meta-trained, bit for bit; ``0.5`` halves every step; ``0``
  freezes the group while its state still advances. Because it is called ``lr``,
  ``torch.optim.lr_scheduler`` and timm's schedulers anneal it like a learning rate.
  How to choose it is :data:`LR_RULE`; a group built with ``0 < lr < 0.01`` warns
  (:class:`StepMultiplierWarning`), because that is a learning rate carried over
  from another optimizer, not a multiplier.
- ``weight_decay``: an L2 coefficient λ ≥ 0 added to the gradient the learned
  optimizer sees, g + λθ (the coupled form of ``torch.optim.Adam``), so the learned
  optimizer minimises f(θ) + λ/2‖θ‖². A learned optimizer has no learning rate to
  decouple it from, so the coupled form is the one that means the same thing for
  every model.

Other keys in a group (timm's ``lr_scale``, ``param_names``) are kept and ignored, as
``torch.optim`` does.

Gradient clipping (``clip_grad_norm_``, timm's ``--clip-grad``) changes the gradient
the learned optimizer sees but does not bound its step: the built-in learned
optimizers normalise gradients by their running scale (RNNProp, L2O-Scale,
``learned_correction``) or read them through a log-magnitude preprocessing (L2O-DM),
so a clipped gradient can give as large an update as the unclipped one. ``lr`` scales
the step.

Complex parameters are refused: the learned optimizers are meta-trained on real
coordinates, so optimise ``torch.view_as_real`` of a complex tensor instead.

The deployed step: a learned optimizer of the zoo also has ``step_``, the same
mathematics fused into in-place kernels (compiled with ``torch.compile`` when it can be,
see :mod:`flat_l2o_plugin.optimizers._fused`). A group of at least 65,536 coordinates
runs it (``fused=None``, the default), within float rounding of ``step``; smaller groups,
wrapper stacks and optimizers without ``step_`` run ``step`` as above. ``fused=True``
runs ``step_`` for every group that can, ``fused=False`` never. ``state_dtype="bfloat16"``
stores the recurrent state the learned optimizer names in
``reduced_precision_state_keys()`` (its LSTM or GRU states) in that dtype, rounding it
after each step; running averages keep their dtype.

A wrapper stack that looks at other points, such as ``sam_gradient``, needs a closure:
``opt.step(closure)`` re-evaluates the same mini-batch (zero grads, loss, backward) and
the wrapper gets the gradients at the points it asks for from it.

``self.state[p]`` may hold keys of other optimizers beside the learned optimizer's
own (those of ``init_state``): timm's ``Lookahead`` keeps its slow weights there. They
are left alone, go through ``state_dict()`` with the rest, and never reach the learned
optimizer.

``state_dict()`` records which learned optimizer the state belongs to, under
``"learned_optimizer"``: its registered name, class, options and the SHA-256 of its
weights. ``load_state_dict`` refuses a state saved with another one (other weights,
another architecture), because recurrent state only means something to the network
that wrote it. A state_dict without that entry (from before it existed) is checked by
its keys and sizes only.

State of a coordinatewise learned optimizer (RNNProp, L2O-DM: a coordinate's update
depends only on its own history): the recurrent state is split per parameter and kept
in ``self.state[p]``; every per-coordinate tensor is sliced to ``p``'s coordinates and
each scalar (the step count) is copied. It goes through ``state_dict()`` /
``load_state_dict()`` like Adam's moments. A parameter whose ``.grad`` is ``None`` at a
step is skipped: its coordinates keep their state and its step count does not advance.
Parameters whose scalars differ (one skipped a step) are batched separately, so every
coordinate always sees exactly the state it would see on its own.

State of a learned optimizer that is not coordinatewise (L2O-Scale, whose tensor and
global RNNs pool over coordinates): a group is one unit. Its whole state is kept in
``self.state`` of the group's first parameter, and every step passes all of the group's
parameters, in order, so the state always describes the same coordinates. A parameter
without a gradient gets a zero gradient and keeps its values, but its share of the
recurrent state advances with the rest of the group. Whether an optimizer is
coordinatewise comes from its registration (``OptimizerInfo.coordinatewise``); pass
``coordinatewise=`` for a module the registry does not know.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, FlatL2OError, UnknownComponentError
from ..optimizers._fused import inplace_step
from ..wrappers.stack import LearnedOptimizerWrapper, host_step, unwrap
from ._identity import describe_identity, identity_differences, learned_identity

__all__ = [
    "ClosureRequiredError",
    "IDENTITY_KEY",
    "LR_RULE",
    "LearnedOptimizerTorch",
    "OptimizerStateError",
    "StepMultiplierWarning",
    "UntrainedOptimizerWarning",
]

LR_RULE = (
    "lr multiplies the meta-trained step, it is not a learning rate: use 1.0 on models like "
    "those the optimizer was meta-trained on; on other models try 1.0, 0.3 and 0.1 and keep the "
    "largest whose validation loss keeps falling. A learning rate tuned for SGD or AdamW, or the "
    "one timm's train.py derives from the batch size when --lr is not given, is far too small: "
    "below 0.01 the model barely moves"
)
"""How to choose ``lr``; the README and :class:`StepMultiplierWarning` say the same."""

IDENTITY_KEY = "learned_optimizer"
"""The ``state_dict()`` entry that records which learned optimizer the state belongs to."""

# Below this (and above 0) an lr is a learning rate carried over from another optimizer.
_SMALLEST_MULTIPLIER = 0.01


class OptimizerStateError(ConfigError):
    """The state of a :class:`LearnedOptimizerTorch` does not fit its learned optimizer.

    Raised when a loaded ``state_dict`` was saved with another learned optimizer (its
    keys differ) or for other parameters (its sizes differ), and when the state of an
    optimizer taken to be coordinatewise does not split per parameter.
    """


class ClosureRequiredError(ConfigError):
    """``step()`` without a closure on a wrapper stack that evaluates the gradient elsewhere (``sam_gradient``)."""


class UntrainedOptimizerWarning(UserWarning):
    """A learned optimizer was built by name without weights, so it has never been meta-trained."""


class StepMultiplierWarning(UserWarning):
    """A group's ``lr`` is below 0.01: a learning rate, not a multiplier (see :data:`LR_RULE`)."""


class LearnedOptimizerTorch(torch.optim.Optimizer):
    """Train any ``nn.Module`` with a meta-trained learned optimizer.

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim`` optimizer.
            A group may set ``lr`` and ``weight_decay`` (see the module docstring).
        optimizer: The learned optimizer: an ``nn.Module`` following
            :class:`~flat_l2o_plugin.protocols.LearnedOptimizer` (a frozen copy is
            taken, so later changes to it do not reach this optimizer), or a
            registered name such as ``"rnnprop"``. With ``weights``, it may be left
            out or give the name the file must record.
        weights: A file written by
            :func:`~flat_l2o_plugin.optimizers.weights.save_learned_optimizer`; the
            learned optimizer is rebuilt from it.
        options: Keyword options when ``optimizer`` is a registered name and no
            ``weights`` are given (a weights file records its own).
        lr: Default multiplier on the learned update; 1.0 applies it as meta-trained.
        weight_decay: Default L2 coefficient added to the gradient.
        fused: Run the learned optimizer's in-place ``step_`` (see the module
            docstring): ``None`` for groups of at least 65,536 coordinates, ``True``
            for every group, ``False`` never (bit for bit the trajectory of ``step``).
        state_dtype: Store the state the learned optimizer names in
            ``reduced_precision_state_keys()`` in this floating dtype (``"bfloat16"``
            halves the state of RNNProp and L2O-DM); ``None`` keeps the dtypes of
            ``init_state``.
        coordinatewise: Whether the learned optimizer's update of a coordinate depends
            only on that coordinate's history, which decides how its state is kept
            (see the module docstring). ``None`` takes it from the registration of the
            optimizer's name or class, and assumes ``True`` for an unregistered
            module (its state layout is checked at the first step).
        foreach: Accepted so that hosts which pass it (timm's ``--opt-foreach``) keep
            working; each group is always one batched call, which is what ``foreach``
            buys other optimizers.
        plugin_manager: The manager whose registry builds a named optimizer and knows
            the registrations; a fresh :func:`~flat_l2o_plugin.get_plugin_manager`
            by default.

    Attributes:
        learned_optimizer: The frozen learned optimizer that computes every step.
        learned_identity: What ``state_dict()`` records under :data:`IDENTITY_KEY`:
            ``{"optimizer": registered name or None, "class": ..., "options": dict or
            None, "weights_sha256": ..., "weights_file": path or None}``.

    Raises:
        ConfigError: No learned optimizer given, both a module and ``weights``, a name
            that disagrees with the weights file, an out-of-range ``lr`` /
            ``weight_decay``, or a complex parameter.
        WeightsError: The weights file is missing or does not fit (see
            :func:`~flat_l2o_plugin.optimizers.weights.load_learned_optimizer`).
        UnknownComponentError: ``optimizer`` names nothing a loaded plugin registers.

    Warns:
        UntrainedOptimizerWarning: ``optimizer`` is a name and ``weights`` is ``None``:
            the network has its initial random weights.
        StepMultiplierWarning: A group's ``lr`` is above 0 and below 0.01 (see
            :data:`LR_RULE`).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = LearnedOptimizerTorch(
        ...     [{"params": model.weight}, {"params": model.bias, "lr": 0.5}],
        ...     weights="rnnprop.safetensors")
        >>> opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
        >>> torch.save(opt.state_dict(), "opt.pt")
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        optimizer: nn.Module | str | None = None,
        *,
        weights: str | os.PathLike[str] | None = None,
        options: Mapping[str, Any] | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        coordinatewise: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: str | torch.dtype | None = None,
        plugin_manager: Any = None,
    ) -> None:
        del foreach  # see the docstring: there is nothing to switch
        _check_group_value("lr", lr, "the constructor")
        _check_group_value("weight_decay", weight_decay, "the constructor")
        resolved = _resolve_learned_optimizer(optimizer, weights, options, plugin_manager)
        learned = resolved.module
        learned.requires_grad_(False)
        learned.eval()
        for weight in learned.parameters():
            weight.grad = None
        # Set before super().__init__, which calls add_param_group.
        self.learned_optimizer: nn.Module = learned
        self.fused = fused
        self.state_dtype, self._reduced_keys = _resolve_state_dtype(state_dtype, learned)
        self.coordinatewise: bool = bool(
            coordinatewise if coordinatewise is not None
            else resolved.coordinatewise if resolved.coordinatewise is not None else True
        )
        self.learned_identity: dict[str, Any] = learned_identity(
            learned, name=resolved.name, options=resolved.options, weights_file=resolved.weights_file,
            pretrained=resolved.pretrained)
        self._own_keys: frozenset[str] | None = None
        self._warn_each_group = False  # the constructor warns once for all its groups
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        _warn_small_multipliers(self.param_groups)
        self._warn_each_group = True

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles only defaults, state and groups; without the learned
        # optimizer a copy (copy.deepcopy, multiprocessing) could not step.
        return {**super().__getstate__(), "learned_optimizer": self.learned_optimizer,
                "coordinatewise": self.coordinatewise, "learned_identity": self.learned_identity,
                "_own_keys": self._own_keys, "_warn_each_group": self._warn_each_group,
                "fused": self.fused, "state_dtype": self.state_dtype, "_reduced_keys": self._reduced_keys}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its parameters, ``lr`` and ``weight_decay`` (see the module docstring)."""
        super().add_param_group(param_group)  # fills the defaults and checks the parameters
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            for key in ("lr", "weight_decay"):
                _check_group_value(key, group[key], f"param_groups[{index}]")
            for position, p in enumerate(group["params"]):
                if p.is_complex():
                    raise ConfigError(
                        f"LearnedOptimizerTorch: param_groups[{index}] parameter {position} is complex "
                        f"({p.dtype}, shape {tuple(p.shape)}); the learned optimizers are meta-trained on "
                        f"real coordinates: keep a real parameter and use torch.view_as_complex(p) in the model"
                    )
        except ConfigError:
            del self.param_groups[index]  # a refused group leaves the optimizer as it was
            raise
        if self._warn_each_group:
            _warn_small_multipliers([group], first_index=index)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One learned-optimizer step on every parameter that has a gradient.

        Args:
            closure: Optional; re-evaluates the model and returns the loss. It is
                called with gradients enabled, before the update.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            OptimizerStateError: The learned optimizer's state does not split per
                parameter although it is taken to be coordinatewise, or its ``step``
                returned a state with other keys.
            FlatL2OError: A sparse gradient (the learned optimizers need dense ones),
                or a group spread over several devices with a learned optimizer that
                is not coordinatewise.
        """
        if closure is None:
            self._check_no_closure_needed()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Wrappers that look at other points (sam_gradient) get their gradient oracle
        # from the closure; it is only valid during this step.
        self._closure = closure
        self._start = None
        if closure is not None and isinstance(self.learned_optimizer, LearnedOptimizerWrapper):
            # The oracle evaluates every group at its value when the step began, as the
            # closure's own gradient was, although earlier groups have moved since.
            self._start = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        try:
            self._step_groups()
        finally:
            self._closure = self._start = None
        return loss

    def _check_no_closure_needed(self) -> None:
        """Refuse, before anything changes, a stack that needs ``step(closure)`` (see :class:`ClosureRequiredError`)."""
        needing = [w for w in unwrap(self.learned_optimizer) if getattr(w, "needs_grad_fn", False)]
        if not needing:
            return
        pretrained = self.learned_identity.get("pretrained")
        what = repr(pretrained["name"]) if pretrained else type(self.learned_optimizer).__name__
        wrappers = ", ".join(sorted({type(w).__name__ for w in needing}))
        raise ClosureRequiredError(
            f"LearnedOptimizerTorch: {what} wraps its model in {wrappers}, which takes a second gradient of the same "
            f"batch at another point, so it needs optimizer.step(closure) with a closure that zeroes the gradients, "
            f"recomputes the loss and calls backward(); step() was called without one, as timm's train.py does"
            + _closure_free_hint())

    def _step_groups(self) -> None:
        for index, group in enumerate(self.param_groups):
            active = [p for p in group["params"] if p.grad is not None]
            if not active:
                continue
            for p in active:
                if p.grad.is_sparse:
                    raise FlatL2OError(
                        f"LearnedOptimizerTorch: param_groups[{index}] has a parameter of shape "
                        f"{tuple(p.shape)} with a sparse gradient; the learned optimizer needs dense "
                        f"gradients (use a dense nn.Embedding, sparse=False)"
                    )
            fused = self._fused_step(group)
            if self.coordinatewise:
                for p in active:
                    if not self._own_state(p):
                        self.state[p].update(self._fresh_param_state(p))
                if fused is not None:
                    for p in active:
                        self._step_fused(fused, group, [p], [p])
                    continue
                for batch in self._batches(active):
                    self._step_batch(group, batch)
            elif fused is not None:
                params = group["params"]
                if not self._own_state(params[0]):
                    self.state[params[0]].update(self._fresh_group_state(index, params))
                self._step_fused(fused, group, params, active)
            else:
                self._step_whole_group(index, group)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state_dict, plus the learned optimizer's identity under :data:`IDENTITY_KEY`."""
        state_dict = super().state_dict()
        state_dict[IDENTITY_KEY] = copy.deepcopy(self.learned_identity)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping each state tensor's dtype.

        Everything is checked before anything changes, so a refused state_dict leaves
        the optimizer as it was. ``torch.optim`` casts floating-point state to its
        parameter's dtype on load; the learned optimizer's recurrent state lives in its
        own dtype (float32 next to bfloat16 parameters, say), so it is restored as
        saved instead, and only moved to the parameter's device. Other optimizers' keys
        (timm's Lookahead) are loaded as ``torch.optim`` loads them.

        Raises:
            ValueError: The groups do not match (raised by ``torch.optim``).
            OptimizerStateError: The saved state belongs to another learned optimizer
                (its recorded identity differs, or, without one, its keys) or to
                parameters of other sizes.
        """
        state_dict = dict(state_dict)
        saved_identity = state_dict.pop(IDENTITY_KEY, None)
        if saved_identity is not None:
            self._check_identity(saved_identity)
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        # Matching layouts only; torch.optim names any other mismatch itself below.
        if len(saved_groups) == len(self.param_groups) and all(
            len(saved["params"]) == len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            for index, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups)):
                states = [saved_state.get(param_id) or {} for param_id in saved_group["params"]]
                self._check_loaded_group(index, group["params"], states, identified=saved_identity is not None)
        super().load_state_dict(state_dict)
        own = self._state_keys()
        for saved_group, group in zip(saved_groups, self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                for key, value in (saved_state.get(param_id) or {}).items():
                    if key in own:
                        self.state[p][key] = value.to(device=p.device)

    def _check_identity(self, saved: Any) -> None:
        mine = self.learned_identity
        if not isinstance(saved, Mapping) or not isinstance(saved.get("weights_sha256"), str):
            raise OptimizerStateError(
                f"LearnedOptimizerTorch: state_dict[{IDENTITY_KEY!r}] is {saved!r}, not the identity "
                f"LearnedOptimizerTorch.state_dict() records"
            )
        differs = identity_differences(saved, mine)
        if differs:
            raise OptimizerStateError(
                f"LearnedOptimizerTorch: the state_dict was saved with another learned optimizer "
                f"({describe_identity(saved)}) than this one ({describe_identity(mine)}; differing: "
                f"{', '.join(differs)}); recurrent state means nothing to other weights: build this optimizer "
                f"from the same weights, start its state afresh (timm's train.py: --no-resume-opt), or "
                f"delete state_dict[{IDENTITY_KEY!r}] to load the state anyway"
            )

    def _check_loaded_group(self, index: int, params: list[Tensor], states: list[Mapping[str, Any]],
                            *, identified: bool) -> None:
        """Check the saved states of one group's parameters against the learned optimizer.

        ``identified``: the state_dict carried a matching identity, so a parameter whose
        state holds only other optimizers' keys is one the learned optimizer has not
        stepped yet. Without an identity such a state belongs to another optimizer.
        """
        own = self._state_keys()
        owner = type(self.learned_optimizer).__name__
        for position, (p, state) in enumerate(zip(params, states)):
            present = own & set(state)
            where = f"param_groups[{index}] parameter {position}"
            carries = self.coordinatewise or position == 0  # where the learned optimizer's state lives
            if (present and present != own) or (carries and state and not present and not identified):
                raise OptimizerStateError(
                    f"LearnedOptimizerTorch: the loaded state of {where} has keys {sorted(state)}, but "
                    f"{owner} uses {sorted(own)}; the state_dict was saved with another learned "
                    f"optimizer: load it into a LearnedOptimizerTorch built with the same one"
                )
        if self.coordinatewise:
            for position, (p, state) in enumerate(zip(params, states)):
                if own & set(state):
                    self._check_param_state({k: state[k] for k in own}, p,
                                            f"param_groups[{index}] parameter {position}")
            return
        stray = [i for i, state in enumerate(states[1:], 1) if own & set(state)]
        if stray:
            raise OptimizerStateError(
                f"LearnedOptimizerTorch: param_groups[{index}] has state on parameters {stray}, but "
                f"{owner} keeps a group's state on its first parameter; the state_dict was saved with "
                f"coordinatewise=True: load it into an optimizer built the same way"
            )
        if not own & set(states[0]):
            return
        fresh = self.learned_optimizer.init_state([p.detach() for p in params])
        found = {k: tuple(states[0][k].shape) for k in fresh if isinstance(states[0][k], Tensor)}
        expected = {k: tuple(v.shape) for k, v in fresh.items()}
        if found != expected:
            raise OptimizerStateError(
                f"LearnedOptimizerTorch: the loaded state of param_groups[{index}] has shapes {found}, but "
                f"{owner} on this group's parameters uses {expected}; the state_dict was saved with another "
                f"learned optimizer or other parameters"
            )

    # ------------------------------------------------------------------ state keys

    def _state_keys(self) -> frozenset[str]:
        """The keys of the learned optimizer's own state: those ``init_state`` makes.

        Any other key in ``self.state[p]`` belongs to another optimizer (timm's
        Lookahead keeps its slow weights there) and never reaches the learned optimizer.
        """
        if self._own_keys is None:
            self._own_keys = frozenset(self.learned_optimizer.init_state([torch.zeros(1)]))
        return self._own_keys

    def _own_state(self, p: Tensor) -> dict[str, Tensor]:
        """The learned optimizer's part of ``self.state[p]``, in its order; empty before its first step."""
        own = self._state_keys()
        return {key: value for key, value in self.state[p].items() if key in own}

    # ------------------------------------------------------------------ coordinatewise

    def _fresh_param_state(self, p: Tensor) -> dict[str, Tensor]:
        state = dict(self.learned_optimizer.init_state([p.detach()]))
        self._check_param_state(state, p, f"init_state() for a parameter of shape {tuple(p.shape)}")
        return self._reduce_precision(state)

    def _check_param_state(self, state: Mapping[str, Any], p: Tensor, where: str) -> None:
        owner = type(self.learned_optimizer).__name__
        for key, value in state.items():
            if not isinstance(value, Tensor) or not (value.dim() == 0 or value.shape[0] == p.numel()):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise OptimizerStateError(
                    f"LearnedOptimizerTorch: {where}: state[{key!r}] of {owner} is {shape}, neither a "
                    f"scalar nor per-coordinate (leading dimension {p.numel()}), so the state cannot be "
                    f"split per parameter: if {owner} is not coordinatewise, pass coordinatewise=False; "
                    f"a loaded state must come from the same parameters"
                )

    def _batches(self, active: list[Tensor]) -> list[list[Tensor]]:
        """Split ``active`` into runs that can share one call: same device and scalars."""
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for p in active:
            by_device[p.device].append(p)
        batches = []
        for params in by_device.values():
            scalar_keys = [k for k, v in self._own_state(params[0]).items() if v.dim() == 0]
            # One host sync per key, not one per parameter.
            columns = [torch.stack([self.state[p][k] for p in params]).tolist() for k in scalar_keys]
            groups: dict[tuple[Any, ...], list[Tensor]] = {}
            for i, p in enumerate(params):
                groups.setdefault(tuple(column[i] for column in columns), []).append(p)
            batches.extend(groups.values())
        return batches

    def _step_batch(self, group: Mapping[str, Any], batch: list[Tensor]) -> None:
        state = {
            key: value if value.dim() == 0 else torch.cat([self.state[p][key] for p in batch])
            for key, value in self._own_state(batch[0]).items()
        }
        new_params, new_state = self._call_learned(group, batch, [p.grad for p in batch], state)
        sizes = [p.numel() for p in batch]
        per_param: list[dict[str, Tensor]] = [{} for _ in batch]
        for key, value in new_state.items():
            # Each parameter gets tensors of its own (not views of the batch), so the
            # state of a parameter skipped later keeps nothing else alive, and each
            # entry serializes on its own.
            pieces = [value] * len(batch) if value.dim() == 0 else list(value.split(sizes))
            for slot, piece in zip(per_param, pieces):
                slot[key] = piece.to(self.state_dtype, copy=True) if key in self._reduced_keys else piece.clone()
        for p, new, slot in zip(batch, new_params, per_param):
            self.state[p].update(slot)  # other optimizers' keys stay as they are
            _apply(p, new, group["lr"])

    # ------------------------------------------------------------------ whole groups

    def _step_whole_group(self, index: int, group: Mapping[str, Any]) -> None:
        params = group["params"]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise FlatL2OError(
                f"LearnedOptimizerTorch: param_groups[{index}] spans devices {sorted(map(str, devices))}; "
                f"{type(self.learned_optimizer).__name__} is not coordinatewise and steps a group as one "
                f"batch: put each device's parameters in a group of their own"
            )
        owner = params[0]
        if not self._own_state(owner):
            self.state[owner].update(self._fresh_group_state(index, params))
        # The state covers every coordinate of the group, so every parameter takes part;
        # one without a gradient is fed zeros and keeps its values.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        new_params, new_state = self._call_learned(group, params, grads, self._own_state(owner))
        self.state[owner].update(self._reduce_precision(dict(new_state)))
        for p, new in zip(params, new_params):
            if p.grad is not None:
                _apply(p, new, group["lr"])

    def _fresh_group_state(self, index: int, params: list[Tensor]) -> dict[str, Tensor]:
        fresh = dict(self.learned_optimizer.init_state([p.detach() for p in params]))
        if set(fresh) != self._state_keys():
            raise OptimizerStateError(
                f"LearnedOptimizerTorch: {type(self.learned_optimizer).__name__}.init_state() makes keys "
                f"{sorted(fresh)} for param_groups[{index}] but {sorted(self._state_keys())} for one "
                f"coordinate; the keys of a learned optimizer's state must not depend on the parameters"
            )
        return self._reduce_precision(fresh)

    # ------------------------------------------------------------------ shared

    def _call_learned(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor],
                      state: Mapping[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        learned = self._learned_on(params[0].device)
        weight_decay = group["weight_decay"]
        if weight_decay != 0:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
        new_params, new_state = host_step(learned, list(params), list(grads), state,
                                          grad_fn=self._oracle(params, weight_decay))
        if set(new_state) != set(state):
            raise OptimizerStateError(
                f"LearnedOptimizerTorch: {type(learned).__name__}.step() returned state keys "
                f"{sorted(new_state)}, but init_state() made {sorted(state)}; a learned optimizer "
                f"must keep the keys of its state"
            )
        return list(new_params), {key: value.detach() for key, value in new_state.items()}

    def _oracle(self, params: list[Tensor], weight_decay: float) -> Callable[[Sequence[Tensor]], list[Tensor]] | None:
        """``grad_fn`` for ``params`` from the step's closure, or ``None`` without one.

        It puts every parameter back to its value at the start of the step, sets
        ``params`` to the given point, re-runs the closure and reads their gradients
        (plus weight decay, as for the plain gradient). Values and ``.grad`` of every
        parameter are restored afterwards, so groups and batches stepped later still see
        the gradient of the step's start. A wrapper's perturbation is thus taken per
        batch of parameters (usually one per group and device).
        """
        closure, start = getattr(self, "_closure", None), getattr(self, "_start", None)
        if closure is None or start is None:
            return None
        every = [p for group in self.param_groups for p in group["params"]]

        def grad_fn(point: Sequence[Tensor]) -> list[Tensor]:
            values = [p.detach().clone() for p in every]
            saved_grads = [None if p.grad is None else p.grad.clone() for p in every]
            try:
                for p, v in zip(every, start):
                    p.copy_(v)
                for p, x in zip(params, point):
                    p.copy_(x)
                with torch.enable_grad():
                    closure()
                return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone().add(x, alpha=weight_decay)
                        for p, x in zip(params, point)]
            finally:
                for p, v in zip(every, values):
                    p.copy_(v)
                for p, g in zip(every, saved_grads):
                    p.grad = g

        return grad_fn

    # ------------------------------------------------------------------ deployed step

    def _fused_step(self, group: Mapping[str, Any]) -> Callable[..., None] | None:
        """The learned optimizer's ``step_`` if this group runs it (see the module docstring)."""
        if self.fused is False or (self.fused is None
                                   and sum(p.numel() for p in group["params"]) < _FUSED_MIN_COORDINATES):
            return None
        devices = {p.device for p in group["params"]}
        if len(devices) > 1 and not self.coordinatewise:
            return None  # _step_whole_group names the problem
        return inplace_step(self._learned_on(next(iter(devices))))

    def _step_fused(self, step_: Callable[..., None], group: Mapping[str, Any], params: list[Tensor],
                    active: list[Tensor]) -> None:
        """Run ``step_`` on ``params`` and their state (kept with ``params[0]``); only ``active`` params move."""
        weight_decay, lr = group["weight_decay"], group["lr"]
        moving = {id(p) for p in active}
        # A parameter without a gradient is fed zeros (its share of a pooled state
        # advances) and updated in a scratch copy, so it keeps its values.
        targets = [p if id(p) in moving else p.detach().clone() for p in params]
        grads = [p.grad if id(p) in moving else torch.zeros_like(p) for p in params]
        if weight_decay != 0:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
        before = [p.detach().clone() for p in active] if lr != 1.0 else []
        # Only the learned optimizer's own entries: another optimizer's (Lookahead's slow
        # weights) never reach it. step_ writes the tensors in place; a dtype change
        # (a state_dict saved without state_dtype) or step_'s own re-layout of a
        # row-major matrix (on its first call) replaces them, hence the update.
        state = self._reduce_precision(self._own_state(params[0]))
        step_(targets, grads, state)
        self.state[params[0]].update(state)
        for p, old in zip(active, before):
            _apply(p, old.add_(p - old, alpha=lr), 1.0)

    def _reduce_precision(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with the entries ``state_dtype`` applies to in that dtype (no copy if they are)."""
        for key in self._reduced_keys:
            state[key] = state[key].to(self.state_dtype)
        return state

    def _learned_on(self, device: torch.device) -> nn.Module:
        weight = next(iter(self.learned_optimizer.parameters()), None)
        if weight is not None and weight.device != device:
            # Models are often moved to the accelerator after the optimizer is built.
            self.learned_optimizer.to(device)
        return self.learned_optimizer


# Groups with fewer coordinates run the reference step by default: it is bit for bit
# what meta-training validated, and at this size a step costs little either way.
_FUSED_MIN_COORDINATES = 1 << 16


def _resolve_state_dtype(state_dtype: str | torch.dtype | None,
                         learned: nn.Module) -> tuple[torch.dtype | None, frozenset[str]]:
    """The state dtype as a ``torch.dtype`` and the keys it applies to."""
    if state_dtype is None:
        return None, frozenset()
    dtype = getattr(torch, state_dtype, None) if isinstance(state_dtype, str) else state_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ConfigError(
            f"LearnedOptimizerTorch: state_dtype must be a floating dtype such as 'bfloat16', 'float16' or "
            f"'float32', got {state_dtype!r}"
        )
    keys = getattr(learned, "reduced_precision_state_keys", None)
    if not callable(keys):
        raise ConfigError(
            f"LearnedOptimizerTorch: state_dtype={state_dtype!r} needs the learned optimizer to name the state "
            f"that may be stored in a lower precision, and {type(learned).__name__} has no "
            f"reduced_precision_state_keys(); leave state_dtype=None"
        )
    return dtype, frozenset(keys())


def _apply(p: Tensor, new: Tensor, lr: float) -> None:
    if lr == 1.0:
        p.copy_(new)  # exactly the learned optimizer's iterate
    else:
        p.add_(new - p, alpha=lr)


def _check_group_value(key: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        meaning = ("the multiplier on the learned update (1.0 = as meta-trained)" if key == "lr"
                   else "the L2 coefficient added to the gradient")
        raise ConfigError(
            f"LearnedOptimizerTorch: {where}: {key} must be a finite number >= 0 ({meaning}), got {value!r}"
        )


def _warn_small_multipliers(groups: Sequence[Mapping[str, Any]], first_index: int = 0) -> None:
    small = {f"param_groups[{i}]": g["lr"] for i, g in enumerate(groups, first_index)
             if 0 < g["lr"] < _SMALLEST_MULTIPLIER}
    if small:
        where = ", ".join(f"{k} lr={v:g}" for k, v in small.items())
        warnings.warn(f"LearnedOptimizerTorch: {where}: {LR_RULE}", StepMultiplierWarning, stacklevel=4)


def _closure_free_hint() -> str:
    """Where step() has no closure: the pre-trained optimizers that step without one."""
    from ..manager import get_plugin_manager
    from ..optimizers.pretrained import load_pretrained

    pm = get_plugin_manager()
    usable = []
    for name in pm.components.pretrained.names():
        try:
            learned = load_pretrained(name, plugin_manager=pm).learned
        except FlatL2OError:
            continue  # a damaged one is reported where it is used
        if not any(getattr(w, "needs_grad_fn", False) for w in unwrap(learned)):
            usable.append(name)
    return f"; there, use a pre-trained optimizer that needs no closure: {', '.join(usable)}" if usable else ""


class _Resolved(NamedTuple):
    module: nn.Module
    coordinatewise: bool | None  # from the registration, if the optimizer is registered
    name: str | None  # the registered name, if known
    options: dict[str, Any] | None  # the factory's options, if known
    weights_file: str | None
    pretrained: dict[str, str] | None = None  # {"name", "version"} of a pretrained optimizer


def _resolve_learned_optimizer(
    optimizer: nn.Module | str | None,
    weights: str | os.PathLike[str] | None,
    options: Mapping[str, Any] | None,
    plugin_manager: Any,
) -> _Resolved:
    """The learned optimizer to use, with what the registry knows about it."""
    from ..manager import get_plugin_manager  # import late: the manager imports the zoo
    from ..optimizers.weights import load_learned_optimizer, read_learned_optimizer_config

    if optimizer is None and weights is None:
        raise ConfigError(
            "LearnedOptimizerTorch needs a learned optimizer: weights='file.safetensors' (from "
            "save_learned_optimizer), or optimizer= a meta-trained module or a registered name"
        )
    if optimizer is not None and not isinstance(optimizer, (nn.Module, str)):
        raise ConfigError(
            f"LearnedOptimizerTorch: optimizer must be an nn.Module, a registered name or None, "
            f"got {type(optimizer).__name__}"
        )
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    registry = pm.components.optimizers
    if weights is not None:
        if isinstance(optimizer, nn.Module):
            raise ConfigError(
                "LearnedOptimizerTorch: got both an optimizer module and weights=; pass the module "
                "(already trained) or the weights file, not both"
            )
        if options:
            raise ConfigError(
                f"LearnedOptimizerTorch: options={dict(options)} with weights={os.fspath(weights)!r}; "
                f"a weights file records the options it was built with: drop options="
            )
        config = read_learned_optimizer_config(weights)
        recorded = config["optimizer"]
        if isinstance(optimizer, str) and optimizer not in registry and optimizer in pm.components.pretrained:
            raise ConfigError(
                f"LearnedOptimizerTorch: {optimizer!r} is a pretrained optimizer with weights of its own; "
                f"drop weights={os.fspath(weights)!r}, or name the model the file holds"
            )
        if isinstance(optimizer, str) and recorded != optimizer:
            raise ConfigError(
                f"LearnedOptimizerTorch: optimizer={optimizer!r} but the weights file "
                f"{os.fspath(weights)} holds a {recorded!r}; pass optimizer={recorded!r} or leave it out"
            )
        module = load_learned_optimizer(weights, plugin_manager=pm)
        resolved = _Resolved(module, registry.get(recorded).coordinatewise, recorded, config["options"],
                             str(os.path.abspath(weights)))
    elif isinstance(optimizer, nn.Module):
        if options:
            raise ConfigError(
                "LearnedOptimizerTorch: options= applies to a registered name; the module given "
                "is already built"
            )
        module = copy.deepcopy(optimizer)
        # Its class may be registered under several names with other options: name and
        # options stay unknown, class and weights identify it.
        info = _registration_of(registry, module)
        resolved = _Resolved(module, info.coordinatewise if info else None, None, None, None)
    elif optimizer not in registry and optimizer in pm.components.pretrained:
        if options:
            raise ConfigError(
                f"LearnedOptimizerTorch: options={dict(options)} with pretrained optimizer {optimizer!r}; it is "
                f"used as meta-trained: drop options= (lr= scales its step)"
            )
        from ..optimizers.pretrained import load_pretrained

        loaded = load_pretrained(optimizer, plugin_manager=pm)
        info = registry.get(loaded.info.optimizer)
        module = loaded.learned
        resolved = _Resolved(module, info.coordinatewise, loaded.info.optimizer, loaded.options,
                             loaded.source, {"name": loaded.info.name, "version": loaded.info.version})
    else:
        assert isinstance(optimizer, str)
        if optimizer not in registry:
            pretrained = pm.components.pretrained.names()
            try:
                pm.component("optimizers", optimizer)
            except UnknownComponentError as exc:
                raise UnknownComponentError(
                    f"{exc}; pretrained optimizers: {', '.join(pretrained) or 'none'}") from None
        info = registry.get(optimizer, failed_plugins=pm.failures)
        try:
            module = info.create(**dict(options or {}))
        except FlatL2OError:
            raise  # already names the optimizer and the option
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"optimizer {optimizer!r} (from plugin {registry.provider(optimizer)!r}): {exc}") from exc
        resolved = _Resolved(module, info.coordinatewise, optimizer, dict(options or {}), None)
        warnings.warn(
            f"LearnedOptimizerTorch: {optimizer!r} was built with its initial random weights; pass "
            f"weights= a file from save_learned_optimizer() to use a meta-trained one",
            UntrainedOptimizerWarning,
            stacklevel=3,
        )
    for method in ("init_state", "step"):
        if not callable(getattr(module, method, None)):
            raise ConfigError(
                f"LearnedOptimizerTorch: {type(module).__name__} has no {method}(); a learned "
                f"optimizer needs init_state(params) and step(params, grads, state)"
            )
    return resolved


def _registration_of(registry: Any, module: nn.Module) -> Any:
    """The registration whose factory is the module's class (or a base), or ``None``."""
    matches = [info for info in registry if isinstance(info.factory, type) and isinstance(module, info.factory)]
    exact = [info for info in matches if type(module) is info.factory]
    chosen = exact or matches
    return chosen[0] if chosen else None
