"""Curves of a meta-training run, drawn from its ``metrics.jsonl`` as one PNG.

One panel per family of metrics, each drawn only if the run logged it: the meta-loss
(with the optimizee loss and the imitation error), the flatness terms (``term/*``),
the estimators' raw values (``*/value``, e.g. the top Hessian eigenvalue), validation
accuracy and loss, the meta-learning rate, and the divergence counters. A diverged
meta-step's NaN leaves a gap in its curve rather than a spike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from .._extras import import_extra
from ..errors import ConfigError
from .metrics import METRICS_FILE, read_metrics

__all__ = ["PLOT_FILE", "plot_metrics"]

PLOT_FILE = "metrics.png"
"""The default PNG name, next to ``metrics.jsonl``."""

_Panel = tuple[str, Callable[[str], bool], bool]  # title, which keys, log y when positive and wide

_PANELS: tuple[_Panel, ...] = (
    ("meta-loss", lambda k: k in ("meta_loss", "loss", "imitation"), True),
    ("flatness terms (weighted, mean over the unroll)", lambda k: k.startswith("term/"), False),
    ("estimates at the end of the unroll", lambda k: k.endswith("/value"), False),
    ("validation accuracy", lambda k: k == "val_accuracy", False),
    ("validation loss", lambda k: k == "val_loss", True),
    ("meta-learning rate", lambda k: k == "meta_lr", False),
    ("divergence (cumulative)", lambda k: k in ("skipped_total", "diverged_total"), False),
)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(record["meta_step"] + 1)
            values.append(float(value))
    return steps, values


def plot_metrics(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the curves of a run as a PNG.

    Args:
        path: A run folder (holding ``metrics.jsonl``) or a metrics file.
        out: The PNG to write (default: ``metrics.png`` next to the metrics file).

    Returns:
        The path written.

    Raises:
        ConfigError: No metrics file, an unreadable one, or one without records (the
            message names it).

    Example:
        >>> plot_metrics("runs/exp1")  # runs/exp1/metrics.png
    """
    # The Agg canvas directly, not pyplot: no global backend switch in the caller's process.
    import_extra("matplotlib", "plot", "plot_metrics")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    metrics_file = path / METRICS_FILE if path.is_dir() else path
    records = read_metrics(metrics_file)
    if not records:
        raise ConfigError(f"metrics file {metrics_file} holds no record yet; plot it after the first meta-step")
    out = Path(out) if out is not None else metrics_file.with_name(PLOT_FILE)
    keys = list(dict.fromkeys(k for r in records for k in r))
    panels = [(title, [k for k in keys if chooses(k)], log) for title, chooses, log in _PANELS]
    panels = [p for p in panels if p[1]]
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.0 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, panel_keys, log) in enumerate(panels, 1):
        axes = figure.add_subplot(rows, columns, index)
        finite: list[float] = []
        for key in panel_keys:
            steps, values = _series(records, key)
            axes.plot(steps, values, lw=1.1, marker="." if len(steps) < 30 else None, label=key)
            finite += [v for v in values if math.isfinite(v)]
        if log and finite and min(finite) > 0 and max(finite) > 20 * min(finite):
            axes.set_yscale("log")
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("meta-step", fontsize=8)
        axes.tick_params(labelsize=7)
        if len(panel_keys) > 1:
            axes.legend(fontsize=7)
    figure.suptitle(f"{metrics_file.parent.name}: {len(records)} meta-steps", fontsize=10)
    figure.savefig(out, format="png")
    return out
