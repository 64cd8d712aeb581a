"""Walk source trees into jobs: filters, hidden files, symlink policy; never decodes."""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from thumbcli.spec import WalkOptions

log = logging.getLogger(__name__)

#: Suffixes of the formats the pyvips-binary wheel decodes (and that we trust).
#: Not SVG: libvips marks svgload untrusted, and `resample.configure_libvips` blocks untrusted
#: loaders, so every SVG would fail on every run ("buffer is not in a known format").
IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".avif",
        ".heic",
        ".heif",
        ".jxl",
    }
)


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
    """The image files of one folder, as the walk found them: (name, path, size, mtime_ns) each."""

    root: str
    reldir: str
    files: list[tuple[str, str, int, int]]

    def sources(self) -> Iterator[SourceFile]:
        """The files as SourceFile records."""
        prefix = f"{self.reldir}/" if self.reldir else ""
        for name, path, size, mtime_ns in self.files:
            yield SourceFile(path, self.root, prefix + name, size, mtime_ns)


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
) -> Iterator[DirBatch | WalkProblem]:
    """Like `walk_sources`, one folder at a time: what a no-change run spends its time on."""
    excluded: set[tuple[int, int]] = set()
    for path in excluded_dirs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        excluded.add((st.st_dev, st.st_ino))
    for source in sources:
        yield from _walk_one(source, options, is_image_name, excluded)


def _walk_one(
    source: str,
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded: set[tuple[int, int]],
) -> Iterator[DirBatch | WalkProblem]:
    try:
        st = os.stat(source) if options.follow_symlinks else os.lstat(source)
    except OSError as exc:
        yield WalkProblem(source, f"cannot read: {exc.strerror or exc}")
        return
    path = source
    if stat.S_ISLNK(st.st_mode):
        # A symlink named on the command line is followed: the user asked for it.
        try:
            st = os.stat(source)
        except OSError as exc:
            yield WalkProblem(source, f"broken symlink: {exc.strerror or exc}")
            return
        # The job names the target, since the loader refuses a final symlink without -L;
        # the output is still named after the link.
        path = os.path.realpath(source)
    if stat.S_ISREG(st.st_mode):
        root = os.path.dirname(source) or "."
        yield DirBatch(root, "", [(os.path.basename(source), path, st.st_size, st.st_mtime_ns)])
        return
    if not stat.S_ISDIR(st.st_mode):
        yield WalkProblem(source, "not a regular file or directory")
        return
    root = source.rstrip("/") or "/"
    # Folders still to walk, last first; each carries the (dev, inode) of the folders above
    # it, so that meeting one of them again (through a symlink) is reported as a loop.
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(root, "", frozenset({(st.st_dev, st.st_ino)}))]
    is_regular = stat.S_ISREG
    while stack:
        directory, reldir, ancestors = stack.pop()
        subdirs: list[tuple[str, str, frozenset[tuple[int, int]]]] = []
        files: list[tuple[str, str, int, int]] = []
        problems: list[WalkProblem] = []
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError as exc:
            yield WalkProblem(directory, f"cannot list directory: {exc.strerror or exc}")
            continue
        for entry in entries:
            name = entry.name
            if name[0] == "." and not options.hidden:
                continue
            try:
                if entry.is_symlink() and not options.follow_symlinks:
                    log.debug("%s: symlink not followed", entry.path)
                    continue
                if entry.is_dir():
                    relpath = f"{reldir}/{name}" if reldir else name
                    if options.exclude and _matches(options.exclude, relpath):
                        continue
                    st = entry.stat()
                    key = (st.st_dev, st.st_ino)
                    if key in excluded:
                        continue
                    if key in ancestors:
                        problems.append(WalkProblem(entry.path, "symlink loop: folder contains itself, not followed"))
                        continue
                    subdirs.append((entry.path, relpath, ancestors | {key}))
                    continue
                if not is_image_name(name):
                    continue
                if options.include or options.exclude:
                    relpath = f"{reldir}/{name}" if reldir else name
                    if options.include and not _matches(options.include, relpath):
                        continue
                    if options.exclude and _matches(options.exclude, relpath):
                        continue
                st = entry.stat()
            except OSError as exc:
                problems.append(WalkProblem(entry.path, f"cannot read: {exc.strerror or exc}"))
                continue
            if is_regular(st.st_mode):
                files.append((name, entry.path, st.st_size, st.st_mtime_ns))
            else:
                problems.append(WalkProblem(entry.path, "not a regular file, skipped"))
        yield from problems
        if files:
            # Sorting the gathered tuples (by name) is cheaper than sorting the DirEntry objects.
            files.sort()
            yield DirBatch(root, reldir, files)
        subdirs.sort(reverse=True)
        stack.extend(subdirs)


def image_name_predicate(suffixes: frozenset[str]) -> Callable[[str], bool]:
    """A fast test of whether a file name carries one of `suffixes` (case-insensitive)."""

    def is_image_name(name: str) -> bool:
        dot = name.rfind(".")
        return dot > 0 and name[dot:].lower() in suffixes

    return is_image_name


#: Whether a file name has a suffix of an image format thumbcli loads.
is_image_name = image_name_predicate(IMAGE_SUFFIXES)


def display_path(path: str | Path) -> str:
    """A path made printable on one line: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
