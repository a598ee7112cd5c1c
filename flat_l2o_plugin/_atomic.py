"""Atomic, durable file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomically", "fsync_folder"]


def write_atomically(path: Path, payload: bytes, error: type[Exception]) -> None:
    """Write ``payload`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    Raises:
        error: the folder of ``path`` does not exist (the message names both).
    """
    folder = path.parent
    if not folder.is_dir():
        raise error(f"{path}: folder {folder} does not exist; create it first")
    # Same folder as the target: os.replace is atomic only within one file system.
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(folder)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries: a rename is durable only once its folder is (POSIX)."""
    if os.name != "posix":  # Windows cannot open a folder for fsync, and does not need to
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
