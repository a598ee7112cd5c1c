"""The foreign adapter: a user's gradient-to-update ``nn.Module`` as a learned optimizer.

Public PyTorch re-implementations of L2O-DM and its relatives share one idea, an
``nn.Module`` that maps per-coordinate gradient features and a recurrent state to an
update, and differ in the details. The adapter is configured with those details, by a
small spec rather than by subclassing, and never edits the module:

``inputs``
    The features, concatenated along the last axis into an ``(N, F)`` batch:
    ``"grad"`` (the raw gradient, 1 feature), ``"log_sign"`` (the log/sign
    preprocessing of Andrychowicz et al. with ``p`` and ``log_eps``, 2 features),
    ``"adam"`` (RNNProp's m̂/√v̂ and g/√v̂ with ``beta1``, ``beta2``, ``eps``, 2 features)
    and ``"param"`` (the parameter value θ itself, detached, 1 feature). A module that
    preprocesses its own gradient takes ``inputs=["grad"]``.
``input_layout``
    ``"NF"`` passes ``(N, F)`` (``nn.LSTMCell`` stacks); ``"1NF"`` passes
    ``(1, N, F)``, a length-1 sequence for ``nn.LSTM``-based modules.
``hidden``
    The initial recurrent state. A nest of lists and tables whose leaves are
    ``["zeros", *shape]``, where the string ``"N"`` marks the coordinate axis (when
    absent, the shape is ``(N, *shape)``)::

        [["zeros", 20], ["zeros", 20]]                            # (h, c) of one LSTMCell
        [[["zeros", 20], ["zeros", 20]], [["zeros", 20], ["zeros", 20]]]  # two LSTMCells
        [["zeros", 2, "N", 20], ["zeros", 2, "N", 20]]            # nn.LSTM, 2 layers
        ["zeros", 20]                                             # one tensor (a GRU)
        {hx = [["zeros", 20], ["zeros", 20]], cx = [...]}         # named parts (TOML)

    Tuples given in Python stay tuples. Or a callable ``init_hidden(n, device, dtype)``
    returning the nest. ``None``: the module keeps no state, ``forward(features) -> update``.
``hidden_as``
    How the state reaches the module:

    * ``"argument"``: ``forward(features, hidden) -> (update, hidden)``, the whole nest
      as one argument and one return value;
    * ``"arguments"``: the state spread over several arguments and return values,
      ``forward(inp, hidden, cell) -> (update, hidden, cell)``. ``hidden`` lists one
      spec per argument, in order (a table passes them as keyword arguments, returned
      in the table's order);
    * ``"attributes"``: the module keeps its state as attributes (``self.hx``,
      ``self.cx``) and is called ``forward(features) -> update``. ``hidden`` is a table
      ``{attribute = spec}``. The adapter owns the state, one per trajectory: it sets
      the attributes before each call, reads them back after, and puts back what was
      there, so nothing leaks from one trajectory into another, truncation detaches
      the state like any other, and the module's own reset method is never needed.
``output_scale`` and ``update``
    θ ← θ + output_scale · update (``"add"``, the zoo's convention) or
    θ ← θ − output_scale · update (``"subtract"``, modules that return a descent step).

The recurrent state is stored flat in the optimizer state, one tensor per leaf under
keys built from the leaf's position (``hidden.0.1`` is the second tensor of the first
pair, ``hidden.cx.0`` the first tensor of attribute ``cx``), so it can be saved like any
other state; the nest is rebuilt for each call.

When the adapter is built it checks the module against the spec: ``forward``'s
signature must take the state the way ``hidden_as`` passes it, and one step on a
three-coordinate probe batch must succeed. A mismatch raises a
:class:`~flat_l2o_plugin.errors.ConfigError` that names the setting that fits. The same
probe step warns (:class:`~flat_l2o_plugin.errors.UnregisteredParametersWarning`) when
``forward`` uses weights that ``parameters()`` does not list, such as submodules kept in
a plain Python list: those would receive meta-gradients but never be trained or saved.
The probe leaves the module as it was (weights, buffers, attributes, random state).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, FlatL2OError
from ..optimizers._flat import flatten, layout, unflatten
from ..optimizers.l2o_dm import log_sign_preprocess
from ..optimizers.rnnprop import adam_features
from ..protocols import Params
from ._hidden import (HIDDEN_KEY, build_hidden, check_hidden_spec, flatten_hidden, is_leaf_spec, leaf_keys,
                      template, unflatten_hidden)
from .stack import TransparentWrapper

__all__ = ["ForeignAdapter", "HiddenSpec", "INPUT_WIDTHS"]

HiddenSpec = Sequence[Any] | Mapping[str, Any] | Callable[[int, torch.device, torch.dtype], Any] | None
"""A nest of ``["zeros", *shape]`` leaves, a callable ``init_hidden(n, device, dtype)``, or ``None``."""

INPUT_WIDTHS = {"grad": 1, "log_sign": 2, "adam": 2, "param": 1}
"""Each input's number of features per coordinate."""

