"""The ``flat-l2o`` command line (also ``python -m flat_l2o_plugin``).

Exit codes: 0 success, 2 usage or configuration error (one line, no traceback unless
``--debug``), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, FlatL2OError, MissingExtraError, UnknownComponentError

__all__ = ["main"]

_KINDS = ("regularizers", "optimizers", "wrappers", "tasks", "pretrained")
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .manager import get_plugin_manager

    pm = get_plugin_manager()
    pm.collect_components()  # fills each record's components and conflicts, and never refuses a clash
    records = [r for r in pm.records.values() if args.all or r.status != "disabled"]
    for conflict in pm.conflicts:
        print(f"flat-l2o: conflict: {conflict}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    for r in records:
        version = f" {r.version}" if r.version else ""
        print(f"{r.name}  [{r.status}]  {r.distribution or '-'}{version}  ({r.value})")
        if r.status == "failed":
            print(f"    error: {r.error}")
        if r.status == "disabled":
            print(f"    disabled by {r.disabled_by}")
        if r.hooks:
            print(f"    hooks: {', '.join(r.hooks)}")
        for kind, names in sorted(r.components.items()):
            print(f"    {kind}: {', '.join(names)}")
        for conflict in r.conflicts:
            print(f"    conflict: {conflict}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .manager import get_plugin_manager

    pm = get_plugin_manager()
    if args.kind == "pretrained":
        return _list_pretrained(pm, args)
    registry = getattr(pm.components, args.kind)
    rows = [{"name": info.name, "description": info.description, "plugin": registry.provider(info.name)}
            for info in registry]
    if args.verbose:
        for row, info in zip(rows, registry):
            row["options"] = _option_rows(info)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['description']}  [{r['plugin']}]")
            for option in r.get("options") or []:
                value = "(required)" if option["required"] else f"= {_toml_like(option['default'])}"
                print(f"    {option['name']} {value}")
            if args.verbose and r.get("options") is None:
                print("    (options: any keyword; see the component's documentation)")
        if args.verbose and args.kind == "regularizers":
            from dataclasses import fields

            from .activation import ACTIVATION_KEYS, Schedule

            first = ["weight", *(f.name for f in fields(Schedule))]
            keys = first + sorted(ACTIVATION_KEYS - set(first))
            print(f"\nevery regularizer also takes the activation keys {', '.join(keys)} (README: Activation config)")
    for name, error in pm.failures.items():
        print(f"warning: plugin {name!r} failed to load: {error}", file=sys.stderr)
    return 0


def _list_pretrained(pm: object, args: argparse.Namespace) -> int:
    """``flat-l2o list pretrained``: each one with its card's numbers, and whether its weights check out."""
    from .optimizers.pretrained import pretrained_digest_error, read_card

    registry = pm.components.pretrained  # type: ignore[attr-defined]
    rows = []
    for info in registry:
        card = read_card(info)
        rows.append({
            "name": info.name, "version": info.version, "plugin": registry.provider(info.name),
            "description": info.description, "optimizer": info.optimizer, "options": dict(info.options),
            "wrappers": [dict(w) for w in info.wrappers], "license": info.license, "sha256": info.sha256,
            "status": pretrained_digest_error(info, registry.provider(info.name)) or "ok",
            "card": card if isinstance(card, dict) else None,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        wrappers = "".join(f" + {w['name']}({', '.join(f'{k}={v}' for k, v in w.items() if k != 'name')})"
                           for w in r["wrappers"])
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['name']} {r['version']}  {r['description']}  [{r['plugin']}, {r['license']}]")
        print(f"    model: {r['optimizer']}({options}){wrappers}")
        for key, value in (r["card"] or {}).get("summary", {}).items():
            print(f"    {key}: {value}")
        if r["status"] != "ok":
            print(f"    refused: {r['status']}")
    for name, error in pm.failures.items():  # type: ignore[attr-defined]
        print(f"warning: plugin {name!r} failed to load: {error}", file=sys.stderr)
    return 0


# Options only Python code can pass; a config file has no way to spell them.
_PYTHON_ONLY_OPTIONS = ("plugin_manager",)


def _option_rows(info: object) -> list[dict[str, object]] | None:
    from .registry import REQUIRED

    options = info.options()  # type: ignore[attr-defined]
    if options is None:
        return None
    rows = []
    for name, default in options.items():
        if name in _PYTHON_ONLY_OPTIONS:
            continue
        try:
            json.dumps(default)
            shown = default
        except (TypeError, ValueError):
            shown = repr(default)
        rows.append({"name": name, "default": None if default is REQUIRED else shown,
                     "required": default is REQUIRED})
    return rows


def _toml_like(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and value.startswith("<"):
        return value  # the repr of a callable or object default
    return json.dumps(value, ensure_ascii=False)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.workers is not None:
        config.workers = args.workers
    run_demo(args.out, config=config, progress=not args.no_progress)
    return 0


def _parse_gammas(text: str) -> tuple[float, ...]:
    try:
        gammas = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        gammas = ()
    if not gammas or not all(0 < g < float("inf") for g in gammas):
        raise ConfigError(f"--gammas: expected comma-separated positive numbers such as 10,100,1000, got {text!r}")
    return gammas


def _cmd_flatness(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .diagnostics import plot_density, task_flatness
    from .tasks.checkpoint import load_optimizee

    gammas = _parse_gammas(args.gammas)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    checkpoint = Path(args.checkpoint)
    task, params = load_optimizee(checkpoint)
    report = task_flatness(task, params, split=args.split, top_k=args.top_k, gammas=gammas, seed=args.seed)
    out = Path(args.out) if args.out else checkpoint.with_name(f"{checkpoint.stem}_flatness")
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "flatness.json", out / "spectral_density.png"
    json_path.write_text(report.to_json() + "\n")
    written = f"{json_path} and {png_path}"
    try:
        plot_density(report, png_path)
    except MissingExtraError as exc:  # the numbers do not need the plot's extra
        print(f"flat-l2o: note: no {png_path.name}: {exc}", file=sys.stderr)
        written = str(json_path)
    if args.json:
        print(report.to_json())
    else:
        print(report.summary())
        print(f"wrote {written}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .training.plot import plot_metrics

    path = plot_metrics(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def _cmd_meta_train(args: argparse.Namespace) -> int:
    from .config import Config, load_config, validate_components
    from .training.runner import WEIGHTS_FILE, run_meta_training

    if (args.config is None) == (args.config_option is None):
        raise ConfigError("meta-train needs one config: flat-l2o meta-train CONFIG or flat-l2o meta-train --config "
                          "CONFIG" + (", not both" if args.config is not None else ""))
    args.config = args.config or args.config_option
    config = load_config(args.config, table=args.table, overrides=args.set or [])
    if args.run_dir is not None:
        config.run_dir = args.run_dir
    if not config.run_dir.strip():
        raise ConfigError("run_dir is empty; name a folder for the run (--run-dir or run_dir in the config)")
    validate_components(config)
    spec = config.as_dict()
    run_dir = spec.pop("run_dir")
    defaults = Config().as_dict()
    if spec == {k: v for k, v in defaults.items() if k != "run_dir"}:
        print(f"flat-l2o: note: {args.config} sets nothing beyond the defaults: a default run of "
              f"{config.trainer.meta_steps} meta-steps ({config.optimizer.name} on {config.task.name}) in {run_dir}",
              file=sys.stderr)
    tasks = ", ".join(t.name for t in config.tasks) if config.tasks else config.task.name
    print(f"meta-training {config.optimizer.name or config.optimizer.module} on {tasks}; run folder "
          f"{run_dir}", file=sys.stderr)
    _log_to_stderr()
    try:
        result = run_meta_training(spec, run_dir, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"flat-l2o: interrupted; the last completed meta-step is checkpointed in {run_dir}. "
              f"Continue with: flat-l2o meta-train {args.config} --resume", file=sys.stderr)
        return 130
    best = f", best validation score {result.best_score:.4f} at meta-step {result.best_step}" \
        if result.best_step is not None else ""
    print(f"done: {len(result.history)} meta-steps, {result.skipped} skipped{best}. Outputs in {run_dir}: "
          f"{WEIGHTS_FILE}, metrics.jsonl, config.json, provenance.json, checkpoint/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json as _json
    import statistics

    from .config import parse_override
    from .optimizers.weights import load_learned_optimizer, read_learned_optimizer_config
    from .training.experiment import EVAL_SEEDS_START, evaluate

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (the number of optimizee init seeds), got {args.seeds}")
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    for lr in args.adam or []:
        # The rate multiplies float32 tensors: beyond float32's range torch cannot apply it.
        if not (math.isfinite(lr) and 0 < lr <= _FLOAT32_MAX):
            raise ConfigError(f"--adam must be a finite learning rate > 0 (at most {_FLOAT32_MAX:.3g}), got {lr}")
    options: dict = {}
    for text in args.task_option or []:
        path, value = parse_override(text)
        options[".".join(path)] = value
    task = (args.task, options)
    contenders = []
    for path in args.weights:
        saved = read_learned_optimizer_config(path)
        model = load_learned_optimizer(path)
        contenders.append((Path(path).name, {"learned": {"name": saved["optimizer"], "options": saved["options"],
                                                         "state_dict": model.state_dict()}}))
    for lr in args.adam or []:
        contenders.append((f"adam(lr={lr:g})", {"baseline": {"name": "adam", "lr": lr}}))
    if not contenders:
        raise ConfigError("evaluate needs at least one WEIGHTS file or --adam LR")
    rows = []
    for label, spec in contenders:
        runs = [evaluate(**spec, task=task, seed=EVAL_SEEDS_START + i, steps=args.steps, split=args.split,
                         flatness=not args.no_flatness) for i in range(args.seeds)]
        row = {"optimizer": label, "task": args.task, "task_options": options, "runs": len(runs)}
        for key in (f"{args.split}_accuracy", f"{args.split}_loss", "train_loss", "top_eigenvalue"):
            values = [r[key] for r in runs if key in r and r[key] == r[key]]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["diverged"] = sum(r["diverged_at"] is not None for r in runs)
        rows.append(row)
    if args.json:
        print(_json.dumps(rows, indent=2))
    else:
        metric = f"{args.split}_accuracy"
        print(f"{'optimizer':<32} {metric:>16} {'train loss':>12} {'top eig':>9}  ({args.seeds} seeds x {args.steps} "
              f"steps on {args.task})")
        for r in rows:
            acc = "n/a" if r[metric] is None else f"{100 * r[metric]:.2f} ± {100 * r[metric + '_std']:.2f}"
            eig = "n/a" if r["top_eigenvalue"] is None else f"{r['top_eigenvalue']:.3f}"
            print(f"{r['optimizer']:<32} {acc:>16} {r['train_loss']:>12.4f} {eig:>9}"
                  + (f"  ({r['diverged']} diverged)" if r["diverged"] else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(_json.dumps(rows, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flat-l2o", description="Flatness-aware meta-training for learned optimizers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  flat-l2o plugins --json\n  flat-l2o list regularizers\n  flat-l2o demo")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list plugins, their hooks, components and load failures",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o plugins\n  flat-l2o plugins --all --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include disabled plugins")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("list", help="list registered components of one kind",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o list regularizers\n  flat-l2o list wrappers -v\n"
                              "  flat-l2o list optimizers --json\n  flat-l2o list pretrained")
    p.add_argument("kind", choices=_KINDS)
    p.add_argument("-v", "--verbose", action="store_true", help="also every component's options with defaults")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("meta-train", help="meta-train a learned optimizer from a config file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o meta-train run.toml\n"
                              "  flat-l2o meta-train run.toml --set trainer.meta_steps=500 --set regularizers."
                              "sharpness.weight=0.1\n  flat-l2o meta-train pyproject.toml   # its [tool.flat_l2o] table\n"
                              "  flat-l2o meta-train run.toml --resume   # after a kill or Ctrl-C")
    p.add_argument("config", nargs="?", default=None,
                   help="a .toml/.yaml/.json config, or a pyproject.toml with [tool.flat_l2o]")
    p.add_argument("--config", dest="config_option", default=None, metavar="CONFIG",
                   help="the config, as an option (the same as the positional argument)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--table", default=None, help="dotted table holding our config inside a host's file")
    p.add_argument("--run-dir", default=None, help="run folder (default: the config's run_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_meta_train)

    p = sub.add_parser("evaluate", help="train held-out optimizees with meta-trained optimizers (and Adam)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o evaluate runs/meta-train/optimizer.safetensors --adam 0.01\n"
                              "  flat-l2o evaluate a.safetensors b.safetensors --task mlp_digits "
                              "--task-option activation=relu --seeds 5 --steps 300 --out eval.json")
    p.add_argument("weights", nargs="*", help="learned-optimizer files (from meta-train or save_learned_optimizer)")
    p.add_argument("--adam", type=float, action="append", metavar="LR", help="also Adam at this learning rate")
    p.add_argument("--task", default="mlp_digits", help="registered task (default: mlp_digits)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    p.add_argument("--seeds", type=int, default=5, help="optimizee init seeds 0..N-1 (default: 5)")
    p.add_argument("--steps", type=int, default=200, help="optimizee steps (default: 200)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split measured at the end")
    p.add_argument("--no-flatness", action="store_true", help="skip the final top-eigenvalue measurement")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="meta-train RNNProp with and without the Hessian regularizer and compare",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o demo\n  flat-l2o demo --quick --out /tmp/demo")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke-test budget; its numbers mean nothing")
    p.add_argument("--workers", type=int, default=None, help="processes (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("flatness", help="flatness diagnostics of a saved optimizee: eigenvalues, trace, density",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o flatness runs/mlp.safetensors\n"
                              "  flat-l2o flatness runs/mlp.safetensors --out /tmp/flat --top-k 5 --gammas 10,100")
    p.add_argument("checkpoint", help="optimizee checkpoint written by save_optimizee (.safetensors)")
    p.add_argument("--out", default=None,
                   help="folder for flatness.json and spectral_density.png (default: CHECKPOINT_STEM_flatness "
                        "next to the checkpoint)")
    p.add_argument("--top-k", type=int, default=3, help="Hessian eigenvalues to report (default: 3)")
    p.add_argument("--gammas", default="10,100,1000",
                   help="comma-separated local-entropy scopes γ (default: 10,100,1000)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="data split whose full-batch loss is measured (default: train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probes (default: 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary")
    p.set_defaults(func=_cmd_flatness)

    p = sub.add_parser("plot", help="draw a meta-training run's curves (from RUN_DIR/metrics.jsonl) as a PNG",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flat-l2o plot runs/exp1\n  flat-l2o plot runs/exp1 --out /tmp/exp1.png")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl (or the metrics file itself)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/metrics.png)")
    p.set_defaults(func=_cmd_plot)

    from .study.cli import add_parser as add_study_parser

    add_study_parser(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (not when the handler was made)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _log_to_stderr() -> None:
    """Show the library's warnings (divergence, resume notes) as ``flat-l2o: ...`` lines."""
    package = logging.getLogger("flat_l2o_plugin")
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("flat-l2o: %(message)s"))
        package.addHandler(handler)
        if package.level == logging.NOTSET:
            package.setLevel(logging.WARNING)


def _one_line(exc: BaseException) -> str:
    """The message on one line: an error wrapping another's text may carry its newlines."""
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 bad input, 1 failure, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UnknownComponentError) as exc:
        if args.debug:
            raise
        print(f"flat-l2o: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FlatL2OError as exc:
        if args.debug:
            raise
        print(f"flat-l2o: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flat-l2o: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or an error nobody anticipated: still one line
        if args.debug:
            raise
        text = _one_line(exc)[:300]
        print(f"flat-l2o: internal error: {type(exc).__name__}: {text} (run with --debug for the traceback, and "
              f"please report it)", file=sys.stderr)
        return 1
