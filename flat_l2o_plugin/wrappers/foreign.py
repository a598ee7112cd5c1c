"""The foreign adapter: a user's ``forward(grad, hidden) -> (update, hidden)`` module as a learned optimizer.

Public PyTorch re-implementations of L2O-DM and its relatives mostly share one shape:
an ``nn.Module`` whose ``forward`` takes per-coordinate gradient features and a
recurrent state, and returns an update and the next state. They differ in the details
the adapter is configured with, by a small spec rather than by subclassing:

``inputs``
    The features, concatenated along the last axis into an ``(N, F)`` batch:
    ``"grad"`` (the raw gradient, 1 feature), ``"log_sign"`` (the log/sign
    preprocessing of Andrychowicz et al. with ``p``, 2 features) and ``"adam"``
    (RNNProp's m̂/√v̂ and g/√v̂ with ``beta1``, ``beta2``, ``eps``, 2 features).
``input_layout``
    ``"NF"`` passes ``(N, F)`` (``nn.LSTMCell`` stacks); ``"1NF"`` passes
    ``(1, N, F)``, a length-1 sequence for ``nn.LSTM``-based modules.
``hidden``
    How to build the initial recurrent state. A nested list of leaves; a leaf is
    ``["zeros", *shape]``, where the string ``"N"`` marks the coordinate axis (when
    absent, the shape is ``(N, *shape)``). Lists nest as the module expects::

        [["zeros", 20], ["zeros", 20]]                            # (h, c) of one LSTMCell
        [[["zeros", 20], ["zeros", 20]], [["zeros", 20], ["zeros", 20]]]  # two LSTMCells
        [["zeros", 2, "N", 20], ["zeros", 2, "N", 20]]            # nn.LSTM, 2 layers
        ["zeros", 20]                                             # one tensor (a GRU)

    Tuples given in Python stay tuples. Or a callable ``init_hidden(n, device, dtype)``
    returning the structure. ``None``: the module keeps no state (it is called with
    ``None`` and must return ``None``).
``output_scale`` and ``update``
    θ ← θ + output_scale · update (``"add"``, the zoo's convention) or
    θ ← θ − output_scale · update (``"subtract"``, modules that return a descent step).

The recurrent state is stored flat in the optimizer state, one tensor per leaf under
keys built from the leaf's position (``hidden.0.1`` is the second tensor of the first
pair), so it can be saved like any other state; the structure is rebuilt for each call.
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
from .stack import TransparentWrapper

__all__ = ["ForeignAdapter", "HiddenSpec"]

HiddenSpec = Sequence[Any] | Callable[[int, torch.device, torch.dtype], Any] | None
"""A nested list of ``["zeros", *shape]`` leaves, a callable ``init_hidden(n, device, dtype)``, or ``None``."""

_INPUT_WIDTHS = {"grad": 1, "log_sign": 2, "adam": 2}
_LAYOUTS = ("NF", "1NF")
_UPDATES = ("add", "subtract")
_HIDDEN_KEY = "hidden"


class ForeignAdapter(TransparentWrapper):
    """A user's gradient-to-update ``nn.Module``, adapted to the learned-optimizer protocol.

    The module's code is untouched and the adapter is transparent as a module: its
    ``state_dict()`` keys are the module's, so the user's pretrained weights load as is.

    Example (an ``nn.LSTM``-based optimizer as found in public re-implementations)::

        class LSTMOptimizer(nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = nn.LSTM(2, 20, num_layers=2)
                self.out = nn.Linear(20, 1)

            def forward(self, x, hidden):          # x: (1, N, 2)
                y, hidden = self.lstm(x, hidden)
                return self.out(y), hidden

        optimizer = ForeignAdapter(LSTMOptimizer(), inputs=["log_sign"], input_layout="1NF",
                                   hidden=[["zeros", 2, "N", 20], ["zeros", 2, "N", 20]],
                                   output_scale=0.1)

    State: ``"step"`` (int64 scalar, steps taken), ``"exp_avg"`` / ``"exp_avg_sq"``
    (``(N,)`` moments, params dtype; only with ``"adam"`` inputs), and one
    ``"hidden[.i[.j...]]"`` tensor per leaf of the recurrent state.

    Args:
        module: The user's module, ``forward(features, hidden) -> (update, hidden)``;
            ``update`` may have any shape with N elements.
        inputs: Feature names, in order (a single name is accepted).
        hidden: The recurrent state's spec (see the module docstring).
        input_layout: ``"NF"`` or ``"1NF"``.
        output_scale: Multiplier of the module's output.
        update: ``"add"`` or ``"subtract"``.
        p: p of the ``"log_sign"`` preprocessing (Andrychowicz et al. use 10).
        beta1: First-moment decay of the ``"adam"`` features.
        beta2: Second-moment decay of the ``"adam"`` features.
        eps: Added to √v̂ in the ``"adam"`` features.

    Raises:
        ConfigError: A spec field is malformed; the message names it (``foreign.<field>``).
    """

    def __init__(self, module: nn.Module, *, inputs: str | Sequence[str] = ("grad",), hidden: HiddenSpec = None,
                 input_layout: str = "NF", output_scale: float = 1.0, update: str = "add",
                 p: float = 10.0, beta1: float = 0.95, beta2: float = 0.95, eps: float = 1e-8) -> None:
        super().__init__(module)
        names = [inputs] if isinstance(inputs, str) else list(inputs) if isinstance(inputs, Sequence) else None
        if not names:
            raise ConfigError(f"foreign.inputs must be a non-empty list drawn from {sorted(_INPUT_WIDTHS)}, "
                              f"got {inputs!r}")
        for index, name in enumerate(names):
            if name not in _INPUT_WIDTHS:
                raise ConfigError(f"foreign.inputs[{index}]: unknown input {name!r}; choose from "
                                  f"{', '.join(sorted(_INPUT_WIDTHS))}")
            if name in names[:index]:
                raise ConfigError(f"foreign.inputs[{index}]: {name!r} is listed twice; list each input once")
        if input_layout not in _LAYOUTS:
            raise ConfigError(f"foreign.input_layout must be one of {_LAYOUTS}, got {input_layout!r}")
        if update not in _UPDATES:
            raise ConfigError(f"foreign.update must be 'add' (θ + scale·out) or 'subtract' (θ - scale·out), "
                              f"got {update!r}")
        for field, value, low in (("output_scale", output_scale, 0.0), ("p", p, 0.0), ("eps", eps, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= low:
                raise ConfigError(f"foreign.{field} must be a finite number > {low:g}, got {value!r}")
        for field, value in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"foreign.{field} must lie in [0, 1), got {value!r}")
        if hidden is not None and not callable(hidden):
            _check_hidden_spec(hidden, _HIDDEN_KEY)
        self.inputs = tuple(names)
        self.hidden_spec = hidden
        # The container types (tuple or list, per level) the module gets its hidden
        # state in; the optimizer state itself stays flat and saveable. A callable spec
        # reveals them when init_state first calls it.
        self._template = None if hidden is None or callable(hidden) else _template(hidden)
        self._template_known = not callable(hidden)
        self.input_layout = input_layout
        self.output_scale = float(output_scale)
        self.update = update
        self.p, self.beta1, self.beta2, self.eps = float(p), float(beta1), float(beta2), float(eps)

    @property
    def num_features(self) -> int:
        """F, the width of the feature batch the module receives."""
        return sum(_INPUT_WIDTHS[name] for name in self.inputs)

    def extra_repr(self) -> str:
        return (f"{type(self.inner).__name__}, inputs={list(self.inputs)}, layout={self.input_layout}, "
                f"output_scale={self.output_scale:g}, update={self.update}")

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
        else:
            structure = _build_hidden(self.hidden_spec, num, device, weight_dtype)
        state.update(_flatten_hidden(structure, _HIDDEN_KEY, "init_hidden"))
        if callable(self.hidden_spec):
            self._template, self._template_known = _template(structure), True
        return state

    def step(self, params: Params, grads: Params,
             state: Mapping[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step of the user's module on all coordinates at once.

        Differentiable in the module's weights; ``state`` is not modified.

        Raises:
            FlatL2OError: The module's forward failed or returned something other than
                ``(update, hidden)`` with N update elements and the declared hidden leaves;
                the message names the module, the features passed and the spec field.
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
                features.append(log_sign_preprocess(grad, self.p))
            else:
                adam, new_state["exp_avg"], new_state["exp_avg_sq"] = adam_features(
                    grad, state["exp_avg"], state["exp_avg_sq"], step,
                    beta1=self.beta1, beta2=self.beta2, eps=self.eps)
                features.append(adam)
        x = torch.cat(features, dim=-1).to(self._weight_dtype(theta.dtype))
        if self.input_layout == "1NF":
            x = x.unsqueeze(0)
        hidden = self._hidden_from_state(state)
        try:
            out = self.inner(x, hidden)
        except Exception as exc:
            raise FlatL2OError(
                f"foreign: {owner}.forward(features, hidden) raised {type(exc).__name__}: {exc}. The adapter "
                f"passed features of shape {tuple(x.shape)} (inputs={list(self.inputs)}, F={self.num_features}, "
                f"input_layout={self.input_layout!r}); check foreign.inputs, foreign.input_layout and "
                f"foreign.hidden against the module"
            ) from exc
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise FlatL2OError(f"foreign: {owner}.forward must return (update, hidden), got {type(out).__name__}; "
                               f"the adapter supports modules of the form forward(grad, hidden) -> (update, hidden)")
        update, new_hidden = out
        if not isinstance(update, Tensor) or update.numel() != theta.numel():
            shape = tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__
            raise FlatL2OError(f"foreign: {owner}.forward returned an update of shape {shape} for "
                               f"{theta.numel()} coordinates; it must have one element per coordinate")
        new_state.update(self._hidden_to_state(new_hidden, state, owner))
        delta = (self.output_scale * update.reshape(-1)).to(theta.dtype)
        new_theta = theta + delta if self.update == "add" else theta - delta
        return unflatten(new_theta, params), new_state

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
            self._template, self._template_known = _template(structure), True
        return _unflatten_hidden(self._template, state, _HIDDEN_KEY)

    def _hidden_to_state(self, hidden: Any, state: Mapping[str, Tensor], owner: str) -> dict[str, Tensor]:
        if self.hidden_spec is None:
            if hidden is not None:
                raise FlatL2OError(f"foreign: {owner}.forward returned a hidden state but foreign.hidden is "
                                   f"None; declare its shape, e.g. hidden=[['zeros', 20], ['zeros', 20]]")
            return {}
        leaves = _flatten_hidden(hidden, _HIDDEN_KEY, f"{owner}.forward")
        expected = sorted(k for k in state if k == _HIDDEN_KEY or k.startswith(_HIDDEN_KEY + "."))
        if sorted(leaves) != expected:
            raise FlatL2OError(f"foreign: {owner}.forward returned hidden leaves {sorted(leaves)} but "
                               f"foreign.hidden declares {expected}; make the spec mirror what the module returns")
        return leaves


def _is_leaf_spec(spec: Any) -> bool:
    return isinstance(spec, (list, tuple)) and len(spec) > 0 and isinstance(spec[0], str)


def _check_hidden_spec(spec: Any, where: str) -> None:
    field = f"foreign.{where}"
    if _is_leaf_spec(spec):
        kind, *dims = spec
        if kind != "zeros":
            raise ConfigError(f"{field}: unknown initialiser {kind!r}; use ['zeros', *shape] or pass a callable "
                              f"init_hidden(n, device, dtype)")
        if not dims:
            raise ConfigError(f"{field}: ['zeros'] needs a shape, e.g. ['zeros', 20] for (N, 20)")
        if sum(d == "N" for d in dims) > 1:
            raise ConfigError(f"{field}: 'N' (the coordinate axis) may appear once, got {list(spec)}")
        for d in dims:
            if d != "N" and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
                raise ConfigError(f"{field}: dimensions are integers >= 1 or 'N', got {d!r} in {list(spec)}")
        return
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"{field}: expected ['zeros', *shape] or a non-empty list of those, got {spec!r}")
    for index, child in enumerate(spec):
        _check_hidden_spec(child, f"{where}.{index}")


def _build_hidden(spec: Any, num: int, device: torch.device, dtype: torch.dtype) -> Any:
    if _is_leaf_spec(spec):
        dims = list(spec[1:])
        shape = [num if d == "N" else d for d in dims] if "N" in dims else [num, *dims]
        return torch.zeros(shape, device=device, dtype=dtype)
    return type(spec)([_build_hidden(child, num, device, dtype) for child in spec])


def _flatten_hidden(structure: Any, key: str, source: str) -> dict[str, Tensor]:
    if isinstance(structure, Tensor):
        return {key: structure}
    if isinstance(structure, (tuple, list)) and structure:
        leaves: dict[str, Tensor] = {}
        for index, child in enumerate(structure):
            leaves.update(_flatten_hidden(child, f"{key}.{index}", source))
        return leaves
    raise FlatL2OError(f"foreign: {source} gave {type(structure).__name__} at {key!r} in the hidden state; "
                       f"the adapter stores tensors nested in tuples or lists")


def _template(structure: Any) -> Any:
    """The container skeleton of a hidden structure or spec: a type per level, ``None`` per leaf."""
    if isinstance(structure, Tensor) or _is_leaf_spec(structure):
        return None
    return (type(structure), [_template(child) for child in structure])


def _unflatten_hidden(template: Any, state: Mapping[str, Tensor], key: str) -> Any:
    if template is None:
        if key not in state:
            raise FlatL2OError(f"ForeignAdapter.step(): state has no {key!r}; build it with init_state(params)")
        return state[key]
    container, children = template
    items = [_unflatten_hidden(child, state, f"{key}.{index}") for index, child in enumerate(children)]
    if hasattr(container, "_fields"):  # a namedtuple takes its fields positionally
        return container(*items)
    return container(items)
