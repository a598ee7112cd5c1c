"""Model cards of the shipped optimizers, generated from committed, measured numbers only.

A card is written twice from the same data: ``docs/models/<name>.md`` for people and
``flat_l2o_plugin/pretrained/<name>/card.json`` for ``flat-l2o list pretrained`` (its
``summary`` lines) and for programs. Its sources:

* the study's compact results (``docs/results.json``, written by
  :func:`~flat_l2o_plugin.study.report.write_report`): what the row was meta-trained on,
  its meta-seeds, its validation scores, its held-out accuracies against the tuned
  baselines with the report's intervals and Holm-adjusted verdicts, and the baselines'
  per-task picks (which give the recommended ``lr``);
* the shipped config (``pretrained/<name>/meta-train.toml``): the meta-training budget;
* ``index.json``: version, digest and the validation the shipping run printed;
* the deploy benchmark's JSON (``benchmarks/deploy.py --out``): the step time against
  Adam and the state bytes per parameter. Without it the card says "not measured".

Every number on a card is one of those files' numbers or a ratio the card names
(``lr`` multiplier = a tuned learning rate over the meta-trained one). Rerun with
``python -m flat_l2o_plugin.study.shipping cards`` after the study or the benchmark
changes.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["build_card", "deploy_numbers", "render_card", "write_cards", "STEP_COST_SIZE"]

STEP_COST_SIZE = 10**6
"""Parameters at which a card quotes the step time against Adam (one thread), as the deploy benchmark's targets."""

_NOT_MEASURED = "not measured"


