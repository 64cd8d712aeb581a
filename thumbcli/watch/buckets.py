"""Bucket sources in a watch: S3 sends no inotify, so each is listed again on an interval, LIST only, in a thread.

A rescan feeds every listed folder to the live pipeline, which plans it by the records (freshness
from the listing's size and ETag, never a GET) and makes only what is new or replaced; what was
listed comes back to the watch for prune, so a rescan lists each bucket source once. It runs in a
thread of its own: listing a large prefix takes minutes, and the folder sources' events and the
signals must not wait for it. An object store that does not answer is said once, not at every
interval, and tried again at the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from thumbcli.bucket import ListedFile, ObjectError, UnreadableKey, list_folders, parse
from thumbcli.discover import DirBatch, WalkProblem, bucket_batches, is_image_name
from thumbcli.errors import EndpointUnreachable
from thumbcli.spec import WalkOptions

log = logging.getLogger(__name__)

#: Seconds between listings of a bucket source, when --rescan does not say.
BUCKET_RESCAN = 60.0

#: Object URLs by the bucket place (`s3://bucket/prefix`) whose whole listing found them.
Listings = Mapping[str, frozenset[str]]


class ObjectStoreTrouble:
    """Whether the object store answers: a warning when it stops, one when it answers again, none in between.

    Listings (the rescan thread) and reads and writes (the pipeline's threads) report here alike.
    """

    def __init__(self, retry_seconds: float) -> None:
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._failing = False

    def failed(self, line: str) -> None:
        """Something could not be done (`line` says what and why); said only if the store was answering until now."""
        with self._lock:
            said, self._failing = self._failing, True
        if not said:
            log.warning("%s; trying again every %g s", line, self._retry_seconds)

    def answered(self) -> None:
        """A listing went through: said if it was failing."""
        with self._lock:
            said, self._failing = self._failing, False
        if said:
            log.warning("the object store answers again")


class BucketRescans:
    """Lists the bucket sources every `interval` seconds (one rescan at a time), feeding what they hold."""

    def __init__(
        self,
        sources: Sequence[str],
        walk: WalkOptions,
        excluded: tuple[str, ...],
        *,
        interval: float,
        feed: Callable[[DirBatch | WalkProblem], None],
        named: set[str] | None = None,
        trouble: ObjectStoreTrouble,
        wake: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> None:
        """`excluded`: destinations in buckets, each URL ending in '/'; `wake` tells the loop a rescan ended.

        `named`: failures already said (the catch-up's), an unreadable key among them not said again.
        """
        self._sources = list(sources)
        self._walk = walk
        self._excluded = excluded
        self._interval = interval
        self._feed = feed
        self._trouble = trouble
        self._wake = wake
        self._stopping = stopping
        self._thread: threading.Thread | None = None
        self._ended: queue.SimpleQueue[Listings | None] = queue.SimpleQueue()
        self._due = time.monotonic() + interval
        #: Unreadable keys already named: once each, not at every rescan.
        self._named: set[str] = set(named or ())

    def seconds_to_next(self, now: float) -> float | None:
        """Seconds until the next rescan is due; None while one runs (its end wakes the loop)."""
        if self._thread is not None and self._thread.is_alive():
            return None
        return max(0.0, self._due - now)

    def start_if_due(self, now: float) -> bool:
        """Start a rescan if one is due and none runs."""
        wait = self.seconds_to_next(now)
        if wait is None or wait > 0:
            return False
        self._thread = threading.Thread(target=self._rescan, name="watch-bucket-rescan", daemon=True)
        self._thread.start()
        return True

    def ended(self) -> list[Listings | None]:
        """What the rescans that ended since the last call listed (None: some listing failed, prune nothing)."""
        done = []
        while True:
            try:
                done.append(self._ended.get_nowait())
            except queue.Empty:
                return done

    def _rescan(self) -> None:
        listings: Listings | None = None
        started = time.monotonic()
        try:
            listings = self._list_all()
            if listings is not None:
                objects = sum(len(found) for found in listings.values())
                log.debug("rescan: %d objects listed and fed in %.3f s", objects, time.monotonic() - started)
        except EndpointUnreachable as exc:  # or a listing refused: `cannot list s3://...: <why>`
            self._trouble.failed(str(exc))
        else:
            self._trouble.answered()
        finally:
            self._due = time.monotonic() + self._interval
            self._ended.put(listings)
            self._wake()

    def _list_all(self) -> Listings | None:
        """List every bucket source, feeding its folders; what each holds (None: stopped before the end)."""
        listings: dict[str, frozenset[str]] = {}
        for source in self._sources:
            url = parse(source).url
            found: set[str] = set()
            unreadable: list[UnreadableKey] = []
            try:
                for batch in bucket_batches(
                    source, _noting(url, found, unreadable), self._walk, is_image_name, self._excluded
                ):
                    if self._stopping():
                        return None
                    if isinstance(batch, DirBatch) or batch.path not in self._named:
                        self._feed(batch)
                    if isinstance(batch, WalkProblem):
                        self._named.add(batch.path)
            except ObjectError as exc:
                raise EndpointUnreachable(f"cannot list {url}: {exc.strerror}") from None
            if not unreadable:  # else keys beside one may have gone unseen: prune asks the store itself
                listings[url] = frozenset(found)
        return listings


def _noting(
    url: str, found: set[str], unreadable: list[UnreadableKey]
) -> Iterator[tuple[str, list[ListedFile]] | UnreadableKey]:
    """The listing of a bucket source, folder by folder, adding each object's URL to `found` on the way."""
    for listed in list_folders(parse(url)):
        if isinstance(listed, UnreadableKey):
            unreadable.append(listed)
        else:
            reldir, files = listed
            folder = url + (f"/{reldir}" if reldir else "")
            found.update(f"{folder}/{name}" for name, _, _ in files)
        yield listed
