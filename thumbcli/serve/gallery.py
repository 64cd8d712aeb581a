"""Gallery pages (`serve --browse`): folder URLs answered off the event loop.

The loop parses the folder URL and parks the request in its connection's output, as a
generate-on-miss does; a page thread lists the folder, reads the page's thumbnail sizes from
their headers and makes the HTML; the finished page comes back through an eventfd.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import select
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from thumbcli.cache import LAYOUT_DIR, url_segments
from thumbcli.discover import is_image_name
from thumbcli.serve.imagesize import size_of_file
from thumbcli.serve.listing import FolderLister, FolderListing, Sort
from thumbcli.serve.pages import PAGE_ITEMS, FolderTile, GalleryItem, Page, PresetView, gallery_page, url_of
from thumbcli.serve.protocol import Connection, Parked, Request
from thumbcli.serve.videos import SourceVideos, is_video_name
from thumbcli.spec import SUFFIX_BY_FORMAT

log = logging.getLogger(__name__)

#: Threads per worker making gallery pages.
PAGE_THREADS = 2
#: Distinct pages being made in one worker before further folder requests get 503.
MAX_PAGES_IN_FLIGHT = 64
#: A made page answers the same URL again for this long (as an opened thumbnail does), then is made anew.
MADE_PAGE_SECONDS = 1.0
PAGES_KEPT = 64


@dataclass(frozen=True, slots=True)
class FolderRequest:
    """A parsed folder URL and its query: which preset, which folder, which sort and page."""

    preset: str
    folder: tuple[bytes, ...]
    sort: Sort
    page: int


def parse_folder_url(target: bytes) -> FolderRequest | None:
    """The folder a `/<preset>/<folder>/...?sort=&page=` URL names, or None if it is not a safe folder URL.

    The segments are judged as the bytes the file system would see, as `thumbcli.cache.split_url_path`
    judges thumbnail URLs; hidden segments (the `.thumbcli` state) name nothing.
    """
    path, _, query = target.partition(b"?")
    path = path.partition(b"#")[0]
    if not path.endswith(b"/") or len(path) < 3:
        return None
    segments = url_segments(path[:-1])
    if segments is None or any(segment.startswith(b".") for segment in segments):
        return None
    preset = segments[0]
    if not preset.isascii():
        return None
    fields = parse_qs(query.decode("latin-1"), max_num_fields=8)
    sort_text = fields.get("sort", ["name"])[0]
    sort: Sort = "date" if sort_text == "date" else "name"
    page_text = fields.get("page", ["1"])[0]
    page = int(page_text) if page_text.isdigit() and len(page_text) < 9 else 1
    return FolderRequest(preset.decode("ascii"), tuple(segments[1:]), sort, max(1, page))


class PageWait(Parked):
    """A folder request waiting for its page, parked in its connection's output."""

    __slots__ = ("conn", "request", "resolved", "since")

    def __init__(self, conn: Connection, request: Request, since: float) -> None:
        self.conn = conn
        self.request = request
        self.since = since
        self.resolved = False


