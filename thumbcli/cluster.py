"""Generate on a Dask cluster: the client walks and keeps the state; each task makes a group of folders on a worker.

The client is the one writer of the state store and the run lock. It walks the sources as a
local run does (a folder whose signature vouches for it costs a stat per file and is never
sent), gathers the other folders into tasks with the records their thumbnails need, and keeps
a bounded number of tasks in flight. A task plans, reads, resamples and writes (atomically)
on a worker, and returns its counts, failures and the records it made; the client records
them. A task that fails or is lost records nothing, so its folders are simply done again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from thumbcli.discover import DirBatch, SourceFile, WalkProblem, display_path, is_image_name
from thumbcli.errors import CannotRunError, FileRejected, SpecError, ThumbcliError
from thumbcli.fsutil import remove_orphaned_temporary_files
from thumbcli.pipeline import FileResult, RunStats, StopReason, read_source
from thumbcli.spec import Limits, ThumbSpec
from thumbcli.splitwalk import SplitWalk, default_processes
from thumbcli.targets.plan import Target
from thumbcli.targets.state import FolderSignature, Origin, Record, StateStore
from thumbcli.targets.tree import OutputTree
from thumbcli.workers import ResampleWorker

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster, as_completed

    from thumbcli.run import GenerateJob

log = logging.getLogger(__name__)

#: Files in one task once work is queued up. Measured in bench/bench_dask.py on 2 busy cores:
#: a task costs the client about 3 ms and the cluster 10-20 ms besides its files, under 0.3% of
#: 128 camera photos (65 ms of CPU each); and a 10-million-photo run still has 80,000 tasks to balance.
TASK_FILES = 128
#: A task is sent no later than this after its first folder was walked, full or not.
TASK_SECONDS = 1.0
#: Seconds to wait for the scheduler to answer when connecting.
CONNECT_SECONDS = 10

_LOCAL = re.compile(r"local(?::(\d+))?")


# -- the worker's side ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskDestination:
    """What a worker needs to rebuild the output tree: its absolute root, specs and naming."""

    root: str
    specs: tuple[ThumbSpec, ...]
    name_template: str
    check_collisions: bool


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
    limits: Limits
    #: Refuse damaged images rather than make degraded thumbnails (--strict).
    strict: bool
    follow_symlinks: bool
    force: bool
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
    #: The budget ran out with files still to make.
    spent: bool
    started: int


class SourceUnreachable(ThumbcliError):
    """A worker host cannot see a source folder or the destination (it is not on the shared filesystem)."""


class TaskState(StateStore):
    """A task's records, in memory: seeded by the client, and a journal of what the task changed.

    Never touches a database: only the client writes the state store.
    """

    def __init__(self, records: dict[str, dict[str, Record]]) -> None:  # no database: the base's is not opened
        self._seeded = {folder: dict(found) for folder, found in records.items()}
        self.made: list[tuple[str, Origin]] = []
        self.signatures: list[FolderSignature] = []

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


_decoders = threading.local()


def _resample_worker(limits: Limits, strict: bool) -> ResampleWorker:
    """This Dask worker thread's resample worker process (started once, kept for the tasks that follow)."""
    worker: ResampleWorker | None = getattr(_decoders, "worker", None)
    if worker is None or getattr(_decoders, "settings", None) != (limits, strict):
        if worker is not None:
            worker.close()
        worker = ResampleWorker(limits, strict=strict, memory_ceiling=limits.worker_memory(1))
        _decoders.worker, _decoders.settings = worker, (limits, strict)
    return worker


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
    state = TaskState(task.records)
    target = OutputTree(
        Path(destination.root),
        destination.specs,
        name_template=destination.name_template,
        check_collisions=destination.check_collisions,
        locked=False,
        state=state,
    )
    # A rerun of a task whose worker was killed finds that attempt's temporary files here.
    for folder in task.records:
        remove_orphaned_temporary_files(os.path.join(destination.root, folder))
    return _TaskRun(task, target, state).run()


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
        task = self.task
        missing: list[tuple[SourceFile, tuple[ThumbSpec, ...]]] = []
        stale: list[tuple[SourceFile, tuple[ThumbSpec, ...]]] = []
        for batch in task.batches:
            fresh, todo = self.target.plan_batch(batch, task.force)
            self.fresh += fresh
            for source, plan in todo:
                if plan.freshness == "rejected":
                    self.results.append(FileResult(self._as_shown(source), "failed", plan.problem))
                elif task.dry_run:
                    for spec in plan.specs:
                        self.planned_by_spec[spec.name] = self.planned_by_spec.get(spec.name, 0) + 1
                    self.results.append(FileResult(self._as_shown(source), "planned", thumbnails=len(plan.specs)))
                else:
                    (stale if plan.freshness == "stale" else missing).append((source, plan.specs))
        interrupted = _EventWatch(task.interrupted)
        for source, specs in missing + stale:
            if task.budget is not None and self.started >= task.budget:
                self.spent = True
                break
            if interrupted.is_set():
                break
            self.started += 1
            self.results.append(self._make(source, specs))
        self.target.close()
        return TaskOutcome(
            self.results,
            self.fresh,
            self.bytes_read,
            self.planned_by_spec,
            self.state.made,
            self.state.signatures,
            self.spent,
            self.started,
        )

    def _make(self, source: SourceFile, specs: tuple[ThumbSpec, ...]) -> FileResult:
        shown = self._as_shown(source)
        limits = self.task.limits
        try:
            data, source = read_source(source, limits, self.task.follow_symlinks)
        except (OSError, FileRejected) as exc:
            return FileResult(shown, "failed", _reason(exc))
        self.bytes_read += len(data)
        # Decoded in this host's resample worker process, under the run's limits, as a local run does.
        made = _resample_worker(limits, self.task.strict).resample(data, specs)
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


