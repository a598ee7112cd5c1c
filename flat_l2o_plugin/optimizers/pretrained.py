"""Pre-trained learned optimizers: weights a distribution ships, checked, then loaded.

A plugin (the package's own included) registers each one as a
:class:`~flat_l2o_plugin.registry.PretrainedInfo`. Using it reads the weights file from
the plugin's package with ``importlib.resources`` (so it works from a wheel, a zip or a
source tree), compares the SHA-256 of the bytes with the registered one *before*
anything is parsed, and rebuilds the model from those same bytes (safetensors: nothing
is unpickled), then stacks the registered wrappers around it.

A model card is a JSON file with the fields of :data:`CARD_FIELDS` (any of them may be
missing; ``flat-l2o list pretrained`` shows what is there) or any text file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError
from ..registry import PretrainedInfo
from .weights import WeightsError, load_learned_optimizer_bytes, read_learned_optimizer_config_bytes

__all__ = ["CARD_FIELDS", "LoadedPretrained", "PretrainedWeightsError", "load_pretrained", "pretrained_digest_error",
           "read_card", "resource_path"]

CARD_FIELDS = ("meta_trained_on", "meta_training", "held_out", "loses_on", "recommended_lr", "step_cost",
               "state_bytes_per_parameter")
"""What a JSON model card may hold (see ``docs/models/`` for the package's own)."""


class PretrainedWeightsError(WeightsError):
    """A pre-trained optimizer's weights file is missing or is not the file its plugin registered."""


@dataclass(frozen=True)
class LoadedPretrained:
    """A pre-trained optimizer, loaded.

    Attributes:
        learned: The learned optimizer to step with (the outermost wrapper, or the model).
        model: The zoo model inside the wrappers, with the shipped weights.
        info: The registration.
        provider: The plugin that registered it.
        source: Where the weights were read from.
        options: The model's options, complete, as the weights file records them.
    """

    learned: nn.Module
    model: nn.Module
    info: PretrainedInfo
    provider: str
    source: str
    options: dict[str, Any]


def resource_path(info: PretrainedInfo, relative: str) -> Any:
    """The ``importlib.resources`` traversable of a file inside ``info.package``."""
    try:
        return resources.files(info.package).joinpath(relative)
    except (ModuleNotFoundError, TypeError) as exc:
        raise PretrainedWeightsError(
            f"pretrained optimizer {info.name!r}: its package {info.package!r} cannot be imported ({exc})") from exc


def _read(info: PretrainedInfo, provider: str) -> tuple[bytes, str]:
    path = resource_path(info, info.weights)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise PretrainedWeightsError(
            f"pretrained optimizer {info.name!r} from plugin {provider!r}: weights file {path} cannot be read "
            f"({exc.strerror or exc}); reinstall the distribution that provides it") from exc


def pretrained_digest_error(info: PretrainedInfo, provider: str) -> str | None:
    """The one-line reason ``info``'s weights would be refused, or ``None`` when they check out."""
    try:
        data, source = _read(info, provider)
    except PretrainedWeightsError as exc:
        return str(exc)
    return _digest_error(info, provider, data, source)


def _digest_error(info: PretrainedInfo, provider: str, data: bytes, source: str) -> str | None:
    found = hashlib.sha256(data).hexdigest()
    if found == info.sha256:
        return None
    return (f"pretrained optimizer {info.name!r} from plugin {provider!r}: weights file {source} has SHA-256 "
            f"{found[:16]}..., not the registered {info.sha256[:16]}...; the file was changed or damaged: "
            f"reinstall the distribution that provides it")


def load_pretrained(name: str, *, plugin_manager: Any = None) -> LoadedPretrained:
    """Load the pre-trained optimizer registered as ``name``, checking its weights first.

    Args:
        name: A pre-trained name (``flat-l2o list pretrained``).
        plugin_manager: Where it is registered; a fresh
            :func:`~flat_l2o_plugin.get_plugin_manager` by default.

    Raises:
        UnknownComponentError: No loaded plugin registers ``name``.
        PretrainedWeightsError: The weights file is missing, or its SHA-256 is not the
            registered one (the message names the file and the plugin).
        WeightsError: The file does not hold the registered model and options.
    """
    from ..manager import get_plugin_manager
    from ..wrappers import wrap

    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    info = pm.component("pretrained", name)
    provider = pm.components.pretrained.provider(name)
    data, source = _read(info, provider)
    problem = _digest_error(info, provider, data, source)
    if problem is not None:
        raise PretrainedWeightsError(problem)
    model = load_learned_optimizer_bytes(data, source=source, plugin_manager=pm)
    config = read_learned_optimizer_config_bytes(data, source=source)
    where = f"pretrained optimizer {name!r} from plugin {provider!r}"
    if config["optimizer"] != info.optimizer:
        raise PretrainedWeightsError(f"{where}: weights file {source} holds a {config['optimizer']!r}, "
                                     f"registered as a {info.optimizer!r}")
    differ = sorted(k for k, v in dict(info.options).items() if json.loads(json.dumps(v)) != config["options"].get(k))
    if differ:
        raise PretrainedWeightsError(f"{where}: registered options {differ} differ from those weights file "
                                     f"{source} records ({config['options']})")
    try:
        learned = wrap(model, [dict(w) for w in info.wrappers], plugin_manager=pm) if info.wrappers else model
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return LoadedPretrained(learned, model, info, provider, source, dict(config["options"]))


def read_card(info: PretrainedInfo) -> Mapping[str, Any] | str | None:
    """The model card: a dict for a JSON card, the text for any other file, ``None`` without one."""
    if info.card is None:
        return None
    try:
        text = resource_path(info, info.card).read_text(encoding="utf-8")
    except (OSError, PretrainedWeightsError):
        return None
    if info.card.endswith(".json"):
        try:
            card = json.loads(text)
        except ValueError:
            return None
        return card if isinstance(card, dict) else None
    return text
