"""A study regime: one TOML file that says what is meta-trained, on what, and against what.

A regime names its optimizee tasks once and then refers to them by label: the
meta-training family, the validation architectures that choose between candidates,
and the held-out tasks of the report (which no candidate may train on). It lists the
hand-designed baselines with their grids, the learned-optimizer candidates, the budget
and the targets. Everything a study selects is selected on validation optimizees
(validation init seeds, ``val`` split); only the final held-out runs touch ``test``.

Layout::

    name = "gap"
    description = "..."

    [budget]                   # see Budget
    meta_seeds = 5
    ...

    [trainer]                  # MetaTrainConfig fields shared by every meta-training run
    meta_steps = 150

    [tasks]                    # label = [registered task, {options}]
    mlp_tanh_50 = ["mlp", {dataset = "mnist1d", hidden_sizes = [50], activation = "tanh"}]

    [sets]
    family = ["mlp_tanh_50", ...]    # what candidates meta-train on (unless they say otherwise)
    selection = [...]                # validation architectures that rank candidates
    held_out = [...]                 # the report's columns, never trained on

    [baselines.sam]            # see Baseline
    optimizer = "sam"
    fixed = {base = "adam"}
    grid = {lr = [3e-3, 1e-2, 3e-2], rho = [0.03, 0.1, 0.3]}
    extend = ["lr", "rho"]

    [[candidates]]             # see Candidate
    label = "correction+sam"
    optimizer = "learned_correction"
    options = {base = "adam", lr = 1e-2}
    wrappers = [{name = "sam_gradient", rho = 0.1}]
    deploy = {options = {lr = "@sam.lr"}, wrappers = [{rho = "@sam.rho"}]}

    [targets]                  # see Targets

    [executor]                 # where the jobs run (default "local"); --executor overrides `use`
    use = "slurm:/shared/me/study-jobs"
    slurm = {slurm_partition = "cpu", timeout_min = 120}

    [quick]                    # a smoke-test budget: overrides of [budget] and [trainer]
    budget = {meta_seeds = 1}
    trainer = {meta_steps = 4}
    sets = {family = ["mlp_tanh_50"]}

Strings ``"@baseline.option"`` in a candidate's ``deploy`` table are replaced, for each
evaluated task, by the value that baseline's grid search picked on that task: a learned
optimizer then runs at the learning rate (or radius) a practitioner would have tuned for
its base optimizer there.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .executors import ExecutorSpec, executor_spec

__all__ = ["Budget", "Baseline", "Candidate", "Regime", "Targets", "load_regime", "regime_from_dict",
           "resolve_picks"]

TaskSpec = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Budget:
    """How much is run.

    Attributes:
        meta_seeds: Meta-training seeds of every headline row.
        candidate_meta_seeds: Meta-training seeds of a candidate compared on validation
            (the first ones of ``meta_seeds``, so a candidate that reaches the headline
            reuses them).
        eval_seeds: Held-out evaluation seeds per meta-seed. Every (meta-seed, eval seed)
            pair gets its own optimizee seed, and hand-designed rows run on all
            ``meta_seeds × eval_seeds`` of them, so both sides of every paired
            difference carry their seed variance.
        val_seeds: Validation optimizees per grid point, and per candidate and selection task.
        eval_steps: Optimizee steps of every evaluation run (validation and held-out).
        headline: Candidates (best by validation) that reach the headline table, besides
            those marked ``headline = "always"``.
        max_grid_extensions: The most values a grid search adds beyond each end of an axis.
        failure_accuracy: A meta-training run whose best validation accuracy stays at or
            below this never learned (it is counted, and kept).
        entropy_gamma: Scope γ of the smoothed-loss flatness measure at the final point.
        flatness: Measure flatness (top Hessian eigenvalue, smoothed loss) at the end of
            held-out runs, and the eigenvalue along the first held-out task's curves.
        flatness_seeds: Measure it on the first this many evaluation seeds of each
            meta-seed (and the curve on the first); 0: on every run. It costs about as
            much as the run, and a mean over a subset answers what the table asks.
        held_out_baselines: The baselines run on the held-out test split, each with
            ``meta_seeds × eval_seeds`` seeds, and compared with every headline row;
            empty: all of them. The others are tuned and reported on validation only.
        workers: Jobs at once: local processes, Dask LocalCluster workers, local Ray CPUs,
            SLURM jobs in flight (``flat-l2o study --workers`` overrides it; a running Dask
            or Ray cluster uses all its workers). It changes no job, so no result.
    """

    meta_seeds: int = 5
    candidate_meta_seeds: int = 2
    eval_seeds: int = 10
    val_seeds: int = 3
    eval_steps: int = 200
    headline: int = 2
    max_grid_extensions: int = 3
    failure_accuracy: float = 0.2
    entropy_gamma: float = 1000.0
    flatness: bool = True
    flatness_seeds: int = 0
    held_out_baselines: tuple[str, ...] = ()
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("meta_seeds", "candidate_meta_seeds", "eval_seeds", "val_seeds", "eval_steps", "workers"):
            _positive_int(f"budget.{name}", getattr(self, name))
        for name in ("headline", "max_grid_extensions", "flatness_seeds"):
            _positive_int(f"budget.{name}", getattr(self, name), minimum=0)
        if self.candidate_meta_seeds > self.meta_seeds:
            raise ConfigError(f"budget.candidate_meta_seeds ({self.candidate_meta_seeds}) must not exceed "
                              f"budget.meta_seeds ({self.meta_seeds})")
        if not 0.0 <= self.failure_accuracy < 1.0:
            raise ConfigError(f"budget.failure_accuracy must lie in [0, 1), got {self.failure_accuracy!r}")
        if not (self.entropy_gamma > 0 and math.isfinite(self.entropy_gamma)):
            raise ConfigError(f"budget.entropy_gamma must be finite and > 0, got {self.entropy_gamma!r}")
        if self.meta_seeds * self.eval_seeds > 100:
            raise ConfigError(f"budget.meta_seeds × budget.eval_seeds = {self.meta_seeds * self.eval_seeds} "
                              f"evaluation seeds, more than the 100 the seed partition reserves for evaluation")


@dataclass(frozen=True)
class Baseline:
    """A hand-designed optimizer, tuned per task on validation.

    Attributes:
        label: Its name in tables and in ``"@label.option"`` references.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"sam"``, ``"entropy_sgd"`` or
            ``"module:Class"``.
        fixed: Options passed as given.
        grid: ``{option: [values]}`` searched on validation.
        extend: Grid axes that grow while the pick sits on their edge.
        bounds: ``{axis: [low, high]}`` an extension may not leave.
    """

    label: str
    optimizer: str
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    extend: tuple[str, ...] = ()
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A learned optimizer to meta-train, compare on validation and maybe report.

    Attributes:
        label: Its name in tables.
        optimizer: A registered learned optimizer.
        options: Its constructor options (as meta-trained).
        wrappers: The wrapper stack, innermost first (``[{"name": ..., **options}]``).
        train_on: Task labels it meta-trains on (default: the ``family`` set).
        trainer: Overrides of the regime's ``[trainer]``.
        regularizers: The flatness activation config of its meta-loss.
        deploy: ``{"options": {...}, "wrappers": [{...}, ...]}``: overrides applied when
            it trains an evaluation optimizee; values may be ``"@baseline.option"``.
        untrained: Also evaluate it with its initial weights, as an ablation row (the
            default for candidates with wrappers: base + wrapper, nothing learned).
        untrained_is: A baseline whose update *is* this candidate's at its initial
            weights once deployed (SAM for ``learned_correction(adam)`` in
            ``sam_gradient`` at SAM's picks): the held-out table then uses that
            baseline's runs as the untrained row instead of running the same update
            again. The study checks the identity on a short trajectory first.
        headline: ``"auto"`` (if validation ranks it among the best), ``"always"`` or
            ``"never"``.
        reference: Another candidate's label this one is an ablation of (e.g. the same
            optimizer without a meta-loss term); the report adds the paired difference.
    """

    label: str
    optimizer: str
    options: dict[str, Any] = field(default_factory=dict)
    wrappers: list[dict[str, Any]] = field(default_factory=list)
    train_on: tuple[str, ...] = ()
    trainer: dict[str, Any] = field(default_factory=dict)
    regularizers: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)
    untrained: bool | None = None
    untrained_is: str | None = None
    headline: str = "auto"
    reference: str | None = None

    @property
    def runs_untrained(self) -> bool:
        return bool(self.wrappers) if self.untrained is None else self.untrained

    @property
    def flatness_aware(self) -> bool:
        """Seeks flatness: a flatness term in its meta-loss, or a SAM-gradient wrapper."""
        weights = [spec.get("weight", 0) for spec in self.regularizers.values() if isinstance(spec, Mapping)]
        return any(w for w in weights) or any(w.get("name") == "sam_gradient" for w in self.wrappers)