# -- the client's side ---------------------------------------------------------


@dataclass(slots=True)
class _Group:
    """Folders gathered into the next task."""

    batches: list[DirBatch] = field(default_factory=list)
    files: int = 0
    since: float = 0.0


class ClusterRun:
    """A generate run whose folders are made by Dask workers; the client walks, submits and records.

    `run()` returns the same RunStats as the local pipeline; `stop()` is safe from a signal handler.
    """

    def __init__(
        self,
        job: GenerateJob,
        target: Target,
        *,
        on_found: Callable[[int], None] | None = None,
        on_skipped: Callable[[int], None] | None = None,
        on_result: Callable[[FileResult], None] | None = None,
        task_files: int = TASK_FILES,
    ) -> None:
        """`task_files`: files per task once work is queued up (bench/bench_dask.py varies it)."""
        if not isinstance(target, OutputTree) or job.dask is None:
            raise SpecError("--dask writes an -o tree or a --cache")
        self._job = job
        self._address = job.dask
        self._local_workers = local_workers(job.dask)
        self._target = target
        self._state = target.state
        self._on_found = on_found
        self._on_skipped = on_skipped
        self._on_result = on_result
        self._task_files = task_files
        self._stats = RunStats()
        #: Tasks submitted so far.
        self.tasks = 0
        self._stop_reason: StopReason | None = None
        self._cancel = threading.Event()
        self._in_flight: dict[Future[TaskOutcome], tuple[FolderTask, int]] = {}
        self._interrupted = f"thumbcli-interrupted-{uuid.uuid4().hex}"
        #: --max-files: files not yet promised to a task.
        self._unpromised = job.run.max_files
        root = os.path.abspath(target.root)
        self._destination = TaskDestination(
            root, target.specs, target.name_template, check_collisions=target.checks_collisions
        )

    def stop(self, reason: StopReason = "interrupted") -> None:
        """Submit no more tasks; an interrupt also cancels those in flight. Safe from a signal handler."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if reason == "interrupted":
            self._cancel.set()

    def run(self) -> RunStats:
        """Walk, submit tasks with a bounded number in flight, record what they return."""
        started = time.monotonic()
        job = self._job
        # Forked before Dask starts its threads.
        walk = SplitWalk(
            job.sources,
            job.walk,
            is_image_name,
            [str(self._target.root)],
            self._target.known_fresh if not job.run.force else lambda batch: False,
            job.walk.processes or default_processes(),
        )
        connection = _Connection(self._address, self._local_workers)
        try:
            self._drive(connection, walk, started)
        except OSError as exc:
            if connection.lost(exc):
                raise _lost_scheduler(self._address) from exc
            raise
        finally:
            connection.close()
            walk.close()
        self._stats.seconds = time.monotonic() - started
        self._stats.stopped = self._stop_reason
        return self._stats

    def _drive(self, connection: _Connection, walk: SplitWalk, started: float) -> None:
        group = _Group()
        max_seconds = self._job.run.max_seconds
        for item in walk:
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                self.stop("max-time")
            if self._stop_reason is not None:
                break
            if isinstance(item, int):
                self._found(item, item)
            elif isinstance(item, WalkProblem):
                self._found(1, 0)
                self._report(FileResult(item.path, "failed", item.reason))
            else:
                self._found(len(item.files), 0)
                if not group.batches:
                    group.since = time.monotonic()
                group.batches.append(item)
                group.files += len(item.files)
            if self._ready(group, connection.limit):
                self._submit(connection, group)
                group = _Group()
            if self._in_flight:
                self._collect(connection, block=len(self._in_flight) >= connection.limit)
        if group.batches and self._stop_reason is None:
            self._submit(connection, group)
        while self._in_flight:
            self._collect(connection, block=True)

    def _ready(self, group: _Group, limit: int) -> bool:
        """Whether to send the group now: full, or old, or the workers are short of work."""
        if not group.batches:
            return False
        idle = len(self._in_flight) < limit // 2
        return idle or group.files >= self._task_files or time.monotonic() - group.since >= TASK_SECONDS

    def _submit(self, connection: _Connection, group: _Group) -> None:
        budget = None
        if self._unpromised is not None:
            budget = min(self._unpromised, group.files)
            self._unpromised -= budget
        task = self._task(group, budget)
        key = f"thumbcli-folders-{uuid.uuid4().hex}"
        future = connection.client().submit(make_folders, SealedTask(task), pure=False, key=key)
        self._in_flight[future] = (task, group.files)
        self.tasks += 1
        connection.completed().add(future)

    def _task(self, group: _Group, budget: int | None) -> FolderTask:
        """The task for a group: absolute paths, and the records of every output folder its files map to."""
        target, state = self._target, self._state
        folders: set[str] = set()
        batches = []
        for batch in group.batches:
            for name, size, mtime_ns in batch.files:
                source = batch.source(name, size, mtime_ns)
                for spec in target.specs:
                    folders.add(target.relative_output(source, spec).rpartition("/")[0])
            batches.append(
                batch._replace(
                    root=os.path.abspath(batch.root),
                    directory=os.path.abspath(batch.directory),
                    target=os.path.abspath(batch.target) if batch.target else "",
                )
            )
        job = self._job
        return FolderTask(
            self._destination,
            tuple(batches),
            tuple(display_path(batch.target or batch.directory) for batch in group.batches),
            {folder: dict(state.folder(folder)) for folder in sorted(folders)},
            job.run.limits,
            job.run.strict,
            job.walk.follow_symlinks,
            job.run.force,
            job.dry_run,
            budget,
            self._interrupted,
        )

    def _collect(self, connection: _Connection, *, block: bool) -> None:
        """Record the tasks that are done; with `block`, wait (in short steps, to notice a stop) for one.

        Past --max-time, the walk submits nothing more (checked between its folders); what was submitted finishes.
        """
        client, completed = connection.client(), connection.completed()
        while True:
            if self._cancel.is_set() and self._in_flight:
                from distributed import Event

                # Cancelling does not stop a task that is running: the event does, at its next file.
                Event(self._interrupted, client=client).set()
                client.cancel(list(self._in_flight))
                self._in_flight.clear()
                return
            # Results are fetched from the workers in Dask's thread, not one round trip at a time here.
            done = completed.next_batch(block=False) if completed.has_ready() else []
            if done or not block or not self._in_flight:
                break
            time.sleep(0.01)
            _require_scheduler(client, self._address)
        for future, result in done:
            entry = self._in_flight.pop(future, None)
            if entry is not None:
                self._record(future, result, *entry)

    def _record(self, future: Future[TaskOutcome], result: object, task: FolderTask, files: int) -> None:
        """Count and record one finished task (or its failure: nothing recorded, its files failed)."""
        if future.status == "cancelled":
            if self._cancel.is_set():
                return
            raise _lost_scheduler(self._address)
        if future.status == "error":
            exc = future.exception()
            if not isinstance(exc, (ThumbcliError, OSError)) and type(exc).__name__ != "KilledWorker":
                raise exc  # a bug: stop the run loudly
            self._give_back(task, 0)
            more = f" and {len(task.shown) - 1} more folders" if len(task.shown) > 1 else ""
            reason = f"task failed, {files} files not made: {exc}"
            self._report(FileResult(f"{task.shown[0]}{more}", "failed", reason), weight=files)
            return
        assert isinstance(result, TaskOutcome)
        outcome = result
        self._give_back(task, outcome.started)
        if outcome.spent:
            self.stop("max-files")
        for out, origin in outcome.records:
            self._state.record(out, origin)
        for signature in outcome.signatures:
            self._state.remember(signature)
        stats = self._stats
        stats.bytes_read += outcome.bytes_read
        for name, count in outcome.planned_by_spec.items():
            stats.planned_by_spec[name] = stats.planned_by_spec.get(name, 0) + count
        self._found(0, outcome.fresh)
        for result in outcome.results:
            self._report(result)

    def _give_back(self, task: FolderTask, started: int) -> None:
        if self._unpromised is not None and task.budget is not None:
            self._unpromised += task.budget - started

    def _found(self, found: int, skipped: int) -> None:
        self._stats.found += found
        self._stats.skipped += skipped
        if self._on_found is not None and found:
            self._on_found(found)
        if self._on_skipped is not None and skipped:
            self._on_skipped(skipped)

    def _report(self, result: FileResult, weight: int = 1) -> None:
        stats = self._stats
        if result.status == "made":
            stats.made += 1
            stats.thumbnails += result.thumbnails
            if result.warning:
                stats.degraded += 1
        elif result.status == "planned":
            stats.planned += 1
        elif result.status == "failed":
            stats.failed += weight
            stats.failures.append(result)
        if self._on_result is not None:
            self._on_result(result)


def local_workers(address: str) -> int | None:
    """For `local` or `local:N`, the number of local worker processes (0: one per core); None for an address."""
    match = _LOCAL.fullmatch(address)
    if match is None:
        if not re.fullmatch(r"[a-z]+://\S+|\S+:\d+", address):
            raise SpecError(f"--dask {address!r}: give a scheduler address (tcp://host:8786) or local[:N]")
        return None
    count = int(match.group(1) or 0)
    if match.group(1) is not None and count < 1:
        raise SpecError("--dask local:N needs at least one worker")
    return count


class _Connection:
    """The Dask client, connected when the first task is ready: a rerun of known-fresh folders never loads Dask."""

    def __init__(self, address: str, local_workers: int | None) -> None:
        self._address = address
        self._local_workers = local_workers
        self._stack = contextlib.ExitStack()
        self._client: Client | None = None
        self._completed: as_completed | None = None
        #: Tasks in flight at most: twice the workers' threads, so each has the next task at hand.
        self.limit = 4

    def client(self) -> Client:
        """The client, connecting on first use."""
        if self._client is None:
            self._client = self._stack.enter_context(_connect(self._address, self._local_workers))
            self.limit = max(self.limit, 2 * sum(self._client.nthreads().values()))
        return self._client

    def completed(self) -> as_completed:
        """The tasks submitted, as they finish, with their results."""
        if self._completed is None:
            from distributed import as_completed

            self._completed = as_completed(loop=self.client().loop, with_results=True, raise_errors=False)
        return self._completed

    def lost(self, exc: OSError) -> bool:
        """Whether `exc` says the connection to the scheduler broke."""
        if self._client is None:
            return False
        from distributed.comm.core import CommClosedError

        return isinstance(exc, CommClosedError)

    def close(self) -> None:
        """Close the client (and a local cluster), if there is one."""
        self._stack.close()


@contextlib.contextmanager
def _connect(address: str, local: int | None) -> Iterator[Client]:
    """A client of the scheduler at `address`, or of a LocalCluster of `local` single-threaded worker processes."""
    # Dask logs its comings and goings, and a lost scheduler with tracebacks, while thumbcli
    # reports what matters in one line: a local cluster's workers (which inherit this) log only
    # what is critical, and in this process the level the CLI chose for "distributed" holds.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    dask_logger = logging.getLogger("distributed")
    level = dask_logger.level
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CannotRunError("--dask needs Dask's distributed package: pip install 'thumbcli[dask]'") from None
    dask_logger.setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.NOTSET)
    cluster: LocalCluster | None = None
    try:
        if local is not None:
            cluster = LocalCluster(
                n_workers=local or default_processes(),
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # No dashboard, but the scheduler's HTTP endpoints still listen: on a port of
                # their own choosing, so two runs at once do not contend for 8787.
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            )
            client = Client(cluster, set_as_default=False)
        else:
            client = Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise CannotRunError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):  # a scheduler already gone has been reported
            client.close(timeout=CONNECT_SECONDS)
        if cluster is not None:
            cluster.close()


def _require_scheduler(client: Client, address: str) -> None:
    if client.status not in ("running", "connecting", "newly-created"):
        raise _lost_scheduler(address)


def _lost_scheduler(address: str) -> CannotRunError:
    return CannotRunError(
        f"lost the Dask scheduler at {address}: what finished is recorded, and a rerun goes on from there"
    )
