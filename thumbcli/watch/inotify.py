"""Source trees followed through inotify: a watch on every folder, events turned into what to make or tidy.

The only `import inotify_simple`. Chosen over `watchfiles` (measured on this tree, in the
commit that added it): watchfiles reports a file "added" while it is still being written
(0.4 s into a copy that closed at 1.5 s) and a rename as an unrelated add and delete, and
has no overflow signal; inotify_simple hands over the kernel's own events, `IN_CLOSE_WRITE`
(4 ms after the close), `IN_MOVED_FROM`/`IN_MOVED_TO` with their cookie, `IN_Q_OVERFLOW`,
and its descriptor can sit in a `select` beside the service's other wake-ups: no polling.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from inotify_simple import INotify, flags

from thumbcli.discover import display_path, identities
from thumbcli.errors import CannotRunError
from thumbcli.spec import WalkOptions

log = logging.getLogger(__name__)

#: A folder of a source tree: (the source root, the folder relative to it; "" for the root).
Folder = tuple[str, str]

_FOLDER_EVENTS = (
    flags.CLOSE_WRITE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.CREATE
    | flags.DELETE
    | flags.DELETE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
    | flags.EXCL_UNLINK
)
#: Filesystems whose changes on other hosts inotify never sees: rescanned on an interval instead.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "fuse.sshfs", "fuse.rclone", "lustre"}
)
MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"


@dataclass(slots=True)
class Changes:
    """What a burst of events asks for, coalesced: the same file changed twice is made once."""

    #: Files to make, by folder: names as they were last seen arriving (closed after writing, or moved in).
    files: dict[Folder, set[str]] = field(default_factory=dict)
    #: Folders to walk whole, and those below them: appeared, moved in, or their events were lost.
    folders: set[Folder] = field(default_factory=set)
    #: Sources or folders deleted or moved away: their thumbnails are to be removed.
    gone: int = 0
    #: The files among them (a folder gone is only counted: what it held is not known here).
    gone_files: set[str] = field(default_factory=set)
    #: The kernel's queue overflowed: events were lost, every tree is walked again.
    overflowed: bool = False
    #: Each file to make -> when its event was read (time.monotonic), for the arrival-to-thumbnail latency.
    arrived: dict[str, float] = field(default_factory=dict)
    #: Events read, by kind (for the metrics).
    events: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.files or self.folders or self.gone or self.overflowed)


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` (from /proc/self/mountinfo; "" if unknown)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            lines = mountinfo.read().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    best, found = -1, ""
    for line in lines:
        fields = line.split()
        try:
            mount = fields[4].encode().decode("unicode_escape")
            fstype = fields[fields.index("-") + 1]
        except (ValueError, IndexError):
            continue
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            best, found = len(mount), fstype
    return found


class TreeWatcher:
    """A watch on every folder of the source trees, added as folders appear; what cannot be watched is listed.

    `unwatched` holds the folders (with everything below them) that inotify does not follow:
    on a network filesystem, or past `fs.inotify.max_user_watches`. The caller rescans them.
    """

    def __init__(
        self,
        roots: Sequence[str],
        options: WalkOptions,
        is_image_name: Callable[[str], bool],
        excluded_dirs: Sequence[str] = (),
    ) -> None:
        self._options = options
        self._is_image_name = is_image_name
        self._excluded = identities(excluded_dirs)
        try:
            self._inotify = INotify()
        except OSError as exc:
            raise CannotRunError(
                f"cannot follow the sources: {exc.strerror or exc} "
                "(at most fs.inotify.max_user_instances inotify instances per user)"
            ) from exc
        self._folder_of: dict[int, Folder] = {}
        self._watch_of: dict[Folder, int] = {}
        self.unwatched: set[Folder] = set()
        self._limit_said = False
        for root in roots:
            root = root.rstrip("/") or "/"
            fstype = filesystem_type(root)
            if fstype in NETWORK_FILESYSTEMS:
                log.warning("%s is on %s, which inotify does not follow: rescanned instead", display_path(root), fstype)
                self.unwatched.add((root, ""))
            else:
                self.watch_tree(root, "")

    @property
    def watches(self) -> int:
        """Folders watched now."""
        return len(self._watch_of)

    def fileno(self) -> int:
        """The inotify descriptor: readable when events wait."""
        return int(self._inotify.fileno())

    def close(self) -> None:
        """Drop every watch."""
        self._inotify.close()

    def watch_tree(self, root: str, reldir: str) -> None:
        """Watch a folder and every folder below it (again: watching a folder twice is harmless)."""
        stack = [reldir]
        while stack:
            folder = stack.pop()
            if (root, folder) in self.unwatched:
                continue
            path = _join(root, folder) if folder else root
            try:
                wd = self._inotify.add_watch(path, _FOLDER_EVENTS)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._over_the_limit(root, [folder, *stack])
                    return
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # gone meanwhile: its event says so
                    log.warning("%s: cannot watch: %s", display_path(path), exc.strerror or exc)
                continue
            self._folder_of[wd] = (root, folder)
            self._watch_of[(root, folder)] = wd
            stack.extend(self._subfolders(path, folder))

    def _over_the_limit(self, root: str, folders: list[str]) -> None:
        self.unwatched.update((root, folder) for folder in folders)
        if not self._limit_said:
            self._limit_said = True
            try:
                with open(MAX_USER_WATCHES, encoding="ascii") as limit_file:
                    limit = limit_file.read().strip()
            except OSError:
                limit = "?"
            log.warning(
                "%s: more folders than inotify may watch (fs.inotify.max_user_watches = %s): "
                "the folders not watched are rescanned every interval instead; "
                "raise the limit with `sysctl fs.inotify.max_user_watches=N` (in /etc/sysctl.d/ to keep it)",
                display_path(root),
                limit,
            )

    def _subfolders(self, path: str, folder: str) -> Iterator[str]:
        try:
            with os.scandir(path) as scan:
                entries = list(scan)
        except OSError:
            return
        for entry in entries:
            if not self._options.hidden and entry.name.startswith("."):
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in self._excluded:
                yield _join(folder, entry.name)

    def unwatch_tree(self, root: str, reldir: str) -> None:
        """Forget the watches of a folder moved away or deleted, and of those below it."""
        prefix = f"{reldir}/"
        keys = [key for key in self._watch_of if key[0] == root]
        for key in [key for key in keys if key[1] == reldir or key[1].startswith(prefix)] if reldir else keys:
            wd = self._watch_of.pop(key)
            self._folder_of.pop(wd, None)
            with contextlib.suppress(OSError):  # the kernel dropped it already (the folder is gone)
                self._inotify.rm_watch(wd)

    def changes(self, wait: float | None, *, settle: float = 0.02, longest: float = 0.25) -> Changes:
        """The events of the next burst, coalesced; empty if none came within `wait` seconds (None: wait for them).

        A burst ends when no event came for `settle` seconds, or after `longest`: a copy of
        thousands of files goes through in batches while it is still going on.
        """
        found = Changes()
        timeout_ms = None if wait is None else max(0, int(wait * 1000))
        events = self._inotify.read(timeout=timeout_ms)
        deadline = time.monotonic() + longest
        while events:
            now = time.monotonic()
            for event in events:
                self._apply(event, found, now)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            events = self._inotify.read(timeout=int(min(settle, remaining) * 1000))
        return found

    def readable(self, others: Sequence[int], wait: float | None) -> list[int]:
        """Which of the inotify descriptor and `others` become readable within `wait` seconds."""
        ready, _, _ = select.select([self.fileno(), *others], [], [], wait)
        return ready

    def _apply(self, event: tuple[int, int, int, str], found: Changes, now: float) -> None:
        wd, mask, _cookie, name = event
        if mask & flags.Q_OVERFLOW:
            found.overflowed = True
            found.events["overflow"] = found.events.get("overflow", 0) + 1
            return
        if mask & flags.IGNORED:
            folder = self._folder_of.pop(wd, None)
            if folder is not None:
                self._watch_of.pop(folder, None)
            return
        where = self._folder_of.get(wd)
        if where is None:
            return
        root, reldir = where
        if mask & flags.DELETE_SELF:
            if not reldir:
                log.warning("%s: the source folder was removed", display_path(root))
            return
        kind = "moved_to" if mask & flags.MOVED_TO else "moved_from" if mask & flags.MOVED_FROM else ""
        kind = kind or ("close_write" if mask & flags.CLOSE_WRITE else "delete" if mask & flags.DELETE else "create")
        found.events[kind] = found.events.get(kind, 0) + 1
        if not self._options.hidden and name.startswith("."):
            if mask & (flags.MOVED_FROM | flags.DELETE):
                found.gone += 1  # a thumbnail of it may exist from a run with --hidden
            return
        child = _join(reldir, name)
        if mask & flags.ISDIR:
            if mask & (flags.CREATE | flags.MOVED_TO):
                if not self._is_excluded(_join(root, child)):
                    self.watch_tree(root, child)
                    found.folders.add((root, child))
            elif mask & (flags.MOVED_FROM | flags.DELETE):
                self.unwatch_tree(root, child)
                found.folders.discard((root, child))
                found.gone += 1
            return
        if mask & (flags.CLOSE_WRITE | flags.MOVED_TO):
            if self._is_image_name(name):
                found.files.setdefault(where, set()).add(name)
                found.arrived.setdefault(_join(root, child), now)
        elif mask & (flags.MOVED_FROM | flags.DELETE):
            names = found.files.get(where)
            if names is not None:
                names.discard(name)
            found.arrived.pop(_join(root, child), None)
            found.gone += 1
            found.gone_files.add(_join(root, child))

    def _is_excluded(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return True
        return not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in self._excluded
