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


def walk_sources(
    sources: Iterable[str],
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded_dirs: Iterable[str] = (),
) -> Iterator[SourceFile | WalkProblem]:
    """Yield every image file under `sources` (files or directory trees), depth first, sorted.

    `excluded_dirs` (output trees, caches) are never entered, wherever they sit.
    """
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
) -> Iterator[SourceFile | WalkProblem]:
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
        yield SourceFile(path, root, os.path.basename(source), st.st_size, st.st_mtime_ns)
        return
    if not stat.S_ISDIR(st.st_mode):
        yield WalkProblem(source, "not a regular file or directory")
        return
    root = source.rstrip("/") or "/"
    # (dev, inode) of every directory on the current path: meeting one again is a loop.
    yield from _walk_dir(root, root, "", options, is_image_name, excluded, {(st.st_dev, st.st_ino)})


def _walk_dir(
    root: str,
    directory: str,
    reldir: str,
    options: WalkOptions,
    is_image_name: Callable[[str], bool],
    excluded: set[tuple[int, int]],
    ancestors: set[tuple[int, int]],
) -> Iterator[SourceFile | WalkProblem]:
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as exc:
        yield WalkProblem(directory, f"cannot list directory: {exc.strerror or exc}")
        return
    for entry in entries:
        name = entry.name
        if name.startswith(".") and not options.hidden:
            continue
        relpath = f"{reldir}/{name}" if reldir else name
        try:
            is_link = entry.is_symlink()
            if is_link and not options.follow_symlinks:
                log.debug("%s: symlink not followed", entry.path)
                continue
            if entry.is_dir(follow_symlinks=True):
                st = entry.stat(follow_symlinks=True)
                key = (st.st_dev, st.st_ino)
                if key in excluded:
                    continue
                if key in ancestors:
                    yield WalkProblem(entry.path, "symlink loop: directory contains itself, not followed")
                    continue
                if options.exclude and _matches(options.exclude, relpath):
                    continue
                ancestors.add(key)
                yield from _walk_dir(root, entry.path, relpath, options, is_image_name, excluded, ancestors)
                ancestors.discard(key)
                continue
            if not is_image_name(name):
                continue
            if options.include and not _matches(options.include, relpath):
                continue
            if options.exclude and _matches(options.exclude, relpath):
                continue
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:
            yield WalkProblem(entry.path, f"cannot read: {exc.strerror or exc}")
            continue
        if not stat.S_ISREG(st.st_mode):
            yield WalkProblem(entry.path, "not a regular file, skipped")
            continue
        yield SourceFile(entry.path, root, relpath, st.st_size, st.st_mtime_ns)


def image_name_predicate(suffixes: frozenset[str]) -> Callable[[str], bool]:
    """A fast test of whether a file name carries one of `suffixes` (case-insensitive)."""

    def is_image_name(name: str) -> bool:
        dot = name.rfind(".")
        return dot > 0 and name[dot:].lower() in suffixes

    return is_image_name


def display_path(path: str | Path) -> str:
    """A path made printable on one line: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
