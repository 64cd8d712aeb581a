"""Generate on a miss (`serve --source`): requests parked in their connection's output until their thumbnail is ready.

A request is first checked against its source (a stat and a record read) on this module's
check thread, apart from the generations: a thumbnail current in the cache is answered at
once, an unknown name 404, and only a thumbnail that must be made takes a place in
`thumbcli.make.ondemand`'s bounded queue. The loop only parks a request, and answers it
when the check or the making completes, through an eventfd.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import queue
import select
from collections.abc import Iterator
from typing import TYPE_CHECKING

from thumbcli.cache import split_url_path
from thumbcli.discover import SourceFile
from thumbcli.serve.metrics import (
    GENERATION_BROKEN_AT,
    GENERATION_WAITING,
    GENERATIONS_FAILED,
    GENERATIONS_JOINED,
    GENERATIONS_REFUSED,
    GENERATIONS_STARTED,
    broken_now,
)
from thumbcli.serve.options import ServeOptions
from thumbcli.serve.protocol import Connection, Parked, Request
from thumbcli.spec import Format, by_preset

if TYPE_CHECKING:
    from thumbcli.make.ondemand import Completion, OnDemand, Outcome

log = logging.getLogger(__name__)

#: The status answering each `thumbcli.make.ondemand.Outcome` (by value: that module loads only with --source).
_STATUS_BY_OUTCOME = {"ready": 200, "missing": 404, "failed": 500, "unchecked": 503}
#: Threads per worker checking thumbnails against their sources. One keeps the checks in the
#: order the requests came (the first of a burst gets the free generation slot); a second would
#: mostly wait for the state store's one lock.
CHECK_THREADS = 1

#: (preset, source path below it): one thumbnail.
Thumb = tuple[str, str]


class Pending(Parked):
    """A request waiting for its thumbnail, parked in its connection's output.

    Responses to later pipelined requests queue behind it, so they keep their order.
    """

    __slots__ = ("conn", "path", "request", "resolved", "since")

    def __init__(self, conn: Connection, request: Request, path: bytes, since: float) -> None:
        self.conn = conn
        self.request = request
        self.path = path
        self.since = since
        self.resolved = False  # answered (or its connection closed); a late completion is ignored


class MissDesk:
    """One worker's generate-on-miss: which presets are made, what is checked or made now, what has completed."""

    def __init__(self, options: ServeOptions, epoll: select.epoll, counters: memoryview) -> None:
        # Imported here, so that the plain server never imports the pipeline; and made here, after
        # fork, so that the generator threads are this process's.
        from thumbcli.make.ondemand import OnDemand

        sources = options.on_demand_sources
        assert sources
        self._on_demand: OnDemand | None = OnDemand(
            sources,
            options.cache_root,
            options.presets,
            workers=options.generators,
            # Every serve process has its generators, each decoding in a resample worker.
            sharing=options.generators * options.workers,
            max_pending=options.max_pending,
            limits=options.limits,
            strict=options.strict,
            decode_for=options.decode_for,
        )
        self._checker = concurrent.futures.ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="thumbcli-check")
        #: Each preset made on a miss, with its formats in the order the config lists them (the fallback last).
        self.generated: dict[str, tuple[Format, ...]] = {
            name: tuple(spec.format for spec in specs) for name, specs in by_preset(options.presets).items()
        }
        self._counters = counters
        counters[GENERATION_BROKEN_AT] = 0  # a worker started again after a crash starts with a new pool
        #: The requests for each thumbnail being checked, then for each being made; a later request joins them.
        self._checking: dict[Thumb, list[Pending]] = {}
        self._making: dict[Thumb, list[Pending]] = {}
        self.in_flight = 0  # checks and check-and-makes this worker started and has not seen complete
        self._closing = False
        #: From the check thread, each verdict (None: the check failed); from the generator threads, each completion.
        self._verdicts: queue.SimpleQueue[tuple[Thumb, Outcome | SourceFile | None]] = queue.SimpleQueue()
        self._completions: queue.SimpleQueue[tuple[Thumb, Completion]] = queue.SimpleQueue()
        self.done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        epoll.register(self.done_fd, select.EPOLLIN)
        roots = ", ".join(f"{name}={root}" if name else str(root) for name, root in sources.items())
        log.info("making %s thumbnails from %s on a miss", ", ".join(sorted(self.generated)), roots)

    def thumbnail_of(self, path: bytes) -> Thumb | None:
        """(preset, source path) if `path` names a thumbnail of a preset made on a miss, else None."""
        parts = split_url_path(path)
        return parts if parts is not None and parts[0] in self.generated else None

    def park(self, conn: Connection, request: Request, path: bytes, thumbnail: Thumb, now: float) -> None:
        """Park the request for `thumbnail`, to be answered once it is checked (and if need be made)."""
        pending = Pending(conn, request, path, now)
        conn.out.append(pending)
        self._counters[GENERATION_WAITING] += 1
        making = self._making.get(thumbnail)
        if making is not None:
            making.append(pending)
            self._counters[GENERATIONS_JOINED] += 1
            return
        checking = self._checking.get(thumbnail)
        if checking is not None:
            checking.append(pending)
            return
        self._checking[thumbnail] = [pending]
        self.in_flight += 1
        self._checker.submit(self._check, thumbnail)

    def _check(self, thumbnail: Thumb) -> None:
        """On the check thread: judge the thumbnail and hand the verdict to the loop."""
        assert self._on_demand is not None
        verdict: Outcome | SourceFile | None = None
        try:
            verdict = self._on_demand.check(*thumbnail)
        except Exception:
            # A bug, not a bad file: loud in the log, a 500 for the waiting clients, the server stays up.
            log.exception("cannot check the %s thumbnail of %s", *thumbnail)
        self._verdicts.put((thumbnail, verdict))
        os.eventfd_write(self.done_fd, 1)

    def _completed(self, thumbnail: Thumb, completion: Completion) -> None:
        """OnDemand's `done`, called on a generator thread: hand the outcome to the loop."""
        self._completions.put((thumbnail, completion))
        os.eventfd_write(self.done_fd, 1)

    def completed(self) -> Iterator[tuple[Pending, int]]:
        """The parked requests whose check or check-and-make has completed and still wait, with the status to answer."""
        # Read the eventfd before emptying the queue: a result queued after this read wakes us again.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.done_fd)
        with contextlib.suppress(queue.Empty):
            while True:
                thumbnail, verdict = self._verdicts.get_nowait()
                self.in_flight -= 1
                yield from self._checked(thumbnail, verdict)
        with contextlib.suppress(queue.Empty):
            while True:
                thumbnail, completion = self._completions.get_nowait()
                self.in_flight -= 1
                yield from self._made(thumbnail, completion)

    def _checked(self, thumbnail: Thumb, verdict: Outcome | SourceFile | None) -> Iterator[tuple[Pending, int]]:
        waiting = self._checking.pop(thumbnail)
        if not isinstance(verdict, SourceFile):
            status = 500 if verdict is None else _STATUS_BY_OUTCOME[verdict.value]
            yield from _still_waiting(waiting, status)
            return
        if self._closing:
            return  # the worker stops: no new generations; the requests are cut short with their connections
        assert self._on_demand is not None
        admission = self._on_demand.request(*thumbnail, functools.partial(self._completed, thumbnail))
        if admission == "busy" or admission == "missing":
            # RFC 9110 §15.6.4: refuse at once instead of queueing without end; the connection stays usable.
            status = 503 if admission == "busy" else 404
            for pending, answer in _still_waiting(waiting, status):
                self._counters[GENERATIONS_REFUSED] += status == 503
                yield pending, answer
            return
        self.in_flight += 1
        self._making[thumbnail] = waiting
        self._counters[GENERATIONS_JOINED] += len(waiting) - 1  # those that came while it was checked share it

    def _made(self, thumbnail: Thumb, completion: Completion) -> Iterator[tuple[Pending, int]]:
        self._count(completion)
        yield from _still_waiting(self._making.pop(thumbnail, []), _STATUS_BY_OUTCOME[completion.outcome.value])

    def _count(self, completion: Completion) -> None:
        """Count a completed check-and-make, and judge from it whether generating works here."""
        counters = self._counters
        # A failure with nothing made is one outside any source (OnDemand answers a bad source
        # made=True): a decoder pool that cannot start, a worker that broke, a bug. Its 500 counts
        # as a failed generation, and /healthz says not ok until a generation gets through again
        # (or BROKEN_SECONDS pass).
        broke = completion.outcome.value == "failed" and not completion.made
        if completion.made or broke:
            counters[GENERATIONS_STARTED] += 1
            if completion.outcome.value != "ready":
                counters[GENERATIONS_FAILED] += 1
            counters[GENERATION_BROKEN_AT] = broken_now() if broke else 0

    def forget(self, pending: Pending) -> None:
        """The request is answered or its client gone: a late completion is ignored."""
        if not pending.resolved:
            pending.resolved = True
            self._counters[GENERATION_WAITING] -= 1

    def close(self) -> None:
        """Stop checking and generating: wait for nothing if work is in flight (writes are atomic), else release all."""
        assert self._on_demand is not None
        self._closing = True
        for _ in self.completed():
            pass  # count the completions that came after the loop's last look
        if self.in_flight:
            # Joining them could outlast the grace period: drop the queued ones; their threads
            # may still signal done_fd, so it stays open.
            log.warning("leaving %d thumbnail checks and generations unfinished", self.in_flight)
            self._checker.shutdown(wait=False, cancel_futures=True)
            self._on_demand.close(abandon=True)
            return
        self._checker.shutdown(wait=True)
        self._on_demand.close()
        self._on_demand = None
        os.close(self.done_fd)
        self.done_fd = -1


def _still_waiting(waiting: list[Pending], status: int) -> Iterator[tuple[Pending, int]]:
    """Each request of `waiting` not answered meanwhile, with `status` (judged as each is reached)."""
    for pending in waiting:
        if not pending.resolved:
            yield pending, status
