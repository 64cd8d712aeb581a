"""The three-stage pipeline: loader threads -> resample worker processes -> writer threads, joined by bounded queues."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thumbcli.discover import DirBatch, SourceFile, WalkProblem
from thumbcli.errors import EndpointUnreachable
from thumbcli.make.engine import Job, SourceMaker
from thumbcli.make.pool import DecoderPool, DecoderSettings
from thumbcli.make.results import FileResult, RunStats, RunTally, StopReason
from thumbcli.objectstores import is_bucket_url
from thumbcli.spec import RunOptions, ThumbSpec, WalkOptions
from thumbcli.splitwalk import SplitWalk
from thumbcli.targets.plan import Target

if TYPE_CHECKING:
    from thumbcli.workers import SourceData, WorkerOutcome

log = logging.getLogger(__name__)

_DONE = None  # queue sentinel: no more work for this stage
#: Planned files the walk may run ahead of the loaders (about 20 MB of plans): a tree of up to this many
#: files to make is walked to its end at once, so the progress bar shows the total and an ETA early.
RUN_AHEAD = 50_000
#: Seconds that files in flight may take to finish once --max-time is up, before their decodes are abandoned.
ABANDON_SECONDS = 5.0
#: Files sent to a worker ahead of its replies: it has the next in its pipe while we turn the last around.
PIPELINED = 2
#: Loader threads at least, when a source is a bucket: each waits out a request's round trip, where a
#: disk needs few readers (the byte budget, not the count, bounds the memory they hold).
BUCKET_LOADERS = 16


@dataclass(slots=True)
class _Loaded:
    source: SourceFile
    specs: tuple[ThumbSpec, ...]
    data: SourceData = b""
    #: What the worker made of it, once it has.
    outcome: WorkerOutcome | None = None
    #: Bytes this job holds of the run's byte budget.
    budgeted: int = 0


class _ByteBudget:
    """Bytes read and not yet resampled, bounded: one file is always let through."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._changed = threading.Condition()

    def take(self, count: int, give_up: Callable[[], bool]) -> bool:
        """Wait until `count` bytes fit; False if `give_up` turns true first."""
        with self._changed:
            while self._held and self._held + count > self._limit:
                if give_up():
                    return False
                self._changed.wait(0.2)
            self._held += count
            return True

    def give_back(self, count: int) -> None:
        """Return bytes taken."""
        if count:
            with self._changed:
                self._held -= count
                self._changed.notify_all()


