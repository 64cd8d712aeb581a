"""The three-stage pipeline: loader threads -> resample worker processes -> writer threads, joined by bounded queues."""

from __future__ import annotations

import functools
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from thumbcli.discover import SourceFile, WalkProblem, display_path, is_image_name
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits, RunOptions, ThumbSpec, WalkOptions
from thumbcli.splitwalk import SplitWalk, default_processes
from thumbcli.targets.plan import Plan, Target

if TYPE_CHECKING:
    from thumbcli.spec import Thumbnail
    from thumbcli.workers import WorkerOutcome

log = logging.getLogger(__name__)

#: "known-failure": refused by the decoder in an earlier run, unchanged since, so not tried (and not reported) again.
Status = Literal["made", "skipped", "failed", "planned", "known-failure"]
StopReason = Literal["interrupted", "max-time", "max-files"]

_DONE = None  # queue sentinel: no more work for this stage
#: Files sent to a worker ahead of its replies: it has the next in its pipe while we turn the last around.
PIPELINED = 2


class FileResult(NamedTuple):
    """What happened to one source file (a NamedTuple: one is made per file)."""

    path: str
    status: Status
    reason: str = ""
    thumbnails: int = 0
    #: Made from only part of a damaged image: what was wrong with it (a degraded thumbnail).
    warning: str = ""
    #: The decoder's raw text behind the reason or the warning (for the fail log).
    detail: str = ""

    def describe(self) -> str:
        """One line naming the file and, for a failure, the reason."""
        text = display_path(self.path)
        return f"{text}: {self.reason}" if self.reason else text


@dataclass(slots=True)
class RunStats:
    """Counts and timings of one run."""

    found: int = 0
    made: int = 0
    thumbnails: int = 0
    skipped: int = 0
    failed: int = 0
    #: Files that failed in an earlier run and were not tried again (see targets/failures.py).
    known_failures: int = 0
    #: Files made from only the part of them that decodes (see FileResult.warning).
    degraded: int = 0
    #: Resample worker processes started, replacements of killed ones included.
    workers_started: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    stopped: StopReason | None = None
    failures: list[FileResult] = field(default_factory=list)
    warnings: list[FileResult] = field(default_factory=list)
    known: list[FileResult] = field(default_factory=list)
    #: With a dry run: files that would be made, and thumbnails per spec name.
    planned: int = 0
    planned_by_spec: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Source images decoded per second of wall time."""
        return self.made / self.seconds if self.seconds > 0 else 0.0

    def count(self, result: FileResult, weight: int = 1) -> None:
        """Count one file's outcome (`weight` files for a failure that stands for several, as a lost task's)."""
        if result.status == "made":
            self.made += 1
            self.thumbnails += result.thumbnails
            if result.warning:
                self.degraded += 1
                self.warnings.append(result)
        elif result.status == "skipped":
            self.skipped += 1
        elif result.status == "planned":
            self.planned += 1
        elif result.status == "known-failure":
            self.known_failures += 1
            self.known.append(result)
        else:
            self.failed += weight
            self.failures.append(result)


class RunTally:
    """A run's counts and the callbacks that follow them as they change (a progress bar); safe from any thread."""

    def __init__(
        self,
        on_found: Callable[[int], None] | None,
        on_skipped: Callable[[int], None] | None,
        on_result: Callable[[FileResult], None] | None,
    ) -> None:
        self.stats = RunStats()
        #: Held for every change to `stats`.
        self.lock = threading.Lock()
        self._on_found = on_found
        self._on_skipped = on_skipped
        self._on_result = on_result

    def found(self, found: int, skipped: int) -> None:
        """Count files found, of which `skipped` were fresh: called per folder, not per file."""
        with self.lock:
            self.stats.found += found
            self.stats.skipped += skipped
            if self._on_found is not None and found:
                self._on_found(found)
            if self._on_skipped is not None and skipped:
                self._on_skipped(skipped)

    def report(self, result: FileResult, weight: int = 1) -> None:
        """Count one file's outcome (see RunStats.count) and pass it on."""
        with self.lock:
            self.stats.count(result, weight)
            if self._on_result is not None:
                self._on_result(result)


