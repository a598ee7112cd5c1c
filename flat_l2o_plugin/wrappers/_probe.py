"""Checks a foreign module against its adapter's spec when the adapter is built.

Two checks, so that a wrong spec fails with the setting that fits instead of a raw
torch error mid-training:

1. ``forward``'s signature must take the state the way ``hidden_as`` passes it.
2. One adapter step on a three-coordinate probe batch must succeed and return state of
   the declared shapes. When it fails, other feature widths and layouts are tried, to
   name the ``inputs`` / ``input_layout`` that would work.

The probe step's graph also shows which weights ``forward`` used: a leaf tensor that
requires grad and is not in ``parameters()`` is a weight that would be meta-trained in
no optimizer and saved in no checkpoint, and is reported with a warning.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError, FlatL2OError, UnregisteredParametersWarning
from ._hidden import leaf_keys

if TYPE_CHECKING:
    from .foreign import ForeignAdapter

__all__ = ["check_module"]

_PROBE_SIZE = 3
_WIDTHS_TRIED = range(1, 9)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def check_module(adapter: ForeignAdapter) -> None:
    """Raise :class:`ConfigError` if ``adapter.inner`` does not fit the spec; warn about unlisted weights."""
    module = adapter.inner
    owner = type(module).__name__
    device, dtype = _placement(module)
    params = [torch.linspace(-0.5, 0.5, _PROBE_SIZE, device=device, dtype=dtype)]
    grads = [torch.tensor([0.1, -0.003, 1e-6], device=device, dtype=dtype)]
    with _untouched(module, device):
        try:
            state = adapter.init_state(params)
        except FlatL2OError as exc:
            raise ConfigError(f"foreign.hidden: {exc}") from exc
        _check_signature(adapter, state)
        with torch.enable_grad():
            try:
                new_params, new_state = adapter.step(params, grads, state)
            except FlatL2OError as exc:
                if exc.__cause__ is None:  # the module ran, and returned the wrong form
                    raise ConfigError(str(exc)) from exc
                raise ConfigError(_diagnose(adapter, state, exc.__cause__)) from exc.__cause__
        for key in leaf_keys(state):
            if new_state[key].shape != state[key].shape:
                raise ConfigError(f"foreign.hidden: {owner}.forward returned {key!r} of shape "
                                  f"{tuple(new_state[key].shape)} for {_PROBE_SIZE} coordinates, but the spec builds "
                                  f"{tuple(state[key].shape)}; make the spec's shape match what the module returns")
        outputs = [*new_params, *(new_state[k] for k in leaf_keys(new_state))]
        _warn_unlisted(module, outputs)


# ---------------------------------------------------------------------- placement and isolation


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@contextlib.contextmanager
def _untouched(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Random state and buffers (BatchNorm statistics, counters) as they were before the probe."""
    buffers = [(owner, name, buf, buf.detach().clone()) for owner in module.modules()
               for name, buf in owner._buffers.items() if buf is not None]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for owner, name, buf, saved in buffers:
                owner._buffers[name] = buf
                buf.copy_(saved)


# ---------------------------------------------------------------------- the signature


