"""What a folder of the served cache holds, for gallery pages: subfolders and thumbnails, never anything else.

Names stay bytes from the file system to the URL, so names that are not UTF-8 still link
correctly. Hidden names (the `.thumbcli` state, temporary files), symbolic links and names whose
URL the server refuses (a backslash: `thumbcli.cache.url_segments`) are never listed. A listing
is kept while its folder's mtime stays the same, so paging through a folder of 50,000 thumbnails
reads it once.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from thumbcli.cache import captured_of, url_segments
from thumbcli.discover import is_image_name

Sort = Literal["name", "date"]
SORTS: tuple[Sort, ...] = ("name", "date")
#: Folder listings each worker keeps.
LISTINGS_KEPT = 32
#: Folder covers each worker keeps (a few bytes each: a page of folders looks up to PAGE_ITEMS).
COVERS_KEPT = 2048
#: How deep a folder's cover is looked for when the folder holds only folders.
COVER_DEPTH = 3


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """One listed thumbnail: its source name (the URL's last segment) and the file it is in."""

    source_name: bytes
    file_name: bytes


@dataclass(frozen=True, slots=True)
class FolderListing:
    """A folder's subfolders and thumbnails, each sorted by name (bytewise)."""

    folders: tuple[bytes, ...]
    thumbnails: tuple[Thumbnail, ...]


@dataclass(slots=True)
class _Kept:
    key: tuple[int, int, int]
    listing: FolderListing
    newest_first: tuple[Thumbnail, ...] | None = None


class FolderLister:
    """Lists cache folders, keeping recent listings; safe to call from several threads."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[bytes, tuple[bytes, ...]], _Kept] = OrderedDict()
        self._lock = threading.Lock()
        self._covers: OrderedDict[tuple[bytes, tuple[bytes, ...], Sort], tuple[tuple[int, int, int], tuple[bytes, ...]]]
        self._covers = OrderedDict()

    def cover(self, folder: bytes, suffixes: tuple[bytes, ...], sort: Sort) -> tuple[bytes, ...] | None:
        """A folder's cover as the path below it: its first thumbnail in `sort` order, else its first folder's cover.

        Kept while the folder's mtime stays the same (a new thumbnail deeper down is seen when
        that folder's listing is kept no longer); none when nothing is found COVER_DEPTH deep.
        """
        key = _stat_key(folder)
        if key is None:
            return None
        with self._lock:
            kept = self._covers.get((folder, suffixes, sort))
        if kept is not None and kept[0] == key:
            return kept[1] or None
        found: tuple[bytes, ...] = ()
        below: tuple[bytes, ...] = ()
        path = folder
        for _ in range(COVER_DEPTH):
            listing = _read_folder(path, suffixes)
            if listing is None:
                break
            if listing.thumbnails:
                first = _newest_first(path, listing.thumbnails)[0] if sort == "date" else listing.thumbnails[0]
                found = (*below, first.source_name)
                break
            if not listing.folders:
                break
            below = (*below, listing.folders[0])
            path = os.path.join(path, listing.folders[0])
        with self._lock:
            self._covers[(folder, suffixes, sort)] = (key, found)
            while len(self._covers) > COVERS_KEPT:
                self._covers.popitem(last=False)
        return found or None

    def thumbnails(self, folder: bytes, suffixes: tuple[bytes, ...], sort: Sort) -> FolderListing | None:
        """The listing of `folder` (thumbnails ending in one of `suffixes`), None if it is not a folder.

        With no `suffixes`, `folder` is a source folder (`serve --source`): each image in it is
        listed under its own name, as a thumbnail that is made when it is asked for.
        """
        key = _stat_key(folder)
        if key is None:
            return None
        with self._lock:
            kept = self._kept.get((folder, suffixes))
            if kept is not None and kept.key == key:
                self._kept.move_to_end((folder, suffixes))
        if kept is None or kept.key != key:
            listing = _read_folder(folder, suffixes)
            if listing is None:
                return None
            kept = _Kept(key, listing)
            with self._lock:
                self._kept[(folder, suffixes)] = kept
                while len(self._kept) > LISTINGS_KEPT:
                    self._kept.popitem(last=False)
        if sort == "name":
            return kept.listing
        if kept.newest_first is None:
            kept.newest_first = _newest_first(folder, kept.listing.thumbnails)
        return FolderListing(kept.listing.folders, kept.newest_first)


def _stat_key(folder: bytes) -> tuple[int, int, int] | None:
    """What changes when a folder's entries change; None when it is not a folder."""
    try:
        st = os.stat(folder, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _read_folder(folder: bytes, suffixes: tuple[bytes, ...]) -> FolderListing | None:
    folders: list[bytes] = []
    by_source: dict[bytes, bytes] = {}
    rank: dict[bytes, int] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(b".") or entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if _linkable(name):
                        folders.append(name)
                    continue
                if not suffixes:
                    if is_image_name(os.fsdecode(name)) and _linkable(name) and entry.is_file(follow_symlinks=False):
                        by_source[name] = name
                    continue
                for order, suffix in enumerate(suffixes):
                    if name.endswith(suffix) and len(name) > len(suffix) and entry.is_file(follow_symlinks=False):
                        source = name[: -len(suffix)]
                        if not _linkable(source):
                            break
                        # One entry per source; its file is the variant of the preferred format.
                        if source not in rank or order < rank[source]:
                            by_source[source] = name
                            rank[source] = order
                        break
    except OSError:
        return None
    folders.sort()
    thumbnails = tuple(Thumbnail(source, by_source[source]) for source in sorted(by_source))
    return FolderListing(tuple(folders), thumbnails)


def _linkable(name: bytes) -> bool:
    """Whether the server answers the URL segment a page links `name` by: the one URL rule judges it."""
    return url_segments(b"/" + quote(name, safe="").encode("ascii")) == [name]


def _newest_first(folder: bytes, thumbnails: tuple[Thumbnail, ...]) -> tuple[Thumbnail, ...]:
    """Newest capture first: the capture time a thumbnail was made with, else its file's mtime."""

    def modified(thumbnail: Thumbnail) -> int:
        path = os.path.join(folder, thumbnail.file_name)
        captured = captured_of(path)
        if captured is not None:
            return captured * 1_000_000_000
        try:
            return os.stat(path, follow_symlinks=False).st_mtime_ns
        except OSError:
            return 0

    dated = [(modified(thumbnail), thumbnail) for thumbnail in thumbnails]
    dated.sort(key=lambda pair: (-pair[0], pair[1].source_name))
    return tuple(thumbnail for _, thumbnail in dated)
