"""Make a meta-trained learned optimizer one of timm's optimizers.

One call registers it in timm's optimizer registry; from then on every timm entry point
that builds an optimizer by name builds it, ``create_optimizer_v2`` and the training
script's ``--opt`` included::

    from flat_l2o_plugin.integrations.timm import register_with_timm
    register_with_timm("l2o-rnnprop", weights="rnnprop.safetensors")

    optimizer = timm.optim.create_optimizer_v2(model, "l2o-rnnprop", lr=1.0, weight_decay=1e-4)

:func:`register_installed_with_timm` registers every installed learned optimizer at
once, under :func:`timm_name` (``rnnprop`` as ``l2o-rnnprop``), taking the weights file
from the ``weights`` keyword at creation, and every pre-trained one under its own name
(``flat-l2o list pretrained``), with its shipped weights and nothing to pass; :mod:`.timm_train` does that for timm's
``train.py`` without editing it (``--opt-kwargs weights=FILE``).

What timm's arguments mean for a learned optimizer (it builds a
:class:`~flat_l2o_plugin.integrations.torch_optim.LearnedOptimizerTorch`):

- ``lr`` multiplies the learned update: 1.0 (the default when ``lr`` is ``None``)
  applies it as meta-trained, smaller values shrink every step. timm's schedulers set
  each group's ``lr`` (times its ``lr_scale`` under layer decay), so a warm-up or a
  cosine schedule anneals the learned steps. How to choose it:
  :data:`~flat_l2o_plugin.integrations.torch_optim.LR_RULE`.
- ``weight_decay`` is an L2 coefficient added to the gradient the learned optimizer
  sees. With a model, timm puts biases and norm weights in a group with
  ``weight_decay=0`` (``filter_bias_and_bn``), which is honoured per group.
- ``momentum``, ``eps`` and ``betas`` do not apply; the registration says so
  (``has_momentum``, ``has_eps``, ``has_betas`` are false), so timm drops them.

- ``lookahead_<name>`` wraps it in timm's ``Lookahead``, which keeps its slow weights
  in the optimizer's state next to the learned optimizer's (see the torch_optim module).

Names may not contain ``_``: ``create_optimizer_v2`` reads ``"a_b"`` as optimizer ``b``
with the prefix ``a`` (``lookahead_adam``), so ``"l2o_rnnprop"`` would look up
``"rnnprop"``. Use ``-`` instead.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .._extras import import_extra
from ..errors import ConfigError
from ..optimizers.weights import read_learned_optimizer_config
from .torch_optim import LearnedOptimizerTorch

import_extra("timm.optim", "timm", "flat_l2o_plugin.integrations.timm")
from timm.optim._optim_factory import OptimInfo, OptimizerRegistry, default_registry  # noqa: E402

__all__ = ["TimmRegistrationError", "register_installed_with_timm", "register_with_timm", "timm_name"]

_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


class TimmRegistrationError(ConfigError):
    """A name cannot be registered in timm: badly formed, or taken by another optimizer."""


def register_with_timm(
    name: str,
    optimizer: nn.Module | str | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    description: str | None = None,
    registry: OptimizerRegistry | None = None,
) -> OptimInfo:
    """Register a learned optimizer in timm's optimizer registry under ``name``.

    The registration is checked by building the optimizer once, so a missing weights
    file or an unknown name fails here rather than at the first training run.
    Registering the same name again with the same configuration does nothing;
    registering a different one under a taken name (another learned optimizer, or one
    of timm's own such as ``"adamw"``) raises instead of replacing it, which is what
    timm itself would do silently.

    Args:
        name: The name to pass as ``opt`` to ``create_optimizer_v2``: lower case,
            letters, digits, ``-`` and ``.``, no ``_`` (see the module docstring).
        optimizer: As for :class:`LearnedOptimizerTorch`: a meta-trained module, a
            registered learned-optimizer name, or ``None`` with ``weights``.
        weights: A file from :func:`~flat_l2o_plugin.optimizers.weights.save_learned_optimizer`
            (the usual case). Stored as an absolute path; read at each creation.
        options: Options of a named optimizer without ``weights``.
        description: Shown by ``timm.optim.list_optimizers(with_description=True)``;
            derived from the configuration by default.
        registry: The timm registry to register in; timm's ``default_registry``
            (used by ``create_optimizer_v2``) by default.

    Returns:
        The ``OptimInfo`` now registered under ``name``.

    Raises:
        TimmRegistrationError: ``name`` is badly formed, or taken by a different
            configuration.
        ConfigError: The configuration does not build a learned optimizer (see
            :class:`LearnedOptimizerTorch`); a ``WeightsError`` for a bad file.

    Example:
        >>> register_with_timm("l2o-rnnprop", weights="runs/rnnprop.safetensors")
        >>> opt = timm.optim.create_optimizer_v2(model, "l2o-rnnprop", lr=1.0)
        >>> isinstance(opt, LearnedOptimizerTorch)
        True
    """
    registry = default_registry if registry is None else registry
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        hint = f" (try {name.replace('_', '-').lower()!r})" if isinstance(name, str) and name else ""
        raise TimmRegistrationError(
            f"register_with_timm: name {name!r} must be lower case letters, digits, '-' or '.', "
            f"starting with a letter or digit{hint}; timm's create_optimizer_v2 reads '_' as a "
            f"prefix separator (lookahead_adam), so a name with '_' could never be selected"
        )
    resolved_weights = None if weights is None else str(Path(weights).resolve())
    defaults: dict[str, Any] = {
        "optimizer": optimizer,
        "weights": resolved_weights,
        "options": None if options is None else dict(options),
    }
    # Building it once surfaces a bad file or name now, with the error that names it.
    LearnedOptimizerTorch([nn.Parameter(torch.zeros(1))], **defaults)

    if description is None:
        what = (read_learned_optimizer_config(resolved_weights)["optimizer"] if resolved_weights
                else optimizer if isinstance(optimizer, str) else type(optimizer).__name__)
        source = (f"weights {resolved_weights}" if resolved_weights
                  else "initial, untrained weights" if isinstance(optimizer, str)
                  else "the module given at registration")
        description = f"flat-l2o-plugin learned optimizer {what!r} ({source}); lr multiplies the learned update"
    info = OptimInfo(
        name=name,
        opt_class=LearnedOptimizerTorch,
        description=description,
        has_eps=False,
        has_momentum=False,
        has_betas=False,
        defaults=defaults,
    )
    if name in registry.list_optimizers():
        existing = registry.get_optimizer_info(name)
        if existing == info:
            return existing
        raise TimmRegistrationError(
            f"register_with_timm: timm already has an optimizer {name!r} ({_describe(existing)}); "
            f"it differs from this one ({_describe(info)}): choose another name"
        )
    registry.register(info)
    return info


def _describe(info: OptimInfo) -> str:
    cls = info.opt_class if isinstance(info.opt_class, str) else getattr(info.opt_class, "__name__", info.opt_class)
    return f"class {cls}, defaults {info.defaults}"



def timm_name(name: str) -> str:
    """The name under which :func:`register_installed_with_timm` registers ``name``.

    ``l2o-`` and the name in lower case with ``-`` for ``_`` (timm reads ``_`` as a
    prefix separator); a name that already starts with ``l2o`` is not prefixed twice.

    Example:
        >>> timm_name("rnnprop"), timm_name("l2o_dm"), timm_name("learned_correction")
        ('l2o-rnnprop', 'l2o-dm', 'l2o-learned-correction')
    """
    dashed = name.lower().replace("_", "-")
    return dashed if dashed == "l2o" or dashed.startswith("l2o-") else f"l2o-{dashed}"


def register_installed_with_timm(
    *,
    registry: OptimizerRegistry | None = None,
    plugin_manager: Any = None,
) -> dict[str, OptimInfo]:
    """Register every installed learned optimizer in timm, each built from a weights file, and every pretrained one.

    The learned optimizer registered as ``name`` (by this package or any plugin) becomes
    timm's :func:`timm_name` ``(name)``. Creating one takes the weights file from the
    ``weights`` keyword, which is what timm's ``train.py`` passes for
    ``--opt-kwargs weights=FILE``; without it creation raises instead of training with
    an untrained network. The file must hold that optimizer (its config says which).

    A name that timm already has is never replaced: a learned optimizer registered
    under it (by :func:`register_with_timm`, say) is kept as it is, and one of timm's
    own, or another learned optimizer whose name maps to the same (``l2o_dm`` and
    ``l2o-dm``; the built-ins are registered first), is kept with a warning. Calling
    this again does nothing new.

    Args:
        registry: The timm registry; timm's ``default_registry`` by default.
        plugin_manager: The manager whose registry lists the learned optimizers, also
            used to build them; a fresh :func:`~flat_l2o_plugin.get_plugin_manager`
            by default.

    Returns:
        timm name -> ``OptimInfo`` for each learned optimizer registered by this call
        or by an earlier one.

    Example:
        >>> register_installed_with_timm()["l2o-rnnprop"].name
        'l2o-rnnprop'
        >>> timm.optim.create_optimizer_v2(model, "l2o-rnnprop", lr=0.1, weights="rnnprop.safetensors")
    """
    from ..manager import get_plugin_manager

    registry = default_registry if registry is None else registry
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    optimizers = pm.components.optimizers
    registered: dict[str, OptimInfo] = {}
    # Our own first: a plugin's name that maps to a built-in's timm name does not take it.
    for name in sorted(optimizers.names(), key=lambda n: (optimizers.provider(n) != "builtin", n)):
        tname = timm_name(name)
        defaults: dict[str, Any] = {"optimizer": name, "timm_name": tname}
        if plugin_manager is not None:
            defaults["plugin_manager"] = plugin_manager
        info = OptimInfo(
            name=tname,
            opt_class=_from_weights,
            description=(f"flat-l2o-plugin learned optimizer {name!r}, from the file given as weights= "
                         f"(train.py: --opt-kwargs weights=FILE); lr multiplies the learned update"),
            has_eps=False,
            has_momentum=False,
            has_betas=False,
            defaults=defaults,
        )
        if not _NAME.fullmatch(tname):
            warnings.warn(f"register_installed_with_timm: learned optimizer {name!r} is not registered in timm: "
                          f"{tname!r} is not a name timm can select", stacklevel=2)
            continue
        if tname in registry.list_optimizers():
            existing = registry.get_optimizer_info(tname)
            if existing == info:
                registered[tname] = existing
            elif existing.opt_class is _from_weights:  # two names that differ only in '_' and '-'
                warnings.warn(f"register_installed_with_timm: {tname!r} already stands for learned optimizer "
                              f"{existing.defaults.get('optimizer')!r}; {name!r} is not registered in timm",
                              stacklevel=2)
            elif existing.opt_class is not LearnedOptimizerTorch:  # a user's register_with_timm is kept silently
                warnings.warn(f"register_installed_with_timm: timm's own optimizer {tname!r} is kept; learned "
                              f"optimizer {name!r} is not registered under that name", stacklevel=2)
            continue
        registry.register(info)
        registered[tname] = info
    for name in pm.components.pretrained.names():
        defaults = {"optimizer": name}
        if plugin_manager is not None:
            defaults["plugin_manager"] = plugin_manager
        info = OptimInfo(
            name=name, opt_class=_pretrained, has_eps=False, has_momentum=False, has_betas=False, defaults=defaults,
            description=(f"flat-l2o-plugin pretrained learned optimizer {name!r} "
                         f"({pm.components.pretrained.get(name).description}); lr multiplies the learned update"))
        if name in registry.list_optimizers():
            existing = registry.get_optimizer_info(name)
            if existing == info:
                registered[name] = existing
            elif existing.opt_class is not LearnedOptimizerTorch:
                warnings.warn(f"register_installed_with_timm: timm's optimizer {name!r} is kept; pretrained "
                              f"optimizer {name!r} is not registered under that name", stacklevel=2)
            continue
        registry.register(info)
        registered[name] = info
    return registered


def _pretrained(params: Iterable[Any], optimizer: str, *, weights: Any = None, **kwargs: Any) -> LearnedOptimizerTorch:
    """The creator timm calls for a pretrained name: its shipped weights, never a file of the user's."""
    if weights is not None:
        raise ConfigError(f"timm optimizer {optimizer!r} is pretrained and loads its own weights; drop "
                          f"weights={weights!r} (train.py: --opt-kwargs weights=...)")
    return LearnedOptimizerTorch(params, optimizer, **kwargs)


def _from_weights(params: Iterable[Any], optimizer: str, *, timm_name: str,
                  weights: str | os.PathLike[str] | None = None, **kwargs: Any) -> LearnedOptimizerTorch:
    """The creator timm calls for a :func:`register_installed_with_timm` name."""
    if weights is None:
        raise ConfigError(
            f"timm optimizer {timm_name!r} needs a meta-trained weights file holding a {optimizer!r}: "
            f"pass weights=FILE (train.py: --opt-kwargs weights=FILE), FILE from save_learned_optimizer()"
        )
    return LearnedOptimizerTorch(params, optimizer, weights=weights, **kwargs)
