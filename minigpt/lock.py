"""One writer per directory: an exclusive OS lock on a lock file inside it.

`train` holds the lock of its run directory for the whole run, and `prepare` the lock of the
prepared-data directory while it writes there. The lock is `fcntl.flock` on the file `.lock`,
which holds the holder's PID, host and start time so that a refused process can name it.
The operating system drops the lock when its process ends in any way (SIGKILL included), so a
killed run never blocks the next one; the file it leaves behind only tells the next holder
that its predecessor ended without releasing (reported as a stale lock). Reading commands
(`sample`, `eval`, `info`, `plot`) never take it.

A released lock file is deleted. That is safe because an acquirer checks, after flock
succeeds, that the path still names the file it locked; if another process deleted it in
between, it starts over on the new file.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from minigpt.errors import CheckpointError, DirectoryInUse

LOCK_NAME = ".lock"


def _holder_line() -> str:
    """PID, host and start time of this process, as written into the lock file."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"PID {os.getpid()} on host {socket.gethostname()}, started {started}"


def _read_holder(path: Path) -> str:
    """What the lock file says about its holder ('' when it is empty or gone)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


class DirectoryLock:
    """An exclusive lock on `directory` (created if needed), taken at construction; `release()` ends it.

    `what` names the holder's activity in the refusal ("training run") and `advice` says what to
    do about it; `wait=True` blocks until the lock is free instead of refusing at once. `stale_holder` is the line left
    by a predecessor that ended without releasing (killed), or "".
    """

    def __init__(self, directory: Path, what: str, wait: bool = False,
                 advice: str = "wait for it to finish or stop it"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.created_directory = not self.directory.exists()
        self._fd: int | None = None
        while self._fd is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise CheckpointError(f"cannot write to {self.directory}: {exc.strerror or exc}; choose a writable "
                                      "directory (--out-dir for a run, data.prepared_dir for prepared data)") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                holder = _read_holder(self.path)
                for _ in range(20):  # the holder writes its line right after taking the lock
                    if holder:
                        break
                    time.sleep(0.025)
                    holder = _read_holder(self.path)
                holder = holder or "a process that is just starting"
                raise DirectoryInUse(f"{self.directory} is in use by another {what} ({holder}); {advice}") from None
            if not self._names(fd):  # deleted (released) between our open and our flock: try the new file
                os.close(fd)
                continue
            self._fd = fd
        self.stale_holder = _read_holder(self.path)  # a released lock deletes its file: text left means killed
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (_holder_line() + "\n").encode(), 0)

    def _names(self, fd: int) -> bool:
        """Whether the lock file's path still leads to the open file `fd`."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self, remove_directory_if_empty: bool = False) -> None:
        """Delete the lock file and drop the lock (idempotent); optionally remove a directory we created empty."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody else can be using this file
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
        if remove_directory_if_empty and self.created_directory:
            try:
                self.directory.rmdir()  # only succeeds if nothing else was written there
            except OSError:
                pass

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(remove_directory_if_empty=exc_type is not None)  # a failed first write leaves no empty directory
