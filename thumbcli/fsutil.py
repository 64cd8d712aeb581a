"""Files that readers see whole or not at all: atomic writes, their temporary files, and the run lock."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

from thumbcli.discover import display_path
from thumbcli.errors import LockedError

log = logging.getLogger(__name__)

#: How the names of `write_atomically`'s temporary files begin.
TEMP_PREFIX = ".thumbcli-tmp-"

_in_flight_lock = threading.Lock()
_in_flight: set[str] = set()
#: Folders this process made or found there, so a write does not ask again: a mkdir of a folder
#: that exists takes its parent's lock, against the writes beside it (one per thumbnail).
_folders_seen: set[str] = set()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def write_atomically(path: str, data: bytes, *, mode: int = 0o666, dir_mode: int = 0o777) -> None:
    """Write `data` to `path` so that readers see the whole file or nothing.

    A temporary file in the same folder is renamed over the final name; the
    permission modes are filtered by the umask like any created file.
    """
    directory = os.path.dirname(path) or "."
    if directory not in _folders_seen:
        os.makedirs(directory, mode=dir_mode, exist_ok=True)
        _folders_seen.add(directory)
    temp = os.path.join(directory, f"{TEMP_PREFIX}{os.urandom(16).hex()}")
    with _in_flight_lock:
        _in_flight.add(temp)
    try:
        try:
            fd = os.open(temp, _CREATE, mode)
        except FileNotFoundError:  # the folder was removed since
            _folders_seen.discard(directory)
            os.makedirs(directory, mode=dir_mode, exist_ok=True)
            fd = os.open(temp, _CREATE, mode)
        try:
            # Held until the rename: a temporary file nobody holds locked was left by a writer
            # that died (a killed cluster worker), and `remove_orphaned_temporary_files` may take it.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.replace(temp, path)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(temp)


def remove_temporary_files() -> None:
    """Unlink the temporary files of writes still in progress (for an abrupt exit)."""
    with _in_flight_lock:
        temps = list(_in_flight)
    for temp in temps:
        with contextlib.suppress(OSError):
            os.unlink(temp)


#: A temporary file older than this was left by a killed run (a live write takes seconds).
ABANDONED_TEMP_SECONDS = 3600


def is_temporary_name(name: str) -> bool:
    """True for the names `write_atomically` uses before the rename."""
    return name.startswith(TEMP_PREFIX)


class RunLock:
    """An exclusive `flock` on a file, so two runs never work on one output at once."""

    def __init__(self, path: Path, *, wait: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            raise LockedError(f"{path} is locked by another thumbcli run (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock."""
        os.close(self._fd)


def remove_orphaned_temporary_files(folder: str) -> int:
    """Unlink the temporary files in `folder` whose writer is gone (no one holds them locked); return how many.

    A write in progress holds its temporary file locked, on this host or another sharing the
    filesystem, so it is never taken. For a rerun of a cluster task whose worker was killed.
    """
    try:
        names = [name for name in os.listdir(folder) if is_temporary_name(name)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        path = os.path.join(folder, name)
        try:
            # Read-write: over NFS an exclusive lock needs a file open for writing.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if st.st_size == 0 and time.time() - st.st_mtime < 1:
                continue  # perhaps created an instant ago by a writer about to lock it
            if st.st_ino == os.lstat(path).st_ino:
                os.unlink(path)
                removed += 1
        except OSError:
            continue  # held by a live writer, or gone
        finally:
            os.close(fd)
    return removed


def remove_if_abandoned(path: Path) -> None:
    """Unlink a temporary file that a killed run left behind (never one being written now)."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > ABANDONED_TEMP_SECONDS:
            path.unlink()
            log.info("%s: removed a temporary file left by an interrupted run", display_path(path))
