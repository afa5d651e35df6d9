"""DataDirLock: one peer process per data folder.

Two peers on one `data_dir` would hash, write and rename each other's partial files. The first
peer to start takes an exclusive `flock` on `data_dir/.zswarm/lock` and holds it for its life,
with its pid written in the file; a second one fails at start with one line naming the folder and
that pid. The kernel releases the lock when the holder exits however it exits (even SIGKILL), so
a stale lock file is never a problem: only a live holder counts. `flock` locks belong to the open
file, so a second `Peer` on the same folder in the same process is refused too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from common.errors import ConfigError

LOCK_NAME = "lock"
META_DIR = ".zswarm"  # as peer/store.py


class DataDirLock:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / META_DIR / LOCK_NAME
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the process that holds it."""
        if self._fd >= 0:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot create {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "pid unknown"
            raise ConfigError(f"data_dir {self.data_dir} is in use by another zswarm peer ({who})") from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"data_dir: cannot lock {self.path}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock is what counts; the pid is only for the message of a second peer
        self._fd = fd

    def release(self) -> None:
        """Let go (idempotent). The file stays: removing it could race with a peer starting."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor of the open file releases the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
