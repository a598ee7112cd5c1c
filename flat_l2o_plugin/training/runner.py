"""One meta-training run described by plain data, in a run folder: build, train, resume.

A *spec* is a JSON-serializable dict; every component is built through the plugin
registry, exactly as a user would::

    {"optimizer": {"name": "rnnprop", "options": {}},
     "task": {"name": "mlp_digits", "options": {}},
     "tasks": [{"name": "mlp", "options": {}}, ...],                 # or a family (replaces task)
     "regularizers": {"hessian_top_eigenvalue": {"weight": 0.1}},   # the activation config
     "trainer": {"meta_steps": 200, "unroll": 20, ...},              # MetaTrainConfig fields
     "val_tasks": 3,                                                 # validation optimizees
     "wrappers": [{"name": "flatness_aware", ...}],                  # retrofit wrappers, innermost first
     "plugins": {"load": None, "disable": [], "strict": False},      # plugin control
     "threads": 1}                                                   # torch threads (optional)

``tasks``, when present and not empty, is a task family: each trajectory draws one of
them uniformly and validation cycles through them
(:class:`~flat_l2o_plugin.tasks.families.UniformTasks`, as
:func:`~flat_l2o_plugin.training.experiment.meta_train` does with ``tasks=``); ``task``
is then ignored. An empty ``tasks`` is dropped, so a spec without a family is the spec
it always was.

This is the shape of :meth:`flat_l2o_plugin.config.Config.as_dict` (without ``run_dir``),
which is how ``flat-l2o meta-train CONFIG`` calls it. The optimizer may instead be the
user's own class, ``{"module": "package.module:Class", "options": {...}, "weights":
"port.pt", "python_path": [...]}``, adapted by a ``foreign`` wrapper (see
:mod:`flat_l2o_plugin.optimizers.external`).

Every key is optional (defaults: RNNProp on ``mlp_digits``, no regularizer, the default
``MetaTrainConfig``, 3 validation tasks, torch's thread count). Seeds follow
:mod:`..tasks.seeds`: torch's global RNG is seeded with ``trainer.seed`` before anything is
built, meta-training init seeds come from ``[TRAIN_SEEDS_START, ...)`` and validation
uses seeds ``VAL_SEEDS_START + i`` on the ``val`` split.

The run folder receives ``config.json`` (the spec, echoed), ``provenance.json`` (the
versions of Python, torch, pluggy, timm, learn2learn and every plugin), ``metrics.jsonl``,
``checkpoint/`` and, at the end, ``optimizer.safetensors``: the best learned optimizer,
loadable with :func:`~flat_l2o_plugin.optimizers.weights.load_learned_optimizer`. For a
user's module it holds that module's own ``state_dict`` (its keys, no wrapper's), which
its class loads with ``load_state_dict(safetensors.torch.load_file(path))`` and a config
names as ``[optimizer] weights``.

Under ``torchrun`` (``WORLD_SIZE`` set) the run joins the process group and splits the
meta-batch over the ranks (:mod:`.distributed`); only rank 0 writes files. From a shell::

    python -m flat_l2o_plugin.training.runner spec.json runs/exp1            # start
    python -m flat_l2o_plugin.training.runner spec.json runs/exp1 --resume   # continue after a kill
    torchrun --nproc_per_node=4 -m flat_l2o_plugin.training.runner spec.json runs/exp1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .._atomic import write_atomically
from ..errors import ConfigError, FlatL2OError
from ..tasks.families import UniformTasks
from .checkpoint import Checkpoint, TrainingCheckpointError, checkpoint_dir
from .distributed import init_distributed, shutdown_distributed
from .meta_trainer import MetaTrainConfig, MetaTrainer, MetaTrainResult
from .run_folder import prepare_run_folder
from .seeding import seed_everything

__all__ = ["CONFIG_FILE", "PROVENANCE_FILE", "RESUMABLE_KEYS", "WEIGHTS_FILE", "build_learned_optimizer", "main",
           "normalize_spec", "run_meta_training", "spec_differences"]

CONFIG_FILE = "config.json"
"""The echoed spec inside a run folder."""

PROVENANCE_FILE = "provenance.json"
"""Versions of everything that produced the run."""

WEIGHTS_FILE = "optimizer.safetensors"
"""The final (best validated) learned optimizer inside a run folder."""

_DEFAULTS: dict[str, Any] = {"optimizer": {"name": "rnnprop", "options": {}},
                             "task": {"name": "mlp_digits", "options": {}},
                             "regularizers": {}, "trainer": {}, "val_tasks": 3, "threads": None,
                             "wrappers": [], "plugins": {"load": None, "disable": [], "strict": False}}
_OPTIMIZER_KEYS = ("name", "options", "module", "weights", "python_path")

RESUMABLE_KEYS = ("threads", "trainer.checkpoint_every", "trainer.meta_steps")
"""The spec entries a resumed run may change: the thread count, how often it checkpoints,
and its length (``trainer.meta_steps``, not below the checkpoint's step; a cosine
schedule stretches to the new length). Everything else must equal the checkpoint's."""

