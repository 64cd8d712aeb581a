"""Files written only beneath their destination root, never through a symlink: atomic writes and the run lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from thumbcli.discover import display_path
from thumbcli.errors import LockedError

log = logging.getLogger(__name__)

#: How the names of `write_atomically`'s temporary files begin.
TEMP_PREFIX = ".thumbcli-tmp-"

#: Temporary files of writes in progress: name -> descriptor of the folder it is in (open until the rename).
#: Re-entrant: `remove_temporary_files` runs in a signal handler, perhaps in a thread inside a write.
_in_flight_lock = threading.RLock()
_in_flight: dict[str, int] = {}

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutsideRootError(OSError):
    """A write that would leave its destination root: through a symlink, or a '..' in its path.

    Built from the message alone, so that its str() is the one-line reason (errno and strerror are None).
    """


def _refuse_if_symlink(folder_fd: int, name: str, shown: str) -> None:
    """Raise OutsideRootError when `name` in the folder is a symlink (ELOOP from O_NOFOLLOW is not specific)."""
    try:
        st = os.lstat(name, dir_fd=folder_fd)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutsideRootError(f"{display_path(shown)} is a symlink")


def _names(relpath: str, shown_root: str) -> list[str]:
    names = [name for name in relpath.split("/") if name not in ("", ".")]
    if ".." in names:
        raise OutsideRootError(f"{display_path(os.path.join(shown_root, relpath))}: '..' leaves {shown_root}")
    return names


def open_folder(root: str | os.PathLike[str], reldir: str, *, dir_mode: int = 0o777, create: bool = True) -> int:
    """A descriptor of the folder `reldir` below `root` (made if missing, with `create`), reached through no symlink.

    `root` is opened (or made) as named: its own symlinks are the caller's choice. Each folder
    below it is opened relative to its parent with O_NOFOLLOW, so a symlink planted in
    the tree raises OutsideRootError instead of leading the write elsewhere.
    """
    shown = os.fspath(root)
    try:
        fd = os.open(shown, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(shown, dir_mode, exist_ok=True)
        fd = os.open(shown, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in _names(reldir, shown):
            shown = os.path.join(shown, name)
            parent, fd = fd, -1  # `_open_child` closes the parent, whatever happens
            fd = _open_child(parent, name, shown, dir_mode if create else None)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def folder_beneath(root: str | os.PathLike[str], reldir: str, *, create: bool = True) -> Iterator[int]:
    """`open_folder` for the length of a block: the descriptor is closed at its end."""
    folder = open_folder(root, reldir, create=create)
    try:
        yield folder
    finally:
        os.close(folder)


def _open_child(parent: int, name: str, shown: str, dir_mode: int | None) -> int:
    """Open the folder `name` in `parent`, made if missing unless `dir_mode` is None; `parent` is closed either way."""
    try:
        try:
            return os.open(name, _FOLDER, dir_fd=parent)
        except FileNotFoundError:
            if dir_mode is None:
                raise
            with contextlib.suppress(FileExistsError):  # made by a writer beside us meanwhile
                os.mkdir(name, dir_mode, dir_fd=parent)
            return os.open(name, _FOLDER, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _refuse_if_symlink(parent, name, shown)
        raise
    finally:
        os.close(parent)


def open_file_beneath(
    root: str | os.PathLike[str], relpath: str, flags: int, *, mode: int = 0o666, dir_mode: int = 0o777
) -> int:
    """Open the file `relpath` below `root` (its folders made if missing) without following any symlink below `root`."""
    reldir, _, name = relpath.rpartition("/")
    folder = open_folder(root, reldir, dir_mode=dir_mode)
    try:
        return _open_in(
            folder, name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, os.path.join(os.fspath(root), relpath)
        )
    finally:
        os.close(folder)


def _open_in(folder: int, name: str, flags: int, mode: int, shown: str) -> int:
    try:
        return os.open(name, flags, mode, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _refuse_if_symlink(folder, name, shown)
        raise


def write_atomically(
    root: str | os.PathLike[str],
    relpath: str,
    data: bytes,
    *,
    mode: int = 0o666,
    dir_mode: int = 0o777,
    attributes: Mapping[str, bytes] | None = None,
) -> None:
    """Write `data` to `relpath` below `root` so that readers see the whole file or nothing.

    `attributes` are extended attributes the file appears with, where the file system keeps them
    (a file system without them, or without `user.` ones, drops them silently).

    A temporary file in the same folder is renamed over the final name; the
    permission modes are filtered by the umask like any created file. Missing
    folders are made. No symlink below `root` is followed (see `open_folder`): one
    in the way raises OutsideRootError, naming it. A symlink at the final name is
    replaced, as a rename does, never written through.
    """
    shown_root = os.fspath(root)
    reldir, _, name = relpath.rpartition("/")
    if not _names(name, shown_root):
        raise OutsideRootError(f"{display_path(os.path.join(shown_root, relpath))}: not a file name")
    folder = open_folder(root, reldir, dir_mode=dir_mode)
    temp = f"{TEMP_PREFIX}{os.urandom(16).hex()}"
    try:
        with _in_flight_lock:
            _in_flight[temp] = folder
        fd = os.open(temp, _CREATE, mode, dir_fd=folder)
        try:
            # Held until the rename: a temporary file nobody holds locked was left by a writer
            # that died (a killed cluster worker), and `remove_orphaned_temporary_files` may take it.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            for key, value in (attributes or {}).items():
                with contextlib.suppress(OSError):  # ENOTSUP, EPERM, ENOSPC: one attribute only, never the file
                    os.setxattr(fd, key, value)
            os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            raise
        finally:
            os.close(fd)
    finally:
        with _in_flight_lock:
            _in_flight.pop(temp, None)
        os.close(folder)


def remove_beneath(root: str | os.PathLike[str], relpath: str, *, empty_folder: bool = False) -> bool:
    """Unlink the file (or remove the `empty_folder`) `relpath` below `root`, following no symlink below `root`.

    False if it was not there; any other error (a folder not empty) is raised.
    """
    reldir, _, name = relpath.rpartition("/")
    try:
        folder = open_folder(root, reldir, create=False)
    except FileNotFoundError:
        return False
    try:
        if empty_folder:
            os.rmdir(name, dir_fd=folder)
        else:
            os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        return False
    finally:
        os.close(folder)
    return True


def rename_beneath(root: str | os.PathLike[str], relpath: str, new_relpath: str) -> None:
    """Rename `relpath` below `root` to `new_relpath` (folders made if missing), following no symlink below `root`."""
    reldir, _, name = relpath.rpartition("/")
    new_reldir, _, new_name = new_relpath.rpartition("/")
    if not _names(new_name, os.fspath(root)):
        raise OutsideRootError(f"{display_path(os.path.join(os.fspath(root), new_relpath))}: not a file name")
    folder = open_folder(root, reldir, create=False)
    try:
        new_folder = open_folder(root, new_reldir)
        try:
            os.rename(name, new_name, src_dir_fd=folder, dst_dir_fd=new_folder)
        finally:
            os.close(new_folder)
    finally:
        os.close(folder)


def open_for_append(path: str | os.PathLike[str], *, mode: int = 0o644) -> int:
    """Open a log file (made if missing) for appending, refusing a symlink at its name (its folder is the caller's)."""
    directory, name = os.path.split(os.path.abspath(path))
    return open_file_beneath(directory, name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode=mode)


def remove_temporary_files() -> None:
    """Unlink the temporary files of writes still in progress (for an abrupt exit)."""
    with _in_flight_lock:
        for temp, folder in _in_flight.items():
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)