_LAYOUTS = ("NF", "1NF")
_UPDATES = ("add", "subtract")
_HIDDEN_AS = ("argument", "arguments", "attributes")
_MISSING = object()


class ForeignAdapter(TransparentWrapper):
    """A user's gradient-to-update ``nn.Module``, adapted to the learned-optimizer protocol.

    The module's code is untouched and the adapter is transparent as a module: its
    ``state_dict()`` keys are the module's, so the user's pretrained weights load as is.

    Example (a two-cell L2O-DM port that preprocesses its own gradient and takes its
    state as two arguments, as found in public re-implementations)::

        class Optimizer(nn.Module):
            def forward(self, inp, hidden, cell):      # inp: (N, 1)
                ...
                return self.output(h1), (h0, h1), (c0, c1)

        optimizer = ForeignAdapter(Optimizer(preproc=True), inputs=["grad"], hidden_as="arguments",
                                   hidden=[[["zeros", 20], ["zeros", 20]],    # hidden
                                           [["zeros", 20], ["zeros", 20]]],   # cell
                                   output_scale=0.1)

    State: ``"step"`` (int64 scalar, steps taken), ``"exp_avg"`` / ``"exp_avg_sq"``
    (``(N,)`` moments, params dtype; only with ``"adam"`` inputs), and one
    ``"hidden[.i[.j...]]"`` tensor per leaf of the recurrent state.

    Args:
        module: The user's module (see ``hidden_as`` for the forms of ``forward``);
            its update may have any shape with N elements.
        inputs: Feature names, in order (a single name is accepted).
        hidden: The recurrent state's spec (see the module docstring).
        hidden_as: ``"argument"``, ``"arguments"`` or ``"attributes"``.
        input_layout: ``"NF"`` or ``"1NF"``.
        output_scale: Multiplier of the module's output.
        update: ``"add"`` or ``"subtract"``.
        p: p of the ``"log_sign"`` preprocessing (Andrychowicz et al. use 10).
        log_eps: ε added to |g| inside the log of the ``"log_sign"`` preprocessing
            (0, the paper's form; some ports use 1e-8).
        beta1: First-moment decay of the ``"adam"`` features.
        beta2: Second-moment decay of the ``"adam"`` features.
        eps: Added to √v̂ in the ``"adam"`` features.

    Raises:
        ConfigError: A spec field is malformed, or the module does not fit it; the
            message names the field (``foreign.<field>``) and, where it can tell, the
            value that fits.
    """

    def __init__(self, module: nn.Module, *, inputs: str | Sequence[str] = ("grad",), hidden: HiddenSpec = None,
                 hidden_as: str = "argument", input_layout: str = "NF", output_scale: float = 1.0,
                 update: str = "add", p: float = 10.0, log_eps: float = 0.0, beta1: float = 0.95,
                 beta2: float = 0.95, eps: float = 1e-8) -> None:
        super().__init__(module)
        names = [inputs] if isinstance(inputs, str) else list(inputs) if isinstance(inputs, Sequence) else None
        if not names:
            raise ConfigError(f"foreign.inputs must be a non-empty list drawn from {sorted(INPUT_WIDTHS)}, "
                              f"got {inputs!r}")
        for index, name in enumerate(names):
            if name not in INPUT_WIDTHS:
                raise ConfigError(f"foreign.inputs[{index}]: unknown input {name!r}; choose from "
                                  f"{', '.join(sorted(INPUT_WIDTHS))}")
            if name in names[:index]:
                raise ConfigError(f"foreign.inputs[{index}]: {name!r} is listed twice; list each input once")
        if input_layout not in _LAYOUTS:
            raise ConfigError(f"foreign.input_layout must be one of {_LAYOUTS}, got {input_layout!r}")
        if update not in _UPDATES:
            raise ConfigError(f"foreign.update must be 'add' (θ + scale·out) or 'subtract' (θ - scale·out), "
                              f"got {update!r}")
        for field, value, low in (("output_scale", output_scale, 0.0), ("p", p, 0.0), ("eps", eps, 0.0)):
            if not _is_number(value) or value <= low:
                raise ConfigError(f"foreign.{field} must be a finite number > {low:g}, got {value!r}")
        if not _is_number(log_eps) or log_eps < 0:
            raise ConfigError(f"foreign.log_eps must be a finite number >= 0, got {log_eps!r}")
        for field, value in (("beta1", beta1), ("beta2", beta2)):
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"foreign.{field} must lie in [0, 1), got {value!r}")
        _check_hidden(hidden, hidden_as)
        self.inputs = tuple(names)
        self.hidden_spec = hidden
        self.hidden_as = hidden_as
        # The container types (tuple, list or dict, per level) the module gets its state
        # in; the optimizer state itself stays flat and saveable. A callable spec reveals
        # them when init_state first calls it.
        self._template = None if hidden is None or callable(hidden) else template(hidden)
        self._template_known = not callable(hidden)
        self.input_layout = input_layout
        self.output_scale = float(output_scale)
        self.update = update
        self.p, self.log_eps = float(p), float(log_eps)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        from ._probe import check_module  # the checks call back into this class

        check_module(self)

    @property
    def num_features(self) -> int:
        """F, the width of the feature batch the module receives."""
        return sum(INPUT_WIDTHS[name] for name in self.inputs)

    def extra_repr(self) -> str:
        return (f"{type(self.inner).__name__}, inputs={list(self.inputs)}, layout={self.input_layout}, "
                f"hidden_as={self.hidden_as}, output_scale={self.output_scale:g}, update={self.update}")

    # ------------------------------------------------------------------ the protocol

    def init_state(self, params: Params) -> dict[str, Tensor]:
        """Fresh state for ``params``: step 0, zero moments, the initial recurrent state."""
        num, dtype, device = layout(params)
        state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.int64, device=device)}
        if "adam" in self.inputs:
            state["exp_avg"] = torch.zeros(num, dtype=dtype, device=device)
            state["exp_avg_sq"] = torch.zeros(num, dtype=dtype, device=device)
        if self.hidden_spec is None:
            return state
        weight_dtype = self._weight_dtype(dtype)
        if callable(self.hidden_spec):
            structure = self.hidden_spec(num, device, weight_dtype)
            _check_structure(structure, self.hidden_as, "init_hidden")
        else:
            structure = build_hidden(self.hidden_spec, num, device, weight_dtype)
        state.update(flatten_hidden(structure, HIDDEN_KEY, "init_hidden"))
        if callable(self.hidden_spec):
            self._template, self._template_known = template(structure), True
        return state

    def step(self, params: Params, grads: Params,
             state: Mapping[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step of the user's module on all coordinates at once.

        Differentiable in the module's weights; ``state`` is not modified.

        Raises:
            FlatL2OError: The module's forward failed or returned something other than
                the update (and the state, as ``hidden_as`` declares it) with N update
                elements and the declared hidden leaves; the message names the module,
                the features passed and the spec field.
        """
        theta = flatten(params)
        grad = flatten(grads).to(theta.dtype)
        owner = type(self.inner).__name__
        for key in ("step", *(("exp_avg", "exp_avg_sq") if "adam" in self.inputs else ())):
            if key not in state:
                raise FlatL2OError(f"ForeignAdapter({owner}).step(): state has no {key!r} (keys: {sorted(state)}); "
                                   f"build it with init_state(params)")
        step = state["step"] + 1
        new_state: dict[str, Tensor] = {"step": step}
        features = []
        for name in self.inputs:
            if name == "grad":
                features.append(grad.unsqueeze(-1))
            elif name == "log_sign":
                features.append(log_sign_preprocess(grad, self.p, self.log_eps))
            elif name == "param":
                features.append(theta.detach().unsqueeze(-1))
            else:
                adam, new_state["exp_avg"], new_state["exp_avg_sq"] = adam_features(
                    grad, state["exp_avg"], state["exp_avg_sq"], step,
                    beta1=self.beta1, beta2=self.beta2, eps=self.eps)
                features.append(adam)
        x = torch.cat(features, dim=-1).to(self._weight_dtype(theta.dtype))
        if self.input_layout == "1NF":
            x = x.unsqueeze(0)
        try:
            update, new_hidden = self.call_module(x, self._hidden_from_state(state))
        except FlatL2OError:
            raise
        except Exception as exc:
            raise FlatL2OError(
                f"foreign: {owner}.forward raised {type(exc).__name__}: {exc}. The adapter passed features of "
                f"shape {tuple(x.shape)} (inputs={list(self.inputs)}, F={self.num_features}, "
                f"input_layout={self.input_layout!r}) and the state as hidden_as={self.hidden_as!r}"
            ) from exc
        if not isinstance(update, Tensor) or update.numel() != theta.numel():
            shape = tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__
            raise FlatL2OError(f"foreign: {owner}.forward returned an update of shape {shape} for "
                               f"{theta.numel()} coordinates; it must have one element per coordinate")
        new_state.update(self._hidden_to_state(new_hidden, state, owner))
        delta = (self.output_scale * update.reshape(-1)).to(theta.dtype)
        new_theta = theta + delta if self.update == "add" else theta - delta
        return unflatten(new_theta, params), new_state

    def call_module(self, x: Tensor, hidden: Any) -> tuple[Any, Any]:
        """Run the module on features ``x`` and state ``hidden`` as ``hidden_as`` says.

        Returns:
            ``(update, new_hidden)``, ``new_hidden`` in the nest of ``hidden``
            (``None`` for a stateless module).

        Raises:
            FlatL2OError: The module returned something of another form.
        """
        module, owner = self.inner, type(self.inner).__name__
        if self.hidden_spec is None or self.hidden_as == "attributes":
            out = self._call_with_attributes(x, hidden) if self.hidden_spec is not None else (module(x), None)
            if not isinstance(out[0], Tensor):
                got = f"a {type(out[0]).__name__} of {len(out[0])}" if isinstance(out[0], (tuple, list)) else \
                    type(out[0]).__name__
                where = "its state is in attributes" if self.hidden_spec is not None else "foreign.hidden is None"
                raise FlatL2OError(f"foreign: {owner}.forward returned {got}; as {where}, forward(features) must "
                                   f"return the update tensor alone (set foreign.hidden_as and foreign.hidden if "
                                   f"it returns its state)")
            return out
        if self.hidden_as == "argument":
            out = module(x, hidden)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise FlatL2OError(f"foreign: {owner}.forward must return (update, hidden) with "
                                   f"hidden_as='argument', got {_describe(out)}")
            return out[0], out[1]
        parts = list(hidden.values()) if isinstance(hidden, Mapping) else list(hidden)
        out = module(x, **hidden) if isinstance(hidden, Mapping) else module(x, *hidden)
        if not isinstance(out, (tuple, list)) or len(out) != 1 + len(parts):
            raise FlatL2OError(f"foreign: {owner}.forward must return (update, <{len(parts)} state values>) with "
                               f"hidden_as='arguments' and {len(parts)} state arguments, got {_describe(out)}")
        if isinstance(hidden, Mapping):
            return out[0], dict(zip(hidden, out[1:]))
        return out[0], list(out[1:])

    def _call_with_attributes(self, x: Tensor, hidden: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        module = self.inner
        saved = {name: getattr(module, name, _MISSING) for name in hidden}
        try:
            for name, value in hidden.items():
                setattr(module, name, value)
            update = module(x)
            missing = [name for name in hidden if not hasattr(module, name)]
            if missing:
                raise FlatL2OError(f"foreign: {type(module).__name__}.forward removed its state attribute(s) "
                                   f"{missing}; foreign.hidden lists {list(hidden)}")
            new = {name: getattr(module, name) for name in hidden}
        finally:
            # What was there before goes back: the module holds no trajectory's state
            # (nor its graph) between calls, so nothing leaks into the next trajectory.
            for name, value in saved.items():
                if value is _MISSING:
                    if name in module.__dict__:
                        delattr(module, name)
                else:
                    setattr(module, name, value)
        return update, new

    # ------------------------------------------------------------------ hidden state

    def _weight_dtype(self, default: torch.dtype) -> torch.dtype:
        for tensor in self.inner.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return default

    def _hidden_from_state(self, state: Mapping[str, Tensor]) -> Any:
        if self.hidden_spec is None:
            return None
        if not self._template_known:
            # A state restored from a checkpoint, with init_state never called: read the
            # container types off a structure built for one coordinate.
            structure = self.hidden_spec(1, torch.device("cpu"), torch.float32)
            _check_structure(structure, self.hidden_as, "init_hidden")
            self._template, self._template_known = template(structure), True
        return unflatten_hidden(self._template, state, HIDDEN_KEY)

    def _hidden_to_state(self, hidden: Any, state: Mapping[str, Tensor], owner: str) -> dict[str, Tensor]:
        if self.hidden_spec is None:
            return {}
        leaves = flatten_hidden(hidden, HIDDEN_KEY, f"{owner}.forward")
        expected = leaf_keys(state)
        if sorted(leaves) != expected:
            raise FlatL2OError(f"foreign: {owner}.forward returned hidden leaves {sorted(leaves)} but "
                               f"foreign.hidden declares {expected}; make the spec mirror what the module returns")
        return leaves


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _check_hidden(hidden: Any, hidden_as: Any) -> None:
    if hidden_as not in _HIDDEN_AS:
        raise ConfigError(f"foreign.hidden_as must be one of {_HIDDEN_AS}, got {hidden_as!r}: 'argument' for "
                          f"forward(x, hidden), 'arguments' for forward(x, hidden, cell, ...), 'attributes' for a "
                          f"module that keeps its state in attributes and is called forward(x)")
    if hidden is None:
        if hidden_as != "argument":
            example = "{hx = ['zeros', 20], cx = ['zeros', 20]}" if hidden_as == "attributes" else \
                "[['zeros', 20], ['zeros', 20]]"
            raise ConfigError(f"foreign.hidden: hidden_as={hidden_as!r} needs the state's spec, e.g. "
                              f"hidden = {example}")
        return
    if callable(hidden):
        return
    check_hidden_spec(hidden, HIDDEN_KEY)
    _check_structure(hidden, hidden_as, None)


def _check_structure(structure: Any, hidden_as: str, source: str | None) -> None:
    """The top level of the state nest must fit how it is passed."""
    where = "foreign.hidden" if source is None else f"foreign: {source}(...)"
    is_leaf = isinstance(structure, Tensor) or is_leaf_spec(structure)
    if hidden_as == "attributes" and not isinstance(structure, Mapping):
        raise ConfigError(f"{where}: hidden_as='attributes' needs a table of the module's state attributes, e.g. "
                          f"{{hx = ['zeros', 20], cx = ['zeros', 20]}}, got {_short(structure)}")
    if hidden_as == "arguments" and (is_leaf or not isinstance(structure, (list, tuple, Mapping))):
        raise ConfigError(f"{where}: hidden_as='arguments' needs one spec per state argument, in a list "
                          f"(positional) or a table (keywords), e.g. [['zeros', 20], ['zeros', 20]] for "
                          f"forward(x, hidden, cell), got {_short(structure)}")


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