def _r(x: float | None) -> float | None:
    """Five significant digits, as the study's compact JSON keeps them."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(f"{x:.5g}")


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def _interval(low: float | None, high: float | None, sign: bool = False) -> str:
    return "n/a" if low is None or high is None else f"[{_pct(low, sign)}, {_pct(high, sign)}]"


# ---------------------------------------------------------------------------- the deploy benchmark


def deploy_numbers(deploy: Mapping[str, Any] | None, optimizer: str, options: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """Step time against Adam and state bytes per parameter of ``optimizer`` from the deploy benchmark's JSON.

    The benchmark times each zoo model at its registered default options; a shipped
    model whose options change its size (anything but ``lr``) was not measured.
    """
    none = {"step_cost": None, "state_bytes_per_parameter": None, "adam_state_bytes_per_parameter": None,
            "why_not": None}
    if deploy is None:
        return {**none, "why_not": "no committed deploy benchmark result"}
    if deploy.get("quick"):
        return {**none, "why_not": "the deploy result is a --quick run, whose numbers mean nothing"}
    from ..manager import get_plugin_manager

    defaults = get_plugin_manager().component("optimizers", optimizer).options() or {}
    sized = sorted(k for k, v in options.items() if k != "lr" and k in defaults and defaults[k] != v)
    if sized:
        return {**none, "why_not": f"the benchmark times {optimizer} at its default options, these set {sized}"}
    rows = [r for r in deploy.get("steps", []) if r.get("threads") == 1 and r.get("device", "cpu") == "cpu"
            and optimizer in r.get("results", {})]
    step = next((r for r in rows if r["size"] == STEP_COST_SIZE), max(rows, key=lambda r: r["size"], default=None))
    states = {r["optimizer"]: r["bytes_per_param"] for r in deploy.get("state", [])}
    return {
        "step_cost": None if step is None else {
            "ratio_to_adam": _r(step["results"][optimizer]["ratio"]), "parameters": step["size"], "threads": 1,
            "ms": _r(step["results"][optimizer]["ms"]), "adam_ms": _r(step["results"].get("adam", {}).get("ms"))},
        "state_bytes_per_parameter": _r(states.get(optimizer)),
        "adam_state_bytes_per_parameter": _r(states.get("adam")),
        "why_not": None if step is not None and optimizer in states else f"{optimizer} is not in the deploy result",
        "torch": deploy.get("torch"),
    }


# ---------------------------------------------------------------------------- the card's data


def _candidate(study: Mapping[str, Any], label: str, source: str) -> dict[str, Any]:
    for c in study.get("candidates", []):
        if c["label"] == label:
            return c
    raise ConfigError(f"{source} has no candidate {label!r}: regenerate it from the study that ships it "
                      "(python benchmarks/generalization.py)")


def _recommended_lr(study: Mapping[str, Any], candidate: Mapping[str, Any], tasks: Sequence[str]
                    ) -> dict[str, Any]:
    """The ``lr`` multiplier that gives the learning rate the study deployed the row at, task by task."""
    trained = candidate["options"].get("lr")
    ref = candidate.get("deploy", {}).get("options", {}).get("lr")
    wrapper_refs = [w for w in candidate.get("deploy", {}).get("wrappers", [])]
    out: dict[str, Any] = {"meta_trained_lr": trained, "per_task": {}, "deployed_like": None}
    if not (isinstance(ref, str) and ref.startswith("@")) or not trained:
        out["multiplier"] = 1.0
        out["rule"] = "1.0: the study ran it as meta-trained"
        return out
    baseline, _, key = ref[1:].partition(".")
    out["deployed_like"] = baseline
    for task in tasks:
        pick = study["grids"].get(baseline, {}).get(task, {}).get("pick", {})
        if key in pick:
            entry = {"multiplier": _r(pick[key] / trained), f"{baseline}_{key}": pick[key]}
            for i, w in enumerate(wrapper_refs):
                for option, value in w.items():
                    if isinstance(value, str) and value.startswith("@"):
                        b, _, k = value[1:].partition(".")
                        tuned = study["grids"].get(b, {}).get(task, {}).get("pick", {}).get(k)
                        entry[f"{candidate['wrappers'][i]['name']}.{option}"] = tuned
            out["per_task"][task] = entry
    multipliers = [e["multiplier"] for e in out["per_task"].values()]
    out["multiplier"] = _r(statistics.median(multipliers)) if multipliers else 1.0
    out["rule"] = (f"tuned {baseline} {key} / the meta-trained {trained:g}: the step a tuned {baseline} takes"
                   if multipliers else "1.0: no tuned pick of the baseline it was deployed like")
    return out


def _held_out(study: Mapping[str, Any], label: str, meta_seed: int) -> dict[str, Any] | None:
    from .report import analyse, expand

    if label not in study.get("headline", []):
        return None
    analysis = analyse(study)
    tasks = analysis["tasks"]
    runs = [r for r in expand(study)["runs"] if not r.get("failed")]
    rows: dict[str, Any] = {}
    for task in tasks:
        acc = analysis["accuracy"]
        own = [r["test_accuracy"] for r in runs if r["optimizer"] == label and r["task"] == task
               and r["meta_seed"] == meta_seed and r.get("test_accuracy") is not None]
        entry: dict[str, Any] = {
            "accuracy": {row: {"mean": _r(acc[row][task].mean), "low": _r(acc[row][task].low),
                               "high": _r(acc[row][task].high)}
                         for row in acc if row == label or row in ("adam", "sam")},
            "shipped_meta_seed_mean": _r(statistics.fmean(own)) if own else None,
            "shipped_meta_seed_runs": len(own),
        }
        for h in analysis["hypotheses"]:
            if h["row"] == label and h["task"] == task and h["reference"] in ("adam", "sam"):
                c, adj = h["result"], h["adjusted"]
                entry[f"vs_{h['reference']}"] = {
                    "mean": _r(c.mean), "low": _r(c.low), "high": _r(c.high), "adjusted_low": _r(adj.low),
                    "adjusted_high": _r(adj.high), "p_holm": _r(h["p_holm"]), "verdict": h["verdict_holm"],
                    "meta_seeds_won": f"{c.wins}/{c.clusters}"}
        rows[task] = entry
    return {"tasks": rows, "meta_seeds": study["budget"]["meta_seeds"],
            "eval_seeds": study["budget"]["eval_seeds"], "hypotheses": len(analysis["hypotheses"])}


def _validation(study: Mapping[str, Any], label: str) -> dict[str, Any]:
    selection = study.get("selection", {}).get(label, {})
    tasks = list(study["regime"]["sets"].get("selection", []))
    per_task = {}
    for task in tasks:
        values = [v for v in selection.get("trained", {}).get(task, []) if v is not None and v == v]
        per_task[task] = {"mean": _r(statistics.fmean(values)) if values else None,
                          **{b: _r(study["grids"][b][task]["score"]) for b in ("adam", "sam")
                             if task in study.get("grids", {}).get(b, {})}}
    return {"tasks": per_task, "mean": _r(selection.get("trained_mean")),
            "untrained_mean": _r(selection.get("untrained_mean"))}


def build_card(record: Mapping[str, Any], study: Mapping[str, Any], config: Mapping[str, Any],
               deploy: Mapping[str, Any] | None, *, study_source: str = "the study results",
               deploy_source: str | None = None) -> dict[str, Any]:
    """The card of one shipped optimizer.

    Args:
        record: Its ``index.json`` entry (name, version, options, wrappers, ``study``).
        study: The study's results (compact or full) holding the row ``record["study"]`` names.
        config: Its shipped meta-training config, parsed.
        deploy: The deploy benchmark's JSON, or ``None`` (then step cost and state are "not measured").
        study_source, deploy_source: Where those came from, for the card.

    Raises:
        ConfigError: The study is not the regime the record names, or lacks its row.
    """
    row = record["study"]
    label, meta_seed = row["candidate"], row["meta_seed"]
    if not isinstance(study.get("regime"), Mapping) or "meta_runs" not in study:
        raise ConfigError(f"{study_source} is not the results of a flat_l2o_plugin.study study (no regime and "
                          "meta_runs): write it with write_report, as python benchmarks/generalization.py does")
    if study.get("name") != row["regime_name"]:
        raise ConfigError(f"{study_source} is the study of regime {study.get('name')!r}, but {record['name']} ships "
                          f"a row of regime {row['regime_name']!r}")
    candidate = _candidate(study, label, study_source)
    regime = study["regime"]
    trained_on = list(candidate.get("train_on") or regime["sets"]["family"])
    meta_run = next((r for r in study.get("meta_runs", []) if r["label"] == label and r["meta_seed"] == meta_seed),
                    None)
    if meta_run is None or meta_run.get("failed"):
        raise ConfigError(f"{study_source} has no finished meta-training run of {label!r} at meta-seed {meta_seed}")
    seeds = sorted(r["meta_seed"] for r in study["meta_runs"] if r["label"] == label and not r.get("failed"))
    held_out = _held_out(study, label, meta_seed)
    tasks = list(regime["sets"]["held_out"])
    card = {
        "name": record["name"], "version": record["version"], "license": record["license"],
        "model": {"optimizer": record["optimizer"], "options": record["options"], "wrappers": record["wrappers"]},
        "study": {"source": study_source, "regime": study["name"], "candidate": label, "meta_seed": meta_seed,
                  "meta_seeds": seeds, "headline": label in study.get("headline", [])},
        "meta_trained_on": {t: regime["tasks"][t] for t in trained_on},
        "meta_training": {
            "trainer": dict(config.get("trainer", {})), "val_tasks": config.get("val_tasks"),
            "objective": config.get("trainer", {}).get("meta_objective", "train"),
            "study_best_val_accuracy": _r(meta_run["best_val_accuracy"]), "study_best_step": meta_run["best_step"],
            "study_seconds": _r(meta_run["seconds"]), "study_weights_digest": meta_run["weights_digest"],
            "shipped_best_val_accuracy": _r(record.get("meta_training", {}).get("best_val_accuracy")),
            "shipped_best_step": record.get("meta_training", {}).get("after_meta_steps"),
            "shipped_weights_digest": record.get("meta_training", {}).get("weights_digest"),
            "weights_are_the_study_s": record.get("meta_training", {}).get("weights_digest")
            == meta_run["weights_digest"],
            "best_validating_meta_seed": all(
                meta_run["best_val_accuracy"] >= r["best_val_accuracy"] for r in study["meta_runs"]
                if r["label"] == label and not r.get("failed")),
            "other_meta_seeds_best_val_accuracy": {
                r["meta_seed"]: _r(r["best_val_accuracy"]) for r in study["meta_runs"]
                if r["label"] == label and r["meta_seed"] != meta_seed and not r.get("failed")},
        },
        "validation": _validation(study, label),
        "held_out": held_out,
        "recommended_lr": _recommended_lr(study, candidate, tasks),
        "deploy": {**deploy_numbers(deploy, record["optimizer"], record["options"]), "source": deploy_source},
        "extra_gradient": any(w["name"] == "sam_gradient" for w in record["wrappers"]),
    }
    card["loses_on"] = _loses(held_out)
    card["summary"] = _summary(card)
    return card


def _loses(held_out: Mapping[str, Any] | None) -> dict[str, list[str]] | None:
    if held_out is None:
        return None
    out: dict[str, list[str]] = {}
    for ref in ("adam", "sam"):
        worse = [t for t, e in held_out["tasks"].items() if e.get(f"vs_{ref}", {}).get("verdict") == "worse"]
        behind = [t for t, e in held_out["tasks"].items() if e.get(f"vs_{ref}", {}).get("verdict") == "within noise"
                  and (e[f"vs_{ref}"]["mean"] or 0) < 0]
        out[f"worse_than_{ref}"], out[f"behind_{ref}_within_noise"] = worse, behind
    return out


def _versus(held_out: Mapping[str, Any], ref: str) -> str:
    entries = {t: e[f"vs_{ref}"] for t, e in held_out["tasks"].items() if f"vs_{ref}" in e}
    if not entries:
        return "not compared"
    counts = {v: [t for t, e in entries.items() if e["verdict"] == v] for v in ("better", "worse", "within noise")}
    means = [e["mean"] for e in entries.values() if e["mean"] is not None]
    span = f"; per-task mean {_pct(min(means), True)} to {_pct(max(means), True)} points" if means else ""
    return (f"better on {len(counts['better'])}, worse on {len(counts['worse'])}, within noise on "
            f"{len(counts['within noise'])} of {len(entries)} held-out tasks (Holm-adjusted){span}")


def _summary(card: Mapping[str, Any]) -> dict[str, str]:
    t = card["meta_training"]["trainer"]
    study = card["study"]
    summary = {
        "meta-trained on": f"{', '.join(card['meta_trained_on'])}; {t.get('meta_steps')} meta-steps, unroll "
                           f"{t.get('unroll')}, horizon {t.get('horizon')}; meta-seed {study['meta_seed']} of "
                           f"{study['meta_seeds']} (study {study['regime']!r}, row {study['candidate']!r})",
    }
    held = card["held_out"]
    if held is None:
        v = card["validation"]
        summary["held-out"] = (f"not evaluated: the study took another row to the held-out tasks; validation "
                               f"accuracy {_pct(v['mean'])}% on " + ", ".join(
                                   f"{task} ({_pct(e['mean'])} vs Adam {_pct(e.get('adam'))}, SAM {_pct(e.get('sam'))})"
                                   for task, e in v["tasks"].items()))
    else:
        summary["held-out vs tuned Adam"] = _versus(held, "adam")
        summary["held-out vs tuned SAM"] = _versus(held, "sam")
        loses = card["loses_on"]
        worse = sorted(set(loses["worse_than_adam"]) | set(loses["worse_than_sam"]))
        summary["loses on"] = ", ".join(
            f"{task} (worse than {' and '.join(r for r in ('Adam', 'SAM') if task in loses[f'worse_than_{r.lower()}'])})"
            for task in worse) or "no held-out task (Holm-adjusted)"
    lr = card["recommended_lr"]
    summary["recommended lr"] = (
        f"{lr['multiplier']:g} (median over the held-out tasks; {lr['rule']}; per task "
        + ", ".join(f"{task} {e['multiplier']:g}" for task, e in lr["per_task"].items()) + ")"
        if lr["per_task"] else f"{lr['multiplier']:g} ({lr['rule']})")
    d = card["deploy"]
    extra = "; plus a second gradient evaluation per step (sam_gradient), as SAM" if card["extra_gradient"] else ""
    if d["step_cost"] is not None:
        s = d["step_cost"]
        summary["step cost"] = f"{s['ratio_to_adam']:g}× Adam's step ({s['parameters']:,d} parameters, 1 thread){extra}"
    else:
        summary["step cost"] = f"{_NOT_MEASURED} ({d['why_not']}){extra}"
    if d["state_bytes_per_parameter"] is not None:
        summary["state"] = (f"{d['state_bytes_per_parameter']:g} bytes per parameter (Adam "
                            f"{d['adam_state_bytes_per_parameter']:g})")
    else:
        summary["state"] = f"{_NOT_MEASURED} ({d['why_not']})"
    return summary


# ---------------------------------------------------------------------------- markdown


def render_card(card: Mapping[str, Any]) -> str:
    """``docs/models/<name>.md``."""
    name, study = card["name"], card["study"]
    model = card["model"]
    wrappers = "".join(f" + {w['name']}({', '.join(f'{k}={v}' for k, v in w.items() if k != 'name')})"
                       for w in model["wrappers"])
    options = ", ".join(f"{k}={v}" for k, v in model["options"].items())
    lines = [f"# `{name}` {card['version']}", "",
             f"Generated by `python -m flat_l2o_plugin.study.shipping cards` from {study['source']}"
             + (f" and {card['deploy']['source']}" if card["deploy"].get("source") else "")
             + "; do not edit by hand.", "",
             f"**Model**: `{model['optimizer']}({options}){wrappers}`, license {card['license']}.", "",
             "**Use**: `LearnedOptimizerTorch(model.parameters(), \"" + name + "\")`, "
             "`timm.optim.create_optimizer_v2(model, \"" + name + "\")`"
             + (" (its `step` needs a closure: not timm's `train.py`)" if card["extra_gradient"] else "")
             + ".", "", "## Summary", ""]
    lines += [f"- **{k}**: {v}" for k, v in card["summary"].items()]
    t = card["meta_training"]
    lines += ["", "## Meta-training", "",
              f"The study `{study['regime']}`'s row `{study['candidate']}`, meta-seed {study['meta_seed']} (the "
              f"row has meta-seeds {study['meta_seeds']}; "
              + ("this one validated best" if t["best_validating_meta_seed"] else "NOT the best validating one")
              + "). Tasks:", ""]
    lines += [f"- `{label}`: `{json.dumps(spec)}`" for label, spec in card["meta_trained_on"].items()]
    others = ", ".join(f"{m}: {_pct(v)}" for m, v in t["other_meta_seeds_best_val_accuracy"].items())
    lines += ["", f"Trainer: `{json.dumps(t['trainer'])}`; validation on {t['val_tasks']} validation optimizees.", "",
              f"Best validation accuracy {_pct(t['study_best_val_accuracy'])}% after {t['study_best_step']} "
              f"meta-steps in the study (other meta-seeds: {others or 'none'}); the shipped weights' run of "
              f"`flat-l2o meta-train --config` printed {_pct(t['shipped_best_val_accuracy'])}% after "
              f"{t['shipped_best_step']}. The shipped weights "
              + ("are bit for bit the study's (weights digest " if t["weights_are_the_study_s"] else
                 "are NOT the study's (the study's weights digest ")
              + f"`{t['study_weights_digest'][:16]}`).", ""]
    v = card["validation"]
    lines += ["## Validation (the study's selection tasks)", "",
              "Mean validation accuracy (%) over the row's meta-seeds and validation seeds; the baselines at their "
              "validation-tuned picks.", "", "| task | this row | tuned Adam | tuned SAM |", "|---|---|---|---|"]
    lines += [f"| {task} | {_pct(e['mean'])} | {_pct(e.get('adam'))} | {_pct(e.get('sam'))} |"
              for task, e in v["tasks"].items()]
    held = card["held_out"]
    lines += ["", "## Held-out test accuracy", ""]
    if held is None:
        lines += ["Not evaluated: the study's held-out evaluation ran its headline row only, and this row was not "
                  "it. The validation numbers above are all this card can say."]
    else:
        lines += [f"Test accuracy (%), mean and 95% interval over {held['meta_seeds']} meta-seeds × "
                  f"{held['eval_seeds']} evaluation seeds (the baselines on the same seeds). Differences in points, "
                  f"paired on the seed; adjusted interval and verdict by Holm over the study's "
                  f"{held['hypotheses']} comparisons. `seed {study['meta_seed']}`: the shipped meta-seed's own "
                  "mean.", "",
                  "| task | this row | seed " + str(study["meta_seed"]) + " | tuned Adam | tuned SAM | − Adam | "
                  "verdict | − SAM | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for task, e in held["tasks"].items():
            acc = e["accuracy"]

            def a(row: str) -> str:
                x = acc.get(row)
                return "n/a" if x is None else f"{_pct(x['mean'])} {_interval(x['low'], x['high'])}"

            def d(ref: str) -> list[str]:
                x = e.get(f"vs_{ref}")
                if x is None:
                    return ["n/a", "n/a"]
                return [f"{_pct(x['mean'], True)} {_interval(x['adjusted_low'], x['adjusted_high'], True)}",
                        f"{x['verdict']} (p={x['p_holm']:.3g})"]

            lines.append("| " + " | ".join([task, a(study["candidate"]), _pct(e["shipped_meta_seed_mean"]),
                                             a("adam"), a("sam"), *d("adam"), *d("sam")]) + " |")
    lr = card["recommended_lr"]
    lines += ["", "## Recommended `lr`", "",
              "`lr` multiplies the meta-trained step (1.0: as meta-trained; the update is linear in it). "
              f"Recommended: **{lr['multiplier']:g}** ({lr['rule']})."]
    if lr["per_task"]:
        keys = sorted({k for e in lr["per_task"].values() for k in e if k != "multiplier"})
        lines += [("The study ran this row, on each held-out task, at:" if card["held_out"] is not None else
                   f"The {lr['deployed_like']} picks on each held-out task (the study deploys this row at them; it "
                   "did not run it there):"), "",
                  "| task | multiplier | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        lines += [f"| {task} | {e['multiplier']:g} | " + " | ".join(str(e.get(k)) for k in keys) + " |"
                  for task, e in lr["per_task"].items()]
        if any(k.startswith("sam_gradient.") for k in keys):
            lines += ["", "The shipped name keeps the wrapper's meta-trained options "
                      f"({wrappers.strip(' +')}); the held-out runs used the tuned values above."]
    dep = card["deploy"]
    lines += ["", "## Cost", ""]
    if dep["step_cost"] is not None:
        s = dep["step_cost"]
        lines.append(f"- Step time: {s['ratio_to_adam']:g}× `torch.optim.Adam`'s ({s['ms']:g} ms against "
                     f"{s['adam_ms']:g} ms, {s['parameters']:,d} parameters, one thread, torch {dep.get('torch')}).")
    else:
        lines.append(f"- Step time: {_NOT_MEASURED} ({dep['why_not']}).")
    lines.append(f"- State: {card['summary']['state']}.")
    if card["extra_gradient"]:
        lines.append("- `sam_gradient` evaluates the gradient a second time at a perturbed point on every step, "
                     "as SAM does: a training step costs about two forward-backward passes.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not JSON ({exc})") from None


def _regime_name(regime: str) -> str:
    """The name inside a shipped row's regime (a built-in regime's name, or a regime file)."""
    from . import builtin_regime, builtin_regimes, load_regime

    return load_regime(builtin_regime(regime) if regime in builtin_regimes() else regime).name


def write_cards(study: str | Path, docs: str | Path, *, deploy: str | Path | None = None,
                folder: str | Path | None = None, names: Sequence[str] | None = None) -> list[Path]:
    """Write ``<docs>/models/<name>.md`` and ``<folder>/<name>/card.json`` for each installed optimizer.

    Args:
        study: The study's results JSON (compact or full).
        docs: The documentation folder (``docs``).
        deploy: The deploy benchmark's JSON; missing or ``None``: "not measured".
        folder: The pretrained folder holding ``index.json`` (default: the package's).
        names: Only these (default: every entry of ``index.json``).

    Returns:
        The markdown files written.

    Raises:
        ConfigError: A file is missing or not JSON, or the study lacks a shipped row.
    """
    from .._atomic import write_atomically
    from .shipping import pretrained_folder, read_index

    folder = Path(folder) if folder is not None else pretrained_folder()
    study_path = Path(study)
    data = _load_json(study_path, "study results")
    deploy_path = Path(deploy) if deploy is not None else None
    deploy_data = _load_json(deploy_path, "deploy result") if deploy_path is not None and deploy_path.exists() else None
    index = read_index(folder)
    if names:
        unknown = sorted(set(names) - {e["name"] for e in index})
        if unknown:
            raise ConfigError(f"{folder / 'index.json'} has no {unknown}; installed: {[e['name'] for e in index]}")
    written = []
    cards = []
    for record in index:
        if names and record["name"] not in names:
            continue
        regime = record["study"]["regime"]
        record = {**record, "study": {**record["study"], "regime_name": _regime_name(regime)}}
        try:
            config = tomllib.loads((folder / record["config"]).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"shipped config {folder / record['config']} cannot be read ({exc})") from None
        cards.append((record, build_card(record, data, config, deploy_data, study_source=str(study_path),
                                         deploy_source=str(deploy_path) if deploy_data is not None else None)))
    # Everything is built before anything is written: a refused study changes no file.
    for record, card in cards:
        write_atomically(folder / record["card"], (json.dumps(card, indent=1) + "\n").encode(), ConfigError)
        md = Path(docs) / "models" / f"{record['name']}.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(md, render_card(card).encode(), ConfigError)
        written.append(md)
    return written
