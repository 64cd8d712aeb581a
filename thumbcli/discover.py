"""Walk source trees into jobs: filters, hidden files, symlink policy; never decodes."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from thumbcli.formats import SOURCE_SUFFIXES
from thumbcli.objectstores import is_bucket_url
from thumbcli.spec import WalkOptions

if TYPE_CHECKING:
    from thumbcli.bucket import ListedFile, UnreadableKey

log = logging.getLogger(__name__)

#: Suffixes of the formats thumbcli reads, from the registry (`formats.REGISTRY`).
IMAGE_SUFFIXES = SOURCE_SUFFIXES


class SourceFile(NamedTuple):
    """One image file found under a source root, with the stat taken while walking.

    A NamedTuple rather than a frozen dataclass: one is made per file of every run,
    and a frozen dataclass costs several times more to build.
    """

    path: str
    root: str
    relpath: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class WalkProblem:
    """Something under a source that could not be walked; reported as a failed file."""

    path: str
    reason: str


def _matches(patterns: tuple[str, ...], relpath: str) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relpath, pat) or fnmatch.fnmatchcase(name, pat) for pat in patterns)


class DirBatch(NamedTuple):
    """The image files of one folder as the walk found them, sorted: (name, size, mtime_ns) each."""

    root: str
    reldir: str
    #: The folder as walked: the root joined with `reldir`.
    directory: str
    files: list[tuple[str, int, int]]
    #: For a single file named on the command line through a symlink: the path to read.
    target: str = ""

    def source(self, name: str, size: int, mtime_ns: int) -> SourceFile:
        """One of the files as a SourceFile record."""
        relpath = f"{self.reldir}/{name}" if self.reldir else name
        return SourceFile(self.target or _join(self.directory, name), self.root, relpath, size, mtime_ns)

    def sources(self) -> Iterator[SourceFile]:
        """The files as SourceFile records."""
        for file in self.files:
            yield self.source(*file)


def _join(directory: str, name: str) -> str:
    return f"{directory}{name}" if directory.endswith("/") else f"{directory}/{name}"


def walk_sources(
    sources: Iterable[str],
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded_dirs: Iterable[str] = (),
) -> Iterator[SourceFile | WalkProblem]:
    """Yield every image file under `sources`: each folder's files in name order, then its subfolders.

    `excluded_dirs` (output trees, caches) are never entered, wherever they sit.
    """
    for item in walk_batches(sources, options, is_image_name, excluded_dirs):
        if isinstance(item, DirBatch):
            yield from item.sources()
        else:
            yield item


def walk_batches(
    sources: Iterable[str],
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded_dirs: Iterable[str] = (),
    part: tuple[int, int] = (0, 1),
) -> Iterator[DirBatch | WalkProblem]:
    """Like `walk_sources`, one folder at a time: what a no-change run spends its time on.

    With `part` = (i, n), only the folders that `owner` assigns to part i have their files
    stat-ed and yielded; the others are listed only to find the folders below them. So n
    processes walking parts 0..n-1 share out the stat calls between them.
    """
    excluded: set[tuple[int, int]] = set()
    for path in excluded_dirs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        excluded.add((st.st_dev, st.st_ino))
    excluded_urls = tuple(f"{path.rstrip('/')}/" for path in excluded_dirs if is_bucket_url(path))
    for source in sources:
        if is_bucket_url(source):
            yield from _walk_bucket(source, options, is_image_name, part, excluded_urls)
        else:
            yield from _walk_one(source, options, is_image_name, excluded, part)


def _walk_bucket(
    source: str,
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    part: tuple[int, int],
    excluded: tuple[str, ...],
) -> Iterator[DirBatch | WalkProblem]:
    """A bucket prefix's objects as folders, by the same filters and shards as a tree; listed by part 0 alone.

    One listing gives every object's size and version: there are no stat calls to share out.
    `excluded` are destinations in buckets (each URL ending in '/'): never walked, wherever they sit.
    """
    if part[0] != 0:
        return
    from thumbcli.bucket import ObjectError, list_folders, parse  # here: a walk of local folders never needs them

    try:
        yield from bucket_batches(source, list_folders(parse(source)), options, is_image_name, excluded)
    except ObjectError as exc:
        yield WalkProblem(parse(source).url, f"cannot list: {exc.strerror}")


def bucket_batches(
    source: str,
    folders: Iterable[tuple[str, list[ListedFile]] | UnreadableKey],
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded: tuple[str, ...] = (),
) -> Iterator[DirBatch | WalkProblem]:
    """The folders of a bucket source's listing (`list_folders`) as batches, by the walk's filters and shard.

    A key the listing could not read is a problem of its own (part 0's, as the listing is), if the
    filters would have let it in. Apart from the listing, so that watch's rescans can also keep
    what was listed for prune.
    """
    from thumbcli.bucket import UnreadableKey, parse

    shard, shards = options.shard
    place = parse(source)
    root, prefix = place.url, place.prefix
    for listed in folders:
        if isinstance(listed, UnreadableKey):
            reldir, _, name = listed.key.removeprefix(f"{prefix}/").rpartition("/")
            mine = shards == 1 or shard_of(reldir, shards) == shard
            if mine and is_image_name(name) and (options.hidden or not name.startswith(".")):
                yield WalkProblem(listed.url, listed.reason)
            continue
        reldir, files = listed
        if shards > 1 and shard_of(reldir, shards) != shard:
            continue
        parents = [reldir.rsplit("/", depth)[0] for depth in range(reldir.count("/") + 1)] if reldir else []
        if not options.hidden and any(name.startswith(".") for name in reldir.split("/") if name):
            continue
        if options.exclude and any(_matches(options.exclude, folder) for folder in parents):
            continue
        kept = [
            file
            for file in files
            if (options.hidden or file[0][0] != ".")
            and is_image_name(file[0])
            and _filtered_in(options, f"{reldir}/{file[0]}" if reldir else file[0])
        ]
        directory = f"{root}/{reldir}" if reldir else root
        if excluded and f"{directory}/".startswith(excluded):
            continue
        if kept:
            yield DirBatch(root, reldir, directory, kept)


def _filtered_in(options: WalkOptions, relpath: str) -> bool:
    """Whether --include and --exclude let the file at `relpath` through."""
    if options.include and not _matches(options.include, relpath):
        return False
    return not (options.exclude and _matches(options.exclude, relpath))


def walk_below(
    root: str,
    reldir: str,
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded_dirs: Iterable[str] = (),
    *,
    recursive: bool = True,
) -> Iterator[DirBatch | WalkProblem]:
    """Like `walk_batches` from one folder of a source tree (and, `recursive`, those below it), named from `root`.

    What watch mode walks again when a folder appears, moves or may have changed unseen.
    """
    excluded = identities(excluded_dirs)
    walk = _TreeWalk(options, is_image_name, excluded, frozenset())
    root = root.rstrip("/") or "/"
    top = _join(root, reldir) if reldir else root
    try:
        st = os.stat(top) if options.follow_symlinks else os.lstat(top)
    except OSError as exc:
        yield WalkProblem(top, f"cannot read: {exc.strerror or exc}")
        return
    if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in excluded:
        return
    stack: list[_Folder] = [(top, reldir, frozenset({(st.st_dev, st.st_ino)}), False)]
    while stack:
        directory, folder, ancestors, _leaf = stack.pop()
        files, subdirs, problems = walk.list_folder(directory, folder, ancestors, True)
        yield from problems
        if files:
            files.sort()
            yield DirBatch(root, folder, directory, files)
        if recursive:
            subdirs.sort(reverse=True)
            stack.extend(subdirs)


def identities(paths: Iterable[str]) -> set[tuple[int, int]]:
    """The (device, inode) of each of `paths` that exists: what a walk compares folders with to skip them."""
    found = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def owner(reldir: str, parts: int) -> int:
    """Which of `parts` walking processes stats the files of the folder at `reldir`."""
    return zlib.crc32(os.fsencode(reldir)) % parts if parts > 1 else 0


def shard_of(reldir: str, shards: int) -> int:
    """Which of `shards` invocations (`--shard I/N`) makes the thumbnails of the folder at `reldir`."""
    if shards <= 1:
        return 0
    # Not `owner`'s CRC: the walkers inside one shard must still share its folders out evenly,
    # so the two choices must not be correlated (crc % 3 == 0 would give every folder to walker 0).
    return int.from_bytes(hashlib.blake2b(os.fsencode(reldir), digest_size=8).digest(), "little") % shards


#: Filesystems whose folders have a link count of 2 plus their number of subfolders, so a folder
#: with a count of 2 holds none (find's "leaf optimization"). Others (btrfs, overlayfs, network
#: and FUSE filesystems) may report 1 or a made-up 2.
_LINK_COUNTING_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs", "f2fs", "jfs"})


@functools.cache
def _link_counting_devices() -> frozenset[int]:
    """The st_dev of every mounted filesystem of a link-counting type (none where /proc is absent)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            lines = mountinfo.read().splitlines()
    except OSError:
        return frozenset()
    devices = set()
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the type follows "-".
        fields = line.split()
        try:
            fstype = fields[fields.index("-") + 1]
            major, minor = fields[2].split(":")
            if fstype in _LINK_COUNTING_FILESYSTEMS:
                devices.add(os.makedev(int(major), int(minor)))
        except (ValueError, IndexError):
            continue
    return frozenset(devices)


def _walk_one(
    source: str,
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded: set[tuple[int, int]],
    part: tuple[int, int],
) -> Iterator[DirBatch | WalkProblem]:
    index, parts = part
    shard, shards = options.shard
    begun = _begin(source, options.follow_symlinks)
    if not isinstance(begun, os.stat_result):
        # A lone file or a problem with the source itself: the first process of the root's shard reports it.
        if index == 0 and shard_of("", shards) == shard:
            yield begun
        return
    # Symlinks to folders are not in a folder's link count: with -L, every folder may lead on.
    splits = parts > 1 or shards > 1
    leaf_devices = _link_counting_devices() if splits and not options.follow_symlinks else frozenset()
    walk = _TreeWalk(options, is_image_name, excluded, leaf_devices)
    root = source.rstrip("/") or "/"
    # Folders still to walk, last first; each carries the (dev, inode) of the folders above
    # it, so that meeting one of them again (through a symlink) is reported as a loop, and
    # whether it is known to hold no folders (then only its owner needs to list it).
    stack: list[_Folder] = [(root, "", frozenset({(begun.st_dev, begun.st_ino)}), False)]
    while stack:
        directory, reldir, ancestors, leaf = stack.pop()
        mine = (parts == 1 or owner(reldir, parts) == index) and (shards == 1 or shard_of(reldir, shards) == shard)
        if leaf and not mine:
            continue
        files, subdirs, problems = walk.list_folder(directory, reldir, ancestors, mine)
        yield from problems
        if files:
            files.sort()
            yield DirBatch(root, reldir, directory, files)
        subdirs.sort(reverse=True)
        stack.extend(subdirs)


def _begin(source: str, follow_symlinks: bool) -> os.stat_result | DirBatch | WalkProblem:
    """The stat of a source folder to walk, the batch of a lone source file, or why the source is not walked."""
    try:
        st = os.stat(source) if follow_symlinks else os.lstat(source)
    except OSError as exc:
        return WalkProblem(source, f"cannot read: {exc.strerror or exc}")
    path = source
    if stat.S_ISLNK(st.st_mode):
        # A symlink named on the command line is followed: the user asked for it.
        try:
            st = os.stat(source)
        except OSError as exc:
            return WalkProblem(source, f"broken symlink: {exc.strerror or exc}")
        # The job names the target, since the loader refuses a final symlink without -L;
        # the output is still named after the link.
        path = os.path.realpath(source)
    if stat.S_ISREG(st.st_mode):
        directory = os.path.dirname(source) or "."
        return DirBatch(directory, "", directory, [(os.path.basename(source), st.st_size, st.st_mtime_ns)], path)
    if not stat.S_ISDIR(st.st_mode):
        return WalkProblem(source, "not a regular file or directory")
    return st


#: A folder still to walk: (path, path relative to the root, (dev, inode) of it and its ancestors, known leaf).
_Folder = tuple[str, str, frozenset[tuple[int, int]], bool]


class _TreeWalk:
    """What listing each folder of one source tree needs to know, set once per tree."""

    __slots__ = ("excluded", "filtered", "follow", "hide", "is_image_name", "leaf_devices", "options")

    _OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

    def __init__(
        self,
        options: WalkOptions,
        is_image_name: Callable[[str], bool],
        excluded: set[tuple[int, int]],
        leaf_devices: frozenset[int],
    ) -> None:
        self.options = options
        self.is_image_name = is_image_name
        self.excluded = excluded
        self.leaf_devices = leaf_devices
        self.hide, self.follow = not options.hidden, options.follow_symlinks
        self.filtered = bool(options.include or options.exclude)

    def list_folder(
        self, directory: str, reldir: str, ancestors: frozenset[tuple[int, int]], mine: bool
    ) -> tuple[list[tuple[str, int, int]], list[_Folder], list[WalkProblem]]:
        """One folder's image files (name, size, mtime_ns) if `mine`, its subfolders, and its problems if `mine`."""
        subdirs: list[_Folder] = []
        files: list[tuple[str, int, int]] = []
        problems: list[WalkProblem] = []
        options, is_regular = self.options, stat.S_ISREG
        try:
            # Listing through a descriptor makes each entry's stat an fstatat() relative to
            # it, which spares the kernel a lookup of the whole path per file.
            fd = os.open(directory, self._OPEN_FLAGS)
        except OSError as exc:
            if mine:
                problems.append(WalkProblem(directory, f"cannot list directory: {exc.strerror or exc}"))
            return files, subdirs, problems
        try:
            with os.scandir(fd) as scan:
                entries = list(scan)
            for entry in entries:
                name = entry.name
                if self.hide and name[0] == ".":
                    continue
                try:
                    if entry.is_dir(follow_symlinks=self.follow):
                        relpath = f"{reldir}/{name}" if reldir else name
                        if options.exclude and _matches(options.exclude, relpath):
                            continue
                        st = entry.stat()
                        key = (st.st_dev, st.st_ino)
                        if key in self.excluded:
                            continue
                        # A symlink may lead anywhere below an output, not only to its root: thumbnails
                        # walked as sources would be made again one level deeper on every run.
                        path = _join(directory, name)
                        if self.follow and self.excluded and entry.is_symlink() and _below(path, self.excluded):
                            log.debug("%s: leads into an output folder, not walked", path)
                            continue
                        if key in ancestors:
                            if mine:
                                loop = "symlink loop: folder contains itself, not followed"
                                problems.append(WalkProblem(path, loop))
                            continue
                        leaf = st.st_nlink == 2 and st.st_dev in self.leaf_devices
                        subdirs.append((path, relpath, ancestors | {key}, leaf))
                        continue
                    if not mine or not self.is_image_name(name):
                        continue
                    if not self.follow and entry.is_symlink():
                        log.debug("%s: symlink not followed", _join(directory, name))
                        continue
                    if self.filtered:
                        relpath = f"{reldir}/{name}" if reldir else name
                        if options.include and not _matches(options.include, relpath):
                            continue
                        if options.exclude and _matches(options.exclude, relpath):
                            continue
                    st = entry.stat()
                except OSError as exc:
                    if mine:
                        problems.append(WalkProblem(_join(directory, name), f"cannot read: {exc.strerror or exc}"))
                    continue
                if is_regular(st.st_mode):
                    files.append((name, st.st_size, st.st_mtime_ns))
                else:
                    problems.append(WalkProblem(_join(directory, name), "not a regular file, skipped"))
        except OSError as exc:
            if mine:
                problems.append(WalkProblem(directory, f"cannot list directory: {exc.strerror or exc}"))
        finally:
            os.close(fd)
        return files, subdirs, problems


_CLIMB = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _below(path: str, folders: set[tuple[int, int]]) -> bool:
    """Whether the folder at `path` (symlinks followed) is one of `folders` (dev, inode) or inside one.

    Climbs '..' from the folder itself rather than comparing paths, which any symlink or bind spelling defeats.
    """
    try:
        fd = os.open(path, _CLIMB)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        while (st.st_dev, st.st_ino) not in folders:
            parent = os.open("..", _CLIMB, dir_fd=fd)
            os.close(fd)
            fd = parent
            above = os.fstat(fd)
            if (above.st_dev, above.st_ino) == (st.st_dev, st.st_ino):
                return False  # the filesystem's root: its '..' is itself
            st = above
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def image_name_predicate(suffixes: frozenset[str]) -> Callable[[str], bool]:
    """A fast test of whether a file name carries one of `suffixes` (case-insensitive)."""

    def is_image_name(name: str) -> bool:
        dot = name.rfind(".")
        return dot > 0 and name[dot:].lower() in suffixes

    return is_image_name


#: Whether a file name has a suffix of an image format thumbcli loads.
is_image_name = image_name_predicate(IMAGE_SUFFIXES)


def absolute_source(path: str) -> str:
    """A source's path made absolute, as records name it; a bucket URL is already."""
    return path if is_bucket_url(path) else os.path.abspath(path)


def display_path(path: str | Path) -> str:
    """A path made printable on one line: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
