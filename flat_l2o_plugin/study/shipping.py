"""From the study to the wheel: which meta-trained optimizers ship, and how each is made.

A shipped optimizer is a row of the study (a candidate of a regime, at one meta-seed)
made again, from a config file, by ``flat-l2o meta-train``. :data:`SHIPPED` is the
choice; changing what ships is changing one of its lines. The steps, each a command of
``python -m flat_l2o_plugin.study.shipping``:

1. ``config NAME`` writes ``flat_l2o_plugin/pretrained/NAME/meta-train.toml``: the
   candidate's optimizer, options, wrappers, task family, trainer and seed exactly as
   the study's meta-training job of that row (:meth:`~.pipeline.Study.meta_job`).
2. ``flat-l2o meta-train --config flat_l2o_plugin/pretrained/NAME/meta-train.toml``
   meta-trains it (the shipped config travels with the wheel, so a user can do the same).
3. ``install NAME RUN_DIR`` copies the run's ``optimizer.safetensors`` into the package
   and records it in ``flat_l2o_plugin/pretrained/index.json``: its SHA-256, the
   version, the license, the wrapper stack and the validation result the run printed.
4. ``cards`` writes the model cards (``docs/models/NAME.md`` and the ``card.json`` the
   index names, whose summary ``flat-l2o list pretrained`` prints) from the study's
   compact results and the deploy benchmark's committed JSON (:mod:`.cards`).

``index.json`` is what the package's own plugin registers, one
:class:`~flat_l2o_plugin.registry.PretrainedInfo` per entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["DEPLOY_RESULT", "INDEX_FILE", "SHIPPED", "Shipped", "install", "meta_train_config", "pretrained_folder", "read_index",
           "shipped", "write_config"]

INDEX_FILE = "index.json"
"""The manifest of the shipped optimizers, in ``flat_l2o_plugin/pretrained/``."""

DEPLOY_RESULT = "benchmarks/results/deploy.json"
"""The deploy benchmark's committed result (``benchmarks/deploy.py --out``), read by the cards."""

LICENSE = "MIT"
"""The shipped weights' license: the package's own."""


@dataclass(frozen=True)
class Shipped:
    """One shipped optimizer: which row of which study it is, and under what name.

    Attributes:
        name: The pre-trained name users type (lower case, digits and ``-``: timm's
            ``create_optimizer_v2`` takes it as is).
        regime: A built-in regime (``"gap"``) or a regime file.
        candidate: The candidate's label in that regime.
        meta_seed: The meta-seed of the study's row this one is.
        version: Bumped whenever the weights change.
        description: One line for ``flat-l2o list pretrained``.
    """

    name: str
    regime: str
    candidate: str
    meta_seed: int
    version: str
    description: str


# The flatness-aware one is the gap study's headline row (chosen on validation over the
# family variants), at the meta-seed of its five that validated best (0.3347 against
# 0.3300, 0.3293, 0.3320, 0.3280); the plain one is the best validating of the plain
# candidate's two meta-seeds (0.4516 against 0.4444). Validation accuracies are the
# study cache's best_val_accuracy, each on its own training tasks' validation optimizees.
SHIPPED: tuple[Shipped, ...] = (
    Shipped("l2o-correction-sam", "gap", "correction+sam, one architecture", 4, "1",
            "Adam + learned correction, fed SAM gradients; meta-trained on one tanh MLP on mnist1d"),
    Shipped("l2o-correction-adam", "gap", "correction, family", 0, "1",
            "Adam + learned correction; meta-trained on an MLP/conv/ViT family"),
)


def shipped(name: str) -> Shipped:
    """The entry of :data:`SHIPPED` called ``name``."""
    for entry in SHIPPED:
        if entry.name == name:
            return entry
    raise ConfigError(f"no shipped optimizer {name!r}; shipped: {', '.join(s.name for s in SHIPPED)}")