class GalleryDesk:
    """One worker's gallery pages: the page threads, pages being made, and those made a moment ago."""

    def __init__(
        self, cache_root: Path, epoll: select.epoll, sources: Mapping[str, Path] | None = None, cache_control: str = ""
    ) -> None:
        self._layout_root = os.fsencode(cache_root / LAYOUT_DIR)
        self._real_root = os.fsencode(os.path.realpath(cache_root))
        self._lister = FolderLister()
        #: The folders `serve --source` makes from, by URL segment (b"": the one unnamed source), resolved.
        self._sources = {
            os.fsencode(name): os.fsencode(os.path.realpath(root)) for name, root in (sources or {}).items()
        }
        #: The videos of those folders, which a video's tile opens.
        self.videos = SourceVideos(sources or {}, cache_control)
        #: The named sources' root, listed as their folders.
        self._source_names = FolderListing(tuple(sorted(name for name in self._sources if name)), ())
        # Made here, after fork, so that the threads are this process's.
        self._threads = concurrent.futures.ThreadPoolExecutor(PAGE_THREADS, thread_name_prefix="thumbcli-page")
        self._completions: queue.SimpleQueue[tuple[FolderRequest, Page | int]] = queue.SimpleQueue()
        #: Requests waiting for a page being made; a second request for it joins the first.
        self._building: dict[FolderRequest, list[PageWait]] = {}
        #: Pages made less than MADE_PAGE_SECONDS ago, with the presets they were made for.
        self._made: OrderedDict[FolderRequest, tuple[float, Mapping[str, PresetView], Page | int]] = OrderedDict()
        self.done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        epoll.register(self.done_fd, select.EPOLLIN)

    @property
    def in_flight(self) -> int:
        """Pages being made."""
        return len(self._building)

    def answer(self, conn: Connection, request: Request, presets: Mapping[str, PresetView], now: float) -> Page | int:
        """A folder request's page if one was made a moment ago, else 0 with the request parked, or a status."""
        folder = parse_folder_url(request.target)
        if folder is None or folder.preset not in presets:
            return 404
        made = self._made.get(folder)
        if made is not None and made[0] > now and made[1] is presets:
            return made[2]
        wait = PageWait(conn, request, now)
        waiting = self._building.get(folder)
        if waiting is not None:
            waiting.append(wait)
        elif len(self._building) >= MAX_PAGES_IN_FLIGHT:
            return 503
        else:
            self._building[folder] = [wait]
            self._threads.submit(self._make, folder, presets)
        conn.out.append(wait)
        return 0

    def source_folder(self, folder: tuple[bytes, ...]) -> bytes | None:
        """The source folder a folder URL names (`serve --source`), b"" for the named sources' root, or None."""
        root = self._sources.get(b"")
        below = folder
        if root is None:
            if not folder:
                return b"" if self._sources else None
            root, below = self._sources.get(folder[0]), folder[1:]
            if root is None:
                return None
        path = os.path.join(root, *below)
        if not os.path.isdir(path) or os.path.commonpath([root, os.path.realpath(path)]) != root:
            return None
        return path

    def names_folder(self, path: bytes, presets: Mapping[str, PresetView]) -> bool:
        """Whether `path`, a URL path without its trailing slash, names a folder a gallery page lists."""
        folder = parse_folder_url(path + b"/")
        if folder is None or folder.preset not in presets:
            return False
        if folder.folder and is_image_name(os.fsdecode(folder.folder[-1])):
            return False  # a thumbnail's URL: no stat on the loop for it (a folder named `x.jpg` is not redirected)
        if presets[folder.preset].generated and self.source_folder(folder.folder) is not None:
            return True
        folder_path = os.path.join(self._layout_root, folder.preset.encode("ascii"), *folder.folder)
        if not os.path.isdir(folder_path):
            return False
        return os.path.commonpath([self._real_root, os.path.realpath(folder_path)]) == self._real_root

    def _make(self, folder: FolderRequest, presets: Mapping[str, PresetView]) -> None:
        """On a page thread: make the page (or a status), then wake the loop."""
        try:
            result: Page | int = self.folder_page(folder, presets)
        except Exception:
            log.exception("cannot make the page for %r", folder)
            result = 500
        self._completions.put((folder, result))
        os.eventfd_write(self.done_fd, 1)

    def folder_page(self, request: FolderRequest, presets: Mapping[str, PresetView]) -> Page | int:
        """The page of one folder of one preset, or 404 when there is no such folder in the cache (or source)."""
        preset = presets[request.preset]
        folder_path = os.path.join(self._layout_root, request.preset.encode("ascii"), *request.folder)
        real = os.path.realpath(folder_path)
        if os.path.commonpath([self._real_root, real]) != self._real_root:
            return 404
        suffixes = tuple(b"." + SUFFIX_BY_FORMAT[fmt].encode("ascii") for fmt in preset.formats)
        # A preset made on a miss lists its source, so a fresh cache is browsed as its source is.
        source = self.source_folder(request.folder) if preset.generated else None
        listed_from, listed_by = (source, ()) if source is not None else (folder_path, suffixes)
        listing = self._source_names if source == b"" else self._lister.thumbnails(listed_from, listed_by, request.sort)
        if listing is None:
            return 404
        folders, thumbnails = listing.folders, listing.thumbnails
        total = len(folders) + len(thumbnails)
        pages = max(1, -(-total // PAGE_ITEMS))
        page = min(request.page, pages)
        start, end = (page - 1) * PAGE_ITEMS, page * PAGE_ITEMS
        shown_folders = folders[start:end]
        first_thumbnail = max(0, start - len(folders))
        shown_thumbnails = thumbnails[first_thumbnail : max(0, end - len(folders))]
        larger = _larger_presets(preset, presets)
        items = []
        for thumbnail in shown_thumbnails:
            segments = (*request.folder, thumbnail.source_name)
            thumb_url = url_of(preset.name, segments, folder=False)
            full_url = thumb_url
            for candidate in larger:
                if candidate.generated or self._has_thumbnail(candidate, segments):
                    full_url = url_of(candidate.name, segments, folder=False)
                    break
            names = (
                (thumbnail.file_name,) if source is None else (thumbnail.source_name + suffix for suffix in suffixes)
            )
            size = next(filter(None, (_size_of(folder_path, name) for name in names)), None)
            video = is_video_name(thumbnail.source_name)
            video_url = self.videos.url_of(segments) if video else None
            items.append(GalleryItem(thumbnail.source_name, thumb_url, full_url, size, video, video_url))
        tiles = []
        for name in shown_folders:
            below = self.source_folder((*request.folder, name)) if source is not None else None
            if below is not None:
                cover = self._lister.cover(below, (), request.sort)
            else:
                cover = self._lister.cover(os.path.join(folder_path, name), suffixes, request.sort)
            cover_url = url_of(preset.name, (*request.folder, name, *cover), folder=False) if cover else None
            tiles.append(FolderTile(name, cover_url))
        return gallery_page(
            preset,
            request.folder,
            tiles,
            items,
            folder_count=len(folders),
            image_count=len(thumbnails),
            sort=request.sort,
            page=page,
            pages=pages,
        )

    def _has_thumbnail(self, preset: PresetView, segments: tuple[bytes, ...]) -> bool:
        base = os.path.join(self._layout_root, preset.name.encode("ascii"), *segments)
        return any(os.path.isfile(base + b"." + SUFFIX_BY_FORMAT[fmt].encode("ascii")) for fmt in preset.formats)

    def completed(self, presets: Mapping[str, PresetView], now: float) -> Iterator[tuple[PageWait, Page | int]]:
        """The parked folder requests whose page is made and that still wait, with the page or a status."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.done_fd)
        while True:
            try:
                folder, result = self._completions.get_nowait()
            except queue.Empty:
                return
            self._made[folder] = (now + MADE_PAGE_SECONDS, presets, result)
            self._made.move_to_end(folder)
            while len(self._made) > PAGES_KEPT:
                self._made.popitem(last=False)
            for wait in self._building.pop(folder, ()):
                if not wait.resolved:
                    yield wait, result

    def forget(self, wait: PageWait) -> None:
        """The request is answered or its client gone: a late page is dropped."""
        wait.resolved = True

    def close(self) -> None:
        """Stop the page threads; a page being made is finished and dropped."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        os.close(self.done_fd)


def _larger_presets(preset: PresetView, presets: Mapping[str, PresetView]) -> list[PresetView]:
    """Presets with a larger box than `preset`, largest first: where a click on a thumbnail leads."""
    area = preset.area
    if not area:
        return []
    return sorted((other for other in presets.values() if other.area > area), key=lambda other: -other.area)


def _size_of(folder_path: bytes, file_name: bytes) -> tuple[int, int] | None:
    try:
        fd = os.open(os.path.join(folder_path, file_name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return size_of_file(fd)
    finally:
        os.close(fd)
