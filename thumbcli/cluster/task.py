"""A cluster task: a group of source folders made on a Dask worker, returning counts, failures and records."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thumbcli.discover import DirBatch, SourceFile
from thumbcli.errors import ThumbcliError
from thumbcli.fsutil import remove_orphaned_temporary_files
from thumbcli.make.engine import Job, SourceMaker
from thumbcli.make.pipeline import PIPELINED
from thumbcli.make.pool import DecoderPool, DecoderSettings
from thumbcli.make.results import FileResult
from thumbcli.objectstores import is_bucket_url
from thumbcli.spec import Limits, ThumbSpec
from thumbcli.targets.records import TaskRecords
from thumbcli.targets.state import FailureRecord, FolderSignature, Origin, Record
from thumbcli.targets.tree import OutputTree

if TYPE_CHECKING:
    from thumbcli.workers import SourceData, WorkerOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskDestination:
    """What a worker needs to rebuild the output tree: its absolute root, specs and naming."""

    root: str
    specs: tuple[ThumbSpec, ...]
    name_template: str
    check_collisions: bool
    #: Each source root, absolute, -> the folder its thumbnails go under (several sources); empty for one.
    source_folders: tuple[tuple[str, str], ...]
    #: Every size of the destination: each image is decoded for the largest (see `resample.resample`).
    decode_for: tuple[ThumbSpec, ...]
    #: `s3://bucket/prefix` when the thumbnails go to a bucket: workers PUT them there, `root` is unused.
    bucket: str = ""


@dataclass(frozen=True, slots=True)
class FolderTask:
    """A group of source folders for one worker to make, with the records of their thumbnails."""

    destination: TaskDestination
    #: The folders' files as the client walked them, with absolute paths (workers have their own cwd).
    batches: tuple[DirBatch, ...]
    #: Each batch's folder as the client names it, for messages.
    shown: tuple[str, ...]
    #: Output folder (relative to the root) -> its records, for every output folder the batches write.
    records: dict[str, dict[str, Record]]
    #: The recorded decode failures of the batches' sources: source path -> (what it failed as, the reason).
    failures: dict[bytes, tuple[FailureRecord, str]]
    limits: Limits
    #: Refuse damaged images rather than make degraded thumbnails (--strict).
    strict: bool
    follow_symlinks: bool
    force: bool
    #: Decode the sources known to have failed too (--retry-failed).
    retry_failed: bool
    dry_run: bool
    #: Files this task may start making (--max-files); None: no limit.
    budget: int | None
    #: The run's Dask Event: set when the client is interrupted, so a running task stops early.
    interrupted: str
    #: Resample workers that decode at once on each worker host (its Dask workers' threads), by host:
    #: each may use that share of its host's memory, as in a local run.
    decoders_by_host: dict[str, int]


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """What a task did: per-file results (made, failed, planned), fresh files, and the records to keep."""

    results: list[FileResult]
    fresh: int
    bytes_read: int
    planned_by_spec: dict[str, int]
    records: list[tuple[str, Origin]]
    signatures: list[FolderSignature]
    #: Decode failures to record: (source path, what it failed as, the reason).
    failed: list[tuple[bytes, FailureRecord, str]]
    #: Sources whose recorded failure is to be forgotten (they were made).
    forgotten: list[bytes]
    #: The budget ran out with files still to make.
    spent: bool
    started: int
    #: How long the task took on its worker.
    seconds: float


class SourceUnreachable(ThumbcliError):
    """A worker host cannot see a source folder or the destination (it is not on the shared filesystem)."""


class _TaskPools:
    """This Dask worker process's resample workers, one per task running at once, kept from task to task.

    A worker process costs an interpreter and libvips to start, so a Dask worker keeps them
    while the run's decoder settings stay the same; a Dask worker with N threads decodes on N cores.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: DecoderPool | None = None
        self._key: tuple[DecoderSettings, int] | None = None

    def pool(self, settings: DecoderSettings, sharing: int) -> DecoderPool:
        """The pool for these settings; a pool of other settings is closed (its lent workers leave when back)."""
        with self._lock:
            if self._pool is None or self._key != (settings, sharing):
                if self._pool is not None:
                    self._pool.close()
                self._pool = DecoderPool(settings, sharing=sharing)
                self._key = (settings, sharing)
            return self._pool


_task_pools = _TaskPools()