def pretrained_folder() -> Path:
    """``flat_l2o_plugin/pretrained`` of this checkout (where the steps above write)."""
    return Path(str(resources.files("flat_l2o_plugin").joinpath("pretrained")))


def _regime(entry: Shipped) -> Any:
    from . import builtin_regime, builtin_regimes, load_regime

    return load_regime(builtin_regime(entry.regime) if entry.regime in builtin_regimes() else entry.regime)


def meta_train_job(entry: Shipped) -> tuple[str, dict[str, Any]]:
    """The study's meta-training job of ``entry``'s row: its cache key and its arguments."""
    from .pipeline import Study

    regime = _regime(entry)
    with tempfile.TemporaryDirectory() as folder:  # the study object writes nothing until run
        job = Study(regime, folder).meta_job(regime.candidate(entry.candidate), entry.meta_seed)
    return job.key, job.args


def meta_train_config(entry: Shipped) -> dict[str, Any]:
    """The ``flat-l2o meta-train`` config (as a dict) that meta-trains ``entry`` as the study did."""
    _, args = meta_train_job(entry)
    config: dict[str, Any] = {
        "optimizer": {"name": args["optimizer"], "options": dict(args["optimizer_options"])},
        "wrappers": [dict(w) for w in args["wrappers"]],
        "tasks": [{"name": name, "options": dict(options)} for name, options in args["tasks"]],
        "trainer": {**args["trainer"], "seed": args["seed"]},
        "val_tasks": args["val_tasks"],
        "run_dir": f"runs/pretrained/{entry.name}",
    }
    if args["regularizers"]:
        config["regularizers"] = dict(args["regularizers"])
    return config


def write_config(entry: Shipped, folder: str | Path | None = None) -> Path:
    """Write ``entry``'s config as ``<folder>/<name>/meta-train.toml`` (default: the package's)."""
    from .._atomic import write_atomically

    folder = Path(folder) if folder is not None else pretrained_folder()
    path = folder / entry.name / "meta-train.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = meta_train_config(entry)
    lines = [f"# {entry.name} {entry.version}: the study's row {entry.candidate!r} (regime {entry.regime!r}, "
             f"meta-seed {entry.meta_seed}).",
             f"# Meta-train it again: flat-l2o meta-train --config {path.name}", ""]
    for key in ("run_dir", "val_tasks"):
        lines.append(f"{key} = {_toml(config[key])}")
    lines += ["", "[optimizer]", f"name = {_toml(config['optimizer']['name'])}",
              f"options = {_toml(config['optimizer']['options'])}"]
    for wrapper in config["wrappers"]:
        lines += ["", "[[wrappers]]", *(f"{k} = {_toml(v)}" for k, v in wrapper.items())]
    for task in config["tasks"]:
        lines += ["", "[[tasks]]", f"name = {_toml(task['name'])}", f"options = {_toml(task['options'])}"]
    for name, options in config.get("regularizers", {}).items():
        lines += ["", f"[regularizers.{name}]", *(f"{k} = {_toml(v)}" for k, v in options.items())]
    lines += ["", "[trainer]", *(f"{k} = {_toml(v)}" for k, v in config["trainer"].items())]
    write_atomically(path, ("\n".join(lines) + "\n").encode(), ConfigError)
    return path