class Pipeline:
    """Walks sources and pushes each stale image through load -> resample -> write.

    Memory is bounded by the queue depths and the largest image: each stage
    blocks on a full queue, so a slow writer stalls the workers, which stall
    the loaders, which stall the walk.
    """

    def __init__(
        self,
        sources: Iterable[str],
        target: Target,
        run: RunOptions,
        walk: WalkOptions,
        *,
        excluded_dirs: Iterable[str] = (),
        dry_run: bool = False,
        decode_for: tuple[ThumbSpec, ...] = (),
        on_found: Callable[[int], None] | None = None,
        on_skipped: Callable[[int], None] | None = None,
        on_result: Callable[[FileResult], None] | None = None,
        on_walked: Callable[[], None] | None = None,
        batches: Iterable[DirBatch | WalkProblem | int] | None = None,
        on_unreachable: Callable[[SourceFile, EndpointUnreachable], None] | None = None,
    ) -> None:
        """`batches`: folders to make as they come (watch mode), instead of a walk of `sources`.

        They are planned and made in the order they come: none is held back for the walk's end.
        `on_unreachable`: an object store that does not answer drops the file to it (watch tries again
        later) instead of stopping the run.
        """
        self._sources = list(sources)
        self._batches = batches
        self._target = target
        self._run = run
        self._walk = walk
        self._excluded_dirs = list(excluded_dirs)
        self._decoders = DecoderSettings(run.limits, run.strict, decode_for)
        self._pool: DecoderPool | None = None
        self._pool_lock = threading.Lock()
        self._on_walked = on_walked
        self._on_unreachable = on_unreachable
        self._stop = threading.Event()
        self._stop_reason: StopReason | None = None
        #: When decodes still running are given up on (a while after --max-time is up); None: never.
        self._abandon_at: float | None = None
        self._tally = RunTally(on_found, on_skipped, on_result)
        self._crash: BaseException | None = None
        depth = run.queue_depth
        self._plan_queue: queue.Queue[_Loaded | None] = queue.Queue(RUN_AHEAD)
        self._resample_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._write_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._byte_budget = _ByteBudget(run.queue_bytes)
        #: Files handed to the loaders, counted against --max-files (by the walker alone).
        self._admitted_files = 0
        self._maker = SourceMaker(target, run.limits, follow_symlinks=walk.follow_symlinks, dry_run=dry_run)

    @property
    def stats(self) -> RunStats:
        """The counts so far (final once `run` has returned)."""
        return self._tally.stats

    def stop(self, reason: StopReason = "interrupted") -> None:
        """Take no new files; in-flight work finishes. Safe from a signal handler."""
        if self._stop_reason is None:
            self._stop_reason = reason
            if reason == "max-time":
                self._abandon_at = time.monotonic() + ABANDON_SECONDS
        self._stop.set()

    # -- stages ------------------------------------------------------------

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # a bug: stop everything and re-raise in run()
                self._crash = exc
                self._stop.set()
                self._drain_all()

        return run

    def _drain_all(self) -> None:
        for q in (self._plan_queue, self._resample_queue, self._write_queue):
            try:
                while True:
                    job = q.get_nowait()
                    if job is not None:
                        self._byte_budget.give_back(job.budgeted)
                        job.budgeted = 0
            except queue.Empty:
                pass

    def _walker(self, walk: Iterable[DirBatch | WalkProblem | int]) -> None:
        """Walk and plan, up to RUN_AHEAD files ahead of the loaders; missing thumbnails before stale ones."""
        stale: list[Job] = []
        #: Fed batch by batch (watch): a stale file waits for no walk's end.
        hold_stale = self._batches is None

        def enqueue(source: SourceFile, specs: tuple[ThumbSpec, ...]) -> bool:
            if not self._admitted():
                return False
            self._put(self._plan_queue, _Loaded(source, specs))
            return not self._stop.is_set()

        for batch in walk:
            if self._stop.is_set():
                break
            if isinstance(batch, int):
                self._tally.found(batch, batch)
                continue
            if isinstance(batch, WalkProblem):
                self._tally.found(1, 0)
                self._tally.report(FileResult(batch.path, "failed", batch.reason))
                continue
            fresh, todo = self._target.plan_batch(batch, self._run.force)
            self._tally.found(len(batch.files), fresh)
            planned = self._maker.sort(todo)
            if planned.planned_by_spec:
                with self._tally.lock:
                    self._tally.stats.add_planned(planned.planned_by_spec)
            for result in planned.results:
                self._tally.report(result)
            stale.extend(planned.stale)
            if self._stop.is_set() or not all(enqueue(*job) for job in planned.missing):
                break
            if not hold_stale:
                if not all(enqueue(*job) for job in stale):
                    break
                stale.clear()
        else:
            if self._on_walked is not None:
                self._on_walked()
        for source, specs in stale:
            if self._stop.is_set() or not enqueue(source, specs):
                break

    def _admitted(self) -> bool:
        """Whether the next planned file is within --max-files; the first one past it stops the run."""
        max_files = self._run.max_files
        if max_files is not None and self._admitted_files >= max_files:
            self.stop("max-files")
            return False
        self._admitted_files += 1
        return True

    def _put(self, q: queue.Queue[_Loaded | None], item: _Loaded | None) -> None:
        # A timeout loop instead of a plain blocking put, so a crash elsewhere cannot wedge us.
        while True:
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._crash is not None:
                    return

    def _get(self, q: queue.Queue[_Loaded | None], *, block: bool = True) -> _Loaded | None:
        """The next item, or _DONE once something crashed (whose drain may have taken the real _DONE).

        Without `block`, raises queue.Empty when there is none now.
        """
        while True:
            try:
                return q.get(block=block, timeout=0.2 if block else None)
            except queue.Empty:
                if self._crash is not None:
                    return _DONE
                if not block:
                    raise

    def _stopping(self) -> bool:
        return self._stop.is_set() and self._stop_reason != "max-files"

    def _loader(self) -> None:
        while (job := self._get(self._plan_queue)) is not _DONE:
            if self._stopping():
                continue
            # Taken before reading, at the size the walk saw: what is read is bounded too.
            budget = min(job.source.size, self._run.limits.max_file_size)
            if not self._byte_budget.take(budget, lambda: self._crash is not None or self._stopping()):
                continue
            job.budgeted = budget
            try:
                read = self._maker.read(job.source)
            except EndpointUnreachable as exc:
                self._byte_budget.give_back(budget)
                self._dropped(job.source, exc)
                continue
            if isinstance(read, FileResult):
                self._byte_budget.give_back(budget)
                self._tally.report(read)
                continue
            job.data, job.source = read
            with self._tally.lock:
                self._tally.stats.bytes_read += len(job.data)
            self._put(self._resample_queue, job)

    def _resampler(self) -> None:
        """Feed one worker process of the pool, PIPELINED files ahead.

        The worker is taken at the first file: a run with nothing to make never starts one.
        Fed batches (watch), it is started at once: the first file to arrive finds it ready.
        """
        lent = contextlib.ExitStack()
        worker = None
        sent: deque[_Loaded] = deque()
        more = True
        with lent:
            if self._batches is not None:
                from thumbcli.workers import WorkerBug

                worker = lent.enter_context(self._decoder_pool().lend())
                try:
                    worker.start()
                except WorkerBug as exc:  # tried again at the first file, which then fails with it
                    log.warning("%s", exc)
            while more or sent:
                while more and len(sent) < PIPELINED:
                    try:
                        job = self._get(self._resample_queue, block=not sent)
                    except queue.Empty:
                        break
                    if job is _DONE:
                        more = False
                    elif self._stopping():
                        self._byte_budget.give_back(job.budgeted)
                    else:
                        if worker is None:
                            worker = lent.enter_context(self._decoder_pool().lend())
                        data, job.data = job.data, b""
                        worker.send(data, job.specs)
                        sent.append(job)
                if sent:
                    assert worker is not None
                    if not self._received(sent.popleft(), worker.receive(self._abandoning)):
                        while sent:  # queued behind an abandoned decode: dropped with it
                            self._byte_budget.give_back(sent.popleft().budgeted)

    def _decoder_pool(self) -> DecoderPool:
        """The run's pool, made when the first file reaches a resampler."""
        with self._pool_lock:
            if self._pool is None:
                run = self._run
                self._pool = DecoderPool(self._decoders, sharing=run.workers, cores=worker_cores(run))
            return self._pool

    def _abandoning(self) -> bool:
        return self._abandon_at is not None and time.monotonic() > self._abandon_at

    def _received(self, job: _Loaded, outcome: WorkerOutcome) -> bool:
        """Report or pass on what a worker made of a file; False if its decode was abandoned."""
        self._byte_budget.give_back(job.budgeted)
        job.budgeted = 0
        if outcome.abandoned:
            return False
        refused = self._maker.refused(job.source, outcome)
        if refused is not None:
            self._tally.report(refused)
            return True
        job.outcome = outcome
        self._put(self._write_queue, job)
        return True

    def _writer(self) -> None:
        while (job := self._get(self._write_queue)) is not _DONE:
            assert job.outcome is not None
            try:
                self._tally.report(self._maker.write(job.source, job.specs, job.outcome))
            except EndpointUnreachable as exc:
                self._dropped(job.source, exc)

    def _dropped(self, source: SourceFile, exc: EndpointUnreachable) -> None:
        """A file the object store's outage kept from being made: the run's end, unless a driver takes it."""
        if self._on_unreachable is None:
            raise exc
        self._on_unreachable(source, exc)

    # -- orchestration -----------------------------------------------------

    def run(self) -> RunStats:
        """Run to completion (or until stopped) and return the counts."""
        started = time.monotonic()
        try:
            self._run_stages(started)
        finally:
            if self._pool is not None:
                self._pool.close()
                self._tally.stats.workers_started = self._pool.started
        self._tally.stats.seconds = time.monotonic() - started
        self._tally.stats.stopped = self._stop_reason
        if self._crash is not None:
            raise self._crash
        return self._tally.stats

    def _run_stages(self, started: float) -> None:
        options = self._run
        if self._batches is not None:
            self._stages(self._batches, started)
            return
        # Forked before any thread of ours starts.
        known_fresh = None if options.force else self._target.known_fresh
        with contextlib.closing(
            SplitWalk.of_images(self._sources, self._walk, self._excluded_dirs, known_fresh)
        ) as walk:
            self._stages(walk, started)

    def _stages(self, walk: Iterable[DirBatch | WalkProblem | int], started: float) -> None:
        options = self._run
        loaders = options.loaders
        if any(is_bucket_url(source) for source in self._sources):
            loaders = max(loaders, BUCKET_LOADERS)

        def start(bodies: Sequence[Callable[[], None]], name: str) -> list[threading.Thread]:
            threads = [
                threading.Thread(target=self._guard(body), name=f"{name}-{i}", daemon=True)
                for i, body in enumerate(bodies)
            ]
            for thread in threads:
                thread.start()
            return threads

        stages = [
            (start([functools.partial(self._walker, walk)], "walker"), self._plan_queue, loaders),
            (start([self._loader] * loaders, "loader"), self._resample_queue, options.workers),
            (start([self._resampler] * options.workers, "resample"), self._write_queue, options.writers),
            (start([self._writer] * options.writers, "writer"), None, 0),
        ]
        for threads, next_queue, consumers in stages:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.2)
                    if options.max_seconds is not None and time.monotonic() - started > options.max_seconds:
                        self.stop("max-time")
            if next_queue is not None:
                for _ in range(consumers):
                    self._put(next_queue, _DONE)


def worker_cores(options: RunOptions) -> list[int | None]:
    """The core each resample worker is kept on: one each when pinned and there is a worker per core, else None.

    Measured on 2 cores and 2,000 real 320x240 photos: 1.07x the images a second of free workers
    (median of 14 interleaved rounds; camera-size JPEGs 1.01x). A run with fewer workers than
    cores is not pinned: shards started side by side with `-j 1` would all get the first core.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if options.pin_workers and options.workers == len(cores):
        return list(cores)
    return [None] * options.workers
