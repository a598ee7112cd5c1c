"""Flatten a parameter list into one coordinate vector and split it back.

Every coordinatewise learned optimizer in the zoo runs its network once on a batch of
all N coordinates, so that a step costs a handful of kernel launches whatever the number
of tensors. These helpers are the only place where the per-tensor structure is touched.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import FlatL2OError

__all__ = ["flatten", "unflatten", "layout", "check_state"]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors of any shapes into one 1-D vector.

    The result is a new tensor (``torch.cat`` copies) and keeps the autograd graph of
    every input, so iterates that depend on the optimizer's weights stay differentiable.

    Args:
        tensors: One or more tensors on the same device.

    Returns:
        A vector of ``sum(t.numel() for t in tensors)`` coordinates, in the order given.
        Mixed floating dtypes are promoted as by ``torch.cat``.

    Raises:
        FlatL2OError: If ``tensors`` is empty.
    """
    if len(tensors) == 0:
        raise FlatL2OError(
            "flatten() got no tensors; a learned optimizer needs at least one parameter tensor"
        )
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a coordinate vector back into tensors shaped and typed like ``like``.

    Inverse of :func:`flatten`. The pieces are views of ``vector`` (``split`` then
    ``view_as``) unless a piece has to be cast to its template's dtype.

    Args:
        vector: A 1-D tensor with exactly ``sum(t.numel() for t in like)`` elements.
        like: The templates whose shapes and dtypes the pieces take.

    Returns:
        One tensor per template, in order.

    Raises:
        FlatL2OError: If the sizes do not match.
    """
    sizes = [t.numel() for t in like]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise FlatL2OError(
            f"unflatten() got a vector of shape {tuple(vector.shape)} for tensors with "
            f"{sum(sizes)} coordinates in all; pass the vector that flatten() built from them"
        )
    pieces = vector.split(sizes)
    # `.to` is a no-op (same object) when the dtype already matches, so the common
    # single-dtype case stays a set of views.
    return [piece.view_as(t).to(t.dtype) for piece, t in zip(pieces, like)]


def layout(tensors: Sequence[Tensor]) -> tuple[int, torch.dtype, torch.device]:
    """What :func:`flatten` would produce, without copying anything.

    Args:
        tensors: One or more tensors on the same device.

    Returns:
        ``(N, dtype, device)``: the total number of coordinates, the promoted dtype and
        the device of the flat vector.

    Raises:
        FlatL2OError: If ``tensors`` is empty.
    """
    if len(tensors) == 0:
        raise FlatL2OError(
            "layout() got no tensors; a learned optimizer needs at least one parameter tensor"
        )
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return sum(t.numel() for t in tensors), dtype, tensors[0].device


def check_state(
    state: Mapping[str, Tensor],
    keys: Iterable[str],
    num_coordinates: int,
    owner: str,
) -> None:
    """Check that ``state`` has ``keys`` and per-coordinate tensors of the right length.

    Only shapes are read, so the check never synchronises with an accelerator.

    Args:
        state: The state dict handed to ``step``.
        keys: Keys that must be present. Every one except ``"step"`` must have a
            leading dimension of ``num_coordinates``.
        num_coordinates: N, the number of coordinates of the params given to ``step``.
        owner: The optimizer's class name, for the error message.

    Raises:
        FlatL2OError: Naming the missing key or mismatched shape and the fix.
    """
    for key in keys:
        if key not in state:
            raise FlatL2OError(
                f"{owner}.step(): state has no {key!r} (keys: {sorted(state)}); "
                f"build it with {owner}.init_state(params)"
            )
        if key == "step":
            continue
        value = state[key]
        if value.dim() == 0 or value.shape[0] != num_coordinates:
            raise FlatL2OError(
                f"{owner}.step(): state[{key!r}] has shape {tuple(value.shape)} but the "
                f"params have {num_coordinates} coordinates; the state belongs to other "
                f"params, so call {owner}.init_state(params) for these"
            )