def _toml(value: Any) -> str:
    """A TOML value for plain data (inline tables and arrays)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"cannot write {value!r} to a config file")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {type(value).__name__} {value!r} to a config file")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_index(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """The entries of ``index.json`` (empty when nothing is installed yet)."""
    path = (Path(folder) if folder is not None else pretrained_folder()) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def install(entry: Shipped, run_dir: str | Path, folder: str | Path | None = None) -> dict[str, Any]:
    """Copy a finished ``flat-l2o meta-train`` run of ``entry``'s config into the package.

    The run's ``config.json`` must be the shipped config's (so the weights are what the
    config makes); its ``metrics.jsonl`` gives the validation result recorded beside them.

    Returns:
        The ``index.json`` entry written.

    Raises:
        ConfigError: The run folder lacks the weights, or was made with another config.
    """
    from .._atomic import write_atomically
    from ..config import load_config
    from ..training.runner import CONFIG_FILE, WEIGHTS_FILE, normalize_spec

    folder = Path(folder) if folder is not None else pretrained_folder()
    run_dir = Path(run_dir)
    weights, config_path = run_dir / WEIGHTS_FILE, folder / entry.name / "meta-train.toml"
    if not weights.is_file():
        raise ConfigError(f"{weights} does not exist: run flat-l2o meta-train --config {config_path} first")
    expected = load_config(config_path).as_dict()
    expected.pop("run_dir")
    ran = json.loads((run_dir / CONFIG_FILE).read_text())
    if normalize_spec(ran) != normalize_spec(expected):
        raise ConfigError(f"{run_dir} was meta-trained with another config than {config_path}")
    validations = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
    # A record's meta_step counts from 0; the validation after it has seen meta_step + 1 steps.
    scores = [(v["val_score"], v["meta_step"] + 1) for v in validations if "val_score" in v]
    best_score, best_step = max(scores, key=lambda s: (s[0], -s[1])) if scores else (None, None)
    target = folder / entry.name / "weights.safetensors"
    shutil.copyfile(weights, target)
    from ..optimizers.weights import load_learned_optimizer_bytes
    from .jobs import weights_digest

    # The study's digest of the same tensors: a card checks the shipped weights are its row's.
    model = load_learned_optimizer_bytes(target.read_bytes(), source=str(target))
    config = expected
    record = {
        "name": entry.name, "version": entry.version, "license": LICENSE, "description": entry.description,
        "optimizer": config["optimizer"]["name"], "options": config["optimizer"]["options"],
        "wrappers": config["wrappers"],
        "weights": f"{entry.name}/weights.safetensors", "sha256": file_sha256(target),
        "config": f"{entry.name}/meta-train.toml", "card": f"{entry.name}/card.json",
        "study": {"regime": entry.regime, "candidate": entry.candidate, "meta_seed": entry.meta_seed},
        "meta_training": {"best_val_accuracy": best_score, "after_meta_steps": best_step,
                          "weights_digest": weights_digest(model.state_dict())},
    }
    index = [e for e in read_index(folder) if e["name"] != entry.name] + [record]
    index.sort(key=lambda e: [s.name for s in SHIPPED].index(e["name"]) if e["name"] in
               [s.name for s in SHIPPED] else len(SHIPPED))
    write_atomically(folder / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode(), ConfigError)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flat_l2o_plugin.study.shipping {config,install} ...``."""
    parser = argparse.ArgumentParser(prog="python -m flat_l2o_plugin.study.shipping", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="write the shipped config of NAME (all when none is named)")
    p.add_argument("names", nargs="*")
    p = sub.add_parser("install", help="copy a finished meta-train run of NAME into the package")
    p.add_argument("name")
    p.add_argument("run_dir")
    p = sub.add_parser("cards", help="write the model cards (docs/models/NAME.md, pretrained/NAME/card.json) of "
                                     "the installed optimizers (all when none is named)")
    p.add_argument("names", nargs="*")
    p.add_argument("--study", default="docs/results.json", help="the study's compact results (default: %(default)s)")
    p.add_argument("--deploy", default=DEPLOY_RESULT,
                   help="the deploy benchmark's JSON; without it step cost and state are 'not measured' "
                        "(default: %(default)s)")
    p.add_argument("--docs", default="docs", help="documentation folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            for entry in [shipped(n) for n in args.names] or SHIPPED:
                print(write_config(entry))
        elif args.command == "cards":
            from .cards import write_cards

            for path in write_cards(args.study, args.docs, deploy=args.deploy, names=args.names or None):
                print(path)
        else:
            print(json.dumps(install(shipped(args.name), args.run_dir), indent=1))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
