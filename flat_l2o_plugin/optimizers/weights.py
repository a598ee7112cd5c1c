"""A meta-trained learned optimizer on disk: its weights and how to rebuild it.

One safetensors file per learned optimizer. The tensors are the module's
``state_dict()`` under its own keys (``input_layer.weight``, ``cells.0.weight_ih``,
...). The file's metadata holds one entry, ``flat_l2o_plugin.learned_optimizer``, a
JSON object::

    {"format_version": 1,
     "optimizer": "rnnprop",                      # the registered name
     "options": {"hidden_size": 20, ...},         # keyword options of the factory
     "package_version": "0.1.0",                  # flat-l2o-plugin that wrote it
     "tensors_sha256": "9f86d0..."}               # digest of the tensors (see below)

Config and weights live in one file, so a single atomic rename publishes both: there is
never a moment at which a reader could see new weights next to an old config. Loading
rebuilds the module through the plugin registry (``OptimizerInfo.create(**options)``),
so a file written with a third-party learned optimizer loads wherever that plugin is
installed, and safetensors never executes code, unlike a pickle.

``tensors_sha256`` is the SHA-256 of every tensor, in sorted key order, each as its
key, dtype and shape (``"key\\0torch.float32\\0(20, 2)\\0"`` in UTF-8) followed by its
bytes in C order, little-endian, as stored. Loading recomputes it and refuses a file
whose tensors changed since it was written (a flipped bit, a truncated copy that still
parses). Files written before the digest existed carry none and load unchecked, as they
always did; saving one again adds it.

``options`` are recorded complete: the options given to :func:`save_learned_optimizer`
on top of the registry's defaults and the factory's own keyword defaults. A file
therefore rebuilds the same network after a later release changes a default (the
output scale of L2O-DM, say), instead of silently loading the weights into a different
model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .._atomic import write_atomically
from ..errors import ConfigError, FlatL2OError, UnknownComponentError

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "WeightsError",
    "load_learned_optimizer",
    "load_learned_optimizer_bytes",
    "read_learned_optimizer_config",
    "read_learned_optimizer_config_bytes",
    "save_learned_optimizer",
    "tensors_digest",
]

FORMAT_VERSION = 1
"""Version of the on-disk layout described in the module docstring."""

METADATA_KEY = "flat_l2o_plugin.learned_optimizer"
"""The safetensors metadata entry holding the JSON config."""

_CONFIG_FIELDS = ("format_version", "optimizer", "options", "package_version")
_DIGEST_FIELD = "tensors_sha256"


class WeightsError(ConfigError):
    """A learned-optimizer weights file is missing, unreadable, or does not fit its config.

    A :class:`~flat_l2o_plugin.errors.ConfigError`, so the command line reports it as a
    usage error; the message names the file and the fix.
    """


def save_learned_optimizer(
    path: str | os.PathLike[str],
    optimizer: nn.Module,
    *,
    name: str,
    options: Mapping[str, Any] | None = None,
    plugin_manager: Any = None,
) -> Path:
    """Write a learned optimizer's weights and config to one safetensors file, atomically.

    Before writing, the module is rebuilt from ``name`` and the completed options and
    its parameter names and shapes are compared with ``optimizer``'s, so a file that
    saves always loads (where the same plugins are installed).

    The bytes go to a temporary file in the target's folder, are flushed and fsynced,
    and the temporary file is renamed over ``path``: an error or a crash leaves either
    the previous file or the new one, never a truncated mix, and no temporary file.

    Args:
        path: The file to write (conventionally ``*.safetensors``). Its folder must exist.
        optimizer: The learned optimizer (an ``nn.Module``) whose ``state_dict`` to save.
        name: Its registered name, e.g. ``"rnnprop"`` (see ``flat_l2o_plugin.list_optimizers()``).
        options: The keyword options it was built with, e.g. ``{"hidden_size": 20}``;
            JSON-serializable (tuples come back as lists).
        plugin_manager: The manager whose registry knows ``name``; a fresh
            :func:`~flat_l2o_plugin.get_plugin_manager` by default.

    Returns:
        The path written.

    Raises:
        WeightsError: A bad argument, options that are not JSON, a module that
            ``name`` with ``options`` does not rebuild, or a folder that cannot be
            written. The message names the file.
        UnknownComponentError: No loaded plugin registers ``name``.

    Example:
        >>> opt = create_optimizer("rnnprop", output_scale=0.1)
        >>> ...  # meta-train it
        >>> save_learned_optimizer("rnnprop.safetensors", opt, name="rnnprop",
        ...                        options={"output_scale": 0.1})
    """
    from .. import __version__  # the package imports this module's package; import late

    path = Path(path)
    if not isinstance(optimizer, nn.Module):
        raise WeightsError(
            f"{path}: optimizer must be the learned optimizer's nn.Module, got {type(optimizer).__name__}"
        )
    if not isinstance(name, str) or not name:
        raise WeightsError(f"{path}: name must be a registered optimizer name, got {name!r}")
    options = dict(options or {})
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"{path}: options must be JSON-serializable (numbers, strings, lists, dicts): {exc}"
        ) from exc

    info = _optimizer_info(name, plugin_manager, path)
    complete = {**_factory_defaults(info.factory), **dict(info.defaults), **options}
    # A JSON round trip gives exactly what load_learned_optimizer will pass (lists for
    # tuples), so the check below builds the very module a later load builds.
    complete = json.loads(json.dumps(complete, allow_nan=False))
    rebuilt = _build(info, name, complete, path)
    _check_tensors(path, rebuilt.state_dict(), optimizer.state_dict(), saved_side="the module given")

    tensors = {
        # safetensors refuses tensors that share storage (tied weights) or are not
        # contiguous; a fresh contiguous CPU copy of each is always accepted.
        key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for key, value in optimizer.state_dict().items()
    }
    config = {
        "format_version": FORMAT_VERSION,
        "optimizer": name,
        "options": complete,
        "package_version": __version__,
        _DIGEST_FIELD: tensors_digest(tensors),
    }
    payload = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(config, sort_keys=True)})
    write_atomically(path, payload, WeightsError)
    return path


def read_learned_optimizer_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config recorded in a weights file, without building anything.

    Args:
        path: A file written by :func:`save_learned_optimizer`.

    Returns:
        ``{"format_version": int, "optimizer": str, "options": dict, "package_version": str}``.

    Raises:
        WeightsError: The file is missing, not a safetensors file, or its config is
            missing, not JSON, incomplete, or of a newer format version.
    """
    path = Path(path)
    with _open(path) as handle:
        return _parse_config(path, handle.metadata() or {})


