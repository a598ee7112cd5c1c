"""The study's report: compact JSON, paired comparisons with Holm's correction, and markdown.

:func:`compact` shrinks ``results.json`` to what the report reads (runs as rows of a
table, curves averaged per optimizer), so the report can be regenerated from a small
committed file. :func:`analyse` computes every number the report prints; :func:`render`
writes the markdown, leading with the targets and whether they were met.

Conventions (see :mod:`.stats`): a learned optimizer's runs are clustered by meta-seed;
a hand-designed optimizer's runs are one cluster per evaluation seed. Every comparison
of a learned row (against a baseline, against its untrained self, against the
candidate it is an ablation of) on every held-out task is one hypothesis of a single
Holm family; "adjusted" intervals are taken at the level Holm's procedure applies to
that hypothesis.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .stats import Comparison, compare, holm

__all__ = ["analyse", "compact", "expand", "plot", "render", "write_report", "ALPHA"]

ALPHA = 0.05
_RUN_KEYS = ("optimizer", "kind", "task", "meta_seed", "seed", "test_accuracy", "train_accuracy", "train_loss",
             "test_loss", "top_eigenvalue", "smoothed_loss", "seconds", "diverged_at")


# ---------------------------------------------------------------------------- compact data


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _nanmean(values: Iterable[float | None]) -> float:
    xs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(xs) if xs else math.nan


def compact(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` without per-run curves (their means per optimizer are kept) or meta-training logs."""
    if results.get("compact"):
        return dict(results)
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        if "curve" in r:
            curves.setdefault(r["optimizer"], []).append(r["curve"])
    mean_curves = {}
    for name, group in curves.items():
        n = min(len(c["step"]) for c in group)
        mean = {"step": group[0]["step"][:n]}
        for series in group[0]:
            if series != "step":
                mean[series] = [_nanmean(c[series][i] for c in group) for i in range(n)]
        mean_curves[name] = mean
    out = {k: v for k, v in results.items() if k not in ("runs",)}
    out["compact"] = True
    out["runs"] = {"columns": list(_RUN_KEYS), "rows": [[_round(r.get(k)) for k in _RUN_KEYS] for r in results["runs"]]}
    out["mean_curves"] = _round(mean_curves)
    return out


def expand(data: Mapping[str, Any]) -> dict[str, Any]:
    """Compact data with its runs as dicts again (the full results pass through)."""
    if not data.get("compact"):
        return dict(data)
    runs = data["runs"]
    return {**data, "runs": [dict(zip(runs["columns"], row)) for row in runs["rows"]]}


# ---------------------------------------------------------------------------- analysis


def _index(runs: Sequence[Mapping[str, Any]], row: str, task: str) -> dict[tuple[Any, int], float]:
    return {(r["meta_seed"], r["seed"]): float(r["test_accuracy"]) for r in runs
            if r["optimizer"] == row and r["task"] == task and r.get("test_accuracy") is not None}


def _differences(runs: Sequence[Mapping[str, Any]], row: str, reference: str, task: str) -> dict[Any, list[float]]:
    """Paired differences row − reference on ``task``, grouped by the row's meta-seed.

    Pairs share the optimizee seed, and the meta-seed when the reference has one.
    """
    mine, theirs = _index(runs, row, task), _index(runs, reference, task)
    by_seed = {seed: acc for (m, seed), acc in theirs.items() if m is None}
    clusters: dict[Any, list[float]] = {}
    for (m, seed), acc in mine.items():
        other = theirs.get((m, seed), by_seed.get(seed))
        if other is None:
            continue
        key = m if m is not None else seed
        clusters.setdefault(key, []).append(acc - other)
    return clusters


def _summary(runs: Sequence[Mapping[str, Any]], row: str, task: str) -> Comparison:
    """The row's own accuracy with its interval (clusters as for comparisons)."""
    clusters: dict[Any, list[float]] = {}
    for (m, seed), acc in _index(runs, row, task).items():
        clusters.setdefault(m if m is not None else seed, []).append(acc)
    return compare(clusters)