def _check_signature(adapter: ForeignAdapter, state: dict[str, Tensor]) -> None:
    module = adapter.inner
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # C or wrapped callables: the probe step decides
        return
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    varkw = any(p.kind is p.VAR_KEYWORD for p in params)
    hidden = adapter._hidden_from_state(state)
    stateless = adapter.hidden_spec is None or adapter.hidden_as == "attributes"
    if stateless:
        passed, keywords = 1, []
    elif adapter.hidden_as == "argument":
        passed, keywords = 2, []
    elif isinstance(hidden, dict):
        passed, keywords = 1, list(hidden)
    else:
        passed, keywords = 1 + len(hidden), []
    forward = f"{type(module).__name__}.forward({', '.join(str(p) for p in params)})"
    fits = len(required) <= passed and (passed <= len(positional) or varargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    taken = {p.name for p in positional[:passed]}
    unknown = [k for k in keywords if (k not in names and not varkw) or k in taken]
    missing_kw = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty
                  and p.name not in keywords]
    if fits and not unknown and not missing_kw:
        return
    if unknown:
        choices = [p.name for p in positional[1:]] + [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        close = difflib.get_close_matches(unknown[0], choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"foreign.hidden: {forward} has no argument {unknown[0]!r}{hint}; with hidden_as="
                          f"'arguments' the table's keys are the names of forward's state arguments")
    if missing_kw:
        raise ConfigError(f"foreign.hidden: {forward} requires the keyword argument(s) {missing_kw}, which the "
                          f"adapter does not pass; list them in foreign.hidden with hidden_as='arguments'")
    state_args = [p.name for p in positional[1:]] if not varargs else None
    raise ConfigError(_signature_advice(adapter, forward, state_args, passed))


def _signature_advice(adapter: ForeignAdapter, forward: str, state_args: list[str] | None, passed: int) -> str:
    spec, how = adapter.hidden_spec, adapter.hidden_as
    count = 0 if state_args is None else len(state_args)
    if count == 0:
        candidates = _state_attribute_candidates(adapter.inner)
        named = f" (it has {', '.join(candidates)})" if candidates else ""
        return (f"foreign.hidden_as: {forward} takes no state argument, but hidden_as={how!r} passes the state as "
                f"{passed - 1} argument(s). If the module keeps its recurrent state in attributes{named}, set "
                f"hidden_as = 'attributes' and hidden = {{<attribute> = <spec>, ...}}; if it keeps none, set "
                f"hidden = None")
    names = ", ".join(state_args)
    if spec is None:
        return (f"foreign.hidden: {forward} takes its state as {count} argument(s) ({names}) but foreign.hidden is "
                f"None; declare the state's spec (hidden_as = 'argument' for one argument, 'arguments' for several)")
    if how == "attributes":
        return (f"foreign.hidden_as: {forward} takes its state as {count} argument(s) ({names}), not in attributes; "
                f"set hidden_as = '{'argument' if count == 1 else 'arguments'}'")
    if how == "argument":
        return (f"foreign.hidden_as: {forward} takes its state as {count} arguments ({names}) but hidden_as="
                f"'argument' passes one; set hidden_as = 'arguments' and list one spec per argument in "
                f"foreign.hidden, in order")
    listed = passed - 1
    advice = " (or hidden_as = 'argument' to pass the whole nest as one)" if count == 1 else ""
    return (f"foreign.hidden: {forward} takes {count} state argument(s) ({names}) but foreign.hidden lists "
            f"{listed}; list one spec per argument, in order{advice}")


def _state_attribute_candidates(module: nn.Module) -> list[str]:
    """Public attributes that look like recurrent state: None, tensors, or lists of tensors."""
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or name in _MODULE_INTERNALS or name == "training":
            continue
        if value is None or isinstance(value, Tensor) or (
                isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value)):
            found.append(name)
    return found


# ---------------------------------------------------------------------- a failing probe step


def _diagnose(adapter: ForeignAdapter, state: dict[str, Tensor], error: BaseException) -> str:
    module = adapter.inner
    owner = type(module).__name__
    width = adapter.num_features
    shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in leaf_keys(state)) or "none"
    head = (f"{owner}.forward fails on the adapter's {_PROBE_SIZE}-coordinate probe batch "
            f"({type(error).__name__}: {error}); it was passed features of width F={width} "
            f"(inputs={list(adapter.inputs)}, input_layout={adapter.input_layout!r}) and state leaves {shapes} "
            f"(hidden_as={adapter.hidden_as!r})")
    fit = _fitting_layout(adapter, state)
    if fit is None:
        return f"foreign: {head}; check foreign.hidden's shapes against the module"
    fit_width, fit_layout = fit
    advice = []
    if fit_width != width:
        advice.append(f"foreign.inputs: the module takes {fit_width} feature(s) per coordinate but inputs="
                      f"{list(adapter.inputs)} gives {width}; choose inputs of total width {fit_width} (grad 1, "
                      f"log_sign 2, adam 2, param 1): a module that preprocesses its own gradient takes "
                      f"inputs = ['grad']")
    if fit_layout != adapter.input_layout:
        advice.append(f"foreign.input_layout: the module takes features as "
                      f"{'(1, N, F)' if fit_layout == '1NF' else '(N, F)'}; set input_layout = {fit_layout!r}")
    return f"{'; '.join(advice)}. ({head})"