def load_learned_optimizer(path: str | os.PathLike[str], *, plugin_manager: Any = None) -> nn.Module:
    """Rebuild a learned optimizer from a file written by :func:`save_learned_optimizer`.

    The module is built by the registry (``name`` and ``options`` from the file) and
    its weights are loaded strictly: every tensor the module has must be in the file
    with the same shape, and nothing else may be. When all the file's floating-point
    tensors share a dtype (float64 after ``.double()``, say), the module is converted
    to it first, so the loaded optimizer computes exactly what the saved one did. The
    module is returned as built (training mode); put it in ``eval()`` to deploy it.
    Nothing is unpickled.

    Args:
        path: The weights file.
        plugin_manager: The manager whose registry builds the optimizer; a fresh
            :func:`~flat_l2o_plugin.get_plugin_manager` by default.

    Returns:
        The learned optimizer, on the CPU.

    Raises:
        WeightsError: The file is missing, not a readable safetensors file, has a
            missing or invalid config, its options do not build the optimizer, or
            its tensors do not match the rebuilt module (the message lists which).
        UnknownComponentError: No loaded plugin registers the recorded name (the
            message names the file and lists what is registered).

    Example:
        >>> opt = load_learned_optimizer("rnnprop.safetensors").eval()
        >>> state = opt.init_state(params)
    """
    path = Path(path)
    with _open(path) as handle:
        config = _parse_config(path, handle.metadata() or {})
        try:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(
                f"learned optimizer file {path}: cannot read its tensors ({exc}); the file may be "
                f"truncated: write it again with save_learned_optimizer()"
            ) from exc
    return _rebuild(path, config, tensors, plugin_manager)


