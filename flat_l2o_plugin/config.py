"""One typed configuration for a meta-training run, from files, ``pyproject.toml``, dicts, env and CLI.

Layout (TOML shown; YAML and plain dicts have the same shape)::

    [optimizer]                     # the learned optimizer, from the registry
    name = "rnnprop"
    options = { output_scale = 0.1 }
    weights = "pretrained.safetensors"   # optional: start from these weights

    # ... or the user's own module, adapted by a [[wrappers]] entry name = "foreign":
    # module = "client_optimizer:Optimizer"   # imported from the config file's folder
    # options = { preproc = true }
    # weights = "port.pt"                     # .safetensors, or a tensors-only .pt

    [task]                          # the optimizee
    name = "mlp_digits"
    options = { activation = "relu" }

    # ... or a task family: each trajectory draws one task uniformly (replaces [task])
    # [[tasks]]
    # name = "mlp"
    # options = { hidden_sizes = [50], activation = "tanh" }
    # [[tasks]]
    # name = "conv"

    [regularizers.hessian_top_eigenvalue]   # the activation config (see FlatL2O)
    weight = 0.1
    start_fraction = 0.5

    [[wrappers]]                    # retrofit wrappers, innermost first; options flat,
    name = "foreign"                # spelled as in wrappers.wrap()
    inputs = ["grad"]

    [trainer]                       # MetaTrainConfig fields
    meta_steps = 200

    [plugins]
    disable = ["some-plugin"]       # pip or entry-point names
    load = ["only-this-one"]        # allow-list of third-party plugins (absent: all)
    strict = false

    run_dir = "runs/meta-train"
    val_tasks = 3

Precedence, lowest first: built-in defaults < the config file (or the ``[tool.flat_l2o]``
table of a ``pyproject.toml``, or the dict a host passes) < environment variables
(``FLAT_L2O_RUN_DIR``, ``FLAT_L2O_SEED``; the plugin variables ``FLAT_L2O_LOAD_PLUGINS``,
``FLAT_L2O_DISABLE_PLUGINS``, ``FLAT_L2O_STRICT_PLUGINS`` win over ``[plugins]`` so a bad
plugin can be switched off without editing files) < ``--set a.b=value`` overrides.

Relative paths (``optimizer.weights``, ``optimizer.python_path``) in a file are relative
to the file's folder; given in a dict or by ``--set``, to the current directory. They
are stored absolute.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError, UnknownComponentError
from .training.meta_trainer import MetaTrainConfig

__all__ = [
    "Config", "ComponentSpec", "OptimizerSpec", "PluginsConfig", "UnknownKeyError", "ConfigValueError",
    "load_config", "config_from_dict", "parse_override", "provenance", "validate_components", "check_option_types",
]


class UnknownKeyError(ConfigError):
    """A key the configuration does not have (the message suggests the closest one)."""


class ConfigValueError(ConfigError):
    """A value of the wrong type or out of range (the message names the field and the value)."""


@dataclass
class ComponentSpec:
    """A registered component by name, with its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerSpec:
    """The learned optimizer: a registered one by ``name``, or the user's own class by ``module``.

    Attributes:
        name: A registered learned optimizer.
        options: Keyword options of its factory (or of the user's class).
        module: ``"package.module:Class"``, the user's own ``nn.Module`` class (or a
            factory returning one); adapt it with a ``foreign`` wrapper.
        weights: A ``.safetensors`` file, or a tensors-only ``.pt`` / ``.pth`` state_dict,
            loaded strictly into what was built.
        python_path: Folders searched first for ``module`` (default: the config file's
            folder); the current directory is searched too.
    """

    name: str | None = "rnnprop"
    options: dict[str, Any] = field(default_factory=dict)
    module: str | None = None
    weights: str | None = None
    python_path: list[str] = field(default_factory=list)


@dataclass
class PluginsConfig:
    """Plugin control; the ``FLAT_L2O_*_PLUGINS`` environment variables take precedence."""

    load: list[str] | None = None
    disable: list[str] = field(default_factory=list)
    strict: bool = False


@dataclass
class Config:
    """A resolved configuration (see the module docstring for the layout)."""

    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    task: ComponentSpec = field(default_factory=lambda: ComponentSpec("mlp_digits"))
    tasks: list[ComponentSpec] = field(default_factory=list)
    """A task family (each trajectory draws one uniformly); when not empty it replaces ``task``."""
    regularizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    wrappers: list[dict[str, Any]] = field(default_factory=list)
    """``{"name": <registered wrapper>, **options}`` per wrapper, innermost first."""
    trainer: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    run_dir: str = "runs/meta-train"
    val_tasks: int = 3

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe), the shape :func:`config_from_dict` reads back."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def plugin_manager(self):  # noqa: ANN201 - FlatL2OPluginManager
        """A fresh plugin manager honouring ``[plugins]`` (the environment still wins)."""
        from .manager import ENV_DISABLE, ENV_LOAD, ENV_STRICT, _env_flag, _env_list, get_plugin_manager

        env_load = _env_list(ENV_LOAD)
        disable = {name: "config [plugins].disable" for name in self.plugins.disable}
        disable.update({name: ENV_DISABLE for name in _env_list(ENV_DISABLE) or []})
        return get_plugin_manager(
            strict=_env_flag(ENV_STRICT) or self.plugins.strict,
            load=env_load if env_load is not None else self.plugins.load,
            disable=disable,
        )


