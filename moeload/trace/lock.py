"""One writer per trace directory: a lock file holding the owner's host, pid and start time."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from moeload.errors import InputError

LOCK_NAME = ".moeload.lock"


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(lock: Path) -> dict[str, Any] | None:
    """The lock's owner record, or None where it cannot be read (being written, or garbage)."""
    try:
        data = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or isinstance(data.get("pid"), bool):
        return None
    return data


class TraceLock:
    """Held lock on a trace directory; `release()` removes the lock file (idempotent)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.held = False

    def acquire(self) -> TraceLock:
        """Create the lock file atomically (O_CREAT|O_EXCL). A stale lock (this host, dead pid) is taken
        over with a warning; a live owner, or one on another host, raises InputError."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
                owner = _read(self.path)
                if owner is None:  # another writer between create and write, or garbage: look once more
                    time.sleep(0.05)
                    owner = _read(self.path)
                if owner is not None and owner.get("host") == socket.gethostname() and owner["pid"] == os.getpid():
                    raise InputError(
                        f"{self.directory}: this process already writes this trace "
                        f"(lock {self.path}); close the other tracer first"
                    ) from None
                stale = owner is not None and owner.get("host") == socket.gethostname() and not _alive(owner["pid"])
                if owner is None or not stale:  # (stale implies an owner)
                    who = "unknown owner" if owner is None else f"host {owner.get('host')} pid {owner['pid']}"
                    raise InputError(
                        f"{self.directory}: another writer holds this trace ({who}, lock {self.path}); "
                        "use another directory, or remove the lock if that job is gone"
                    ) from None
                warnings.warn(
                    f"moeload: {self.directory}: taking over a stale lock of pid {owner['pid']} (no longer running)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return self
        raise InputError(f"{self.directory}: could not take the lock {self.path} (contended); retry")

    def release(self) -> None:
        """Remove the lock file if this lock holds it."""
        if not self.held:
            return
        self.held = False
        owner = _read(self.path)
        if owner is not None and owner["pid"] == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def acquire(directory: str | os.PathLike[str]) -> TraceLock:
    """Take the writer lock on `directory` (created if missing)."""
    return TraceLock(directory).acquire()