def _fitting_layout(adapter: ForeignAdapter, state: dict[str, Tensor]) -> tuple[int, str] | None:
    """The (width, layout) closest to the adapter's on which the module runs, if any."""
    layouts = [adapter.input_layout] + [lay for lay in ("NF", "1NF") if lay != adapter.input_layout]
    widths = sorted(_WIDTHS_TRIED, key=lambda w: abs(w - adapter.num_features))
    device, dtype = _placement(adapter.inner)
    for layout_ in layouts:
        for width in widths:
            x = torch.linspace(-1.0, 1.0, _PROBE_SIZE * width, device=device, dtype=dtype).reshape(_PROBE_SIZE, width)
            if layout_ == "1NF":
                x = x.unsqueeze(0)
            try:
                with torch.no_grad():
                    update, _ = adapter.call_module(x, adapter._hidden_from_state(state))
            except Exception:  # noqa: BLE001 - any failure means "not this layout"
                continue
            if isinstance(update, Tensor) and update.numel() == _PROBE_SIZE:
                return width, layout_
    return None


# ---------------------------------------------------------------------- weights forward uses


def _warn_unlisted(module: nn.Module, outputs: list[Tensor]) -> None:
    listed = {id(p) for p in module.parameters()}
    unlisted = [leaf for leaf in _graph_leaves(outputs) if id(leaf) not in listed]
    if not unlisted:
        return
    names = _locate(module, {id(t) for t in unlisted})
    shown = sorted(names.get(id(t), f"a tensor of shape {tuple(t.shape)}") for t in unlisted)
    listing = ", ".join(shown[:6]) + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")
    owner = type(module).__name__
    warnings.warn(f"foreign: {owner}.forward uses {len(unlisted)} weight tensor(s) that {owner}.parameters() does "
                  f"not list ({listing}): they receive meta-gradients but are never trained or saved. Register "
                  f"them in the module: nn.ModuleList instead of a Python list of modules, nn.Parameter instead of "
                  f"a plain tensor", UnregisteredParametersWarning, stacklevel=4)


def _graph_leaves(outputs: list[Tensor]) -> list[Tensor]:
    """The leaf tensors that require grad in the autograd graph of ``outputs``, in order of discovery."""
    seen: set[Any] = set()
    leaves: dict[int, Tensor] = {}
    stack = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(child for child, _ in node.next_functions)
    return list(leaves.values())


def _locate(module: nn.Module, wanted: set[int]) -> dict[int, str]:
    """Attribute paths (``lstms[0].weight_ih``) of the wanted tensors, where the module holds them."""
    found: dict[int, str] = {}

    def visit(value: Any, path: str, depth: int) -> None:
        if depth > 3:
            return
        if isinstance(value, Tensor):
            if id(value) in wanted:
                found.setdefault(id(value), path)
        elif isinstance(value, nn.Module):
            for name, tensor in value.named_parameters():
                if id(tensor) in wanted:
                    found.setdefault(id(tensor), f"{path}.{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]", depth + 1)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]", depth + 1)

    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name not in _MODULE_INTERNALS:
                visit(value, f"{prefix}.{name}" if prefix else name, 0)
    return found
