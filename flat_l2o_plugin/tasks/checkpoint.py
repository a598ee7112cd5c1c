"""A trained optimizee on disk: its parameters and the task that gives them meaning.

One safetensors file holds the tensors ``param.0``, ``param.1``, ... in the task's
parameter order, and two metadata strings: ``task`` (a registered task name) and
``task_options`` (the task's keyword options, as JSON). Loading rebuilds the task
through the plugin registry, so a checkpoint written with a third-party task loads
wherever that plugin is installed. safetensors never executes code, unlike a pickle,
so opening a checkpoint from elsewhere is safe.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .._atomic import write_atomically
from ..errors import ConfigError, FlatL2OError
from ..protocols import Task

__all__ = ["CheckpointError", "save_optimizee", "load_optimizee"]

_PARAM_KEY = re.compile(r"param\.(0|[1-9][0-9]*)")


class CheckpointError(ConfigError):
    """An optimizee checkpoint is missing, unreadable, or lacks what loading needs.

    A :class:`~flat_l2o_plugin.errors.ConfigError`, so the command line reports it as a
    usage error (exit code 2); the message names the file.
    """


def save_optimizee(
    path: str | os.PathLike[str], task_name: str, task_options: Mapping[str, Any], params: Sequence[Tensor]
) -> Path:
    """Write an optimizee checkpoint atomically.

    The file is written to a temporary file in the same folder, flushed to disk, then
    renamed over ``path``: a crash or an error leaves either the previous file or the
    new one, never a truncated mix.

    Args:
        path: The file to write (conventionally ``*.safetensors``).
        task_name: The registered task name, e.g. ``"mlp_digits"``.
        task_options: The options ``create_task(task_name, **task_options)`` needs to
            rebuild the task; JSON-serializable (tuples come back as lists).
        params: The parameters, in the task's order.

    Returns:
        The path written.

    Raises:
        CheckpointError: A bad argument (the message names it), or the folder cannot
            be written.

    Example:
        >>> save_optimizee("runs/mlp.safetensors", "mlp_digits", {"hidden_sizes": (20,)}, params)
    """
    path = Path(path)
    if not isinstance(task_name, str) or not task_name:
        raise CheckpointError(f"{path}: task_name must be a non-empty string, got {task_name!r}")
    try:
        options_json = json.dumps(dict(task_options), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: task_options must be JSON-serializable (numbers, strings, lists, dicts): {exc}"
        ) from exc
    tensors = {}
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise CheckpointError(f"{path}: params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        # safetensors refuses views sharing storage and non-contiguous tensors; a fresh
        # contiguous CPU copy of each is always accepted.
        tensors[f"param.{i}"] = p.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if not tensors:
        raise CheckpointError(f"{path}: params is empty; an optimizee has at least one tensor")
    payload = safetensors.torch.save(tensors, metadata={"task": task_name, "task_options": options_json})
    write_atomically(path, payload, CheckpointError)
    return path


def load_optimizee(path: str | os.PathLike[str]) -> tuple[Task, list[Tensor]]:
    """Read an optimizee checkpoint written by :func:`save_optimizee`.

    Args:
        path: The checkpoint file.

    Returns:
        ``(task, params)``: the task rebuilt with ``create_task(name, **options)`` and the
        parameters (CPU tensors, in the saved dtype), checked against the task's shapes.

    Raises:
        CheckpointError: The file is missing, is not a safetensors file, lacks the
            ``task`` / ``task_options`` metadata or a ``param.i`` tensor, names a task no
            loaded plugin registers, or holds tensors the task does not expect. The
            message names the file.
    """
    from .. import create_task  # the package imports this module's package; import late

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"optimizee checkpoint {path} does not exist; write one with save_optimizee()")
    if not path.is_file():
        raise CheckpointError(f"optimizee checkpoint {path} is not a file")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"optimizee checkpoint {path} is not a readable safetensors file ({exc}); "
            f"it may be truncated or of another format: write it again with save_optimizee()"
        ) from exc

    for key in ("task", "task_options"):
        if key not in metadata:
            raise CheckpointError(
                f"optimizee checkpoint {path} has no {key!r} metadata; "
                f"it was not written by save_optimizee(), which records the task to rebuild"
            )
    task_name = metadata["task"]
    try:
        options = json.loads(metadata["task_options"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"optimizee checkpoint {path}: 'task_options' metadata is not valid JSON ({exc})"
        ) from exc
    if not isinstance(options, dict):
        raise CheckpointError(
            f"optimizee checkpoint {path}: 'task_options' metadata must be a JSON object, "
            f"got {type(options).__name__}"
        )

    params = _ordered_params(path, tensors)
    try:
        task = create_task(task_name, **options)
    except FlatL2OError as exc:
        raise CheckpointError(f"optimizee checkpoint {path}: cannot rebuild task {task_name!r}: {exc}") from exc
    expected = [tuple(p.shape) for p in task.init_params(0)]
    found = [tuple(p.shape) for p in params]
    if expected != found:
        raise CheckpointError(
            f"optimizee checkpoint {path}: task {task_name!r} with options {options} expects parameter "
            f"shapes {expected}, the file holds {found}"
        )
    return task, params


def _ordered_params(path: Path, tensors: Mapping[str, Tensor]) -> list[Tensor]:
    unexpected = sorted(key for key in tensors if not _PARAM_KEY.fullmatch(key))
    if unexpected:
        raise CheckpointError(
            f"optimizee checkpoint {path} holds tensors other than 'param.<i>': {unexpected}"
        )
    count = len(tensors)
    missing = [f"param.{i}" for i in range(count) if f"param.{i}" not in tensors]
    if not tensors or missing:
        raise CheckpointError(
            f"optimizee checkpoint {path} must hold param.0 ... param.<n-1>; "
            f"{'it holds no tensor' if not tensors else f'missing {missing}'}"
        )
    return [tensors[f"param.{i}"] for i in range(count)]
