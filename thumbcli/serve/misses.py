"""Generate on a miss (`serve --source`): requests parked in their connection's output until their thumbnail is ready.

The check against the source and the making both happen on `thumbcli.make.ondemand`'s threads;
the loop only parks a request, and answers it when the completion arrives through an eventfd.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import select
from collections.abc import Iterator
from typing import TYPE_CHECKING

from thumbcli.cache import split_url_path
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
from thumbcli.spec import Format

if TYPE_CHECKING:
    from thumbcli.make.ondemand import Completion, OnDemand

log = logging.getLogger(__name__)

#: The status answering each `thumbcli.make.ondemand.Outcome` (by value: that module loads only with --source).
_STATUS_BY_OUTCOME = {"ready": 200, "missing": 404, "failed": 500, "unchecked": 503}


class Pending(Parked):
    """A request waiting for its thumbnail, parked in its connection's output.

    Responses to later pipelined requests queue behind it, so they keep their order.
    """

    __slots__ = ("conn", "path", "request", "resolved", "since", "started")

    def __init__(self, conn: Connection, request: Request, path: bytes, since: float) -> None:
        self.conn = conn
        self.request = request
        self.path = path
        self.since = since
        self.started = False  # this request started the check-and-make (others joined it)
        self.resolved = False  # answered (or its connection closed); a late completion is ignored


class MissDesk:
    """One worker's generate-on-miss: which presets are made, what is in flight, what has completed."""

    def __init__(self, options: ServeOptions, epoll: select.epoll, counters: memoryview) -> None:
        # Imported here, so that the plain server never imports the pipeline; and made here, after
        # fork, so that the generator threads are this process's.
        from thumbcli.make.ondemand import OnDemand

        sources = options.on_demand_sources
        assert sources
        self._on_demand: OnDemand | None = OnDemand(
            sources,
            options.cache_root,
            {spec.name: spec for spec in options.presets},
            workers=options.generators,
            # Every serve process has its generators, each decoding in a resample worker.
            sharing=options.generators * options.workers,
            max_pending=options.max_pending,
            limits=options.limits,
            strict=options.strict,
            decode_for=options.decode_for,
        )
        self.generated: dict[str, Format] = {spec.name: spec.format for spec in options.presets}
        self._counters = counters
        counters[GENERATION_BROKEN_AT] = 0  # a worker started again after a crash starts with a new pool
        self.in_flight = 0  # check-and-makes this worker started and has not seen complete
        self._completions: queue.SimpleQueue[tuple[Pending, Completion]] = queue.SimpleQueue()
        self.done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        epoll.register(self.done_fd, select.EPOLLIN)
        roots = ", ".join(f"{name}={root}" if name else str(root) for name, root in sources.items())
        log.info("making %s thumbnails from %s on a miss", ", ".join(sorted(self.generated)), roots)

    def thumbnail_of(self, path: bytes) -> tuple[str, str] | None:
        """(preset, source path) if `path` names a thumbnail of a preset made on a miss, else None."""
        parts = split_url_path(path)
        return parts if parts is not None and parts[0] in self.generated else None

    def park(self, conn: Connection, request: Request, path: bytes, thumbnail: tuple[str, str], now: float) -> int:
        """Check (and if need be make) `thumbnail` and park the request for it; 0, or the status to answer now."""
        assert self._on_demand is not None
        pending = Pending(conn, request, path, now)
        admission = self._on_demand.request(*thumbnail, functools.partial(self._completed, pending))
        counters = self._counters
        if admission == "busy":
            # RFC 9110 §15.6.4: refuse at once instead of queueing without end; the connection stays usable.
            counters[GENERATIONS_REFUSED] += 1
            return 503
        if admission == "missing":
            return 404
        if admission == "queued":
            pending.started = True
            self.in_flight += 1
        else:
            counters[GENERATIONS_JOINED] += 1
        counters[GENERATION_WAITING] += 1
        conn.out.append(pending)
        return 0

    def _completed(self, pending: Pending, completion: Completion) -> None:
        """OnDemand's `done`, called on a generator thread: hand the outcome to the loop thread."""
        self._completions.put((pending, completion))
        os.eventfd_write(self.done_fd, 1)

    def completed(self) -> Iterator[tuple[Pending, int]]:
        """The parked requests whose check-and-make has completed and still wait, with the status to answer."""
        # Read the eventfd before emptying the queue: a completion queued after this read wakes us again.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.done_fd)
        completions = self._completions
        while True:
            try:
                pending, completion = completions.get_nowait()
            except queue.Empty:
                return
            if pending.started:
                self.in_flight -= 1
                self._count(completion)
            if not pending.resolved:
                yield pending, _STATUS_BY_OUTCOME[completion.outcome.value]

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
        """Stop generating: wait for nothing if work is in flight (writes are atomic), else release all."""
        assert self._on_demand is not None
        for _ in self.completed():
            pass  # count the completions that came after the loop's last look
        if self.in_flight:
            # Joining them could outlast the grace period: drop the queued ones; their threads
            # may still signal done_fd, so it stays open.
            log.warning("leaving %d thumbnail generations unfinished", self.in_flight)
            self._on_demand.close(abandon=True)
            return
        self._on_demand.close()
        self._on_demand = None
        os.close(self.done_fd)
        self.done_fd = -1