def load_learned_optimizer_bytes(data: bytes, *, source: str, plugin_manager: Any = None) -> nn.Module:
    """:func:`load_learned_optimizer` for the bytes of such a file (already read, and checked).

    Args:
        data: The whole file, as written by :func:`save_learned_optimizer`.
        source: Where the bytes came from, for messages (a path, a resource).
        plugin_manager: As for :func:`load_learned_optimizer`.

    Raises:
        WeightsError: As :func:`load_learned_optimizer`, naming ``source``.
    """
    config = read_learned_optimizer_config_bytes(data, source=source)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"learned optimizer file {source} is not a readable safetensors file ({exc})") from exc
    return _rebuild(Path(source), config, tensors, plugin_manager)


def read_learned_optimizer_config_bytes(data: bytes, *, source: str) -> dict[str, Any]:
    """:func:`read_learned_optimizer_config` for the bytes of a weights file (``source`` names it)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size]) if 0 < size <= len(data) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise WeightsError(f"learned optimizer file {source} is not a readable safetensors file (bad header)")
    metadata = header.get("__metadata__")
    return _parse_config(Path(source), metadata if isinstance(metadata, dict) else {})


def _rebuild(path: Path, config: Mapping[str, Any], tensors: dict[str, Tensor], plugin_manager: Any) -> nn.Module:
    recorded = config.get(_DIGEST_FIELD)
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise WeightsError(
            f"learned optimizer file {path} is corrupted: its tensors' SHA-256 differs from the one recorded when "
            f"it was written; restore the file from a copy or write it again"
        )
    name, options = config["optimizer"], config["options"]
    info = _optimizer_info(name, plugin_manager, path)
    module = _build(info, name, options, path)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        module = module.to(float_dtypes.pop())
    _check_tensors(path, module.state_dict(), tensors, saved_side="the file")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # anything the name/shape check above did not foresee
        raise WeightsError(f"learned optimizer file {path}: {exc}") from exc
    return module


# ---------------------------------------------------------------------- helpers


class _open:  # noqa: N801 - used like a function, as a context manager
    """``safetensors.safe_open`` with errors that name the file and the fix."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def __enter__(self) -> Any:
        path = self.path
        if not path.exists():
            raise WeightsError(
                f"learned optimizer file {path} does not exist; write one with save_learned_optimizer()"
            )
        if not path.is_file():
            raise WeightsError(f"learned optimizer file {path} is not a file")
        try:
            self._handle = safetensors.safe_open(str(path), framework="pt", device="cpu")
            return self._handle.__enter__()
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(
                f"learned optimizer file {path} is not a readable safetensors file ({exc}); it may "
                f"be truncated or of another format: write it again with save_learned_optimizer()"
            ) from exc

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.__exit__(*exc_info)