#: A temporary file older than this was left by a killed run (a live write takes seconds).
ABANDONED_TEMP_SECONDS = 3600


def is_temporary_name(name: str) -> bool:
    """True for the names `write_atomically` uses before the rename."""
    return name.startswith(TEMP_PREFIX)


class RunLock:
    """An exclusive `flock` on a file, so two runs never work on one output at once.

    The file is `name` in the open `folder` (see `open_folder`), opened without following a
    symlink: a lock planted as a symlink would otherwise have its target truncated. `path`
    names it in messages.
    """

    def __init__(self, folder: int, name: str, path: Path, *, wait: bool) -> None:
        self._fd = _open_in(folder, name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, str(path))
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise OutsideRootError(f"{display_path(path)} is not a regular file")
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            raise LockedError(f"{path} is locked by another thumbcli run (pid {holder})") from None
        except BaseException:
            os.close(self._fd)
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock."""
        os.close(self._fd)


def remove_orphaned_temporary_files(root: str | os.PathLike[str], reldir: str = "") -> int:
    """Unlink the temporary files in `reldir` below `root` whose writer is gone (no one holds them locked).

    A write in progress holds its temporary file locked, on this host or another sharing the
    filesystem, so it is never taken. For a rerun of a cluster task whose worker was killed.
    The folder is reached as writes reach it (`open_folder`): a symlink below `root` is not followed.
    Returns how many were removed.
    """
    try:
        folder = open_folder(root, reldir, create=False)
    except OSError:
        return 0
    removed = 0
    try:
        for name in [name for name in os.listdir(folder) if is_temporary_name(name)]:
            try:
                # Read-write: over NFS an exclusive lock needs a file open for writing.
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            except OSError:
                continue  # renamed or removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                if st.st_size == 0 and time.time() - st.st_mtime < 1:
                    continue  # perhaps created an instant ago by a writer about to lock it
                if st.st_ino == os.lstat(name, dir_fd=folder).st_ino:
                    os.unlink(name, dir_fd=folder)
                    removed += 1
            except OSError:
                continue  # held by a live writer, or gone
            finally:
                os.close(fd)
    finally:
        os.close(folder)
    return removed


def remove_if_abandoned(root: Path, relpath: str) -> None:
    """Unlink a temporary file below `root` that a killed run left behind (never one being written now)."""
    reldir, _, name = relpath.rpartition("/")
    with contextlib.suppress(OSError):
        folder = open_folder(root, reldir, create=False)
        try:
            if time.time() - os.stat(name, dir_fd=folder, follow_symlinks=False).st_mtime > ABANDONED_TEMP_SECONDS:
                os.unlink(name, dir_fd=folder)
                log.info("%s: removed a temporary file left by an interrupted run", display_path(root / relpath))
        finally:
            os.close(folder)
