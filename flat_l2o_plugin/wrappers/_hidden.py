"""The recurrent state of a foreign module: its spec, how it is built, and how it is stored flat.

A spec is a nest of lists, tuples and string-keyed tables whose leaves are
``["zeros", *shape]`` (``"N"`` marks the coordinate axis; without it the shape is
``(N, *shape)``). The optimizer state holds one tensor per leaf under a key built from
the leaf's position (``hidden.0.1``, ``hidden.cx.0``), so it saves like any other state;
a *template* (the containers without the tensors) rebuilds the nest for each call.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError, FlatL2OError

__all__ = ["HIDDEN_KEY", "build_hidden", "check_hidden_spec", "flatten_hidden", "is_leaf_spec", "leaf_keys",
           "template", "unflatten_hidden"]

HIDDEN_KEY = "hidden"
"""The prefix of every recurrent-state key in the optimizer state."""


def is_leaf_spec(spec: Any) -> bool:
    """Whether ``spec`` is one ``["zeros", *shape]`` leaf (rather than a container of specs)."""
    return isinstance(spec, (list, tuple)) and len(spec) > 0 and isinstance(spec[0], str)


def check_hidden_spec(spec: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming ``foreign.<where>`` for a malformed spec."""
    field = f"foreign.{where}"
    if is_leaf_spec(spec):
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
    if isinstance(spec, Mapping) and spec:
        for key, child in spec.items():
            _check_name(key, field)
            check_hidden_spec(child, f"{where}.{key}")
        return
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"{field}: expected ['zeros', *shape], or a non-empty list or table of those, "
                          f"got {spec!r}")
    for index, child in enumerate(spec):
        check_hidden_spec(child, f"{where}.{index}")


def _check_name(key: Any, field: str) -> None:
    if not isinstance(key, str) or not key.isidentifier():
        raise ConfigError(f"{field}: table keys name arguments or attributes and must be identifiers, got {key!r}")


def build_hidden(spec: Any, num: int, device: torch.device, dtype: torch.dtype) -> Any:
    """The initial state a spec describes, for ``num`` coordinates."""
    if is_leaf_spec(spec):
        dims = list(spec[1:])
        shape = [num if d == "N" else d for d in dims] if "N" in dims else [num, *dims]
        return torch.zeros(shape, device=device, dtype=dtype)
    if isinstance(spec, Mapping):
        return {key: build_hidden(child, num, device, dtype) for key, child in spec.items()}
    return type(spec)([build_hidden(child, num, device, dtype) for child in spec])


def flatten_hidden(structure: Any, key: str, source: str) -> dict[str, Tensor]:
    """``{key.path: tensor}`` for every leaf of a state nest."""
    if isinstance(structure, Tensor):
        return {key: structure}
    if isinstance(structure, Mapping) and structure:
        leaves: dict[str, Tensor] = {}
        for name, child in structure.items():
            if not isinstance(name, str) or "." in name:
                raise FlatL2OError(f"foreign: {source} gave the table key {name!r} at {key!r} in the hidden state; "
                                   f"keys must be strings without dots")
            leaves.update(flatten_hidden(child, f"{key}.{name}", source))
        return leaves
    if isinstance(structure, (tuple, list)) and structure:
        leaves = {}
        for index, child in enumerate(structure):
            leaves.update(flatten_hidden(child, f"{key}.{index}", source))
        return leaves
    raise FlatL2OError(f"foreign: {source} gave {type(structure).__name__} at {key!r} in the hidden state; "
                       f"the adapter stores tensors nested in tuples, lists or dicts")


def leaf_keys(state: Mapping[str, Any]) -> list[str]:
    """The recurrent-state keys of an optimizer state, sorted."""
    return sorted(k for k in state if k == HIDDEN_KEY or k.startswith(HIDDEN_KEY + "."))


def template(structure: Any) -> Any:
    """The container skeleton of a state nest or spec: a type per level, ``None`` per leaf."""
    if isinstance(structure, Tensor) or is_leaf_spec(structure):
        return None
    if isinstance(structure, Mapping):
        return (type(structure), {key: template(child) for key, child in structure.items()})
    return (type(structure), [template(child) for child in structure])


def unflatten_hidden(skeleton: Any, state: Mapping[str, Tensor], key: str) -> Any:
    """The nest :func:`flatten_hidden` stored under ``key``, rebuilt on ``skeleton``."""
    if skeleton is None:
        if key not in state:
            raise FlatL2OError(f"ForeignAdapter.step(): state has no {key!r}; build it with init_state(params)")
        return state[key]
    container, children = skeleton
    if isinstance(children, dict):
        items = {name: unflatten_hidden(child, state, f"{key}.{name}") for name, child in children.items()}
        return items if container is dict else container(items)
    values = [unflatten_hidden(child, state, f"{key}.{index}") for index, child in enumerate(children)]
    if hasattr(container, "_fields"):  # a namedtuple takes its fields positionally
        return container(*values)
    return container(values)