# ---------------------------------------------------------------------------- validation

_MISSING = object()


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               tuple: "a list", dict: "a table"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return _TYPE_NAMES.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints widen to floats, lists to tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigValueError as exc:
                errors.append(str(exc))
        raise ConfigValueError(errors[0] if len(errors) == 1 else f"{where} must be {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigValueError(f"{where} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple or tp is tuple else items
    elif origin in (dict, Mapping) or tp is dict:
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise ConfigValueError(f"{where} must have string keys, got {list(value)!r}")
            return dict(value)
    else:
        raise ConfigValueError(f"{where}: unsupported annotation {tp!r}")
    raise ConfigValueError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            dotted = f"{where}.{key}" if where else str(key)
            raise UnknownKeyError(f"unknown key {dotted!r}{hint}; valid keys here: {', '.join(allowed)}")


def _dataclass_from(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigValueError(f"{where or 'the configuration'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    _check_keys(data, names, where)
    kwargs = {}
    for name in names:
        if name in data:
            path = f"{where}.{name}" if where else name
            kwargs[name] = _NESTED[hints[name]](data[name], path) if hints[name] in _NESTED else _coerce(
                data[name], hints[name], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a ConfigError too: re-worded with the field's path
        raise ConfigValueError(str(exc).replace(f"{cls.__name__}.", f"{where}.")) from None


def _component(data: Any, where: str) -> ComponentSpec:
    if isinstance(data, str):
        return ComponentSpec(data)
    spec = _dataclass_from(ComponentSpec, data, where)
    if not spec.name.isidentifier():
        raise ConfigValueError(f"{where}.name must be a component name, got {spec.name!r}")
    return spec


def _optimizer(data: Any, where: str) -> OptimizerSpec:
    from .optimizers.external import check_object_path

    spec = OptimizerSpec(data) if isinstance(data, str) else _dataclass_from(OptimizerSpec, data, where)
    if spec.name is not None and spec.module is not None:
        raise ConfigValueError(f"{where}: give name (a registered learned optimizer) or module (your own class, "
                               f"'package.module:Class'), not both")
    if spec.name is None and spec.module is None:
        raise ConfigValueError(f"{where} needs name (a registered learned optimizer) or module (your own class, "
                               f"'package.module:Class')")
    if spec.name is not None and not spec.name.isidentifier():
        hint = f"; for your own class write module = {spec.name!r}" if ":" in spec.name else ""
        raise ConfigValueError(f"{where}.name must be a component name, got {spec.name!r}{hint}")
    if spec.module is not None:
        check_object_path(spec.module, f"{where}.module")
    return spec


def _task_family(data: Any, where: str) -> list[ComponentSpec]:
    if not isinstance(data, (list, tuple)):
        raise ConfigValueError(f"{where} must be a list of task tables {{name = <task>, options = {{...}}}}, "
                               f"got {data!r}")
    family = []
    for index, item in enumerate(data):
        at = f"{where}[{index}]"
        if isinstance(item, (list, tuple)):  # the study's ["mlp", {options}] pairs
            if len(item) != 2 or not isinstance(item[1], Mapping):
                raise ConfigValueError(f"{at} must be a table {{name = <task>, options = {{...}}}} or a pair "
                                       f"[<task>, {{options}}], got {item!r}")
            item = {"name": item[0], "options": item[1]}
        if isinstance(item, Mapping) and "name" not in item:
            raise ConfigValueError(f"{at}.name is missing: name the registered task")
        family.append(_component(item, at))
    return family


def _regularizers(data: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, Mapping):
        raise ConfigValueError(f"{where} must be a table of regularizer tables, got {data!r}")
    out = {}
    for name, spec in data.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigValueError(f"{where}: {name!r} is not a regularizer name")
        if not isinstance(spec, Mapping) or not all(isinstance(k, str) for k in spec):
            raise ConfigValueError(f"{where}.{name} must be a table of options, got {spec!r}")
        out[name] = dict(spec)
    return out


def _wrappers(data: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(data, (list, tuple)):
        raise ConfigValueError(f"{where} must be a list of wrapper tables, got {data!r}")
    entries = []
    for index, item in enumerate(data):
        at = f"{where}[{index}]"
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, Mapping) or not all(isinstance(k, str) for k in entry):
            raise ConfigValueError(f"{at} must be a table {{name = <wrapper>, <option> = ...}}, got {item!r}")
        if "name" not in entry:
            close = difflib.get_close_matches("name", list(entry), n=1)
            if close:
                raise UnknownKeyError(f"unknown key {f'{at}.{close[0]}'!r} (did you mean 'name'?); a wrapper table "
                                      f"holds name and the wrapper's options")
            raise ConfigValueError(f"{at}.name is missing: name the registered wrapper")
        if not isinstance(entry["name"], str) or not entry["name"].isidentifier():
            raise ConfigValueError(f"{at}.name must be a component name, got {entry['name']!r}")
        # Options are checked against the wrapper itself, by validate_components / wrap().
        entries.append(dict(entry))
    return entries


_NESTED = {
    OptimizerSpec: _optimizer,
    ComponentSpec: _component,
    PluginsConfig: lambda d, w: _dataclass_from(PluginsConfig, d, w),
    MetaTrainConfig: lambda d, w: _dataclass_from(MetaTrainConfig, d, w),
    dict[str, dict[str, Any]]: _regularizers,
    list[dict[str, Any]]: _wrappers,
    list[ComponentSpec]: _task_family,
}


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate plain data into a :class:`Config`; raises a :class:`ConfigError` subclass naming the field."""
    if not isinstance(data, Mapping):
        raise ConfigValueError(f"the configuration must be a table, got {data!r}")
    # Partial tables (``[task.options]`` without a name) complete from the defaults.
    defaults = Config().as_dict()
    optimizer = data.get("optimizer")
    if isinstance(optimizer, Mapping) and optimizer.get("module") is not None and "name" not in optimizer:
        defaults["optimizer"]["name"] = None  # a module replaces the default registered name
    if data.get("tasks") and "task" in data:
        raise ConfigValueError("tasks: give a task family ([[tasks]]) or one task ([task]), not both")
    config = _dataclass_from(Config, _merge(defaults, data), "")
    if config.val_tasks < 0:
        raise ConfigValueError(f"val_tasks must be >= 0, got {config.val_tasks!r}")
    return config


# ---------------------------------------------------------------------------- sources


def _read_file(path: Path, table: str | None = None) -> dict[str, Any]:
    try:
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; give the .toml/.yaml/.json file in it")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); is it a config "
                          f"file?") from None
    except (OSError, ValueError) as exc:  # unreadable, or a NUL byte in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"config file {str(path)!r} cannot be read ({reason})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
            if table is None and path.name == "pyproject.toml":
                table = "tool.flat_l2o"
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r}: use .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers' own errors say where the syntax is wrong
        raise ConfigError(f"config file {str(path)!r} could not be parsed: {exc}") from exc
    for part in (table.split(".") if table else []):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{str(path)!r} has no [{table}] table")
        data = data[part]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.meta_steps=100"`` -> (["trainer", "meta_steps"], 100); values parse as TOML or JSON."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [part.strip() for part in key.split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key")
    return path, _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except Exception:
        pass
    try:
        return json.loads(raw)
    except Exception:
        return raw  # a bare word is a string


def _set(data: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(path)} goes through {part!r}, which is not a table")
        node = child
    node[path[-1]] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | None = None, *, table: str | None = None,
                overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a configuration.

    Args:
        source: A ``.toml`` / ``.yaml`` / ``.json`` file, a ``pyproject.toml`` (its
            ``[tool.flat_l2o]`` table), a dict, or ``None`` for the defaults.
        table: The dotted name of the table that holds our configuration inside a host
            tool's own file (e.g. ``"tool.flat_l2o"``); default: the whole file.
        overrides: ``--set`` strings, applied last.
        environ: The environment to read ``FLAT_L2O_*`` from (default: ``os.environ``).

    Raises:
        ConfigError: or a subclass naming the file, key or field at fault.
    """
    base: Path | None = None
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = json.loads(json.dumps(source, default=list)) if _jsonable(source) else dict(source)
    else:
        data = _read_file(Path(source), table)
        base = Path(source).resolve().parent
        _resolve_paths(data, base)
    env = os.environ if environ is None else environ
    if env.get("FLAT_L2O_RUN_DIR"):
        data = _merge(data, {"run_dir": env["FLAT_L2O_RUN_DIR"]})
    if env.get("FLAT_L2O_SEED"):
        try:
            seed = int(env["FLAT_L2O_SEED"])
        except ValueError:
            raise ConfigValueError(f"FLAT_L2O_SEED must be an integer, got {env['FLAT_L2O_SEED']!r}") from None
        data = _merge(data, {"trainer": {"seed": seed}})
    for text in overrides:
        path, value = parse_override(text)
        _set(data, path, value, f"--set {text}")
    _resolve_paths(data, Path.cwd())
    optimizer = data.get("optimizer")
    if base is not None and isinstance(optimizer, dict) and optimizer.get("module") is not None \
            and "python_path" not in optimizer:
        optimizer["python_path"] = [str(base)]
    return config_from_dict(data)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make ``optimizer.weights`` and ``optimizer.python_path`` absolute, relative to ``base``."""
    optimizer = data.get("optimizer")
    if not isinstance(optimizer, dict):
        return
    data["optimizer"] = optimizer = dict(optimizer)  # never the caller's own table
    if isinstance(optimizer.get("weights"), str):
        optimizer["weights"] = str(base / Path(optimizer["weights"]).expanduser())
    if isinstance(optimizer.get("python_path"), list):
        optimizer["python_path"] = [str(base / Path(p).expanduser()) if isinstance(p, str) else p
                                    for p in optimizer["python_path"]]


def _jsonable(data: Any) -> bool:
    try:
        json.dumps(data)
    except (TypeError, ValueError):
        return False
    return True


def _checkable(tp: Any) -> bool:
    """Whether :func:`_coerce` can check a value against ``tp`` (plain data types only)."""
    if tp is Any or tp in (bool, int, float, str, list, tuple, dict, type(None)):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list, tuple, Sequence, dict, Mapping):
        return all(_checkable(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return False


def check_option_types(factory: Any, options: Mapping[str, Any], where: str) -> None:
    """Check ``options`` against the type hints of ``factory``'s keyword parameters.

    Only plain-data hints (numbers, strings, booleans, lists, tables and their unions)
    are checked; anything else is left to the factory.

    Raises:
        ConfigValueError: An option of the wrong type, named as ``<where>.<option>``.
    """
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # hints that do not resolve here: the factory checks its own arguments
        return
    for key, value in options.items():
        tp = hints.get(key)
        if tp is not None and _checkable(tp):
            _coerce(value, tp, f"{where}.{key}")


def validate_components(config: Config, plugin_manager: Any = None) -> None:
    """Check that every named component exists and accepts its options.

    The learned optimizer is built (the user's ``module`` imported, its ``weights``
    loaded) and wrapped by the ``[[wrappers]]`` stack, so wrapper options and a foreign
    module's fit to its adapter are checked too.

    Raises:
        UnknownComponentError: listing what is available, the plugins that failed to
            load, and the plugins that were disabled (with the setting that did it).
        ConfigError: an option a component rejects, naming the config field.
    """
    from .activation import ACTIVATION_KEYS
    from .host import FlatL2O
    from .training.runner import build_learned_optimizer

    pm = plugin_manager if plugin_manager is not None else config.plugin_manager()
    kinds = ([(f"tasks[{i}]", "tasks", spec.name, spec.options) for i, spec in enumerate(config.tasks)]
             if config.tasks else [("task", "tasks", config.task.name, config.task.options)])
    if config.optimizer.name is not None:
        kinds.insert(0, ("optimizer", "optimizers", config.optimizer.name, config.optimizer.options))
    for where, kind, name, options in kinds:
        try:
            info = pm.component(kind, name)
        except UnknownComponentError as exc:
            raise type(exc)(f"{where}.name: {exc}") from None
        check_option_types(info.factory, options, f"{where}.options")
    for name, options in config.regularizers.items():
        if name in pm.components.regularizers:
            factory = pm.components.regularizers.get(name).factory
            check_option_types(factory, {k: v for k, v in options.items() if k not in ACTIVATION_KEYS},
                               f"regularizers.{name}")
    try:
        FlatL2O(config.regularizers, plugin_manager=pm)
    except UnknownComponentError as exc:
        raise type(exc)(f"regularizers: {exc}") from None
    except ConfigError as exc:
        raise type(exc)(exc if str(exc).startswith("regularizers.") else f"regularizers: {exc}") from None
    build_learned_optimizer(dataclasses.asdict(config.optimizer), config.wrappers, pm)


def provenance(plugin_manager: Any = None) -> dict[str, Any]:
    """Versions of everything that shaped a result: Python, torch, pluggy, timm, learn2learn, plugins."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    out: dict[str, Any] = {"python": sys.version.split()[0],
                           **{d: version(d) for d in ("flat-l2o-plugin", "torch", "pluggy", "timm", "learn2learn",
                                                      "numpy", "safetensors")}}
    if plugin_manager is not None:
        out["plugins"] = {name: {"distribution": r.distribution, "version": r.version, "status": r.status}
                          for name, r in plugin_manager.records.items()}
    return out