_ABSENT = object()


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with its defaults filled in and its types checked.

    Raises:
        ConfigError: An unknown key or a value of the wrong type (the message names it,
            e.g. ``spec.task.name``).
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"spec must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_DEFAULTS) - {"tasks"})
    if unknown:
        raise ConfigError(f"spec: unknown key(s) {unknown}; expected some of {sorted(_DEFAULTS)}")
    out = json.loads(json.dumps({**_DEFAULTS, **spec}))  # a deep, JSON-faithful copy
    for part, keys in (("optimizer", _OPTIMIZER_KEYS), ("task", ("name", "options"))):
        entry = out[part]
        if not isinstance(entry, dict) or set(entry) - set(keys):
            raise ConfigError(f"spec.{part} must be an object with keys among {list(keys)}, got {entry!r}")
        entry.setdefault("options", {})
        if not isinstance(entry["options"], dict):
            raise ConfigError(f"spec.{part}.options must be an object, got {entry['options']!r}")
    if not isinstance(out["task"].get("name"), str):
        raise ConfigError(f"spec.task.name must be a registered task name, got {out['task'].get('name')!r}")
    family = out.pop("tasks", [])
    if not isinstance(family, list):
        raise ConfigError(f"spec.tasks must be a list of {{\"name\": str, \"options\": {{...}}}} objects, got {family!r}")
    for index, entry in enumerate(family):
        if not isinstance(entry, dict) or set(entry) - {"name", "options"} or not isinstance(entry.get("name"), str):
            raise ConfigError(f"spec.tasks[{index}] must be an object with a task name and options, got {entry!r}")
        entry.setdefault("options", {})
        if not isinstance(entry["options"], dict):
            raise ConfigError(f"spec.tasks[{index}].options must be an object, got {entry['options']!r}")
    if family:
        out["tasks"] = family  # absent when empty: a spec without a family is unchanged
    optimizer = out["optimizer"] = {"name": None, "module": None, "weights": None, "python_path": [],
                                    **out["optimizer"]}
    if (optimizer["module"] is None) == (optimizer["name"] is None):
        raise ConfigError(f"spec.optimizer needs exactly one of name (registered) and module "
                          f"('package.module:Class'), got {optimizer!r}")
    for part in ("regularizers", "trainer", "plugins"):
        if not isinstance(out[part], dict):
            raise ConfigError(f"spec.{part} must be an object, got {out[part]!r}")
    if not isinstance(out["wrappers"], list) or not all(isinstance(w, dict) and isinstance(w.get("name"), str)
                                                         for w in out["wrappers"]):
        raise ConfigError(f"spec.wrappers must be a list of {{\"name\": str, ...}} objects, got {out['wrappers']!r}")
    val_tasks = out["val_tasks"]
    if not isinstance(val_tasks, int) or isinstance(val_tasks, bool) or val_tasks < 0:
        raise ConfigError(f"spec.val_tasks must be an integer >= 0, got {val_tasks!r}")
    threads = out["threads"]
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"spec.threads must be an integer >= 1 or null, got {threads!r}")
    return out


