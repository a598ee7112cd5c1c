"""A run folder: checked before anything is written, and one writer at a time.

:func:`prepare_run_folder` refuses what cannot be a run folder (an empty path, a file,
a path under a file, a folder that cannot be created) with one line naming it.

:class:`RunLock` is an advisory lock held for the lifetime of a run.

``run_dir/.lock`` is locked with ``flock(2)`` (``msvcrt.locking`` on Windows) by the
process that runs in the folder, from before it checks the folder until it ends. The
operating system releases the lock when that process exits, however it exits (a
``SIGKILL`` included), so a killed run never leaves the folder locked. The file itself
stays: deleting a lock file while another process may have it open would let two
processes each hold "the" lock.

Once the run is known to start (the checks passed), the holder writes who it is into
the file (pid, host, start time, command line); a second process refused the lock
reads it for its message. A refused command writes nothing. The content is only a
description: the lock is the ``flock``, never the content.

A process may take the lock on a folder it already holds (the runner, then the
trainer inside it): the lock is counted per folder and released with the last holder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["LOCK_FILE", "RunFolderLockedError", "RunLock", "prepare_run_folder"]

LOCK_FILE = ".lock"
"""The lock file's name inside a run folder."""



@dataclass
class _Held:
    fd: int
    count: int = 1
    recorded: bool = False


# Folders this process holds, by resolved path.
_HELD: dict[str, _Held] = {}


class RunFolderLockedError(ConfigError):
    """Another process is running in this run folder (the message names it)."""


def prepare_run_folder(run_dir: str | os.PathLike[str], *, create: bool) -> Path:
    """``run_dir`` as a path, checked (and created when ``create``).

    Args:
        run_dir: The run folder.
        create: Create it (and its parents) if missing; otherwise only check it.

    Raises:
        ConfigError: ``run_dir`` is empty (it would write into the current folder), is a
            file, lies under a file, or cannot be created; the message names it.
    """
    if not str(run_dir).strip():
        raise ConfigError("run_dir is empty; name a folder for the run (it would otherwise write checkpoint/, "
                          "metrics.jsonl and optimizer.safetensors into the current folder)")
    path = Path(run_dir)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run folder {path} is a file, not a folder; choose another run_dir")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"run folder {path} cannot be created: {parent} is a file, not a folder")
                break
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"run folder {str(path)!r} cannot be {'created' if create else 'used'} ({reason}); "
                          f"choose another run_dir") from None
    return path


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RunLock:
    """The lock on one run folder.

    Args:
        run_dir: The run folder; it must exist.

    Example:
        >>> with RunLock("runs/exp1") as lock:   # raises RunFolderLockedError if taken
        ...     lock.record_holder()            # once the run is known to start
        ...     ...
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._key = os.path.realpath(self.run_dir)
        self._held = False

    def acquire(self) -> RunLock:
        """Take the lock without waiting.

        Raises:
            RunFolderLockedError: Another process holds it; the message names the folder
                and, when it recorded itself, its pid, host and command.
            ConfigError: The lock file cannot be opened (e.g. a read-only folder).
        """
        if self._held:
            return self
        if self._key in _HELD:
            _HELD[self._key].count += 1
            self._held = True
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"run folder {self.run_dir}: cannot open its lock file {self.path} "
                              f"({exc.strerror or exc})") from None
        if not _try_lock(fd):
            holder = _describe(self._read_holder(fd))
            os.close(fd)
            raise RunFolderLockedError(f"run folder {self.run_dir} is in use by {holder}; wait for that run to "
                                       f"end (or stop it), or choose another run folder")
        _HELD[self._key] = _Held(fd)
        self._held = True
        return self

    def record_holder(self) -> None:
        """Write this process's pid, host, start time and command into the lock file."""
        if not self._held:
            raise ConfigError(f"run folder {self.run_dir}: record_holder() needs the lock; call acquire() first")
        held = _HELD[self._key]
        if held.recorded:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])}
        payload = (json.dumps(info) + "\n").encode("utf-8")
        # Written in place: replacing the file would replace the inode that holds the lock.
        os.ftruncate(held.fd, 0)
        os.pwrite(held.fd, payload, 0)
        held.recorded = True

    def release(self) -> None:
        """Let go of the lock: the last holder in this process unlocks, and clears what it recorded.

        A process that never recorded itself (a refused command) leaves the file as it was.
        """
        if not self._held:
            return
        self._held = False
        held = _HELD[self._key]
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[self._key]
        try:
            if held.recorded:
                os.ftruncate(held.fd, 0)
        finally:
            os.close(held.fd)  # closing the descriptor releases the flock

    def _read_holder(self, fd: int) -> dict[str, Any] | None:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
            info = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(info: dict[str, Any] | None) -> str:
    if info is None or not isinstance(info.get("pid"), int):
        return "another process (it has not recorded itself yet: it is still checking the folder)"
    pid, host = info["pid"], info.get("host", "?")
    if host == socket.gethostname() and not _alive(pid):
        return f"another process (the recorded holder, pid {pid}, has exited; the new one has not recorded itself)"
    command = f", running {info['command']!r}" if info.get("command") else ""
    since = f" since {info['since']}" if info.get("since") else ""
    return f"process {pid} on host {host}{since}{command}"
