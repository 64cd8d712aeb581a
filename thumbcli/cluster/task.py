"""A cluster task: a group of source folders made on a Dask worker, returning counts, failures and records."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from thumbcli.discover import DirBatch, SourceFile
from thumbcli.errors import FileRejected, ThumbcliError
from thumbcli.fsutil import remove_orphaned_temporary_files
from thumbcli.pipeline import PIPELINED, FileResult, read_source
from thumbcli.spec import Limits, ThumbSpec
from thumbcli.targets.state import FailureRecord, FolderSignature, Origin, Record, StateStore
from thumbcli.targets.tree import OutputTree
from thumbcli.workers import ResampleWorker, WorkerOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskDestination:
    """What a worker needs to rebuild the output tree: its absolute root, specs and naming."""

    root: str
    specs: tuple[ThumbSpec, ...]
    name_template: str
    check_collisions: bool
    #: Every size of the destination: each image is decoded for the largest (see `resample.resample`).
    decode_for: tuple[ThumbSpec, ...]


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


class TaskState(StateStore):
    """A task's records, in memory: seeded by the client, and a journal of what the task changed.

    Never touches a database: only the client writes the state store.
    """

    def __init__(  # no database: the base's is not opened
        self, records: dict[str, dict[str, Record]], failures: dict[bytes, tuple[FailureRecord, str]]
    ) -> None:
        self._seeded = {folder: dict(found) for folder, found in records.items()}
        self._failures = dict(failures)
        self.made: list[tuple[str, Origin]] = []
        self.signatures: list[FolderSignature] = []
        self.failed: list[tuple[bytes, FailureRecord, str]] = []
        self.forgotten: list[bytes] = []

    def failures(self) -> dict[bytes, tuple[FailureRecord, str]]:
        """The failures the client sent with the task, and those the task met."""
        return dict(self._failures)

    def failure(self, source: bytes) -> tuple[FailureRecord, str] | None:
        """The failure known for one source: there is no database to read."""
        return self._failures.get(source)

    def record_failure(self, source: bytes, record: FailureRecord, reason: str) -> None:
        """Note a decode failure for the client to record."""
        self._failures[source] = (record, reason)
        self.failed.append((source, record, reason))

    def forget_failure(self, source: bytes) -> None:
        """Note that a source with a recorded failure was made, for the client to forget it."""
        if self._failures.pop(source, None) is not None:
            self.forgotten.append(source)

    def folder(self, folder: str) -> dict[str, Record]:
        """The records of one output folder, as the client sent them plus what this task made."""
        return self._seeded.setdefault(folder, {})

    def fetch(self, out: str) -> Record | None:
        """Like `get`: there is no database to read."""
        return self.get(out)

    def record(self, out: str, origin: Origin) -> None:
        """Remember what the output at `out` was made from, for the client to record."""
        folder, _, name = out.rpartition("/")
        self.folder(folder)[name] = (origin.mtime_ns, origin.size, origin.preset, origin.digest)
        self.made.append((out, origin))

    def knows(self, signature: FolderSignature | None) -> bool:
        """The client already skipped the folders it knew fresh: a task knows none."""
        return False

    def remember(self, signature: FolderSignature | None) -> None:
        """Pass a settled signature of an all-fresh folder back to the client."""
        if signature is not None and signature.settled:
            self.signatures.append(signature)

    def close(self) -> None:
        """Nothing to commit: the client records the journal."""


class _ResampleWorkers:
    """This Dask worker process's resample worker processes, one per task running at once.

    Kept from task to task (a worker process costs an interpreter and libvips to start), so a
    Dask worker with N threads decodes on N cores, and one with one thread keeps one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[ResampleWorker] = []
        self._settings: tuple[Limits, bool, tuple[ThumbSpec, ...]] | None = None

    @contextlib.contextmanager
    def lend(self, limits: Limits, strict: bool, decode_for: tuple[ThumbSpec, ...]) -> Iterator[ResampleWorker]:
        """A resample worker for these settings, this task's until it ends."""
        settings = (limits, strict, decode_for)
        with self._lock:
            if self._settings != settings:
                for old in self._idle:
                    old.close()
                self._idle.clear()
                self._settings = settings
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            ceiling = limits.worker_memory(_dask_threads())
            worker = ResampleWorker(limits, strict=strict, memory_ceiling=ceiling, decode_for=decode_for)
        try:
            yield worker
        except BaseException:
            worker.close()  # it may hold files of this task unanswered
            raise
        with self._lock:
            if self._settings == settings:
                self._idle.append(worker)
                return
        worker.close()


_resample_workers = _ResampleWorkers()


