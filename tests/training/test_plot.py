"""``flat-l2o plot``: PNG curves from a run's metrics."""

from __future__ import annotations

import math

import pytest

from flat_l2o_plugin.cli import main
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training.metrics import MetricsLog
from flat_l2o_plugin.training.plot import plot_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(run_dir, steps=6):
    log = MetricsLog(run_dir / "metrics.jsonl")
    log.open()
    for s in range(steps):
        record = {"meta_step": s, "meta_loss": math.nan if s == 3 else 2.0 / (s + 1), "loss": 1.0, "meta_lr": 1e-3,
                  "term/hessian_top_eigenvalue": 0.1, "hessian_top_eigenvalue/value": 3.0 - s * 0.1,
                  "skipped_total": int(s >= 3), "diverged_total": int(s >= 3), "seconds": float(s)}
        if s % 2:
            record.update(val_accuracy=0.5 + s / 100, val_loss=1.0)
        log.append(record)
    log.close()


def test_plot_writes_a_png_next_to_the_metrics(tmp_path):
    _metrics(tmp_path)
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "metrics.png" and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_cli_plot_verb(tmp_path, capsys):
    _metrics(tmp_path)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert "curves.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "metrics file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--help"])
    assert exit_info.value.code == 0 and "examples:\n  flat-l2o plot runs/exp1" in capsys.readouterr().out


def test_an_empty_metrics_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'metrics.jsonl'} holds no record"):
        plot_metrics(tmp_path)