def _untrained_reference(candidate: Mapping[str, Any]) -> str | None:
    """The row holding a candidate's untrained self: its own ablation row, or the baseline it equals."""
    if candidate.get("untrained_is"):
        return candidate["untrained_is"]
    return f"{candidate['label']} (untrained)" if candidate["untrained"] else None


def _verdict(c: Comparison, p: float) -> str:
    if c.clusters < 2 or math.isnan(c.mean) or p >= ALPHA:
        return "within noise"
    return "better" if c.mean > 0 else "worse"


def analyse(data: Mapping[str, Any]) -> dict[str, Any]:
    """Every number the report prints, from the study's results (full or compact)."""
    data = expand(data)
    runs = [r for r in data["runs"] if not r.get("failed")]
    tasks = list(data["regime"]["sets"]["held_out"])
    baselines = list(data["budget"].get("held_out_baselines") or data["regime"]["baselines"])
    candidates = {c["label"]: c for c in data["candidates"]}
    headline = list(data["headline"])
    targets = {"beat": "sam", "beat_on_at_least": 4, "no_collapse_vs": "adam", "collapse_points": 1.0,
               "learned_contribution_on_at_least": 3, **data["regime"].get("targets", {})}
    untrained_of = {c: _untrained_reference(candidates[c]) for c in headline}
    rows = baselines + [x for c in headline
                        for x in ([c, untrained_of[c]] if untrained_of[c] == f"{c} (untrained)" else [c])]
    accuracy = {row: {t: _summary(runs, row, t) for t in tasks} for row in rows}

    # The Holm family: every comparison of a headline learned row.
    hypotheses = []
    for c in headline:
        # A baseline that is this row's untrained self gives one comparison, of both kinds.
        references = [(b, "learned contribution" if b == untrained_of[c] else "vs baseline") for b in baselines]
        if untrained_of[c] == f"{c} (untrained)":
            references.append((untrained_of[c], "learned contribution"))
        if candidates[c]["reference"]:
            references.append((candidates[c]["reference"], "vs reference"))
        for ref, kind in references:
            for t in tasks:
                diffs = _differences(runs, c, ref, t)
                hypotheses.append({"row": c, "reference": ref, "kind": kind, "task": t, "clusters": diffs,
                                   "result": compare(diffs)})
    adjusted = holm([h["result"].p for h in hypotheses])
    order = sorted(range(len(hypotheses)), key=lambda i: hypotheses[i]["result"].p)
    for rank, i in enumerate(order):
        h = hypotheses[i]
        h["p_holm"] = adjusted[i]
        level = 1 - ALPHA / (len(hypotheses) - rank)
        h["adjusted"] = compare(h["clusters"], level=level)
        h["verdict"] = _verdict(h["result"], h["result"].p)
        h["verdict_holm"] = _verdict(h["result"], adjusted[i])

    verdicts = []
    for c in headline:
        if not candidates[c]["flatness_aware"]:
            continue
        mine = [h for h in hypotheses if h["row"] == c]
        beat = [h["task"] for h in mine if h["reference"] == targets["beat"] and h["verdict_holm"] == "better"]
        collapse = [h["task"] for h in mine if h["reference"] == targets["no_collapse_vs"]
                    and h["result"].mean < -targets["collapse_points"] / 100]
        learned = [h["task"] for h in mine if h["kind"] == "learned contribution" and h["verdict_holm"] == "better"]
        verdicts.append({
            "row": c, "beats": beat, "collapses": collapse, "learned_contribution": learned,
            "untrained_row": untrained_of[c] is not None, "untrained_reference": untrained_of[c],
            "met_beat": len(beat) >= targets["beat_on_at_least"], "met_no_collapse": not collapse,
            "met_contribution": len(learned) >= targets["learned_contribution_on_at_least"]})
    for v in verdicts:
        v["met"] = v["met_beat"] and v["met_no_collapse"] and v["met_contribution"]
    return {"tasks": tasks, "rows": rows, "accuracy": accuracy, "hypotheses": hypotheses, "targets": targets,
            "verdicts": verdicts, "runs": runs}


# ---------------------------------------------------------------------------- rendering


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:+.1f}"


