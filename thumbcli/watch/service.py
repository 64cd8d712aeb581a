"""The watch driver: catch up as `generate` does, then feed what changes into one long-lived pipeline.

The run lock and the state of the destination are held from the catch-up to the end, so a
`generate` from cron beside it waits or exits LOCKED. The resample workers stay warm between
bursts: each burst is folders fed into the same pipeline, not a run of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from thumbcli.discover import DirBatch, SourceFile, WalkProblem, is_image_name, walk_below
from thumbcli.errors import CannotRunError, EndpointUnreachable, SpecError
from thumbcli.fsutil import remove_temporary_files
from thumbcli.job import GenerateJob
from thumbcli.make.pipeline import Pipeline
from thumbcli.make.results import FileResult
from thumbcli.objectstores import is_bucket_url
from thumbcli.run import GenerateSummary, RunStopper, destination_urls, generate, open_target
from thumbcli.targets.plan import Removal, Target
from thumbcli.targets.tree import OutputTree
from thumbcli.watch.buckets import BUCKET_RESCAN, BucketRescans, Listings, ObjectStoreTrouble
from thumbcli.watch.inotify import Changes, Folder, TreeWatcher
from thumbcli.watch.metrics import WatchMetrics
from thumbcli.watch.systemd import notify

log = logging.getLogger(__name__)

#: Seconds between rescans of folders inotify does not follow, when --rescan does not say.
UNWATCHED_RESCAN = 60.0
#: Seconds between metrics writes while files come in.
METRICS_EVERY = 1.0
#: Arrival times kept for the latency before the oldest are forgotten (ARRIVAL_FORGOTTEN seconds old).
ARRIVALS_KEPT = 10_000
ARRIVAL_FORGOTTEN = 600.0

WatchEnd = Literal["stopped", "reload"]


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """How a watch runs beside its job: rescans, the drain on stop, the metrics file."""

    #: Walk every source again this often (filesystems without inotify); None: only what is not watched,
    #: and list bucket sources every BUCKET_RESCAN seconds.
    rescan_seconds: float | None = None
    #: Seconds that the files in flight may take to finish once a stop is asked for.
    drain_seconds: float = 5.0
    metrics_file: Path | None = None


@dataclass(frozen=True, slots=True)
class WatchSummary:
    """How a watch ended and what it did after its catch-up."""

    ended: WatchEnd
    catch_up: GenerateSummary
    made: int
    failed: int
    removed: int

    def as_json(self) -> dict[str, object]:
        """The summary as `watch --json` prints it last."""
        return {
            "event": "stopped" if self.ended == "stopped" else "reloading",
            "made": self.made,
            "failed": self.failed,
            "removed": self.removed,
        }


def require_watchable(job: GenerateJob) -> None:
    """Refuse what watch cannot follow: a source not a folder or bucket, a shard, a dry run, a cluster, a budget."""
    for source in job.sources:
        if not is_bucket_url(source) and not os.path.isdir(source):
            raise SpecError(f"{source}: watch follows folders and buckets: name the folder that holds it")
    if job.walk.shard[1] > 1 or job.dask is not None or job.dry_run:
        raise SpecError("watch runs on this host, whole and for real: no --shard, --dask or --dry-run")
    if job.run.max_files is not None or job.run.max_seconds is not None:
        raise SpecError("--max-files and --max-time budget a run that ends; a watch runs until it is stopped")


class BatchFeed:
    """Folders for the live pipeline: an iterable that blocks for the next and ends when closed."""

    _TICK = 0.5  # seconds between zero counts, so the pipeline's walker sees a stop while idle

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[DirBatch | WalkProblem | None] = queue.SimpleQueue()

    def put(self, item: DirBatch | WalkProblem) -> None:
        """Hand a folder (or a problem found walking) to the pipeline."""
        self._queue.put(item)

    def close(self) -> None:
        """No more folders: the pipeline finishes what it has, then ends."""
        self._queue.put(None)

    def __iter__(self) -> Iterator[DirBatch | WalkProblem | int]:
        while True:
            try:
                item = self._queue.get(timeout=self._TICK)
            except queue.Empty:
                yield 0
                continue
            if item is None:
                return
            yield item


class WatchRun:
    """One watch: catch-up, then inotify bursts into the pipeline until a stop or reload is requested.

    `request_stop` and `request_reload` are safe from signal handlers.
    """

    def __init__(
        self,
        job: GenerateJob,
        options: WatchOptions,
        *,
        on_result: Callable[[FileResult, float | None], None] | None = None,
        on_removed: Callable[[Removal], None] | None = None,
        on_caught_up: Callable[[GenerateSummary], None] | None = None,
    ) -> None:
        require_watchable(job)
        self._job = job
        self._options = options
        self._on_result = on_result
        self._on_removed = on_removed
        self._on_caught_up = on_caught_up
        self.metrics = WatchMetrics()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ending: WatchEnd | None = None
        self._catching_up: RunStopper | None = None
        self._arrived: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._made = 0
        self._failed = 0
        #: What the catch-up named as failed: a rescan does not name an unreadable key among them again.
        self._failed_at_catch_up: set[str] = set()
        self._removed = 0
        self._crash: BaseException | None = None
        self._folders = [source for source in job.sources if not is_bucket_url(source)]
        self._buckets = [source for source in job.sources if is_bucket_url(source)]
        self._trouble = ObjectStoreTrouble(options.rescan_seconds or BUCKET_RESCAN)
        #: When to walk the folder sources again for files an object store's outage kept from being made.
        self._retry_at: float | None = None

    @property
    def wakeup_fd(self) -> int:
        """A descriptor for `signal.set_wakeup_fd`: a signal that lands on any thread then wakes the loop.

        Without it, a signal delivered to a pipeline thread leaves the main thread asleep in
        `select`, where Python never gets to run its handler.
        """
        return self._wake_write

    def request_stop(self) -> None:
        """Finish the files in flight and end (a second request during the catch-up abandons it)."""
        self._request("stopped")

    def request_reload(self) -> None:
        """Finish the files in flight and end with `reload`, for the caller to start again with a new job."""
        self._request("reload")

    def _request(self, ending: WatchEnd) -> None:
        if self._ending is None:
            self._ending = ending
        if self._catching_up is not None:
            self._catching_up.request_stop()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b".")

    def run(self) -> WatchSummary:
        """Catch up, then follow the sources until asked to stop or reload."""
        target = open_target(self._job)
        try:
            return self._run(target)
        finally:
            target.close()

    def close(self) -> None:
        """Close the wake-up pipe (after `signal.set_wakeup_fd` no longer names it)."""
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _run(self, target: Target) -> WatchSummary:
        job = self._job
        excluded = [str(target.root), *destination_urls(target)]
        # Watching before the catch-up: what lands while it runs is in the queue, not lost.
        watcher = TreeWatcher(self._folders, job.walk, is_image_name, excluded)
        try:
            self._catching_up = RunStopper()
            caught_up = generate(job, on_result=self._caught_up_result, stopper=self._catching_up, opened=target)
            self._catching_up = None
            if self._on_caught_up is not None:
                self._on_caught_up(caught_up)
            if self._ending is None:
                self._prune(target)
                self._follow(target, watcher, excluded)
        finally:
            watcher.close()
            notify("STOPPING=1")
        ending = self._ending or "stopped"
        return WatchSummary(ending, caught_up, self._made, self._failed, self._removed)

    def _caught_up_result(self, result: FileResult) -> None:
        self.metrics.count_file(result.status, None)
        if result.status == "failed":
            self._failed_at_catch_up.add(result.path)
        if self._on_result is not None:
            self._on_result(result, None)

    def _follow(self, target: Target, watcher: TreeWatcher, excluded: list[str]) -> None:
        job, feed = self._job, BatchFeed()
        pipeline = Pipeline(
            job.sources,
            target,
            job.run,
            job.walk,
            excluded_dirs=excluded,
            decode_for=job.decode_for or target.specs,
            on_found=lambda count: self._count_pending(count),
            on_skipped=lambda count: self._count_pending(-count),
            on_result=self._live_result,
            batches=feed,
            on_unreachable=self._unreachable,
        )
        thread = threading.Thread(target=self._run_pipeline, args=(pipeline,), name="watch-pipeline", daemon=True)
        thread.start()
        notify("READY=1")
        log.info("watching %d folders", watcher.watches)
        buckets = None
        if self._buckets:
            buckets = BucketRescans(
                self._buckets,
                job.walk,
                tuple(f"{url.rstrip('/')}/" for url in destination_urls(target)),
                interval=self._options.rescan_seconds or BUCKET_RESCAN,
                feed=feed.put,
                named=self._failed_at_catch_up,
                trouble=self._trouble,
                wake=self._wake,
                stopping=lambda: self._ending is not None,
            )
        try:
            self._loop(target, watcher, feed, excluded, buckets)
        finally:
            feed.close()
            thread.join(self._options.drain_seconds)
            if thread.is_alive():
                pipeline.stop("interrupted")
                thread.join(self._options.drain_seconds)
            if thread.is_alive():
                # A stop must not wait on a decode that hangs: what is left is made by the next start.
                log.warning("files still in flight after %g s: left to the next start", 2 * self._options.drain_seconds)
                remove_temporary_files()
            if self._options.metrics_file is not None:
                self.metrics.write(self._options.metrics_file, force=True)
        if self._crash is not None:
            raise self._crash

    def _run_pipeline(self, pipeline: Pipeline) -> None:
        try:
            pipeline.run()
        except BaseException as exc:  # a bug: the loop sees it and stops the watch loudly
            self._crash = exc
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_write, b"!")

    def _loop(
        self, target: Target, watcher: TreeWatcher, feed: BatchFeed, excluded: list[str], buckets: BucketRescans | None
    ) -> None:
        rescan_every = self._options.rescan_seconds if self._folders else None
        if rescan_every is None and watcher.unwatched:
            rescan_every = UNWATCHED_RESCAN
        next_rescan = time.monotonic() + rescan_every if rescan_every is not None else None
        next_metrics = 0.0
        roots = {(root.rstrip("/") or "/", "") for root in self._folders}
        while self._ending is None and self._crash is None:
            now = time.monotonic()
            waits = [max(0.0, due - now) for due in (next_rescan, self._retry_at) if due is not None]
            if buckets is not None and (bucket_wait := buckets.seconds_to_next(now)) is not None:
                waits.append(bucket_wait)
            wait = min(waits) if waits else None
            if self._options.metrics_file is not None and self.metrics.changed:
                due = max(0.0, next_metrics - now)
                wait = due if wait is None else min(wait, due)
            ready = watcher.readable([self._wake_read], wait)
            if self._wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 64)
            if watcher.fileno() in ready:
                self._apply(target, watcher, watcher.changes(0), feed, excluded)
            if next_rescan is not None and rescan_every is not None and time.monotonic() >= next_rescan:
                everything = self._options.rescan_seconds is not None
                self._rescan(target, (roots if everything else set()) | watcher.unwatched, feed, excluded)
                next_rescan = time.monotonic() + rescan_every
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
                self._rescan(target, roots, feed, excluded)
            if buckets is not None:
                self._follow_buckets(target, buckets)
            if self._options.metrics_file is not None and time.monotonic() >= next_metrics:
                self.metrics.write(self._options.metrics_file)
                next_metrics = time.monotonic() + METRICS_EVERY

    def _apply(
        self, target: Target, watcher: TreeWatcher, changes: Changes, feed: BatchFeed, excluded: list[str]
    ) -> None:
        """Feed a burst's files and folders to the pipeline; remove the thumbnails of what went away."""
        self.metrics.count_events(changes.events)
        with self._lock:
            for path, when in changes.arrived.items():
                self._arrived.setdefault(path, when)
            if len(self._arrived) > ARRIVALS_KEPT:
                # Arrivals that never became a result (found fresh, gone before read) are not kept forever.
                oldest = time.monotonic() - ARRIVAL_FORGOTTEN
                self._arrived = {path: when for path, when in self._arrived.items() if when > oldest}
        walk = self._job.walk
        folders = _outermost(changes.folders)
        for (root, reldir), names in changes.files.items():
            if not names or _inside_any(root, reldir, folders):
                continue  # the walk of a new folder finds them
            for item in walk_below(root, reldir, walk, is_image_name, excluded, recursive=False):
                if isinstance(item, DirBatch):
                    files = [file for file in item.files if file[0] in names]
                    if files:
                        feed.put(item._replace(files=files))
                elif os.path.basename(item.path) in names:
                    feed.put(item)
        for root, reldir in sorted(folders):
            for item in walk_below(root, reldir, walk, is_image_name, excluded):
                feed.put(item)
        if changes.overflowed:
            log.warning("inotify's event queue overflowed: walking the sources again")
            roots = {(root.rstrip("/") or "/", "") for root in self._folders}
            for root, _ in roots:
                watcher.watch_tree(root, "")
            self._rescan(target, roots, feed, excluded, prune=False)
        if changes.gone or changes.overflowed:
            only_files = changes.gone == len(changes.gone_files) and not changes.overflowed
            self._prune(target, changes.gone_files if only_files else None)

    def _rescan(
        self, target: Target, folders: set[Folder], feed: BatchFeed, excluded: list[str], *, prune: bool = True
    ) -> None:
        """Walk folders again, feeding those whose signature no longer vouches that all is fresh."""
        self.metrics.count(rescans=1)
        for root, reldir in sorted(_outermost(folders)):
            for item in walk_below(root, reldir, self._job.walk, is_image_name, excluded):
                if isinstance(item, DirBatch) and target.known_fresh(item):
                    continue
                feed.put(item)
        if prune:
            self._prune(target)

    def _follow_buckets(self, target: Target, buckets: BucketRescans) -> None:
        """Start a listing of the bucket sources when one is due; prune by those that ended whole."""
        for listings in buckets.ended():
            self.metrics.count(rescans=1)
            if listings is not None:
                self._prune(target, listed=listings)
        buckets.start_if_due(time.monotonic())

    def _unreachable(self, source: SourceFile, exc: EndpointUnreachable) -> None:
        """A file the object store's outage kept from being made (a pipeline thread): made at the next try."""
        self._trouble.failed(str(exc))
        self._count_pending(-1)
        self._retry_later()

    def _retry_later(self) -> None:
        """Walk the folder sources again (and prune) at the next try, for what an object store's outage left undone.

        A bucket source's objects come again with its next listing; a file of a folder needs a walk.
        """
        if self._folders and self._retry_at is None:
            self._retry_at = time.monotonic() + (self._options.rescan_seconds or BUCKET_RESCAN)
            self._wake()

    def _prune(self, target: Target, sources: set[str] | None = None, listed: Listings | None = None) -> None:
        """Remove the thumbnails whose source is gone (prune's own judgement, under the lock already held).

        `sources`: only files were deleted, these: the desktop cache looks only at their thumbnails.
        `listed`: what the bucket sources hold, as a rescan just listed them.
        An object store that cannot say which objects are gone (or take the deletes) leaves all to the next prune.
        """
        try:
            removals = self._removals(target, sources, listed)
        except CannotRunError as exc:
            self._trouble.failed(str(exc))
            self._retry_later()
            return
        self._removed += len(removals)
        self.metrics.count(removed=len(removals))
        if self._on_removed is not None:
            for removal in removals:
                self._on_removed(removal)

    @staticmethod
    def _removals(target: Target, sources: set[str] | None, listed: Listings | None) -> list[Removal]:
        if isinstance(target, OutputTree):  # a served cache too
            return target.prune(dry_run=False, listed=listed)
        from thumbcli.targets.freedesktop import FreedesktopCache

        assert isinstance(target, FreedesktopCache)
        return target.prune(dry_run=False) if sources is None else target.prune_sources(sources)

    def _count_pending(self, change: int) -> None:
        with self._lock:
            self._pending += change
            self.metrics.set_queue_depth(self._pending)

    def _live_result(self, result: FileResult) -> None:
        now = time.monotonic()
        with self._lock:
            arrived = self._arrived.pop(result.path, None)
            self._pending -= 1
            self.metrics.set_queue_depth(self._pending)
            if result.status == "made":
                self._made += 1
            elif result.status == "failed":
                self._failed += 1
        latency = now - arrived if arrived is not None else None
        if result.status == "made":
            self._trouble.answered()  # an outage that only met PUTs (folders into a bucket) ends here
        self.metrics.count_file(result.status, latency)
        if self._on_result is not None:
            self._on_result(result, latency)


def _outermost(folders: set[Folder]) -> set[Folder]:
    """The folders not inside another of them (walking those walks the rest)."""
    return {(root, reldir) for root, reldir in folders if not _inside_any(root, reldir, folders - {(root, reldir)})}


def _inside_any(root: str, reldir: str, folders: set[Folder]) -> bool:
    """Whether the folder is one of `folders` or below one."""
    for other_root, other in folders:
        if other_root == root and (other == reldir or not other or reldir.startswith(f"{other}/")):
            return True
    return False
