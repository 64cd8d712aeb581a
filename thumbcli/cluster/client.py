"""The client side of a cluster run: walk, group folders into tasks, keep some in flight, record what they made."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from thumbcli.cluster import DASK_LOGGERS
from thumbcli.cluster.task import FolderTask, SealedTask, TaskDestination, TaskOutcome, make_folders
from thumbcli.discover import DirBatch, WalkProblem, absolute_source, display_path
from thumbcli.errors import CannotRunError, SpecError, ThumbcliError
from thumbcli.job import GenerateJob, local_workers
from thumbcli.make.results import FileResult, RunStats, RunTally, StopReason
from thumbcli.spec import ThumbSpec
from thumbcli.splitwalk import SplitWalk, default_processes
from thumbcli.targets.failures import failure_key
from thumbcli.targets.state import FolderSignature
from thumbcli.targets.tree import OutputTree, signed_folder

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster, as_completed

log = logging.getLogger(__name__)

#: A task's work in seconds of a worker's time: long enough that what a task costs besides its
#: files (about 3 ms on the client, 10-20 ms in the cluster) stays small, short enough that
#: the workers end a run together. Measured in bench/bench_dask.py: a task of 128 camera
#: photos (9 s) left one of two workers idle for a third of a 200-photo run.
TASK_WORK_SECONDS = 1.0
#: Tasks per second the client is asked to record at most (it can record about 100): with
#: many workers, tasks grow past TASK_WORK_SECONDS rather than swamp the client.
CLIENT_TASKS_PER_SECOND = 40
#: Files in each task until the first tasks say how long a file takes.
FIRST_TASK_FILES = 8
#: Files in one task at most (a rerun's fresh files cost next to nothing each).
MAX_TASK_FILES = 2000
#: A task is sent no later than this after its first folder was walked, full or not.
TASK_SECONDS = 1.0
#: Seconds to wait for the scheduler to answer when connecting.
CONNECT_SECONDS = 10

#: Dask settings for the scheduler and the workers of a cluster that makes thumbnails: the
#: README exports them before `dask scheduler` and `dask worker`, and a `--dask local` cluster
#: gets them. Dask's profiler samples each worker's threads every 10 ms; a task's time is spent
#: waiting on its resample worker process, so it has nothing to show and costs each worker 3% of
#: a core. Each scheduler, nanny and worker process also wakes every 20 ms to check its event
#: loop and every 100-500 ms to sample memory and CPU: 2.4% of a core each, on 2 cores 12% of a
#: core for a scheduler and two workers; at these paces, 0.3-0.5% each. Tasks are seconds long.
CLUSTER_SETTINGS = {
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "500ms",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
    "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "1s",
}
#: Dask settings for this process and the workers of a local cluster (which inherit them), unless
#: the environment says otherwise. Dask logs its comings and goings, and a lost scheduler with
#: tracebacks, while thumbcli reports what matters in one line: only what is critical is logged
#: (in this process the level the CLI chose for "distributed" holds).
_LOCAL_DASK_SETTINGS = {"DASK_LOGGING__DISTRIBUTED": "critical", **CLUSTER_SETTINGS}


@dataclass(slots=True)
class _Pending:
    """Walked folders not yet sent, oldest first (the first may be what is left of a folder sent in parts)."""

    batches: deque[DirBatch] = field(default_factory=deque)
    files: int = 0
    #: When the oldest of them was walked.
    since: float = 0.0

    def add(self, batch: DirBatch) -> None:
        if not self.batches:
            self.since = time.monotonic()
        self.batches.append(batch)
        self.files += len(batch.files)


@dataclass(slots=True)
class _SplitFolder:
    """A folder sent in parts: remembered as fresh only if every part was found fresh."""

    #: Taken before the first part was sent, as a local run takes it before planning.
    signature: FolderSignature | None
    parts_out: int = 0
    all_sent: bool = False
    fresh: bool = True


class ClusterRun:
    """A generate run whose folders are made by Dask workers; the client walks, submits and records.

    `run()` returns the same RunStats as the local pipeline; `stop()` is safe from a signal handler.
    """

    def __init__(
        self,
        job: GenerateJob,
        target: OutputTree,
        *,
        decode_for: tuple[ThumbSpec, ...] = (),
        on_found: Callable[[int], None] | None = None,
        on_skipped: Callable[[int], None] | None = None,
        on_walked: Callable[[], None] | None = None,
        on_result: Callable[[FileResult], None] | None = None,
        task_files: int | None = None,
    ) -> None:
        """`task_files`: files per task; None sizes tasks by how long files take (bench/bench_dask.py sets it).

        `decode_for`: every size of the destination (empty: the target's specs; see `resample.resample`).
        """
        if job.dask is None:
            raise SpecError("a cluster run needs a Dask scheduler's address or local[:N]")
        self._job = job
        self._address = job.dask
        self._target = target
        self._state = target.records
        #: Every recorded decode failure, read once: tasks get those of their sources.
        self._failures = target.records.failures()
        self._on_walked = on_walked
        self._task_files = task_files
        #: Files the finished tasks walked, and the seconds they took on their workers.
        self._worked_files = 0
        self._worked_seconds = 0.0
        self._split: dict[bytes, _SplitFolder] = {}
        self._tally = RunTally(on_found, on_skipped, on_result)
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
            root,
            target.specs,
            target.name_template,
            check_collisions=target.checks_collisions,
            source_folders=tuple((absolute_source(root), folder) for root, folder in target.source_folders.items()),
            decode_for=decode_for or target.specs,
            bucket=getattr(target, "url", ""),  # a bucket's tree or cache (targets/objects.py)
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
        known_fresh = None if job.run.force else self._target.known_fresh
        excluded = [str(self._target.root), *([self._destination.bucket] if self._destination.bucket else [])]
        walk = SplitWalk.of_images(job.sources, job.walk, excluded, known_fresh)
        connection = _Connection(self._address)
        try:
            self._drive(connection, walk, started)
        except OSError as exc:
            if connection.lost(exc):
                raise _lost_scheduler(self._address) from exc
            raise
        finally:
            connection.close()
            walk.close()
        self._tally.stats.seconds = time.monotonic() - started
        self._tally.stats.stopped = self._stop_reason
        return self._tally.stats

    def _drive(self, connection: _Connection, walk: SplitWalk, started: float) -> None:
        pending = _Pending()
        max_seconds = self._job.run.max_seconds
        for item in walk:
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                self.stop("max-time")
            if self._stop_reason is not None:
                break
            if isinstance(item, int):
                self._tally.found(item, item)
            elif isinstance(item, WalkProblem):
                self._tally.found(1, 0)
                self._tally.report(FileResult(item.path, "failed", item.reason))
            else:
                self._tally.found(len(item.files), 0)
                pending.add(item)
            self._send(connection, pending, walked_all=False)
            if self._in_flight:
                self._collect(connection, block=False)
        else:
            if self._on_walked is not None:
                self._on_walked()
        self._send(connection, pending, walked_all=True)
        while self._in_flight:
            self._collect(connection, block=True)

    def _send(self, connection: _Connection, pending: _Pending, *, walked_all: bool) -> None:
        """Send tasks while there are files enough for one, or the workers are short of work; wait for room."""
        while pending.files and self._stop_reason is None:
            size = self._task_size(connection)
            if walked_all:
                # The last of the work in shrinking shares, so that the workers finish together.
                size = min(size, -(-pending.files // connection.threads))
            elif pending.files < size and not self._short_of_work(connection) and not self._waited_long(pending):
                return
            if len(self._in_flight) >= connection.limit:
                self._collect(connection, block=True)
                continue
            self._submit(connection, self._take(pending, size))

    def _short_of_work(self, connection: _Connection) -> bool:
        return len(self._in_flight) < connection.threads

    @staticmethod
    def _waited_long(pending: _Pending) -> bool:
        return time.monotonic() - pending.since >= TASK_SECONDS

    def _task_size(self, connection: _Connection) -> int:
        """Files per task: what takes a worker TASK_WORK_SECONDS, as the finished tasks measured it."""
        if self._task_files is not None:
            return self._task_files
        if not self._worked_files:
            return FIRST_TASK_FILES
        seconds = max(TASK_WORK_SECONDS, connection.threads / CLIENT_TASKS_PER_SECOND)
        per_file = max(self._worked_seconds / self._worked_files, 1e-6)
        return max(1, min(MAX_TASK_FILES, round(seconds / per_file)))

    def _take(self, pending: _Pending, count: int) -> list[DirBatch]:
        """Up to `count` files from the oldest pending folders, cutting a folder in parts if need be."""
        taken = []
        while pending.batches and count > 0:
            batch = pending.batches[0]
            split = self._split_of(batch)
            if len(batch.files) <= count:
                piece = pending.batches.popleft()
                if split is not None:
                    split.all_sent = True
            else:
                if split is None:
                    signature = None if self._job.run.force else self._target.folder_signature(batch)
                    split = self._split[_folder_key(batch)] = _SplitFolder(signature)
                piece = batch._replace(files=batch.files[:count])
                pending.batches[0] = batch._replace(files=batch.files[count:])
            if split is not None:
                split.parts_out += 1
            pending.files -= len(piece.files)
            count -= len(piece.files)
            taken.append(piece)
        pending.since = time.monotonic()
        return taken

    def _submit(self, connection: _Connection, batches: list[DirBatch]) -> None:
        files = sum(len(batch.files) for batch in batches)
        budget = None
        if self._unpromised is not None:
            budget = min(self._unpromised, files)
            self._unpromised -= budget
        client = connection.client()  # connected first: a task carries what the connection found
        task = self._task(connection, batches, budget)
        key = f"thumbcli-folders-{uuid.uuid4().hex}"
        future = client.submit(make_folders, SealedTask(task), pure=False, key=key)
        self._in_flight[future] = (task, files)
        self.tasks += 1
        log.debug("sent %s: %d files in %d folders", key, files, len(batches))
        connection.completed().add(future)

    def _task(self, connection: _Connection, group: list[DirBatch], budget: int | None) -> FolderTask:
        """The task for a group: absolute paths, and the records of every output folder its files map to."""
        target, state = self._target, self._state
        folders: set[str] = set()
        failures = {}
        batches = []
        for batch in group:
            for name, size, mtime_ns in batch.files:
                source = batch.source(name, size, mtime_ns)
                failure = self._failures.get(failure_key(source.path))
                if failure is not None:
                    failures[failure_key(source.path)] = failure
                for spec in target.specs:
                    folders.add(target.relative_output(source, spec).rpartition("/")[0])
            batches.append(
                batch._replace(
                    root=absolute_source(batch.root),
                    directory=absolute_source(batch.directory),
                    target=absolute_source(batch.target) if batch.target else "",
                )
            )
        job = self._job
        return FolderTask(
            self._destination,
            tuple(batches),
            tuple(display_path(batch.target or batch.directory) for batch in group),
            {folder: dict(state.folder(folder)) for folder in sorted(folders)},
            failures,
            job.run.limits,
            job.run.strict,
            job.walk.follow_symlinks,
            job.run.force,
            job.run.retry_failed,
            job.dry_run,
            budget,
            self._interrupted,
            connection.decoders_by_host,
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
            self._settle_parts(task, set())
            more = f" and {len(task.shown) - 1} more folders" if len(task.shown) > 1 else ""
            reason = f"task failed, {files} files not made: {exc}"
            self._tally.report(FileResult(f"{task.shown[0]}{more}", "failed", reason), weight=files)
            return
        assert isinstance(result, TaskOutcome)
        outcome = result
        log.debug("%s done: %d files in %.2f s on its worker", future.key, files, outcome.seconds)
        self._give_back(task, outcome.started)
        if outcome.spent:
            self.stop("max-files")
        for out, origin in outcome.records:
            self._state.record(out, origin)
        self._worked_files += files
        self._worked_seconds += outcome.seconds
        for signature in outcome.signatures:
            if signature.folder not in self._split:
                self._state.remember(signature)
        self._settle_parts(task, {signature.folder for signature in outcome.signatures})
        for source, record, reason in outcome.failed:
            self._state.record_failure(source, record, reason)
            self._failures[source] = (record, reason)
        for source in outcome.forgotten:
            self._state.forget_failure(source)
            self._failures.pop(source, None)
        stats = self._tally.stats
        stats.bytes_read += outcome.bytes_read
        stats.add_planned(outcome.planned_by_spec)
        self._tally.found(0, outcome.fresh)
        for result in outcome.results:
            self._tally.report(result)

    def _split_of(self, batch: DirBatch) -> _SplitFolder | None:
        """The split folder `batch` is (a part of), if it is one; nothing to compute while none is split."""
        return self._split.get(_folder_key(batch)) if self._split else None

    def _settle_parts(self, task: FolderTask, fresh: set[bytes]) -> None:
        """Note the parts of split folders a task had, and which it found fresh (it returned their signature)."""
        if not self._split:
            return
        for batch in task.batches:
            key = _folder_key(batch)
            split = self._split.get(key)
            if split is None:
                continue
            split.parts_out -= 1
            split.fresh = split.fresh and key in fresh
            if split.all_sent and not split.parts_out:
                del self._split[key]
                if split.fresh:
                    self._state.remember(split.signature)

    def _give_back(self, task: FolderTask, started: int) -> None:
        if self._unpromised is not None and task.budget is not None:
            self._unpromised += task.budget - started


def _folder_key(batch: DirBatch) -> bytes:
    """A folder as its signature names it (FolderSignature.folder)."""
    return os.fsencode(signed_folder(batch))


class _Connection:
    """The Dask client, connected when the first task is ready: a rerun of known-fresh folders never loads Dask."""

    def __init__(self, address: str) -> None:
        self._address = address
        #: For `local[:N]`, the local worker processes to start; None for a scheduler's address.
        self._local_workers = local_workers(address)
        self._stack = contextlib.ExitStack()
        self._client: Client | None = None
        self._completed: as_completed | None = None
        #: The workers' threads (one task at a time each), as of connecting.
        self.threads = 2
        #: Tasks in flight at most: twice the workers' threads, so each has the next task at hand.
        self.limit = 4
        #: Threads of the workers on each host, as of connecting: each decodes in a resample worker.
        self.decoders_by_host: dict[str, int] = {}

    def client(self) -> Client:
        """The client, connecting on first use."""
        if self._client is None:
            self._client = self._stack.enter_context(_connect(self._address, self._local_workers))
            self.threads = max(1, sum(self._client.nthreads().values()))
            for info in self._client.scheduler_info()["workers"].values():
                host = str(info["host"])
                self.decoders_by_host[host] = self.decoders_by_host.get(host, 0) + int(info["nthreads"])
            self.limit = max(self.limit, 2 * self.threads)
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
    # Set only while connected: a program that runs thumbcli as a library keeps its environment.
    settings = {name: value for name, value in _LOCAL_DASK_SETTINGS.items() if name not in os.environ}
    os.environ.update(settings)
    try:
        with _connected(address, local) as client:
            yield client
    finally:
        for name in settings:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _connected(address: str, local: int | None) -> Iterator[Client]:
    """`_connect`'s client, with Dask's logging already quietened."""
    # Importing distributed sets levels of its own on these loggers and some of their children
    # (tornado.application: error); the levels this program chose for them hold (cli/options.py).
    chosen = {name: logging.getLogger(name).level for name in DASK_LOGGERS}
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CannotRunError("a cluster run needs Dask's distributed package: pip install 'thumbcli[dask]'") from None
    for name, level in chosen.items():
        logging.getLogger(name).setLevel(level)
    children = tuple(f"{name}." for name in DASK_LOGGERS)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(children):
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


#: Seconds a scheduler has to accept a connection before a run gives up on it (before any folder is made).
REACH_SECONDS = 3.0


def require_reachable(address: str) -> None:
    """Refuse a scheduler address nothing listens on, in a few seconds and before the run touches the disk.

    Dask's own client waits CONNECT_SECONDS and only once the first task is ready; a typo in a
    cron line should fail at once, with the output folder left as it was.
    """
    if local_workers(address) is not None:
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_SECONDS).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise CannotRunError(f"cannot reach the Dask scheduler at {address}: {reason}") from None