def _acc(c: Comparison) -> str:
    if math.isnan(c.mean):
        return "n/a"
    if math.isnan(c.low):
        return f"{100 * c.mean:.1f}"
    return f"{100 * c.mean:.1f} [{100 * c.low:.1f}, {100 * c.high:.1f}]"


def _interval(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines


def render(data: Mapping[str, Any], analysis: Mapping[str, Any], *, reading: str = "") -> str:
    """The markdown report."""
    data = expand(data)
    a = analysis
    tasks, targets = a["tasks"], a["targets"]
    budget = data["budget"]
    lines = [f"# Study `{data['name']}`: results", "",
             f"{data['description']}", "",
             "Regenerate with `flat-l2o study report DIR` (or "
             "`python -m flat_l2o_plugin.study.report RESULTS.json DOCS_DIR`). Every selection below was made on "
             "validation optimizees (validation init seeds, the `val` split); only the held-out runs touch `test`.",
             ""]
    lines += ["## The answer", ""]
    if not a["verdicts"]:
        lines += ["No flatness-aware learned optimizer reached the headline.", ""]
    for v in a["verdicts"]:
        status = "**met**" if v["met"] else "**not met**"
        lines.append(f"- `{v['row']}`: target {status}. Beats tuned {targets['beat']} (Holm-adjusted) on "
                     f"{len(v['beats'])} of {len(tasks)} held-out tasks (target ≥ {targets['beat_on_at_least']})"
                     f"{': ' + ', '.join(v['beats']) if v['beats'] else ''}; "
                     + (f"trails tuned {targets['no_collapse_vs']} by more than {targets['collapse_points']:g} point "
                        f"on {', '.join(v['collapses'])}; " if v["collapses"] else
                        f"never more than {targets['collapse_points']:g} point below tuned {targets['no_collapse_vs']}; ")
                     + (f"learned contribution (trained − untrained"
                        f"{'' if v['untrained_reference'].endswith('(untrained)') else ' = ' + v['untrained_reference']}"
                        f") above 0 on {len(v['learned_contribution'])} "
                        f"(target ≥ {targets['learned_contribution_on_at_least']})"
                        if v["untrained_row"] else "no untrained row, so no learned contribution is measured")
                     + ".")
    if reading:
        lines += ["", reading.strip()]
    lines += ["", "## Held-out test accuracy (%)", "",
              f"Mean and 95% interval. Learned rows: {budget['meta_seeds']} meta-seeds × {budget['eval_seeds']} "
              f"evaluation seeds (clustered by meta-seed); hand-designed rows: {budget['meta_seeds'] * budget['eval_seeds']} "
              "evaluation seeds, the same ones. Each baseline runs at its own per-task pick."
              + _validation_only(data, a), ""]
    lines += _table(["optimizer", *tasks], ([row, *(_acc(a["accuracy"][row][t]) for t in tasks)] for row in a["rows"]))
    lines += ["", "## Paired differences (accuracy points)", "",
              f"Treatment − reference, paired on the optimizee seed (and meta-seed). `p_holm`: Holm-adjusted over "
              f"all {len(a['hypotheses'])} comparisons of this table; the adjusted interval is taken at the level "
              "Holm applies to that comparison. `units won`: independent units (meta-seeds) whose mean difference "
              "is above 0.", ""]
    rows = []
    for h in a["hypotheses"]:
        c, adj = h["result"], h["adjusted"]
        rows.append([h["row"], h["reference"], h["task"], _pct(c.mean), _interval(c.low, c.high), h["verdict"],
                     f"{h['p_holm']:.3g}", _interval(adj.low, adj.high), h["verdict_holm"],
                     f"{c.wins}/{c.clusters}"])
    lines += _table(["row", "reference", "task", "mean", "95% interval", "raw verdict", "p_holm",
                     "adjusted interval", "adjusted verdict", "units won"], rows)
    lines += _candidates_section(data)
    lines += _grids_section(data)
    lines += _meta_section(data)
    lines += _flatness_section(a)
    lines += _environment_section(data)
    return "\n".join(lines) + "\n"


def _validation_only(data: Mapping[str, Any], a: Mapping[str, Any]) -> str:
    others = [b for b in data["regime"]["baselines"] if b not in a["rows"]]
    return (f" Tuned and reported on validation only (see the picks below): {', '.join(others)}." if others else "")


def _candidates_section(data: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Candidates, compared on validation", "",
             "Mean validation accuracy (%) over the selection tasks, their validation seeds and the candidate's "
             "meta-seeds; untrained: the same optimizer and wrappers with their initial weights. Every candidate "
             "is listed, including those rejected.", ""]
    rows = []
    headline = set(data["headline"])
    for c in data["candidates"]:
        s = data["selection"].get(c["label"], {})
        trained, untrained = s.get("trained_mean", math.nan), s.get("untrained_mean", math.nan)
        per_task = "; ".join(f"{t}: {100 * _nanmean(v):.1f}" for t, v in s.get("trained", {}).items())
        rows.append([c["label"], f"{100 * trained:.1f}", "n/a" if math.isnan(untrained) else f"{100 * untrained:.1f}",
                     "n/a" if math.isnan(untrained) else _pct(trained - untrained), per_task,
                     "yes" if c["label"] in headline else "no"])
    return lines + _table(["candidate", "trained", "untrained", "trained − untrained", "per selection task",
                           "headline"], rows)


def _grids_section(data: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Baseline picks (validation)", "",
             "Each grid grew while its pick lay on an edge. `margin`: the pick's validation accuracy minus the "
             "runner-up's; a margin below 1 point is a pick another machine may not reproduce.", ""]
    rows = []
    for label, per_task in data["grids"].items():
        for task, g in per_task.items():
            runner = g.get("runner_up")
            margin = g["score"] - runner["score"] if runner else math.nan
            extents = ", ".join(f"{k} {min(v):g}..{max(v):g}" for k, v in g["grid"].items() if len(v) > 1)
            rows.append([label, task, json.dumps(g["pick"]), f"{100 * g['score']:.1f}",
                         "n/a" if math.isnan(margin) else f"{100 * margin:.1f}", extents or "fixed",
                         ", ".join(f"{k}+{len(v)}" for k, v in g["extensions"].items()) or "none",
                         ", ".join(g["on_edge"]) or "no"])
    return lines + _table(["baseline", "task", "pick", "val acc", "margin", "grid", "extensions", "on edge"], rows)


def _meta_section(data: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Meta-training runs", "",
             "Best checkpoint by validation. `margin`: its validation score minus the next best validation of "
             "the same run (below 1 point: another machine may select another checkpoint). `digest`: SHA-256 of "
             "the selected weights, to check a rerun against.", ""]
    rows = []
    for r in data["meta_runs"]:
        if r.get("failed"):
            rows.append([r["label"], r["meta_seed"], "failed", "", "", "", "", ""])
            continue
        scores = sorted((v["val_score"] for v in r["validation"]), reverse=True)
        margin = scores[0] - scores[1] if len(scores) > 1 else math.nan
        rows.append([r["label"], r["meta_seed"], f"{100 * r['best_val_accuracy']:.1f}", r["best_step"],
                     "n/a" if math.isnan(margin) else f"{100 * margin:.1f}", "yes" if r["never_learned"] else "no",
                     f"{r['seconds']:.0f}", r["weights_digest"][:12]])
    return lines + _table(["candidate", "meta-seed", "best val acc", "step", "margin", "never learned", "seconds",
                           "digest"], rows)


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    from scipy import stats

    return float(stats.spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def _flatness_section(a: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Flatness at the final point", "",
             "Mean top Hessian eigenvalue (whole training set) and smoothed-loss excess over the train loss; "
             "Spearman correlation of test accuracy with the top eigenvalue over every run of the task.", ""]
    runs = a["runs"]
    rows = []
    for task in a["tasks"]:
        here = [r for r in runs if r["task"] == task]
        rho = _spearman([r["top_eigenvalue"] for r in here], [r["test_accuracy"] for r in here])
        for row in a["rows"]:
            mine = [r for r in here if r["optimizer"] == row]
            rows.append([task, row, f"{_nanmean(r['top_eigenvalue'] for r in mine):.3g}",
                         f"{_nanmean(r['smoothed_loss'] - r['train_loss'] for r in mine):.3g}",
                         f"{100 * _nanmean(r['train_accuracy'] - r['test_accuracy'] for r in mine):.1f}",
                         "" if row != a["rows"][0] else ("n/a" if math.isnan(rho) else f"{rho:+.2f}")])
    return lines + _table(["task", "optimizer", "top eigenvalue", "smoothed − train loss", "gap (points)",
                           "Spearman(acc, λ)"], rows)


def _job_hours(data: Mapping[str, Any]) -> float:
    """Seconds of the held-out runs and the meta-training runs (grid searches record none)."""
    seconds = [r.get("seconds") for r in data["runs"]] + [r.get("seconds") for r in data["meta_runs"]]
    return sum(s for s in seconds if isinstance(s, (int, float)) and math.isfinite(s)) / 3600


def _environment_section(data: Mapping[str, Any]) -> list[str]:
    env = data.get("environment", {})
    return ["", "## How it was run", "",
            f"- {env.get('cpu_count')} CPUs ({env.get('machine')}, {env.get('processor') or 'unknown processor'}), "
            f"{env.get('threads_per_job')} thread per job; Python {env.get('python')}, torch {env.get('torch')}, "
            f"numpy {env.get('numpy')}; {env.get('platform')}.",
            f"- Wall time {data.get('wall_seconds', math.nan) / 60:.1f} min, summed over the invocations that ran "
            "to their end (a rerun finds finished jobs in the cache; an interrupted invocation is not counted). "
            f"Its held-out and meta-training jobs took {_job_hours(data):.1f} job-hours, each timed in its worker "
            "(grid searches not counted).",
            f"- Budget: {json.dumps(data['budget'])}.", ""]


def plot(data: Mapping[str, Any], analysis: Mapping[str, Any], path: Path) -> bool:
    """Curves on the first held-out task and accuracy against flatness; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curves = data.get("mean_curves", {})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for row in analysis["rows"]:
        c = curves.get(row)
        if not c:
            continue
        axes[0].plot(c["step"], [100 * x for x in c.get("test_accuracy", [])], label=row)
        axes[1].plot(c["step"], c["train_loss"], label=row)
    axes[0].set(title=f"test accuracy, {analysis['tasks'][0]}", xlabel="step", ylabel="%")
    axes[1].set(title="train mini-batch loss", xlabel="step", yscale="log")
    measured = False
    for row in analysis["rows"]:
        mine = [r for r in analysis["runs"] if r["optimizer"] == row and r["top_eigenvalue"] is not None
                and math.isfinite(r["top_eigenvalue"]) and r["top_eigenvalue"] > 0]
        axes[2].scatter([r["top_eigenvalue"] for r in mine], [100 * r["test_accuracy"] for r in mine], s=6,
                        label=row)
        measured |= bool(mine)
    # A study run without flatness measures (budget.flatness = false) has nothing to put on a log axis.
    axes[2].set(title="test accuracy against the top Hessian eigenvalue (all tasks)", ylabel="%",
                xscale="log" if measured else "linear")
    if axes[0].get_legend_handles_labels()[0]:  # a study without saved curves draws none
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_report(source: str | Path | Mapping[str, Any], docs: str | Path, *, reading: str | Path | None = None,
                 stem: str = "results") -> Path:
    """Write ``<docs>/<stem>.json`` (compact), ``<docs>/<stem>.md`` and its figure from a study's results.

    ``reading``: a markdown file whose text is placed under the answer (the authors'
    interpretation, kept apart from generated numbers).
    """
    from .._atomic import write_atomically

    if isinstance(source, Mapping):
        data = dict(source)
    else:
        data = json.loads(Path(source).read_text())
    small = compact(data)
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    text = Path(reading).read_text() if reading is not None and Path(reading).exists() else ""
    analysis = analyse(small)
    markdown = render(small, analysis, reading=text)
    figure = docs / "img" / f"{stem}_{small['name']}.png"
    if plot(small, analysis, figure):
        markdown += f"\n![curves and flatness](img/{figure.name})\n"
    write_atomically(docs / f"{stem}.json", json.dumps(small, indent=None, separators=(",", ":")).encode(), OSError)
    write_atomically(docs / f"{stem}.md", markdown.encode(), OSError)
    return docs / f"{stem}.md"
