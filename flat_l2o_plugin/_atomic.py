"""Atomic, durable file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
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
    fd, tmp_name = _create_beside(path)
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


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, uniquely named file in ``path``'s folder, open for writing.

    Created with mode 0o666 less the umask, as ``open()`` creates files, so the result
    is an ordinary file others may read (``tempfile.mkstemp`` would make it 0600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:  # 64 random bits: practically never
            continue


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries: a rename is durable only once its folder is (POSIX)."""
    if os.name != "posix":  # Windows cannot open a folder for fsync, and does not need to
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
