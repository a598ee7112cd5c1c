"""The run's metrics as JSON lines: one record per completed meta-step.

``run_dir/metrics.jsonl`` holds one JSON object per line, in meta-step order, each with
at least ``meta_step`` (0-based). The trainer appends a line after each meta-step and
flushes it, so a reader (``flat-l2o plot``, ``tail -f``) always sees whole lines up to
the last completed step. Non-finite numbers (a diverged trajectory's loss) are written
as ``null``: the file stays standard JSON that any reader accepts, and
:func:`read_metrics` turns them back into NaN.

On resume the file is cut back to the checkpoint's step before training continues
(:meth:`MetricsLog.open`), so a run that was killed and resumed has exactly one line per
meta-step, with no duplicate and no orphan line from work the checkpoint does not hold.
The cut is itself atomic (a rewritten temporary file renamed over the old one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Mapping

from ..errors import ConfigError

__all__ = ["METRICS_FILE", "MetricsLog", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
"""The metrics file's name inside a run folder."""

logger = logging.getLogger(__name__)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _none_to_nan(record: dict[str, Any]) -> dict[str, Any]:
    # Our records hold no None of their own: a null was a non-finite float.
    return {k: (math.nan if v is None else v) for k, v in record.items()}


def _parse_lines(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                # A last line without its newline was cut by a kill mid-write: it never
                # completed, so it is dropped, like the step that wrote it.
                break
            raise ConfigError(f"metrics file {path}, line {number}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("meta_step"), int):
            raise ConfigError(f"metrics file {path}, line {number}: expected an object with an integer "
                              f"'meta_step', got {line[:80]!r}")
        records.append(_none_to_nan(record))
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file (or of ``RUN_DIR/metrics.jsonl`` when given a folder).

    Args:
        path: A ``metrics.jsonl`` file, or the run folder holding one.

    Returns:
        One dict per line, in file order; ``null`` values come back as ``math.nan``.

    Raises:
        ConfigError: The file is missing or a line is not a JSON object with an integer
            ``meta_step`` (the message names the file and the line).
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"metrics file {path} does not exist; a MetaTrainer with run_dir= writes it")
    return _parse_lines(path, path.read_text(encoding="utf-8"))


class MetricsLog:
    """Appends meta-step records to a JSONL file; cuts it back to a checkpoint on resume.

    Args:
        path: The file, conventionally ``run_dir/metrics.jsonl``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handle: IO[str] | None = None

    def open(self, *, keep: int = 0) -> list[dict[str, Any]]:
        """Start writing, keeping the records of meta-steps ``0 .. keep-1``.

        ``keep=0`` starts an empty file (a fresh run). With ``keep > 0`` (a resume from a
        checkpoint at step ``keep``) the lines of later steps, written after that
        checkpoint by the run that was interrupted, are removed.

        Returns:
            The kept records, in order.
        """
        kept: list[dict[str, Any]] = []
        if keep > 0 and self.path.is_file():
            kept = [r for r in _parse_lines(self.path, self.path.read_text(encoding="utf-8"))
                    if r["meta_step"] < keep]
        if keep > 0 and [r["meta_step"] for r in kept] != list(range(keep)):
            logger.warning("metrics file %s holds %d of the %d records before the checkpoint; the history of "
                           "this run is incomplete before meta-step %d", self.path, len(kept), keep, keep)
        self._rewrite(kept)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        return kept

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as a line and flush it to the operating system."""
        if self._handle is None:
            raise ConfigError(f"metrics file {self.path} is not open; call open() first")
        self._handle.write(json.dumps(_finite_or_none(dict(record)), allow_nan=False) + "\n")
        self._handle.flush()

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint refers to them)."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
