"""The three-stage pipeline: loader threads -> resample workers -> writer threads, joined by bounded queues."""

from __future__ import annotations

import functools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, NamedTuple

from thumbcli.cache import is_within
from thumbcli.discover import SourceFile, WalkProblem, display_path, is_image_name
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits, RunOptions, ThumbSpec, WalkOptions
from thumbcli.splitwalk import SplitWalk, default_processes
from thumbcli.writers import Plan, Target

if TYPE_CHECKING:
    from thumbcli.resample import Thumbnail

log = logging.getLogger(__name__)

Status = Literal["made", "skipped", "failed", "planned"]
StopReason = Literal["interrupted", "max-time", "max-files"]

_DONE = None  # queue sentinel: no more work for this stage


class FileResult(NamedTuple):
    """What happened to one source file (a NamedTuple: one is made per file)."""

    path: str
    status: Status
    reason: str = ""
    thumbnails: int = 0

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
    seconds: float = 0.0
    bytes_read: int = 0
    stopped: StopReason | None = None
    failures: list[FileResult] = field(default_factory=list)
    #: With a dry run: files that would be made, and thumbnails per spec name.
    planned: int = 0
    planned_by_spec: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Source images decoded per second of wall time."""
        return self.made / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class _Loaded:
    source: SourceFile
    specs: tuple[ThumbSpec, ...]
    data: bytes = b""
    made: list[tuple[ThumbSpec, Thumbnail]] = field(default_factory=list)


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
        on_found: Callable[[int], None] | None = None,
        on_skipped: Callable[[int], None] | None = None,
        on_result: Callable[[FileResult], None] | None = None,
    ) -> None:
        self._sources = list(sources)
        self._target = target
        self._run = run
        self._walk = walk
        self._excluded_dirs = list(excluded_dirs)
        self._dry_run = dry_run
        self._on_found = on_found
        self._on_skipped = on_skipped
        self._on_result = on_result
        self._stop = threading.Event()
        self._stop_reason: StopReason | None = None
        self._stats = RunStats()
        self._stats_lock = threading.Lock()
        self._crash: BaseException | None = None
        depth = run.queue_depth
        self._load_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._resample_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        self._write_queue: queue.Queue[_Loaded | None] = queue.Queue(depth)
        #: Sources read so far; with `written`, lets a test observe the backpressure.
        self.loaded = 0
        self.written = 0

    @property
    def stats(self) -> RunStats:
        """The counts so far (final once `run` has returned)."""
        return self._stats

    def stop(self, reason: StopReason = "interrupted") -> None:
        """Take no new files; in-flight work finishes. Safe from a signal handler."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop.set()

    # -- reporting ---------------------------------------------------------

    def _report(self, result: FileResult) -> None:
        with self._stats_lock:
            stats = self._stats
            if result.status == "made":
                stats.made += 1
                stats.thumbnails += result.thumbnails
            elif result.status == "skipped":
                stats.skipped += 1
            elif result.status == "planned":
                stats.planned += 1
            else:
                stats.failed += 1
                stats.failures.append(result)
            if self._on_result is not None:
                self._on_result(result)

    def _found(self, found: int, skipped: int) -> None:
        # Called for batches of files: a no-change run is mostly this, so no per-file lock or callback.
        with self._stats_lock:
            self._stats.found += found
            self._stats.skipped += skipped
            if self._on_found is not None and found:
                self._on_found(found)
            if self._on_skipped is not None and skipped:
                self._on_skipped(skipped)

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
                    q.get_nowait()
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
                self._found(batch, batch)
                continue
            if isinstance(batch, WalkProblem):
                self._found(1, 0)
                self._report(FileResult(batch.path, "failed", batch.reason))
                continue
            fresh, todo = self._target.plan_batch(batch, self._run.force)
            self._found(len(batch.files), fresh)
            if self._stop.is_set() or not self._plan_each(todo, stale, enqueue):
                break
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
                self._report(FileResult(item.path, "failed", plan.problem))
            elif self._dry_run:
                with self._stats_lock:
                    for spec in plan.specs:
                        by_spec = self._stats.planned_by_spec
                        by_spec[spec.name] = by_spec.get(spec.name, 0) + 1
                self._report(FileResult(item.path, "planned", thumbnails=len(plan.specs)))
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

    def _loader(self) -> None:
        while (job := self._load_queue.get()) is not _DONE:
            if self._stop.is_set() and self._stop_reason != "max-files":
                continue
            try:
                job.data, job.source = read_source(job.source, self._run.limits, self._walk.follow_symlinks)
            except (OSError, FileRejected) as exc:
                self._report(FileResult(job.source.path, "failed", _reason(exc)))
                continue
            with self._stats_lock:
                self.loaded += 1
                self._stats.bytes_read += len(job.data)
            self._put(self._resample_queue, job)

    def _worker(self) -> None:
        # libvips is loaded by the first worker that gets an image, so that a run
        # with nothing to make (the nightly no-change case) never pays for it.
        resample: ModuleType | None = None
        limits = self._run.limits
        while (job := self._resample_queue.get()) is not _DONE:
            if resample is None:
                resample = _load_resample()
            if self._stop.is_set() and self._stop_reason != "max-files":
                continue
            try:
                thumbnails = resample.make_thumbnails(job.data, job.specs, limits)
            except FileRejected as exc:
                self._report(FileResult(job.source.path, "failed", str(exc)))
                self._target.record_failure(job.source, str(exc))
                continue
            job.data = b""
            job.made = list(zip(job.specs, thumbnails, strict=True))
            self._put(self._write_queue, job)

    def _writer(self) -> None:
        while (job := self._write_queue.get()) is not _DONE:
            try:
                self._target.write(job.source, job.made)
            except OSError as exc:
                self._report(FileResult(job.source.path, "failed", f"cannot write thumbnail: {_reason(exc)}"))
                continue
            with self._stats_lock:
                self.written += 1
            self._report(FileResult(job.source.path, "made", thumbnails=len(job.made)))

    # -- orchestration -----------------------------------------------------

    def run(self) -> RunStats:
        """Run to completion (or until stopped) and return the counts."""
        started = time.monotonic()
        options = self._run
        # Forked before any thread of ours starts.
        walk = SplitWalk(
            self._sources,
            self._walk,
            is_image_name,
            self._excluded_dirs,
            self._target.known_fresh if not options.force else lambda batch: False,
            self._walk.processes or default_processes(),
        )
        try:
            self._run_stages(walk, started)
        finally:
            walk.close()
        self._stats.seconds = time.monotonic() - started
        self._stats.stopped = self._stop_reason
        if self._crash is not None:
            raise self._crash
        return self._stats

    def _run_stages(self, walk: SplitWalk, started: float) -> None:
        options = self._run

        def start(body: Callable[[], None], count: int, name: str) -> list[threading.Thread]:
            threads = [
                threading.Thread(target=self._guard(body), name=f"{name}-{i}", daemon=True) for i in range(count)
            ]
            for thread in threads:
                thread.start()
            return threads

        stages = [
            (start(functools.partial(self._walker, walk), 1, "walker"), self._load_queue, options.loaders),
            (start(self._loader, options.loaders, "loader"), self._resample_queue, options.workers),
            (start(self._worker, options.workers, "resample"), self._write_queue, options.writers),
            (start(self._writer, options.writers, "writer"), None, 0),
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


OnDemandStatus = Literal["queued", "joined", "busy", "missing"]


class GenerationFailure(NamedTuple):
    """Why an on-demand thumbnail was not made: the source's fault (no thumbnail can exist) or ours."""

    reason: str
    source_problem: bool


class OnDemand:
    """Makes single thumbnails on request (serve's generate-on-miss) with the pipeline's stages.

    Concurrent requests for one thumbnail share one generation; past `max_pending`
    outstanding generations a request is refused at once instead of queueing.
    A source that could not be thumbnailed is not tried again until it changes.
    Writes take no run lock: every write is atomic, so a concurrent batch run is harmless.
    """

    _REMEMBERED_FAILURES = 4096

    def __init__(
        self,
        source_root: Path,
        cache_root: Path,
        presets: Mapping[str, ThumbSpec],
        *,
        workers: int = 2,
        max_pending: int = 16,
        limits: Limits | None = None,
    ) -> None:
        from thumbcli.writers import CacheDirectory

        self._source_root = source_root
        self._presets = dict(presets)
        self._limits = limits or Limits()
        self._target = CacheDirectory(cache_root, tuple(self._presets.values()), check_collisions=False, locked=False)
        self._max_pending = max_pending
        self._pending: dict[tuple[str, str], list[Callable[[GenerationFailure | None], None]]] = {}
        self._lock = threading.Lock()
        #: (preset, relpath) -> (mtime_ns, size) of sources that could not be thumbnailed.
        self._failed: dict[tuple[str, str], tuple[int, int]] = {}
        from concurrent.futures import ThreadPoolExecutor  # only `serve --source` needs it

        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="on-demand")

    def source_for(self, relpath: str) -> SourceFile | None:
        """The source file a URL's relative path names, or None if there is no such image."""
        name = relpath.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in relpath.split("/")) or not is_image_name(name):
            return None
        path = self._source_root / relpath
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or not is_within(self._source_root, path):
            return None
        return SourceFile(str(path), str(self._source_root), relpath, st.st_size, st.st_mtime_ns)

    def is_fresh(self, preset: str, relpath: str) -> bool | None:
        """True if the cached thumbnail is current, False if it must be made, None if there is no source."""
        source = self.source_for(relpath)
        spec = self._presets.get(preset)
        if source is None or spec is None:
            return None
        return self._target.is_fresh(source, spec)

    def request(self, preset: str, relpath: str, done: Callable[[GenerationFailure | None], None]) -> OnDemandStatus:
        """Start (or join) making one thumbnail; `done(None)` on success or `done(failure)`, from a worker thread."""
        spec = self._presets.get(preset)
        source = self.source_for(relpath)
        if spec is None or source is None:
            return "missing"
        key = (preset, relpath)
        with self._lock:
            if self._failed.get(key) == (source.mtime_ns, source.size):
                return "missing"
            waiting = self._pending.get(key)
            if waiting is not None:
                waiting.append(done)
                return "joined"
            if len(self._pending) >= self._max_pending:
                return "busy"
            self._pending[key] = [done]
        self._executor.submit(self._make, key, source, spec)
        return "queued"

    def _make(self, key: tuple[str, str], source: SourceFile, spec: ThumbSpec) -> None:
        failure: GenerationFailure | None = None
        try:
            try:
                data, source = read_source(source, self._limits, follow_symlinks=False)
                thumbnail = _load_resample().make_thumbnails(data, (spec,), self._limits)[0]
            except (OSError, FileRejected) as exc:
                failure = GenerationFailure(f"{display_path(source.path)}: {_reason(exc)}", source_problem=True)
            else:
                try:
                    self._target.write(source, [(spec, thumbnail)])
                except OSError as exc:
                    failure = GenerationFailure(f"cannot write thumbnail: {_reason(exc)}", source_problem=False)
            if failure is not None:
                log.warning("cannot make %s thumbnail: %s", spec.name, failure.reason)
                if failure.source_problem:
                    self._remember_failure(key, source)
        finally:
            with self._lock:
                waiting = self._pending.pop(key, [])
        for done in waiting:
            done(failure)

    def _remember_failure(self, key: tuple[str, str], source: SourceFile) -> None:
        with self._lock:
            if len(self._failed) >= self._REMEMBERED_FAILURES:
                self._failed.clear()
            self._failed[key] = (source.mtime_ns, source.size)

    def close(self, *, abandon: bool = False) -> None:
        """Finish the generations in flight, then release the cache.

        With `abandon` (a process about to exit), drop the queued generations and
        return at once; the running ones finish their atomic writes on their own.
        """
        if abandon:
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        self._executor.shutdown(wait=True)
        self._target.close()


@functools.cache
def _load_resample() -> ModuleType:
    """Import the resample module and configure libvips (idempotent, so a racing second call is harmless)."""
    from thumbcli import resample

    resample.configure_libvips()
    return resample


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)
