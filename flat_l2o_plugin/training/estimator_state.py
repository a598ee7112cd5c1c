"""Per-trajectory state of the activated flatness estimators, and how it is saved.

Some estimators carry state from one call to the next: the warm-started power
iteration keeps its probe vector, every stochastic estimator its own
``torch.Generator``, and ``weighting="scale_free"`` a running mean of |R|. The state of
one trajectory says nothing about another (the probe is an eigenvector of *that*
optimizee's Hessian), so the trainer keeps one copy per trajectory slot and swaps it in
around that slot's unroll. This also makes a slot's computation independent of the
other slots, which is what lets data-parallel ranks split the meta-batch and still
compute exactly the single-process trajectories, and lets a checkpoint hold the state
exactly.

What counts as state: the plain attributes of the estimator object whose values are
tensors, lists or tuples of tensors, ``torch.Generator``\\s, numbers, strings, booleans or
``None``; and the host's running scale and last raw value of each activated regularizer.
The regularizers managed are all those the facade evaluates (:meth:`FlatL2O.evaluated`):
its own and those of wrappers attached to it, so a term activated by a ``flatness_aware``
wrapper behaves exactly as the same term in the host's config. Attributes of other types
(nested objects, dicts) are shared by all slots and not saved, and so is any state of a
plugin that implements the ``flatness_terms`` hook itself without exposing its
regularizers: such a plugin resumes from its state at construction.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from ..errors import FlatL2OError
from ..host import FlatL2O

__all__ = ["EstimatorSlots"]

_HOST_ATTRIBUTES = ("_scale", "last_raw")
_GOLDEN = 0x9E3779B97F4A7C15  # an odd constant that spreads slot indices over the seed space


def _is_state(value: Any) -> bool:
    if value is None or isinstance(value, (Tensor, torch.Generator, bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, Tensor) for v in value)


def _capture(obj: Any, names: tuple[str, ...] | None) -> dict[str, Any]:
    attributes = getattr(obj, "__dict__", {})
    if names is not None:
        return {n: attributes[n] for n in names if n in attributes}
    return {n: v for n, v in attributes.items() if _is_state(v)}


def _fork_generator(generator: torch.Generator, slot: int) -> torch.Generator:
    # Seeded from the estimator's own seed and the slot alone, so that slot k's stream is
    # the same whichever process runs it.
    seed = (generator.initial_seed() + _GOLDEN * slot) % 2**63
    return torch.Generator(device=generator.device).manual_seed(seed)


class EstimatorSlots:
    """One copy of every activated estimator's state per trajectory slot.

    Args:
        flat: The host facade whose activated regularizers are managed.
        slots: Number of trajectory slots (the meta-batch size).
    """

    def __init__(self, flat: FlatL2O, slots: int) -> None:
        self._flat = flat
        evaluated = flat.evaluated()
        self._managed = {name: id(active) for name, active in evaluated.items()}
        self._targets: dict[str, tuple[Any, tuple[str, ...] | None]] = {}
        for name, active in sorted(evaluated.items()):
            self._targets[f"{name}/host"] = (active, _HOST_ATTRIBUTES)
            self._targets[f"{name}/estimator"] = (active.regularizer, None)
        base = {key: _capture(obj, names) for key, (obj, names) in self._targets.items()}
        # The estimators' options as built (plain scalars other than the ``last_*`` readouts):
        # a checkpoint written with other options must not be resumed into these.
        self.fingerprint = {key: {n: v for n, v in attrs.items() if not n.startswith("last_")
                                  and (v is None or isinstance(v, (bool, int, float, str)))}
                            for key, attrs in base.items()}
        self._states = [{key: {n: _fork_generator(v, slot) if isinstance(v, torch.Generator) else v
                               for n, v in attrs.items()} for key, attrs in base.items()}
                        for slot in range(slots)]

    @property
    def names(self) -> list[str]:
        """The managed objects, ``"<regularizer>/host"`` and ``"<regularizer>/estimator"``."""
        return list(self._targets)

    @contextmanager
    def use(self, slot: int) -> Iterator[None]:
        """Swap slot ``slot``'s state into the estimators for the duration of the block.

        Raises:
            FlatL2OError: The facade evaluates other regularizers than when the slots
                were made (a wrapper attached to it since): their state would be shared
                by all slots and missing from checkpoints.
        """
        now = {name: id(active) for name, active in self._flat.evaluated().items()}
        if now != self._managed:
            added = sorted(set(now) - set(self._managed)) or sorted(now)
            raise FlatL2OError(f"the regularizers {added} were attached to the host after the trainer was built, so "
                               f"their state could not be kept per trajectory; attach wrappers (FlatnessAware.attach) "
                               f"before building the trainer")
        for key, (obj, names) in self._targets.items():
            state = self._states[slot][key]
            for name in set(_capture(obj, names)) - set(state):
                # Created lazily by another slot's calls: this slot has not made it yet.
                delattr(obj, name)
            for name, value in state.items():
                setattr(obj, name, value)
        try:
            yield
        finally:
            self._states[slot] = {key: _capture(obj, names) for key, (obj, names) in self._targets.items()}

    # ------------------------------------------------------------------ checkpoints

    def export(self, slot: int, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Slot ``slot``'s state as tensors (keys under ``prefix``) and JSON-serializable values.

        Generators are saved as their state; tensors are referenced, not copied (the
        estimators replace them rather than write into them).
        """
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {}
        for key, attrs in self._states[slot].items():
            entries = meta[key] = {}
            for name, value in attrs.items():
                tensor_key = f"{prefix}/{key}/{name}"
                if isinstance(value, torch.Generator):
                    tensors[tensor_key] = value.get_state()
                    entries[name] = {"kind": "generator", "device": str(value.device)}
                elif isinstance(value, Tensor):
                    tensors[tensor_key] = value.detach()
                    entries[name] = {"kind": "tensor", "device": str(value.device)}
                elif isinstance(value, (list, tuple)):
                    for i, item in enumerate(value):
                        tensors[f"{tensor_key}/{i}"] = item.detach()
                    entries[name] = {"kind": "tensors", "length": len(value), "tuple": isinstance(value, tuple),
                                     "device": str(value[0].device) if value else "cpu"}
                else:
                    entries[name] = {"kind": "value", "value": value}
        return tensors, meta

    def load(self, slot: int, prefix: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore slot ``slot`` from :meth:`export`'s output.

        Raises:
            KeyError: ``meta`` describes other regularizers than those activated now (the
                caller turns it into an error naming the checkpoint file).
        """
        if sorted(meta) != sorted(self._targets):
            raise KeyError(f"the checkpoint holds estimator state for {sorted(meta)}, this run activates "
                           f"{sorted(self._targets)}")
        state: dict[str, dict[str, Any]] = {}
        for key, entries in meta.items():
            attrs = state[key] = {}
            for name, entry in entries.items():
                tensor_key, kind = f"{prefix}/{key}/{name}", entry["kind"]
                if kind == "generator":
                    generator = torch.Generator(device=entry["device"])
                    generator.set_state(tensors[tensor_key])
                    attrs[name] = generator
                elif kind == "tensor":
                    attrs[name] = tensors[tensor_key].to(entry["device"])
                elif kind == "tensors":
                    items = [tensors[f"{tensor_key}/{i}"].to(entry["device"]) for i in range(entry["length"])]
                    attrs[name] = tuple(items) if entry["tuple"] else items
                else:
                    attrs[name] = entry["value"]
        self._states[slot] = state
