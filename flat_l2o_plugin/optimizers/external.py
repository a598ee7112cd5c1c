"""The learned optimizer of an ``[optimizer]`` table: a registered one, or the user's own class.

A config names either a registered learned optimizer or the user's own ``nn.Module``
class, with its options and, optionally, a file of pretrained weights::

    [optimizer]                       # registered
    name = "l2o_dm"
    weights = "pretrained.safetensors"

    [optimizer]                       # the user's own class, adapted by [[wrappers]]
    module = "client_optimizer:Optimizer"
    options = { preproc = true }
    weights = "l2o_dm_port.pt"

``module`` is ``"package.module:Class"`` (or a factory function), imported as Python
imports it, with the folders of ``python_path`` (by default the config file's folder)
and the current directory put first on ``sys.path``, and left there so the module's own
later imports work. ``weights`` is a ``.safetensors`` file or a ``.pt`` / ``.pth`` file
holding only a ``state_dict`` of tensors, read with ``torch.load(weights_only=True)``:
nothing is ever unpickled beyond tensors and plain containers. They load strictly.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .._atomic import write_atomically
from ..errors import ConfigError, FlatL2OError
from ..registry import OptimizerInfo

__all__ = ["MODULE_METADATA_KEY", "build_optimizer", "import_object", "load_state_dict_file", "save_module_weights",
           "check_object_path"]

MODULE_METADATA_KEY = "flat_l2o_plugin.module"
"""The safetensors metadata entry of a user module's weights (its class and options, as JSON)."""

_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def check_object_path(text: Any, where: str) -> tuple[str, str]:
    """``"package.module:Class"`` split into its module and attribute paths.

    Raises:
        ConfigError: naming ``where`` and the expected form.
    """
    if isinstance(text, str) and text.count(":") == 1:
        module, attribute = text.split(":")
        if all(part.isidentifier() for part in module.split(".")) and \
                all(part.isidentifier() for part in attribute.split(".")):
            return module, attribute
    raise ConfigError(f"{where} must look like 'package.module:Class' (a Python module you can import, a colon, "
                      f"the class or factory in it), got {text!r}")


def import_object(path: str, *, python_path: Sequence[str] = (), where: str = "optimizer.module") -> Any:
    """The object ``"package.module:Name"`` names, imported with ``python_path`` and the cwd searched first.

    Raises:
        ConfigError: a malformed path, a module that is not found or fails to import,
            a name the module lacks (with the closest one), or a clash with another
            module of the same name imported earlier.
    """
    module_name, attribute = check_object_path(path, where)
    folders = [str(Path(folder).resolve()) for folder in [*python_path, os.getcwd()]]
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None:
        _check_same_module(loaded, top, folders, where)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError(f"{where}: no module named {exc.name!r} (searched {', '.join(folders)} and "
                              f"sys.path); put the file there or set optimizer.python_path") from None
        raise ConfigError(f"{where}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {getattr(target, '__name__', module_name)!r} has no attribute "
                              f"{part!r}{hint}")
        target = getattr(target, part)
    return target