@dataclass(slots=True)
class _Loaded:
    source: SourceFile
    specs: tuple[ThumbSpec, ...]
    data: bytes = b""
    made: list[tuple[ThumbSpec, Thumbnail]] = field(default_factory=list)
    warning: str = ""
    detail: str = ""
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
    ) -> None:
        self._sources = list(sources)
        self._target = target
        self._run = run
        self._walk = walk
        self._excluded_dirs = list(excluded_dirs)
        self._dry_run = dry_run
        self._decode_for = decode_for
        self._on_walked = on_walked
        self._stop = threading.Event()
        self._stop_reason: StopReason | None = None
        self._tally = RunTally(on_found, on_skipped, on_result)
        self._crash: BaseException | None = None
        depth = run.queue_depth
        self._load_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._resample_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._write_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._byte_budget = _ByteBudget(run.queue_bytes)
        self._memory_ceiling = run.limits.worker_memory(run.workers)
        #: Sources read so far; with `written`, lets a test observe the backpressure.
        self.loaded = 0
        self.written = 0

    @property
    def stats(self) -> RunStats:
        """The counts so far (final once `run` has returned)."""
        return self._tally.stats

    def stop(self, reason: StopReason = "interrupted") -> None:
        """Take no new files; in-flight work finishes. Safe from a signal handler."""
        if self._stop_reason is None:
            self._stop_reason = reason
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
        for q in (self._load_queue, self._resample_queue, self._write_queue):
            try:
                while True:
                    job = q.get_nowait()
                    if job is not None:
                        self._byte_budget.give_back(job.budgeted)
                        job.budgeted = 0
            except queue.Empty:
                pass

    def _walker(self, walk: SplitWalk) -> None:
        stale: list[tuple[SourceFile, tuple[ThumbSpec, ...]]] = []
        queued = 0
        max_files = self._run.max_files

        def enqueue(source: SourceFile, specs: tuple[ThumbSpec, ...]) -> bool:
            nonlocal queued
            if max_files is not None and queued >= max_files:
                self.stop("max-files")
                return False
            queued += 1
            self._put(self._load_queue, _Loaded(source, specs))
            return True

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
            if self._stop.is_set() or not self._plan_each(todo, stale, enqueue):
                break
        else:
            if self._on_walked is not None:
                self._on_walked()
        for source, specs in stale:
            if self._stop.is_set() or not enqueue(source, specs):
                break

    def _plan_each(
        self,
        todo: list[tuple[SourceFile, Plan]],
        stale: list[tuple[SourceFile, tuple[ThumbSpec, ...]]],
        enqueue: Callable[[SourceFile, tuple[ThumbSpec, ...]], bool],
    ) -> bool:
        """Queue, defer or report each file that is not fresh; False once the budget is spent."""
        for item, plan in todo:
            if plan.freshness == "rejected":
                self._tally.report(FileResult(item.path, "failed", plan.problem))
            elif plan.freshness == "known-failure":
                self._tally.report(FileResult(item.path, "known-failure", plan.problem))
            elif self._dry_run:
                with self._tally.lock:
                    for spec in plan.specs:
                        by_spec = self._tally.stats.planned_by_spec
                        by_spec[spec.name] = by_spec.get(spec.name, 0) + 1
                self._tally.report(FileResult(item.path, "planned", thumbnails=len(plan.specs)))
            elif plan.freshness == "stale":
                # Missing thumbnails first: budgeted runs converge on full coverage.
                stale.append((item, plan.specs))
            elif not enqueue(item, plan.specs):
                return False
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
        while (job := self._get(self._load_queue)) is not _DONE:
            if self._stopping():
                continue
            # Taken before reading, at the size the walk saw: what is read is bounded too.
            budget = min(job.source.size, self._run.limits.max_file_size)
            if not self._byte_budget.take(budget, lambda: self._crash is not None or self._stopping()):
                continue
            job.budgeted = budget
            try:
                job.data, job.source = read_source(job.source, self._run.limits, self._walk.follow_symlinks)
            except (OSError, FileRejected) as exc:
                self._byte_budget.give_back(budget)
                self._tally.report(FileResult(job.source.path, "failed", _reason(exc)))
                continue
            with self._tally.lock:
                self.loaded += 1
                self._tally.stats.bytes_read += len(job.data)
            self._put(self._resample_queue, job)

    def _resampler(self, cpu: int | None) -> None:
        """Feed one worker process (kept on core `cpu`, if one), PIPELINED files ahead.

        The worker is started at the first file: a run with nothing to make never starts one.
        """
        worker = None
        sent: deque[_Loaded] = deque()
        more = True
        try:
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
                            # Imported at the first file: a run with nothing to make (a no-change rerun) never needs it.
                            from thumbcli.workers import ResampleWorker

                            limits, strict = self._run.limits, self._run.strict
                            worker = ResampleWorker(
                                limits,
                                strict=strict,
                                memory_ceiling=self._memory_ceiling,
                                decode_for=self._decode_for,
                                cpu=cpu,
                            )
                        data, job.data = job.data, b""
                        worker.send(data, job.specs)
                        sent.append(job)
                if sent:
                    assert worker is not None
                    self._received(sent.popleft(), worker.receive())
        finally:
            if worker is not None:
                worker.close()
                with self._tally.lock:
                    self._tally.stats.workers_started += worker.started

    def _received(self, job: _Loaded, outcome: WorkerOutcome) -> None:
        self._byte_budget.give_back(job.budgeted)
        job.budgeted = 0
        if outcome.reason:
            self._tally.report(FileResult(job.source.path, "failed", outcome.reason, detail=outcome.detail))
            self._target.record_failure(job.source, outcome.reason)
            return
        job.made = list(zip(job.specs, outcome.thumbnails, strict=True))
        job.warning, job.detail = outcome.warning, outcome.detail
        self._put(self._write_queue, job)

    def _writer(self) -> None:
        while (job := self._get(self._write_queue)) is not _DONE:
            try:
                self._target.write(job.source, job.made)
            except OSError as exc:
                self._tally.report(FileResult(job.source.path, "failed", f"cannot write thumbnail: {_reason(exc)}"))
                continue
            with self._tally.lock:
                self.written += 1
            self._tally.report(
                FileResult(job.source.path, "made", thumbnails=len(job.made), warning=job.warning, detail=job.detail)
            )

    # -- orchestration -----------------------------------------------------

    def run(self) -> RunStats:
        """Run to completion (or until stopped) and return the counts."""
        started = time.monotonic()
        options = self._run
        # Forked before any thread of ours starts.
        walk = start_walk(self._sources, self._walk, self._excluded_dirs, self._target, force=options.force)
        try:
            self._run_stages(walk, started)
        finally:
            walk.close()
        self._tally.stats.seconds = time.monotonic() - started
        self._tally.stats.stopped = self._stop_reason
        if self._crash is not None:
            raise self._crash
        return self._tally.stats

    def _run_stages(self, walk: SplitWalk, started: float) -> None:
        options = self._run

        def start(bodies: Sequence[Callable[[], None]], name: str) -> list[threading.Thread]:
            threads = [
                threading.Thread(target=self._guard(body), name=f"{name}-{i}", daemon=True)
                for i, body in enumerate(bodies)
            ]
            for thread in threads:
                thread.start()
            return threads

        resamplers = [functools.partial(self._resampler, cpu) for cpu in worker_cores(options)]
        stages = [
            (start([functools.partial(self._walker, walk)], "walker"), self._load_queue, options.loaders),
            (start([self._loader] * options.loaders, "loader"), self._resample_queue, options.workers),
            (start(resamplers, "resample"), self._write_queue, options.writers),
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


def start_walk(
    sources: list[str] | tuple[str, ...], options: WalkOptions, excluded: list[str], target: Target, *, force: bool
) -> SplitWalk:
    """Fork the walk of `sources` (call before any thread starts); folders `target` knows fresh are not planned."""
    known_fresh = target.known_fresh if not force else lambda batch: False
    return SplitWalk(sources, options, is_image_name, excluded, known_fresh, options.processes or default_processes())


def read_source(source: SourceFile, limits: Limits, follow_symlinks: bool) -> tuple[bytes, SourceFile]:
    """Read a whole source with blocking I/O, refusing what is not a regular file or is too big.

    Returns the bytes and the source re-stated from the open file (what was read is what is recorded).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(source.path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRejected("not a regular file")
        limit = limits.max_file_size
        if st.st_size > limit:
            raise FileRejected(f"file is {st.st_size} bytes, over the --max-file-size limit of {limit}")
        chunks = []
        remaining = limit + 1
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 22))):
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise FileRejected(f"file grew past the --max-file-size limit of {limit} while being read")
    finally:
        os.close(fd)
    if (st.st_mtime_ns, st.st_size) != (source.mtime_ns, source.size):
        # Record what was actually read, not what the walk saw.
        source = SourceFile(source.path, source.root, source.relpath, st.st_size, st.st_mtime_ns)
    return data, source


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)
