"""``docs/results.md`` from the generalization study's JSON: tables, paired statistics, plots.

Run: ``python benchmarks/generalization_report.py [RESULTS] [--docs docs]``.

``RESULTS`` is the study's raw ``results.json`` (default ``runs/generalization``) or the
compact ``docs/results.json`` this script writes next to the report, so the report can
be regenerated from a fresh clone. Intervals are 95% Student-t intervals. A learned
optimizer's runs are clustered by meta-training seed (the mean over evaluation seeds
per meta-seed is one observation), since runs that share a meta-trained optimizer are
not independent; a hand-designed baseline's observations are its evaluation seeds.
The interpretive reading is kept in ``benchmarks/generalization_reading.md`` and
included verbatim.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

HERE = Path(__file__).resolve().parent
READING = HERE / "generalization_reading.md"
BASELINES = ("adam", "sgd_momentum", "sam", "entropy_sgd")


# ---------------------------------------------------------------------------- statistics


def t_interval(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (NaN with fewer than 2 values)."""
    from scipy import stats

    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))


def clustered(runs: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    """One observation per meta-training seed (the mean over evaluation seeds), or per run for baselines."""
    runs = list(runs)
    if runs and runs[0]["meta_seed"] is None:
        return [float(r[key]) for r in runs]
    by_seed: dict[int, list[float]] = {}
    for r in runs:
        by_seed.setdefault(r["meta_seed"], []).append(float(r[key]))
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def paired(runs: Sequence[Mapping[str, Any]], task: str, treatment: str, reference: str) -> dict[str, Any] | None:
    """Test-accuracy difference treatment − reference on one task.

    Pairs share the optimizee init seed (and so its batches) and, when both are learned,
    the meta-training seed. Differences are averaged per meta-seed of the treatment
    (clusters), and the interval is taken over clusters.
    """
    def index(name: str) -> dict[tuple[Any, int], float]:
        return {(r["meta_seed"], r["seed"]): r["test_accuracy"] for r in runs
                if r["task"] == task and r["optimizer"] == name}

    t_runs, r_runs = index(treatment), index(reference)
    if not t_runs or not r_runs:
        return None
    ref_learned = next(iter(r_runs))[0] is not None
    diffs: dict[Any, list[float]] = {}
    for (meta_seed, seed), acc in t_runs.items():
        other = r_runs.get((meta_seed, seed) if ref_learned else (None, seed))
        if other is not None and not (math.isnan(acc) or math.isnan(other)):
            diffs.setdefault(meta_seed, []).append(acc - other)
    flat = [d for v in diffs.values() for d in v]
    if not flat:
        return None
    mean, half = t_interval([statistics.fmean(v) for v in diffs.values()] if len(diffs) > 1 else flat)
    return {"mean": mean, "half": half, "wins": sum(d > 0 for d in flat), "pairs": len(flat)}


def verdict(p: Mapping[str, Any]) -> str:
    if math.isnan(p["half"]) or abs(p["mean"]) <= p["half"]:
        return "within noise"
    return "better" if p["mean"] > 0 else "worse"


# ---------------------------------------------------------------------------- compact data


def compact(results: Mapping[str, Any]) -> dict[str, Any]:
    """Drop per-run curves (the plotted task's are kept as means per optimizer) and validation logs."""
    if results.get("compact"):
        return dict(results)
    out = {k: v for k, v in results.items() if k != "regimes"}
    out["compact"], out["regimes"] = True, {}
    for name, regime in results["regimes"].items():
        curves: dict[str, dict[str, Any]] = {}
        plotted = regime["held_out"][0]["name"]  # the curves shown in the report
        for r in regime["runs"]:
            if r["task"] == plotted:
                curves.setdefault(f"{r['task']}|{r['optimizer']}", []).append(r["curve"])  # type: ignore[union-attr]
        mean_curves = {}
        for key, group in curves.items():
            n = min(len(c["step"]) for c in group)
            mean_curves[key] = {"step": group[0]["step"][:n]}
            for series in group[0]:
                if series != "step":
                    mean_curves[key][series] = [_nanmean(c[series][i] for c in group) for i in range(n)]
        out["regimes"][name] = {
            **{k: v for k, v in regime.items() if k not in ("runs", "meta_runs")},
            "meta_runs": [{k: v for k, v in m.items() if k != "validation"} for m in regime["meta_runs"]],
            # Columns and rows: the held-out runs are most of the file.
            "runs": {"columns": list(_RUN_KEYS), "rows": [[_round(r[k]) for k in _RUN_KEYS] for r in regime["runs"]]},
            "mean_curves": _round(mean_curves),
        }
    return out


# What the report reads from each held-out run (the task's options are in the config).
_RUN_KEYS = ("task", "optimizer", "kind", "meta_seed", "seed", "test_accuracy", "train_accuracy", "train_loss",
             "test_loss", "top_eigenvalue", "smoothed_loss", "seconds", "diverged_at")


def _round(value: Any) -> Any:
    """Five significant digits: the compact JSON stays small, and the report rounds further."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def expand(results: Mapping[str, Any]) -> dict[str, Any]:
    """The compact results with each regime's runs as dicts again, plus the train-test gap
    (``gap``) and the smoothed loss's excess over the train loss (``entropy_excess``)."""
    out = {**results, "regimes": {}}
    for name, regime in results["regimes"].items():
        runs = regime["runs"]
        rows = [dict(zip(runs["columns"], row)) for row in runs["rows"]]
        for r in rows:
            r["gap"] = r["train_accuracy"] - r["test_accuracy"]
            r["entropy_excess"] = r["smoothed_loss"] - r["train_loss"]
        out["regimes"][name] = {**regime, "runs": rows}
    return out


def _nanmean(values: Iterable[float]) -> float:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(xs) if xs else math.nan


# ---------------------------------------------------------------------------- tables


def _pct(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def _num(x: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}g}"


def _contenders(regime: Mapping[str, Any]) -> list[str]:
    learned = list(regime["held_out_contenders"])
    return [b for b in BASELINES if any(r["optimizer"] == b for r in regime["runs"])] + learned


def headline(regime: Mapping[str, Any]) -> list[str]:
    tasks = [h["name"] for h in regime["held_out"]]
    lines = ["| optimizer | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name in _contenders(regime):
        cells, means = [], []
        for task in tasks:
            runs = [r for r in regime["runs"] if r["optimizer"] == name and r["task"] == task]
            mean, half = t_interval(clustered(runs, "test_accuracy"))
            cells.append(_pct(mean, half))
            means.append(mean)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * _nanmean(means):.1f} |")
    return lines


def per_task(regime: Mapping[str, Any], task: str) -> list[str]:
    lines = ["| optimizer | runs | test acc (%) | train loss | gap (train − test acc, points) | top eigenvalue "
             "| smoothed − train loss | diverged | s per run |", "|---" * 9 + "|"]
    for name in _contenders(regime):
        runs = [r for r in regime["runs"] if r["optimizer"] == name and r["task"] == task]
        if not runs:
            continue
        acc = t_interval(clustered(runs, "test_accuracy"))
        gap = t_interval(clustered(runs, "gap"))
        lines.append(
            f"| {name} | {len(runs)} | {_pct(*acc)} | {_num(_nanmean(r['train_loss'] for r in runs))} "
            f"| {_pct(*gap)} | {_num(_nanmean(r['top_eigenvalue'] for r in runs))} "
            f"| {_num(_nanmean(r['entropy_excess'] for r in runs))} "
            f"| {sum(r['diverged_at'] is not None for r in runs)} | {_nanmean(r['seconds'] for r in runs):.2f} |")
    return lines


def paired_table(regime: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> list[str]:
    tasks = [h["name"] for h in regime["held_out"]]
    lines = ["| treatment − reference | " + " | ".join(tasks) + " | tasks better / worse / within noise |",
             "|---" * (len(tasks) + 2) + "|"]
    for treatment, reference in pairs:
        cells, tally = [], {"better": 0, "worse": 0, "within noise": 0}
        for task in tasks:
            p = paired(regime["runs"], task, treatment, reference)
            if p is None:
                cells.append("n/a")
                continue
            tally[verdict(p)] += 1
            half = "" if math.isnan(p["half"]) else f" ± {100 * p['half']:.1f}"
            cells.append(f"{100 * p['mean']:+.1f}{half} ({p['wins']}/{p['pairs']})")
        lines.append(f"| {treatment} − {reference} | " + " | ".join(cells)
                     + f" | {tally['better']} / {tally['worse']} / {tally['within noise']} |")
    return lines


def regularized_pairs(regime: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(optimizer+term, optimizer) for every learned optimizer evaluated with and without a term."""
    plain = [c for c in regime["held_out_contenders"] if "+" not in c]
    return [(c, c.split("+")[0]) for c in regime["held_out_contenders"] if "+" in c and c.split("+")[0] in plain]


def recipe_tally(results: Mapping[str, Any]) -> dict[str, int]:
    """Verdicts of every (optimizer+term − optimizer, held-out task) comparison, over all regimes.

    Only pairs whose treatment is a meta-loss regularizer of the config count; a wrapper
    such as ``rnnprop+sam_gradient`` is a variant, not the paper's recipe.
    """
    tally = {"better": 0, "worse": 0, "within noise": 0}
    for regime in results["regimes"].values():
        terms = set(regime["chosen_regularizers"])
        for treatment, reference in regularized_pairs(regime):
            if treatment.split("+", 1)[1] not in terms:
                continue
            for task in (h["name"] for h in regime["held_out"]):
                p = paired(regime["runs"], task, treatment, reference)
                if p is not None:
                    tally[verdict(p)] += 1
    return tally


def meta_table(regime: Mapping[str, Any]) -> list[str]:
    lines = ["| configuration | group | meta-seeds | best validation acc (%) | failed | meta-training s "
             "| × plain optimizer |", "|---" * 7 + "|"]
    labels: dict[str, list[Mapping[str, Any]]] = {}
    for m in regime["meta_runs"]:
        labels.setdefault(m["label"], []).append(m)
    seconds = {label: _nanmean(m["seconds"] for m in runs) for label, runs in labels.items()}
    for label, runs in labels.items():
        acc = t_interval([m["best_val_accuracy"] for m in runs])
        base = label.split("+")[0]
        ratio = f"{seconds[label] / seconds[base]:.2f}×" if base != label and base in seconds else ""
        lines.append(f"| {label} | {runs[0]['group']} | {len(runs)} | {_pct(*acc)} "
                     f"| {sum(m['failed'] for m in runs)}/{len(runs)} | {seconds[label]:.0f} | {ratio} |")
    return lines


def flatness_correlation(regime: Mapping[str, Any]) -> list[str]:
    """Spearman rank correlation of test accuracy with each flatness measure, per held-out task."""
    from scipy import stats

    lines = ["| held-out task | runs | ρ(top eigenvalue, test acc) | ρ(smoothed − train loss, test acc) "
             "| ρ(top eigenvalue, gap) |", "|---|---|---|---|---|"]
    for task in (h["name"] for h in regime["held_out"]):
        runs = [r for r in regime["runs"] if r["task"] == task and not math.isnan(r["top_eigenvalue"])
                and not math.isnan(r["smoothed_loss"])]
        if len(runs) < 3:
            continue
        eig = [r["top_eigenvalue"] for r in runs]
        excess = [r["entropy_excess"] for r in runs]
        acc = [r["test_accuracy"] for r in runs]
        gap = [r["gap"] for r in runs]
        cells = [float(stats.spearmanr(a, b).statistic) for a, b in ((eig, acc), (excess, acc), (eig, gap))]
        lines.append(f"| {task} | {len(runs)} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
    return lines


def sweep_tables(regime: Mapping[str, Any]) -> list[str]:
    lines = ["| regularizer | α | best validation acc (%) |", "|---|---|---|"]
    for row in regime["alpha_sweep"]:
        picked = regime["chosen_regularizers"][row["regularizer"]]["weight"] == row["alpha"]
        lines.append(f"| {row['regularizer']} | {row['alpha']:g}{' (picked)' if picked else ''} "
                     f"| {100 * row['best_val_accuracy']:.1f} |")
    lines += ["", "| baseline | held-out task | picked on validation | validation acc (%) |", "|---|---|---|---|"]
    for base, per_task in regime["baseline_picks"].items():
        for task, point in per_task.items():
            shown = ", ".join(f"{k}={v:g}" for k, v in point.items() if k != "_score")
            lines.append(f"| {base} | {task} | {shown} | {100 * point['_score']:.1f} |")
    return lines


# ---------------------------------------------------------------------------- plots


def plots(results: Mapping[str, Any], img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    files = []
    for name, regime in results["regimes"].items():
        task = regime["held_out"][0]["name"]
        shown = [c for c in _contenders(regime) if f"{task}|{c}" in regime["mean_curves"]]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        colors = plt.get_cmap("tab20").colors
        for ax in axes:
            ax.set_prop_cycle(color=colors)
        for c in shown:
            curve = regime["mean_curves"][f"{task}|{c}"]
            style = "--" if c in BASELINES else "-"
            axes[0].plot(curve["step"], curve["test_accuracy"], style, label=c)
            axes[1].plot(curve["step"], curve["train_loss"], style, label=c)
            if "top_eigenvalue" in curve:
                axes[2].plot(curve["step"], curve["top_eigenvalue"], style, label=c)
        axes[0].set_ylabel("test accuracy")
        axes[1].set_ylabel("train mini-batch loss")
        axes[1].set_yscale("log")
        axes[2].set_ylabel("top Hessian eigenvalue (train set)")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("optimizee step")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: {task} (mean over runs)")
        fig.tight_layout()
        path = img / f"results_{name}_curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path.name)

    fig, axes = plt.subplots(1, len(results["regimes"]), figsize=(7 * len(results["regimes"]), 5), squeeze=False)
    for ax, (name, regime) in zip(axes[0], results["regimes"].items()):
        colors = plt.get_cmap("tab10").colors
        for i, task in enumerate(h["name"] for h in regime["held_out"]):
            for kind, marker in (("baseline", "x"), ("learned", ".")):
                runs = [r for r in regime["runs"] if r["kind"] == kind and r["task"] == task
                        and r["top_eigenvalue"] > 0]
                ax.scatter([r["top_eigenvalue"] for r in runs], [r["test_accuracy"] for r in runs], s=10,
                           marker=marker, alpha=0.5, color=colors[i % 10],
                           label=task if kind == "learned" else None)
        ax.set_xscale("log")
        ax.set_xlabel("top Hessian eigenvalue at the final point")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: every held-out run (x: hand-designed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = img / "results_accuracy_vs_flatness.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return files + [path.name]


# ---------------------------------------------------------------------------- the report


def report(results: Mapping[str, Any], docs: Path) -> str:
    data = compact(results)
    results = expand(data)
    plots(results, docs / "img")
    study = results["study"]
    out = ["# Does flatness-aware meta-training generalize? Results of the study", "",
           "Generated by `python benchmarks/generalization_report.py docs/results.json` from the study's JSON "
           "(`python benchmarks/generalization.py` writes the raw one; see the protocol below). "
           + ("**Quick mode: these numbers are a smoke test and mean nothing.**" if results.get("quick") else ""),
           "", f"Compute: {results['cpu']}; wall time of the full study **{results['wall_seconds'] / 60:.0f} min** "
           f"on this CPU machine (no GPU).", ""]
    tally = recipe_tally(results)
    out += [f"The paper's recipe in one line: {sum(tally.values())} paired comparisons of a learned optimizer "
            f"meta-trained with a flatness term against the same optimizer without it (every regime and held-out "
            f"task): {tally['better']} better, {tally['worse']} worse, {tally['within noise']} within noise.", ""]
    if READING.exists():
        out += [READING.read_text().strip(), ""]
    for name, regime in results["regimes"].items():
        tasks = [h["name"] for h in regime["held_out"]]
        adam = [r for r in regime["runs"] if r["optimizer"] == "adam" and r["task"] == tasks[0]]
        gap = _nanmean(r["gap"] for r in adam)
        out += [f"## Regime `{name}`: {regime['description']}", "",
                f"Tuned Adam on the training architecture (new seeds) reaches "
                f"{100 * _nanmean(r['train_accuracy'] for r in adam):.1f}% train and "
                f"{100 * _nanmean(r['test_accuracy'] for r in adam):.1f}% test accuracy: a train-test gap of "
                f"**{100 * gap:.1f} points** after {regime['eval_steps']} steps.", "",
                "### Test accuracy on held-out optimizees (%, mean ± 95% CI)", "", *headline(regime), ""]
        learned_plain = [c for c in regime["held_out_contenders"] if "+" not in c]
        pairs = regularized_pairs(regime)
        variants = [c for c in regime["held_out_contenders"] if c not in learned_plain and (c, c.split("+")[0])
                    not in pairs]
        pairs += [(v, b) for v in variants for b in ("adam", "sam")]
        pairs += [(c, "adam") for c in learned_plain]
        out += ["### Paired differences in test accuracy (points; mean ± 95% CI over meta-seeds; "
                "(pairs won / pairs))", "", *paired_table(regime, pairs), ""]
        out += ["### Meta-training: validation, failures, cost", "",
                f"Budget per run: {json.dumps(regime['trainer'])}. A run *failed* when its best validation "
                f"accuracy stayed at or below {study['failure_accuracy']:.0%}.", "", *meta_table(regime), ""]
        out += ["### Test-time cost (ms per optimizee step, side by side on the first held-out task)", "",
                "| optimizer | ms/step | reference | ms/step | ratio |", "|---|---|---|---|---|"]
        out += [f"| {c['optimizer']} | {c['ms_per_step']:.2f} | {c['reference']} | {c['reference_ms_per_step']:.2f} "
                f"| {c['ratio']:.2f}× |" for c in regime.get("test_time_cost", [])]
        out += ["", "### Sweeps (validation only)", "", *sweep_tables(regime), ""]
        out += ["### Per held-out task", ""]
        for task in tasks:
            out += [f"#### {task}", "", *per_task(regime, task), ""]
        out += [f"![{name} curves](img/results_{name}_curves.png)", ""]
    out += ["## Test accuracy against flatness, every held-out run", "",
            "![accuracy vs flatness](img/results_accuracy_vs_flatness.png)", "",
            "Spearman rank correlations across all runs of a held-out task (every optimizer, every seed); "
            "a negative ρ with the eigenvalue means flatter end points tested better.", ""]
    for name, regime in results["regimes"].items():
        out += [f"**{name}**", "", *flatness_correlation(regime), ""]
    out += ["## Protocol", "",
            PROTOCOL.format(**study), ""]
    text = "\n".join(out)
    (docs / "results.md").write_text(text)
    (docs / "results.json").write_text(json.dumps(data, separators=(",", ":"), default=str))
    return text


PROTOCOL = """\
- **Seeds.** Optimizee init seeds are partitioned: evaluation 0–{eval_seeds_last}, validation 100+,
  meta-training 1000+. Meta-training seeds {meta_seeds}. Every optimizer trains a given optimizee seed on
  the same mini-batches.
- **Selection, on validation only.** Hand-designed baselines: every grid point is run on {val_seeds}
  validation optimizees of each held-out task; the best mean validation accuracy is kept per task.
  Regularizer weight α: the first learned optimizer, first meta-seed, meta-trained at each α of the sweep;
  the best validation accuracy picks α for every learned optimizer. Each meta-training run keeps its best
  checkpoint by validation accuracy ({val_seeds} validation optimizees). Variants: ranked by mean best
  validation accuracy; the best {held_out_variants} are evaluated on held-out optimizees.
  `@adam.lr`-style references in the config take the baselines' validation picks on the training task.
- **Held-out evaluation.** Each contender trains each held-out optimizee for the regime's `eval_steps`
  (twice the meta-training horizon); the test split is measured once, at the end. Train loss and train
  accuracy are on the whole training set; the top Hessian eigenvalue (power iteration, 50 steps) and
  the smoothed loss −log E exp(−f(θ+ε)), ε ~ N(0, I/γ) with γ = {entropy_gamma:g} (the local entropy
  without its constant), are on the whole training set at the final point.
- **Statistics.** Means with 95% Student-t intervals. Learned optimizers: one observation per
  meta-training seed (mean over evaluation seeds), so n = {n_meta}; baselines: n = {eval_seeds}
  evaluation seeds. Paired differences pair the optimizee seed and, between learned optimizers, the
  meta-training seed; "better"/"worse" means the interval excludes 0.
- **Cost.** Entropy-SGD takes `inner_steps` extra gradients per step and SAM one; the `sam_gradient`
  wrapper one. The "s per run" column is the wall time per held-out run in two concurrent workers
  (a rough guide); the test-time cost table measures each pair side by side in one process."""


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=Path("runs/generalization/results.json"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    study = results["study"]
    study.setdefault("eval_seeds_last", study["eval_seeds"] - 1)
    study.setdefault("n_meta", len(study["meta_seeds"]))
    text = report(results, args.docs)
    print(f"wrote {args.docs / 'results.md'} ({len(text.splitlines())} lines) and {args.docs / 'results.json'}")
    return text


if __name__ == "__main__":
    main()