def _write_json_atomically(path: Path, value: Any) -> None:
    write_atomically(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"), ConfigError)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def spec_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two specs, except :data:`RESUMABLE_KEYS`."""
    before, after = _flatten(saved), _flatten(now)
    return [key for key in sorted(set(before) | set(after))
            if key not in RESUMABLE_KEYS and before.get(key, _ABSENT) != after.get(key, _ABSENT)]


def _run_config(spec: Mapping[str, Any], config: MetaTrainConfig) -> dict[str, Any]:
    # The trainer section complete, so that a default written out equals a default left out.
    return json.loads(json.dumps({**spec, "trainer": dataclasses.asdict(config)}))


def _check_resumed_spec(checkpoint: Checkpoint, run_config: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume ``checkpoint`` with a configuration other than the one it was made with."""
    saved = checkpoint.state.get("run_config")
    where = checkpoint_dir(run_dir) or run_dir
    if saved is None:
        # Written before checkpoints recorded their configuration: the echoed spec is all there is.
        saved, where = _legacy_spec(run_dir), run_dir / CONFIG_FILE
        if saved is None:
            return
        trainer = saved.get("trainer") if isinstance(saved.get("trainer"), dict) else {}
        run_config = {**run_config, "trainer": {k: run_config["trainer"].get(k) for k in trainer}}
    changed = spec_differences(saved, run_config)
    if changed:
        before, after = _flatten(saved), _flatten(run_config)
        shown = "; ".join(f"{k}: {_show(before.get(k, _ABSENT))} -> {_show(after.get(k, _ABSENT))}"
                          for k in changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise TrainingCheckpointError(f"{where} was made with another configuration ({shown}); resume with the "
                                      f"configuration the run started with (only {', '.join(RESUMABLE_KEYS)} may "
                                      f"change) or start a new run folder")


def _legacy_spec(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        # Normalized like the spec, so a folder written before a key gained a default still compares equal.
        saved = normalize_spec(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, RecursionError) as exc:  # invalid JSON, or a ConfigError
        raise TrainingCheckpointError(f"run config {path} is not a valid run spec ({exc})") from None
    return saved


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)[:60]


def _build(pm: Any, kind: str, part: str, entry: Mapping[str, Any]) -> Any:
    from ..config import check_option_types

    info = pm.component(kind, entry["name"])
    check_option_types(info.factory, entry["options"], f"spec.{part}.options")
    try:
        return info.create(**entry["options"])
    except FlatL2OError as exc:
        raise ConfigError(f"spec.{part}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"spec.{part}.options: {exc}") from exc


def run_meta_training(spec: Mapping[str, Any], run_dir: str | os.PathLike[str], *, resume: bool = False,
                      progress: bool = False) -> MetaTrainResult:
    """Meta-train the learned optimizer ``spec`` describes, writing the run into ``run_dir``.

    The run folder is locked for the whole run (:mod:`.run_folder`); nothing in it is
    written before every check passed, so a refused call leaves it byte for byte as it
    was.

    Args:
        spec: The run, as plain data (see the module docstring).
        run_dir: The run folder (created if missing).
        resume: Continue from ``run_dir/checkpoint/``. The spec must be the one the
            checkpoint records, except for :data:`RESUMABLE_KEYS` (the run length,
            the checkpoint rate, the thread count).
        progress: Show a progress bar (rank 0 only).

    Returns:
        The trainer's result; the learned optimizer with the best validated weights is in
        ``run_dir/optimizer.safetensors``.

    Raises:
        ConfigError: A bad spec (the message names the field), or a ``run_dir`` that is
            empty, a file, under a file, or cannot be created.
        TrainingCheckpointError: ``resume`` without a usable checkpoint, with another
            configuration than the checkpoint's, or a fresh start in a folder that
            holds one.
        RunFolderLockedError: Another process runs in ``run_dir`` (the message names it).

    Example:
        >>> result = run_meta_training({"trainer": {"meta_steps": 100, "unroll": 10, "horizon": 50}},
        ...                            "runs/rnnprop", progress=True)
    """
    from ..config import config_from_dict, provenance
    from ..host import FlatL2O
    from ..optimizers.external import build_optimizer, save_module_weights
    from ..optimizers.weights import save_learned_optimizer
    from ..wrappers import FlatnessAware, unwrap

    spec = normalize_spec(spec)
    run_dir = prepare_run_folder(run_dir, create=False)
    try:
        config = MetaTrainConfig(**spec["trainer"])
    except TypeError as exc:
        raise ConfigError(f"spec.trainer: {exc}; the fields are those of MetaTrainConfig") from exc
    except ConfigError as exc:
        raise ConfigError(f"spec.trainer: {exc}") from exc
    run_config = _run_config(spec, config)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    context = init_distributed()
    threads = torch.get_num_threads()
    try:
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        seed_everything(config.seed)
        pm = config_from_dict({"plugins": spec["plugins"]}).plugin_manager()
        if spec["optimizer"]["name"] is not None:
            from ..config import check_option_types

            factory = pm.component("optimizers", spec["optimizer"]["name"]).factory
            check_option_types(factory, spec["optimizer"]["options"], "spec.optimizer.options")
        model = build_optimizer(spec["optimizer"], pm)
        family = UniformTasks([_build(pm, "tasks", f"tasks[{i}]", entry) for i, entry in enumerate(spec["tasks"])]
                              if spec.get("tasks") else [_build(pm, "tasks", "task", spec["task"])])
        flat = FlatL2O(spec["regularizers"], plugin_manager=pm)
        learned = _stack(model, spec["optimizer"], spec["wrappers"], pm)
        for layer in unwrap(learned):
            if isinstance(layer, FlatnessAware):
                layer.attach(flat)  # the reference host asks its facade; the wrapper answers
        trainer = MetaTrainer(learned, family, flat=flat, config=config, run_dir=run_dir,
                              val_tasks=family.validation_tasks(spec["val_tasks"]),
                              distributed=context, run_config=run_config)
        with trainer.lock(create=not resume) as lock:
            if resume:
                checkpoint = trainer.read_checkpoint()
                _check_resumed_spec(checkpoint, run_config, run_dir)
                trainer.resume(checkpoint)
            elif context.is_main and checkpoint_dir(run_dir) is not None:
                raise TrainingCheckpointError(f"{checkpoint_dir(run_dir)} already holds a checkpoint of this run "
                                              f"folder; pass --resume to continue it, or choose a new run folder")
            if context.is_main:
                # Every check passed: only now does anything in the folder change.
                lock.record_holder()
                _write_json_atomically(run_dir / CONFIG_FILE, spec)
                _write_json_atomically(run_dir / PROVENANCE_FILE, provenance(pm))
            result = trainer.train(progress=progress, resume=resume)
            if context.is_main and spec["optimizer"].get("module") is not None:
                save_module_weights(run_dir / WEIGHTS_FILE, model, spec=spec["optimizer"])
            elif context.is_main:
                save_learned_optimizer(run_dir / WEIGHTS_FILE, model, name=spec["optimizer"]["name"],
                                       options=spec["optimizer"]["options"])
        return result
    finally:
        torch.set_num_threads(threads)
        if owns_group:
            shutdown_distributed()


def build_learned_optimizer(optimizer: Mapping[str, Any], wrappers: Sequence[Mapping[str, Any]],
                            plugin_manager: Any = None) -> tuple[nn.Module, nn.Module]:
    """The model an ``[optimizer]`` table describes, and the learned optimizer its wrappers make of it.

    Returns:
        ``(model, learned)``: the registered optimizer or the user's module (its
        weights loaded), and the outermost wrapper of the ``wrappers`` stack around it
        (``model`` itself without wrappers).

    Raises:
        ConfigError: a bad ``optimizer`` field or wrapper option, or a user module that
            no wrapper adapts into a learned optimizer.
    """
    from ..optimizers.external import build_optimizer

    model = build_optimizer(optimizer, plugin_manager)
    return model, _stack(model, optimizer, wrappers, plugin_manager)


def _stack(model: nn.Module, optimizer: Mapping[str, Any], wrappers: Sequence[Mapping[str, Any]],
           plugin_manager: Any) -> nn.Module:
    from ..wrappers import wrap

    learned = wrap(model, wrappers, plugin_manager=plugin_manager) if wrappers else model
    missing = [m for m in ("init_state", "step") if not callable(getattr(learned, m, None))]
    if missing:
        raise ConfigError(f"optimizer.module: {optimizer.get('module') or optimizer.get('name')} is not a learned "
                          f"optimizer (it has no {' or '.join(missing)}()); adapt it with a [[wrappers]] entry "
                          f"name = \"foreign\", first in the list")
    return learned


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flat_l2o_plugin.training.runner SPEC.json RUN_DIR [--resume] [--progress]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flat_l2o_plugin.training.runner", description="Meta-train one spec in a run folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m flat_l2o_plugin.training.runner spec.json runs/exp1\n"
               "  python -m flat_l2o_plugin.training.runner spec.json runs/exp1 --resume\n"
               "  torchrun --nproc_per_node=2 -m flat_l2o_plugin.training.runner spec.json runs/exp1")
    parser.add_argument("spec", help="the run's spec, a JSON file")
    parser.add_argument("run_dir", help="the run folder (config.json, metrics.jsonl, checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint/")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s")
    try:
        try:
            spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"spec file {args.spec}: {exc}") from exc
        result = run_meta_training(spec, args.run_dir, resume=args.resume, progress=args.progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FlatL2OError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if rank == 0:
        print(json.dumps({"run_dir": str(args.run_dir), "meta_steps": len(result.history),
                          "best_val_score": result.best_score if math.isfinite(result.best_score) else None,
                          "best_step": result.best_step,
                          "skipped": result.skipped, "seconds": round(result.seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