def _parse_config(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    where = f"learned optimizer file {path}"
    if METADATA_KEY not in metadata and "flat_l2o_plugin.module" in metadata:
        raise WeightsError(
            f"{where} holds the weights of a user's own module ({metadata['flat_l2o_plugin.module']}), which "
            f"is never imported from a file's say-so: build that class and load_state_dict("
            f"safetensors.torch.load_file(path)), or name the file as [optimizer] weights in a config"
        )
    if METADATA_KEY not in metadata:
        raise WeightsError(
            f"{where} has no {METADATA_KEY!r} metadata, so the optimizer to rebuild is unknown; "
            f"it was not written by save_learned_optimizer() (a bare state_dict, perhaps): "
            f"build the optimizer and save it with save_learned_optimizer(path, opt, name=..., options=...)"
        )
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{where}: {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsError(
            f"{where}: {METADATA_KEY!r} metadata must be a JSON object, got {type(config).__name__}"
        )
    missing = [key for key in _CONFIG_FIELDS if key not in config]
    if missing:
        raise WeightsError(f"{where}: {METADATA_KEY!r} metadata lacks {missing}")
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WeightsError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{where} has format version {version}, written by flat-l2o-plugin "
            f"{config['package_version']}; this version reads up to {FORMAT_VERSION}: upgrade flat-l2o-plugin"
        )
    if not isinstance(config["optimizer"], str) or not config["optimizer"]:
        raise WeightsError(f"{where}: 'optimizer' must be a registered name, got {config['optimizer']!r}")
    if not isinstance(config["options"], dict):
        raise WeightsError(
            f"{where}: 'options' must be a JSON object of keyword options, got {config['options']!r}"
        )
    digest = config.get(_DIGEST_FIELD)
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise WeightsError(f"{where}: {_DIGEST_FIELD!r} must be 64 hex digits, got {digest!r}")
    return config


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """The SHA-256 of ``tensors`` as the weights file records it (see the module docstring).

    Args:
        tensors: A ``state_dict``-like mapping of CPU or device tensors.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode("utf-8"))
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        if sys.byteorder == "big" and tensor.element_size() > 1:  # pragma: no cover - big-endian hosts
            data = tensor.reshape(-1).view(torch.uint8).reshape(-1, tensor.element_size()).flip(1).numpy().tobytes()
        digest.update(data)
    return digest.hexdigest()


def _optimizer_info(name: str, plugin_manager: Any, path: Path) -> Any:
    from ..manager import get_plugin_manager  # import late: the manager imports the zoo

    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    try:
        return pm.components.optimizers.get(name, failed_plugins=pm.failures)
    except UnknownComponentError as exc:
        # Same class as the registry's, so callers catch one thing; the file is named
        # because "unknown optimizer" alone does not say where the name came from.
        raise UnknownComponentError(
            f"learned optimizer file {path}: {exc}; install the plugin that provides it"
        ) from exc


def _build(info: Any, name: str, options: Mapping[str, Any], path: Path) -> nn.Module:
    try:
        module = info.create(**options)
    except FlatL2OError as exc:
        raise WeightsError(f"learned optimizer file {path}: cannot build {name!r} with {dict(options)}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"learned optimizer file {path}: optimizer {name!r} rejects options {dict(options)}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise WeightsError(
            f"learned optimizer file {path}: optimizer {name!r} built a {type(module).__name__}, "
            f"not an nn.Module, so it has no weights to save or load"
        )
    return module


def _factory_defaults(factory: Any) -> dict[str, Any]:
    """The factory's keyword defaults that survive a JSON round trip."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and some C callables have none
        return {}
    defaults = {}
    for parameter in signature.parameters.values():
        if parameter.default is inspect.Parameter.empty or parameter.kind not in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            continue
        try:
            json.dumps(parameter.default, allow_nan=False)
        except (TypeError, ValueError):
            continue  # not representable: the factory applies it itself on load
        defaults[parameter.name] = parameter.default
    return defaults


def _check_tensors(
    path: Path, expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, saved_side: str
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, {saved_side} has {tuple(found[key].shape)}"
        for key in sorted(set(expected) & set(found))
        if expected[key].shape != found[key].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing from {saved_side}: {missing}")
    if unexpected:
        problems.append(f"not in the rebuilt optimizer: {unexpected}")
    if mismatched:
        shown = "; ".join(mismatched[:4]) + (f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else "")
        problems.append(f"shape mismatch: {shown}")
    raise WeightsError(
        f"learned optimizer file {path}: the tensors of {saved_side} do not fit the optimizer its "
        f"name and options build ({'; '.join(problems)}); save with the name and options the "
        f"optimizer was built with"
    )