def _decoders_here(by_host: Mapping[str, int]) -> int:
    """The resample workers decoding at once on this host, by the client's count (this worker's threads if none)."""
    try:
        from distributed import get_worker
        from distributed.comm.addressing import get_address_host

        worker = get_worker()
        return by_host.get(get_address_host(worker.address)) or max(1, int(worker.state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def _require_visible(path: str, what: str, shown: str) -> None:
    try:
        os.stat(path)
    except OSError as exc:
        raise SourceUnreachable(
            f"worker host {socket.gethostname()} cannot see the {what} {shown}: {exc.strerror or exc}"
        ) from None


class SealedTask:
    """A FolderTask as Dask carries it: opaque.

    Dask looks for futures inside a task's arguments, walking into every dataclass, tuple and
    dict: for a task of thousands of records that costs the client time, and it rebuilds
    a frozen slotted dataclass without its last field (distributed 2026.8). The payload holds
    no futures, so it travels sealed.
    """

    __slots__ = ("task",)

    def __init__(self, task: FolderTask) -> None:
        self.task = task


def make_folders(sealed: SealedTask) -> TaskOutcome:
    """Run on a worker: plan the task's folders, make what is not fresh, and say what was done."""
    task = sealed.task
    destination = task.destination
    if not destination.bucket:
        _require_visible(destination.root, "destination", destination.root)
    for batch, shown in zip(task.batches, task.shown, strict=True):
        if not is_bucket_url(batch.directory):
            _require_visible(batch.target or batch.directory, "source", shown)
    records = TaskRecords(task.records, task.failures)
    options: dict[str, Any] = {
        "name_template": destination.name_template,
        "check_collisions": destination.check_collisions,
        "source_folders": dict(destination.source_folders),
        "locked": False,
        "records": records,
        "retry_failed": task.retry_failed,
    }
    target: OutputTree
    if destination.bucket:
        from thumbcli.targets.objects import BucketTree

        # The records travel with the task; the tree's folder on this host only holds nothing of note.
        scratch = Path(tempfile.gettempdir()) / f"thumbcli-task-{os.getuid()}"
        target = BucketTree(destination.bucket, scratch, destination.specs, **options)
    else:
        target = OutputTree(Path(destination.root), destination.specs, **options)
        # A rerun of a task whose worker was killed finds that attempt's temporary files here.
        for folder in task.records:
            remove_orphaned_temporary_files(destination.root, folder)
    with _heap_kept:
        return _TaskRun(task, target, records).run()


class _HeapKept:
    """While tasks run in this Dask worker process, glibc keeps freed memory for the next file.

    Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536, to give memory back to
    the system. Set at all, it also pins glibc's mmap threshold at 128 KiB: each source read
    then took fresh pages from the kernel, zeroed and faulted in, and gave them back after, two
    thirds of a Dask worker's CPU on camera JPEGs (1.05 s per 100 5 MB files, 0.37 s kept).
    When the last task ends, the environment's settings are back and the heap is trimmed.
    Nothing changes in a process whose environment left glibc to tune itself.
    """

    _M_TRIM_THRESHOLD = -1
    _M_MMAP_THRESHOLD = -3
    _GLIBC_DEFAULT = 128 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        #: The environment's trim and mmap thresholds, or None if it leaves glibc to tune them.
        self._pinned = self._thresholds_of(os.environ)

    def _mallopt(self, trim: int, mmap: int, *, trim_now: bool = False) -> None:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
            libc = ctypes.CDLL(None)
            libc.mallopt(self._M_MMAP_THRESHOLD, mmap)
            libc.mallopt(self._M_TRIM_THRESHOLD, trim)
            if trim_now:
                libc.malloc_trim(0)

    @classmethod
    def _thresholds_of(cls, environment: Mapping[str, str]) -> tuple[int, int] | None:
        trim, mmap = environment.get("MALLOC_TRIM_THRESHOLD_"), environment.get("MALLOC_MMAP_THRESHOLD_")
        if trim is None and mmap is None:
            return None
        try:
            return int(trim or cls._GLIBC_DEFAULT), int(mmap or cls._GLIBC_DEFAULT)
        except ValueError:
            return None

    def __enter__(self) -> None:
        with self._lock:
            self._running += 1
            if self._running == 1 and self._pinned is not None:
                self._mallopt(trim=256 << 20, mmap=32 << 20)  # 32 MiB: glibc's ceiling for it

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0 and self._pinned is not None:
                self._mallopt(*self._pinned, trim_now=True)


_heap_kept = _HeapKept()


class _TaskRun:
    """One task on a worker: the engine's steps for each file, in order, on one thread (a worker is one thread)."""

    def __init__(self, task: FolderTask, target: OutputTree, records: TaskRecords) -> None:
        self.task = task
        self.records = records
        self.results: list[FileResult] = []
        self.fresh = 0
        self.bytes_read = 0
        self.planned_by_spec: dict[str, int] = {}
        self.started = 0
        self.spent = False
        self._shown = {
            batch.directory: shown for batch, shown in zip(task.batches, task.shown, strict=True) if not batch.target
        }
        self.target = target
        self.maker = SourceMaker(
            target, task.limits, follow_symlinks=task.follow_symlinks, dry_run=task.dry_run, shown=self._as_shown
        )

    def _as_shown(self, path: str) -> str:
        """A source's path as the client names it."""
        directory, _, name = path.rpartition("/")
        shown = self._shown.get(directory)
        return f"{shown.rstrip('/')}/{name}" if shown is not None else path

    def run(self) -> TaskOutcome:
        """Plan every folder, then make the missing thumbnails before the stale ones, within the budget."""
        began = time.monotonic()
        missing: list[Job] = []
        stale: list[Job] = []
        for batch in self.task.batches:
            fresh, todo = self.target.plan_batch(batch, self.task.force)
            self.fresh += fresh
            planned = self.maker.sort(todo)
            self.results.extend(planned.results)
            for name, count in planned.planned_by_spec.items():
                self.planned_by_spec[name] = self.planned_by_spec.get(name, 0) + count
            missing.extend(planned.missing)
            stale.extend(planned.stale)
        self._make(missing + stale)
        self.target.close()
        records = self.records
        return TaskOutcome(
            self.results,
            self.fresh,
            self.bytes_read,
            self.planned_by_spec,
            records.made,
            records.signatures,
            records.failed,
            records.forgotten,
            self.spent,
            self.started,
            time.monotonic() - began,
        )

    def _make(self, todo: list[Job]) -> None:
        """Read, decode (in this host's resample worker process, PIPELINED files ahead) and write, in order."""
        task = self.task
        interrupted = _EventWatch(task.interrupted)
        sent: deque[Job] = deque()
        settings = DecoderSettings(task.limits, task.strict, task.destination.decode_for)
        pool = _task_pools.pool(settings, _decoders_here(task.decoders_by_host))
        with pool.lend() as worker, _ReadAhead(self.maker, todo) as reads:
            for (source, specs), read in reads:
                if task.budget is not None and self.started >= task.budget:
                    self.spent = True
                    break
                if interrupted.is_set():
                    break
                self.started += 1
                if isinstance(read, FileResult):
                    self.results.append(read)
                    continue
                data, source = read
                self.bytes_read += len(data)
                worker.send(data, specs)
                sent.append((source, specs))
                if len(sent) >= PIPELINED:
                    self._finish(worker.receive(), *sent.popleft())
            while sent:
                self._finish(worker.receive(), *sent.popleft())

    def _finish(self, outcome: WorkerOutcome, source: SourceFile, specs: tuple[ThumbSpec, ...]) -> None:
        refused = self.maker.refused(source, outcome)
        self.results.append(refused or self.maker.write(source, specs, outcome))


class _ReadAhead:
    """A task's files with their bytes, read in order; objects in a bucket a few ahead, on threads of their own.

    A GET waits out a round trip that a local read does not: read one at a time, a worker's
    decoder would wait for each. Files on disk are read when their turn comes, as before.
    """

    #: Objects in flight ahead of the one being decoded (at most this many sources' bytes held).
    AHEAD = 4

    def __init__(self, maker: SourceMaker, todo: list[Job]) -> None:
        self._maker = maker
        self._todo = todo
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if any(is_bucket_url(source.path) for source, _ in todo):
            self._executor = concurrent.futures.ThreadPoolExecutor(self.AHEAD, thread_name_prefix="thumbcli-read")

    def __enter__(self) -> Iterator[tuple[Job, tuple[SourceData, SourceFile] | FileResult]]:
        if self._executor is None:
            return ((job, self._maker.read(job[0])) for job in self._todo)
        return self._ahead(self._executor)

    def _ahead(
        self, executor: concurrent.futures.ThreadPoolExecutor
    ) -> Iterator[tuple[Job, tuple[SourceData, SourceFile] | FileResult]]:
        pending: deque[tuple[Job, concurrent.futures.Future[tuple[SourceData, SourceFile] | FileResult]]] = deque()
        jobs = iter(self._todo)
        for job in itertools.islice(jobs, self.AHEAD):
            pending.append((job, executor.submit(self._maker.read, job[0])))
        while pending:
            job, future = pending.popleft()
            for later in itertools.islice(jobs, 1):
                pending.append((later, executor.submit(self._maker.read, later[0])))
            yield job, future.result()

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            # Reads begun for files the task will not make (a budget, an interrupt) are let go.
            self._executor.shutdown(wait=True, cancel_futures=True)


class _EventWatch:
    """A Dask Event, asked at most four times a second (each question is a round trip to the scheduler)."""

    _EVERY = 0.25

    def __init__(self, name: str) -> None:
        self._name = name
        self._asked = time.monotonic()

    def is_set(self) -> bool:
        """Whether the event was set, as of the last question."""
        if time.monotonic() - self._asked < self._EVERY:
            return False
        from distributed import Event

        self._asked = time.monotonic()
        return bool(Event(self._name).is_set())