def _dask_threads() -> int:
    """The threads of the Dask worker running this task (1 outside one): each may run a task at once."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
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
    _require_visible(destination.root, "destination", destination.root)
    for batch, shown in zip(task.batches, task.shown, strict=True):
        _require_visible(batch.target or batch.directory, "source", shown)
    state = TaskState(task.records, task.failures)
    target = OutputTree(
        Path(destination.root),
        destination.specs,
        name_template=destination.name_template,
        check_collisions=destination.check_collisions,
        locked=False,
        state=state,
        retry_failed=task.retry_failed,
    )
    # A rerun of a task whose worker was killed finds that attempt's temporary files here.
    for folder in task.records:
        remove_orphaned_temporary_files(os.path.join(destination.root, folder))
    with _heap_kept:
        return _TaskRun(task, target, state).run()


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
    """One task on a worker: the local pipeline's stages, in order, on one thread (a worker is one thread)."""

    def __init__(self, task: FolderTask, target: OutputTree, state: TaskState) -> None:
        self.task = task
        self.target = target
        self.state = state
        self.results: list[FileResult] = []
        self.fresh = 0
        self.bytes_read = 0
        self.planned_by_spec: dict[str, int] = {}
        self.started = 0
        self.spent = False
        self._shown = {
            batch.directory: shown for batch, shown in zip(task.batches, task.shown, strict=True) if not batch.target
        }

    def _as_shown(self, source: SourceFile) -> str:
        """The source's path as the client names it."""
        directory, _, name = source.path.rpartition("/")
        shown = self._shown.get(directory)
        return f"{shown.rstrip('/')}/{name}" if shown is not None else source.path

    def run(self) -> TaskOutcome:
        """Plan every folder, then make the missing thumbnails before the stale ones, within the budget."""
        began = time.monotonic()
        task = self.task
        missing: list[tuple[SourceFile, tuple[ThumbSpec, ...]]] = []
        stale: list[tuple[SourceFile, tuple[ThumbSpec, ...]]] = []
        for batch in task.batches:
            fresh, todo = self.target.plan_batch(batch, task.force)
            self.fresh += fresh
            for source, plan in todo:
                if plan.freshness == "rejected":
                    self.results.append(FileResult(self._as_shown(source), "failed", plan.problem))
                elif plan.freshness == "known-failure":
                    self.results.append(FileResult(self._as_shown(source), "known-failure", plan.problem))
                elif task.dry_run:
                    for spec in plan.specs:
                        self.planned_by_spec[spec.name] = self.planned_by_spec.get(spec.name, 0) + 1
                    self.results.append(FileResult(self._as_shown(source), "planned", thumbnails=len(plan.specs)))
                else:
                    (stale if plan.freshness == "stale" else missing).append((source, plan.specs))
        self._make(missing + stale)
        self.target.close()
        return TaskOutcome(
            self.results,
            self.fresh,
            self.bytes_read,
            self.planned_by_spec,
            self.state.made,
            self.state.signatures,
            self.state.failed,
            self.state.forgotten,
            self.spent,
            self.started,
            time.monotonic() - began,
        )

    def _make(self, todo: list[tuple[SourceFile, tuple[ThumbSpec, ...]]]) -> None:
        """Read, decode (in this host's resample worker process, PIPELINED files ahead) and write, in order."""
        task = self.task
        interrupted = _EventWatch(task.interrupted)
        sent: deque[tuple[str, SourceFile, tuple[ThumbSpec, ...]]] = deque()
        with _resample_workers.lend(task.limits, task.strict, task.destination.decode_for) as worker:
            for source, specs in todo:
                if task.budget is not None and self.started >= task.budget:
                    self.spent = True
                    break
                if interrupted.is_set():
                    break
                self.started += 1
                shown = self._as_shown(source)
                try:
                    data, read = read_source(source, task.limits, task.follow_symlinks)
                except (OSError, FileRejected) as exc:
                    self.results.append(FileResult(shown, "failed", _reason(exc)))
                    continue
                self.bytes_read += len(data)
                worker.send(data, specs)
                sent.append((shown, read, specs))
                if len(sent) >= PIPELINED:
                    self.results.append(self._write(worker.receive(), *sent.popleft()))
            while sent:
                self.results.append(self._write(worker.receive(), *sent.popleft()))

    def _write(self, made: WorkerOutcome, shown: str, source: SourceFile, specs: tuple[ThumbSpec, ...]) -> FileResult:
        if made.reason:
            self.target.record_failure(source, made.reason)
            return FileResult(shown, "failed", made.reason, detail=made.detail)
        try:
            self.target.write(source, list(zip(specs, made.thumbnails, strict=True)))
        except OSError as exc:
            return FileResult(shown, "failed", f"cannot write thumbnail: {_reason(exc)}")
        return FileResult(shown, "made", thumbnails=len(specs), warning=made.warning, detail=made.detail)


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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)