@dataclass(frozen=True)
class Targets:
    """What the study's leading claim must show, on held-out tasks outside the training family.

    Attributes:
        beat: The baseline a flatness-aware learned optimizer must beat...
        beat_on_at_least: ...on at least this many held-out tasks (Holm-adjusted
            interval above 0).
        no_collapse_vs: The baseline it may never trail...
        collapse_points: ...by more than this many accuracy points (mean difference).
        learned_contribution_on_at_least: Held-out tasks on which trained − untrained
            must be above 0 (Holm-adjusted).
    """

    beat: str = "sam"
    beat_on_at_least: int = 4
    no_collapse_vs: str = "adam"
    collapse_points: float = 1.0
    learned_contribution_on_at_least: int = 3


@dataclass(frozen=True)
class Regime:
    """A parsed, checked regime file. See the module docstring for the layout."""

    name: str
    description: str
    budget: Budget
    trainer: dict[str, Any]
    tasks: dict[str, TaskSpec]
    family: tuple[str, ...]
    selection: tuple[str, ...]
    held_out: tuple[str, ...]
    baselines: dict[str, Baseline]
    candidates: tuple[Candidate, ...]
    targets: Targets
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    # The file's data, for the record; without `executor`, since where jobs run changes no result.
    source: dict[str, Any] = field(default_factory=dict)

    def task(self, label: str) -> TaskSpec:
        name, options = self.tasks[label]
        return name, copy.deepcopy(options)

    def trained_on(self, candidate: Candidate) -> tuple[str, ...]:
        return candidate.train_on or self.family

    def candidate(self, label: str) -> Candidate:
        for c in self.candidates:
            if c.label == label:
                return c
        raise KeyError(label)