def _check_same_module(loaded: Any, top: str, folders: Sequence[str], where: str) -> None:
    # A module imported earlier under the same name (another example's client module,
    # say) would silently stand in for the file this config means.
    for folder in folders:
        candidates = [Path(folder) / f"{top}.py", Path(folder) / top / "__init__.py"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            continue
        origin = getattr(loaded, "__file__", None)
        if origin is not None and Path(origin).resolve() != found.resolve():
            raise ConfigError(f"{where}: a module named {top!r} is already imported from {origin}, so {found} "
                              f"cannot be; rename one of them")
        return


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message: torch's carry a C++ backtrace after it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_state_dict_file(path: str | os.PathLike[str], *, where: str = "optimizer.weights") -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt`` / ``.pth`` / ``.bin`` tensors-only state_dict.

    A ``.pt`` file is read with ``torch.load(weights_only=True)``, which refuses anything
    but tensors and plain containers, and must hold a flat ``{key: tensor}`` mapping.

    Raises:
        ConfigError: the file is missing, of another format, unreadable, or not a
            state_dict of tensors; the message names ``where`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{where}: {path} is not a readable safetensors file ({exc})") from exc
    if suffix not in _STATE_DICT_SUFFIXES:
        raise ConfigError(f"{where}: {path} must be a .safetensors file or a tensors-only "
                          f"{'/'.join(_STATE_DICT_SUFFIXES)} state_dict")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {path} is not a tensors-only file, so it is not loaded (torch.load with "
                          f"weights_only=True refused it: {_first_line(exc)}); save "
                          f"torch.save(module.state_dict(), path) "
                          f"or a .safetensors file") from exc
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in loaded.items()):
        kind = type(loaded).__name__
        extra = f" with entries {sorted(map(str, loaded))[:6]}" if isinstance(loaded, Mapping) else ""
        raise ConfigError(f"{where}: {path} holds a {kind}{extra}, not a state_dict of tensors; save "
                          f"module.state_dict() alone")
    return dict(loaded)


def build_optimizer(spec: Mapping[str, Any], plugin_manager: Any = None) -> nn.Module:
    """Build what an ``[optimizer]`` table describes and load its ``weights``.

    Args:
        spec: ``{"name": str | None, "options": {...}, "module": str | None,
            "weights": str | None, "python_path": [...]}``; exactly one of ``name`` and
            ``module``.
        plugin_manager: Where ``name`` is looked up (default: a fresh manager).

    Returns:
        The registered learned optimizer, or the user's module (a learned optimizer
        only once a wrapper such as ``foreign`` adapts it).

    Raises:
        ConfigError: naming the ``optimizer.*`` field at fault.
        UnknownComponentError: ``name`` is not registered.
    """
    options = dict(spec.get("options") or {})
    if spec.get("module") is not None:
        factory = import_object(spec["module"], python_path=spec.get("python_path") or ())
        if not callable(factory):
            raise ConfigError(f"optimizer.module: {spec['module']!r} is a {type(factory).__name__}, not a class or "
                              f"factory")
        label = getattr(factory, "__name__", "factory")
        info = OptimizerInfo(name=label if label.isidentifier() else "factory", factory=factory)
        what = f"{spec['module']}"
    else:
        from ..manager import get_plugin_manager  # the manager imports the zoo

        pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        info = pm.component("optimizers", spec["name"])
        what = repr(spec["name"])
    try:
        module = info.create(**options)
    except FlatL2OError as exc:
        raise type(exc)(f"optimizer.options: {exc}") from exc
    except (TypeError, ValueError, RuntimeError) as exc:
        # RuntimeError: torch refusing a size (an allocation too large); its message carries
        # a C++ backtrace, so only its first line is kept.
        raise ConfigError(f"optimizer.options: {what} rejected {options}: {_first_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(f"optimizer.module: {what} built a {type(module).__name__}, not a torch nn.Module")
    if spec.get("weights"):
        _load_weights(module, spec["weights"], what)
    return module


def _load_weights(module: nn.Module, path: str, what: str) -> None:
    tensors = load_state_dict_file(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(expected[k].shape)} in the module"
                  for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} {items[:6]}{' ...' if len(items) > 6 else ''}" for label, items in
                    (("missing from the file:", missing), ("not in the module:", unexpected),
                     ("shape mismatch:", mismatched)) if items]
        raise ConfigError(f"optimizer.weights: {path} does not fit {what} built with its options "
                          f"({'; '.join(problems)})")
    module.load_state_dict(tensors, strict=True)


def save_module_weights(path: str | os.PathLike[str], module: nn.Module, *, spec: Mapping[str, Any]) -> Path:
    """Write a user module's ``state_dict`` (its own keys) to a safetensors file, atomically.

    The file's metadata records ``module`` and ``options`` under
    :data:`MODULE_METADATA_KEY`; the tensors load into the bare class with
    ``module.load_state_dict(safetensors.torch.load_file(path))``, or as
    ``[optimizer] weights`` of a config.
    """
    path = Path(path)
    tensors = {key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for key, value in module.state_dict().items()}
    record = {"module": spec.get("module"), "options": dict(spec.get("options") or {})}
    payload = safetensors.torch.save(tensors, metadata={MODULE_METADATA_KEY: json.dumps(record, sort_keys=True)})
    write_atomically(path, payload, ConfigError)
    return path