# ---------------------------------------------------------------------------- parsing


def _positive_int(where: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _unknown(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _table(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    return dict(data)


def _dataclass(cls: type, data: Any, where: str, **extra: Any) -> Any:
    data = _table(data, where)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    _unknown(data, names, where)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        kind = hints[key]
        if kind in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
        if kind in ("float", float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
            data[key] = float(value)
        if kind in ("bool", bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        if kind in ("str",) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
        if kind in ("tuple[str, ...]",):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise ConfigError(f"{where}.{key} must be a list of strings, got {value!r}")
            data[key] = tuple(value)
    return cls(**data, **extra)


def _labels(data: Any, where: str, known: Mapping[str, Any]) -> tuple[str, ...]:
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ConfigError(f"{where} must be a list of task labels, got {data!r}")
    for label in data:
        if label not in known:
            close = difflib.get_close_matches(label, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the [tasks] table has {', '.join(known)}"
            raise ConfigError(f"{where}: unknown task {label!r}{hint}")
    return tuple(data)


def _tasks(data: Any) -> dict[str, TaskSpec]:
    out = {}
    for label, entry in _table(data, "[tasks]").items():
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], Mapping)):
            raise ConfigError(f"tasks.{label} must be [registered task name, {{options}}], got {entry!r}")
        out[label] = (entry[0], dict(entry[1]))
    return out


def _baseline(label: str, data: Any) -> Baseline:
    where = f"baselines.{label}"
    data = _table(data, where)
    _unknown(data, ["optimizer", "fixed", "grid", "extend", "bounds"], where)
    if not isinstance(data.get("optimizer"), str):
        raise ConfigError(f"{where}.optimizer must name a hand-designed optimizer, got {data.get('optimizer')!r}")
    grid = _table(data.get("grid", {}), f"{where}.grid")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{axis} must be a non-empty list, got {values!r}")
    extend = data.get("extend", [])
    if not isinstance(extend, list) or any(a not in grid for a in extend):
        raise ConfigError(f"{where}.extend must list axes of its grid ({', '.join(grid) or 'none'}), got {extend!r}")
    bounds = {}
    for axis, pair in _table(data.get("bounds", {}), f"{where}.bounds").items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise ConfigError(f"{where}.bounds.{axis} must be [low, high], got {pair!r}")
        bounds[axis] = (float(pair[0]), float(pair[1]))
    fixed = _table(data.get("fixed", {}), f"{where}.fixed")
    clash = sorted(set(fixed) & set(grid))
    if clash:
        raise ConfigError(f"{where}: {clash} both fixed and in the grid")
    return Baseline(label=label, optimizer=data["optimizer"], fixed=fixed, grid=grid, extend=tuple(extend),
                    bounds=bounds)


_CANDIDATE_KEYS = [f.name for f in dataclasses.fields(Candidate)]


def _candidate(index: int, data: Any, tasks: Mapping[str, Any]) -> Candidate:
    where = f"candidates[{index}]"
    data = _table(data, where)
    _unknown(data, _CANDIDATE_KEYS, where)
    for key in ("label", "optimizer"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{where}.{key} must be a non-empty string, got {data.get(key)!r}")
    where = f"candidate {data['label']!r}"
    wrappers = data.get("wrappers", [])
    if not isinstance(wrappers, list) or not all(isinstance(w, Mapping) and isinstance(w.get("name"), str)
                                                 for w in wrappers):
        raise ConfigError(f"{where}: wrappers must be a list of tables with a name, got {wrappers!r}")
    deploy = _table(data.get("deploy", {}), f"{where}.deploy")
    _unknown(deploy, ["options", "wrappers"], f"{where}.deploy")
    if len(deploy.get("wrappers", [])) > len(wrappers):
        raise ConfigError(f"{where}.deploy.wrappers has more entries than the candidate has wrappers")
    headline = data.get("headline", "auto")
    if headline not in ("auto", "always", "never"):
        raise ConfigError(f"{where}.headline must be 'auto', 'always' or 'never', got {headline!r}")
    untrained = data.get("untrained")
    if untrained is not None and not isinstance(untrained, bool):
        raise ConfigError(f"{where}.untrained must be true or false, got {untrained!r}")
    untrained_is = data.get("untrained_is")
    if untrained_is is not None and not (isinstance(untrained_is, str) and untrained_is):
        raise ConfigError(f"{where}.untrained_is must name a baseline, got {untrained_is!r}")
    return Candidate(
        label=data["label"], optimizer=data["optimizer"], options=_table(data.get("options", {}), f"{where}.options"),
        wrappers=[dict(w) for w in wrappers],
        train_on=_labels(data["train_on"], f"{where}.train_on", tasks) if "train_on" in data else (),
        trainer=_table(data.get("trainer", {}), f"{where}.trainer"),
        regularizers=_table(data.get("regularizers", {}), f"{where}.regularizers"), deploy=deploy,
        untrained=untrained, untrained_is=untrained_is, headline=headline, reference=data.get("reference"))


_TOP = ["name", "description", "budget", "trainer", "tasks", "sets", "baselines", "candidates", "targets", "executor",
        "quick"]


def regime_from_dict(data: Mapping[str, Any], *, quick: bool = False) -> Regime:
    """Check and parse a regime's data (what :func:`load_regime` reads from a file).

    Raises:
        ConfigError: Naming the offending key, task label, baseline or candidate.
    """
    data = copy.deepcopy(dict(data))
    _unknown(data, _TOP, "regime")
    for key in ("name", "tasks", "sets", "baselines"):
        if key not in data:
            raise ConfigError(f"regime: missing {'[' + key + ']' if key != 'name' else 'name'}")
    if quick:
        q = _table(data.get("quick", {}), "[quick]")
        _unknown(q, ["budget", "trainer", "sets", "candidates", "held_out", "grid_points"], "[quick]")
        data["budget"] = {**_table(data.get("budget", {}), "[budget]"), **_table(q.get("budget", {}), "quick.budget")}
        data["trainer"] = {**_table(data.get("trainer", {}), "[trainer]"),
                           **_table(q.get("trainer", {}), "quick.trainer")}
        if "sets" in q:
            data["sets"] = {**_table(data["sets"], "[sets]"), **_table(q["sets"], "quick.sets")}
        if "candidates" in q:
            data["candidates"] = data.get("candidates", [])[: _positive_int("quick.candidates", q["candidates"])]
        if "held_out" in q:
            sets = _table(data["sets"], "[sets]")
            sets["held_out"] = list(sets.get("held_out", []))[: _positive_int("quick.held_out", q["held_out"])]
            data["sets"] = sets
        if "grid_points" in q:
            points = _positive_int("quick.grid_points", q["grid_points"])
            for b in _table(data["baselines"], "[baselines]").values():
                if isinstance(b, dict) and isinstance(b.get("grid"), dict):
                    b["grid"] = {k: v[:points] if isinstance(v, list) else v for k, v in b["grid"].items()}
                    b["extend"] = []
    if not isinstance(data["name"], str) or not data["name"]:
        raise ConfigError(f"regime: name must be a non-empty string, got {data['name']!r}")
    tasks = _tasks(data["tasks"])
    sets = _table(data["sets"], "[sets]")
    _unknown(sets, ["family", "selection", "held_out"], "[sets]")
    family = _labels(sets.get("family", []), "sets.family", tasks)
    selection = _labels(sets.get("selection", []), "sets.selection", tasks)
    held_out = _labels(sets.get("held_out", []), "sets.held_out", tasks)
    if not held_out:
        raise ConfigError("sets.held_out must list at least one task: the report's columns")
    baselines = {label: _baseline(label, b) for label, b in _table(data["baselines"], "[baselines]").items()}
    candidates = data.get("candidates", [])
    if not isinstance(candidates, list):
        raise ConfigError("[[candidates]] must be an array of tables")
    parsed = tuple(_candidate(i, c, tasks) for i, c in enumerate(candidates))
    labels = [c.label for c in parsed]
    dupes = sorted({x for x in labels if labels.count(x) > 1} | (set(labels) & set(baselines)))
    if dupes:
        raise ConfigError(f"regime: the labels {dupes} are used twice (candidates and baselines share one namespace)")
    for c in parsed:
        trained = c.train_on or family
        if not trained:
            raise ConfigError(f"candidate {c.label!r}: no train_on and no sets.family to meta-train on")
        overlap = sorted(set(trained) & set(held_out))
        if overlap:
            raise ConfigError(f"candidate {c.label!r} meta-trains on held-out tasks {overlap}: a held-out task "
                              "must never be trained on")
        if c.reference is not None and c.reference not in labels:
            raise ConfigError(f"candidate {c.label!r}: reference {c.reference!r} is not a candidate")
        _check_references(c, baselines)
        if c.untrained_is is not None and c.untrained_is not in baselines:
            raise ConfigError(f"candidate {c.label!r}: untrained_is {c.untrained_is!r} is not a baseline; "
                              f"baselines: {', '.join(baselines)}")
    targets = _dataclass(Targets, data.get("targets", {}), "targets")
    for key in ("beat", "no_collapse_vs"):
        if getattr(targets, key) not in baselines:
            raise ConfigError(f"targets.{key}: no baseline {getattr(targets, key)!r}; baselines: {', '.join(baselines)}")
    budget = _dataclass(Budget, data.get("budget", {}), "budget")
    if budget.held_out_baselines:
        unknown = [b for b in budget.held_out_baselines if b not in baselines]
        if unknown:
            raise ConfigError(f"budget.held_out_baselines: no baseline {unknown[0]!r}; baselines: {', '.join(baselines)}")
        needed = {targets.beat, targets.no_collapse_vs} | {c.untrained_is for c in parsed if c.untrained_is}
        missing = sorted(needed - set(budget.held_out_baselines))
        if missing:
            raise ConfigError(f"budget.held_out_baselines must include {missing}: the targets or an untrained_is "
                              "compare with them on the held-out tasks")
    executor = executor_spec(data.pop("executor", "local"))
    return Regime(name=data["name"], description=str(data.get("description", "")),
                  budget=budget,
                  trainer=_table(data.get("trainer", {}), "[trainer]"), tasks=tasks, family=family,
                  selection=selection, held_out=held_out, baselines=baselines, candidates=parsed, targets=targets,
                  executor=executor, source=data)


def _references(value: Any) -> list[str]:
    if isinstance(value, str) and value.startswith("@"):
        return [value]
    if isinstance(value, Mapping):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


def _check_references(candidate: Candidate, baselines: Mapping[str, Baseline]) -> None:
    for ref in _references(candidate.deploy):
        name, _, option = ref[1:].partition(".")
        base = baselines.get(name)
        if base is None or option not in {**base.fixed, **base.grid}:
            known = [f"@{b}.{o}" for b, spec in baselines.items() for o in {**spec.fixed, **spec.grid}]
            close = difflib.get_close_matches(ref, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"candidate {candidate.label!r}: deploy refers to {ref!r}, which no baseline "
                              f"tunes or fixes{hint}")


def resolve_picks(value: Any, picks: Mapping[str, Mapping[str, Any]]) -> Any:
    """``value`` with every ``"@baseline.option"`` replaced by that baseline's pick."""
    if isinstance(value, str) and value.startswith("@"):
        name, _, option = value[1:].partition(".")
        return picks[name][option]
    if isinstance(value, Mapping):
        return {k: resolve_picks(v, picks) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_picks(v, picks) for v in value]
    return value


def load_regime(path: str | Path, *, quick: bool = False) -> Regime:
    """Read and check a regime file (TOML). ``quick`` applies its ``[quick]`` table.

    Raises:
        ConfigError: The file is missing, a directory, not TOML, or not a valid regime
            (the message names the file and the offending key).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"regime file {path} is a directory; give the path of a .toml file")
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"regime file {path} does not exist") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"regime file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"regime file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return regime_from_dict(data, quick=quick)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
