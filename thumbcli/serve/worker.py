"""One worker process's event loop: accept, read, dispatch, write, time out, drain.

One single-threaded epoll loop drives non-blocking sockets, parses with httptools
(llhttp) and sends bodies with `os.sendfile`.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from thumbcli.errors import ExitCode
from thumbcli.serve.accesslog import AccessLog
from thumbcli.serve.doors import Doors
from thumbcli.serve.files import CacheFiles
from thumbcli.serve.gallery import GalleryDesk, PageWait
from thumbcli.serve.metrics import (
    CONNECTIONS_ACCEPTED,
    CONNECTIONS_SHED,
    GENERATIONS_TIMED_OUT,
    OPEN_CONNECTIONS,
    TIMEOUT_HEADER,
    TIMEOUT_IDLE,
    TIMEOUT_SEND,
    MetricsBoard,
)
from thumbcli.serve.misses import MissDesk, Pending
from thumbcli.serve.options import ServeOptions
from thumbcli.serve.pages import Page
from thumbcli.serve.protocol import RECV_BYTES, Body, Connection, HeadLimits, Parked
from thumbcli.serve.respond import MISS_ANSWERS, Responder
from thumbcli.serve.signals import StopSignals

log = logging.getLogger(__name__)

MANIFEST_CHECK_SECONDS = 1.0
#: After a response that closes the connection, unread client bytes are drained this long
#: so that closing does not reset the connection before the client has read the response.
LINGER_SECONDS = 2.0
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_IN = select.EPOLLIN


class Worker:
    """One process's event loop: listeners, connections, timers."""

    def __init__(
        self,
        options: ServeOptions,
        board: MetricsBoard,
        index: int,
        listeners: tuple[socket.socket, socket.socket | None],
        supervisor_pid: int | None,
    ) -> None:
        self.options = options
        self.counters = counters = board.row(index)
        #: Only a forked worker watches its parent: a lone server must outlive the shell that started it.
        self.supervisor_pid = supervisor_pid
        self.epoll = select.epoll()
        self.doors = Doors(listeners, self.epoll, options.max_connections, lambda conn: self._close(conn, shed=True))
        self.connections: dict[int, Connection] = {}
        self.limits = HeadLimits(options.max_uri_bytes, options.max_header_bytes, options.access_log is not None)
        self.misses: MissDesk | None = None
        self.gallery: GalleryDesk | None = None
        self.access_log: AccessLog | None = None
        try:
            if options.on_demand_sources:
                self.misses = MissDesk(options, self.epoll, counters)
            if options.access_log is not None:
                self.access_log = AccessLog(options.access_log)
            if options.browse:
                # A bucket source is not listed as folders (its thumbnails are, once made).
                sources = {name: root for name, root in options.on_demand_sources.items() if isinstance(root, Path)}
                self.gallery = GalleryDesk(options.cache_root, self.epoll, sources, options.cache_control)
            generated = self.misses.generated if self.misses is not None else {}
            files = CacheFiles(options.cache_root, options.cache_control, generated)
        except BaseException:
            self._release()
            raise
        serve_admin_here = listeners[1] is None and options.admin_port is None
        self.respond = Responder(
            options, board, counters, files, self.misses, self.gallery, self.access_log, serve_admin_here
        )
        self.now = time.monotonic()
        self.draining = False
        self.drain_deadline = 0.0
        self.signals_seen = 0
        self.tick = min(1.0, max(0.02, min(options.header_timeout, options.idle_timeout, options.send_timeout) / 10))
        self.next_sweep = 0.0
        self.next_manifest_check = 0.0

    def run(self, signals: StopSignals | None) -> int:
        """Serve until told to stop; the exit code says whether the drain was clean."""
        try:
            self.doors.open()
            if signals is not None:
                self.epoll.register(signals.fileno(), select.EPOLLIN)
            return self._loop(signals)
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            self.respond.files.evict_all()
            self.respond.repeats.close()
            self._release()

    def _release(self) -> None:
        if self.misses is not None:
            self.misses.close()
        if self.gallery is not None:
            self.gallery.close()
        if self.access_log is not None:
            self.access_log.close()
        self.doors.close()
        self.epoll.close()

    def _loop(self, signals: StopSignals | None) -> int:
        poll = self.epoll.poll
        connections = self.connections
        monotonic = time.monotonic
        wall_clock = time.time
        respond = self.respond
        listen_fd, admin_fd = self.doors.fds()
        signal_fd = signals.fileno() if signals is not None else -1
        done_fd = self.misses.done_fd if self.misses is not None else -1
        pages_fd = self.gallery.done_fd if self.gallery is not None else -1
        while True:
            events = poll(self.tick)
            self.now = now = monotonic()
            respond.tick(now, wall_clock())
            for fd, event in events:
                conn = connections.get(fd)
                if conn is not None:
                    if event & _WRITABLE and conn.out:
                        self._on_writable(conn)
                    if event & _READABLE and not conn.closed:
                        self._on_readable(conn)
                elif fd == listen_fd:
                    self._accept(admin=False)
                elif fd == admin_fd:
                    self._accept(admin=True)
                elif fd == done_fd:
                    self._on_completed()
                elif fd == pages_fd:
                    self._on_pages()
                elif fd == signal_fd:
                    assert signals is not None
                    self.signals_seen += signals.count()
                    if self.signals_seen >= 2:
                        log.warning("second signal: closing %d connections at once", len(self.connections))
                        return ExitCode.INTERRUPTED
                    if self.signals_seen and not self.draining:
                        self._begin_drain()
            if self.draining and not self._busy():
                return ExitCode.OK
            if now >= self.next_sweep:
                code = self._sweep(now)
                if code is not None:
                    return code

    def _busy(self) -> bool:
        in_flight = self.misses.in_flight if self.misses is not None else 0
        return in_flight > 0 or any(not conn.lingering for conn in self.connections.values())

    def _begin_drain(self) -> None:
        log.info("draining %d connections for up to %.1f s", len(self.connections), self.options.grace_period)
        self.draining = self.respond.draining = True
        self.drain_deadline = self.now + self.options.grace_period
        # Connections already in a listener's backlog would be reset when it closes.
        self._accept(admin=False, drain_backlog=True)
        self._accept(admin=True, drain_backlog=True)
        self.doors.close()
        for conn in list(self.connections.values()):
            if not conn.out and not conn.in_message and not conn.lingering:
                self._close(conn)

    def _sweep(self, now: float) -> int | None:
        self.next_sweep = now + self.tick
        for conn in list(self.connections.values()):
            self._time_out(conn, now)
        if self.draining and now >= self.drain_deadline:
            cut = sum(1 for conn in self.connections.values() if conn.out)
            if cut:
                log.warning("grace period over: cutting %d responses short", cut)
                return ExitCode.CUT_SHORT
            return ExitCode.OK
        self.doors.tick(now)
        if now >= self.next_manifest_check:
            self.next_manifest_check = now + MANIFEST_CHECK_SECONDS
            self.respond.files.reload_manifest(force=False)
            self.respond.files.evict_expired(now)
            if self.supervisor_pid is not None and os.getppid() != self.supervisor_pid and not self.draining:
                log.warning("supervisor process is gone: draining")
                self._begin_drain()
        if self.access_log is not None:
            self.access_log.flush()
        return None

    def _time_out(self, conn: Connection, now: float) -> None:
        options, counters = self.options, self.counters
        if conn.lingering:
            if now - conn.idle_since > LINGER_SECONDS:
                self._close(conn)
        elif conn.out:
            if now - conn.last_progress > options.send_timeout:
                head = conn.out[0]
                if isinstance(head, PageWait):
                    if now - head.since > options.send_timeout:
                        self._resolve_page(head, 503)
                elif not isinstance(head, Pending):
                    counters[TIMEOUT_SEND] += 1
                    self._close(conn)
                elif now - head.since > options.send_timeout:
                    # Nothing can be sent while a thumbnail is made, so the wait has its own bound;
                    # the generation goes on, and a retry joins it or finds the thumbnail made.
                    counters[GENERATIONS_TIMED_OUT] += 1
                    self._resolve(head, 503)
        elif conn.in_message:
            if now - conn.head_start > options.header_timeout:
                counters[TIMEOUT_HEADER] += 1
                self._close(conn)
        elif now - conn.idle_since > options.idle_timeout:
            counters[TIMEOUT_IDLE] += 1
            self._close(conn)

    # -- accepting

    def _accept(self, admin: bool, drain_backlog: bool = False) -> None:
        for sock, address in self.doors.accept(admin, self.connections, self.now, drain_backlog):
            conn = Connection(sock, address, admin, self.limits, self.counters, self.now)
            self.connections[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLIN)
            self.counters[CONNECTIONS_ACCEPTED] += 1
            self.counters[OPEN_CONNECTIONS] += 1

    # -- connection events

    def _on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.lingering:
            if not data:
                self._close(conn)
            return
        if not data:
            conn.eof = True
            if conn.out:
                self._set_interest(conn, select.EPOLLOUT)
            else:
                self._close(conn)
            return
        respond = self.respond
        try:
            if not (conn.clean and respond.answer_again(conn, data)):
                reject = conn.feed(data, self.now)
                requests = conn.requests
                if requests:
                    for request in requests:
                        if conn.closing:
                            break
                        respond.answer(conn, request)
                    requests.clear()  # those after a closing answer are dropped with the connection
                if reject and not conn.closing:
                    respond.answer_error(conn, reject)
        except OSError:
            self._close(conn)
            return
        if conn.out:
            self._set_interest(conn, select.EPOLLOUT)
        elif conn.closing:
            self._linger(conn)
        else:
            if conn.interest != _IN:
                self._set_interest(conn, _IN)
            if not self.doors.accepting:
                self.doors.room()

    def _on_writable(self, conn: Connection) -> None:
        try:
            parked = conn.pump(self.now)
        except OSError:
            self._close(conn)
            return
        if parked:
            self._set_interest(conn, 0)  # read nothing, send nothing, until the thumbnail is ready
        elif conn.out:
            return
        elif conn.closing or self.draining:
            self._linger(conn)
        elif conn.eof:
            self._close(conn)
        else:
            conn.idle_since = self.now
            self._set_interest(conn, select.EPOLLIN)
            self.doors.room()

    def _set_interest(self, conn: Connection, interest: int) -> None:
        if conn.interest != interest:
            conn.interest = interest
            self.epoll.modify(conn.fd, interest)

    def _linger(self, conn: Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering = True
        conn.idle_since = self.now
        self._set_interest(conn, select.EPOLLIN)
        self.doors.room()

    def _close(self, conn: Connection, shed: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.counters[CONNECTIONS_SHED] += shed
        for item in conn.out:
            if isinstance(item, Body):
                item.file.release()
            elif isinstance(item, Pending):
                assert self.misses is not None
                self.misses.forget(item)
            elif isinstance(item, PageWait):
                assert self.gallery is not None
                self.gallery.forget(item)
        conn.out.clear()
        del self.connections[conn.fd]
        conn.sock.close()  # also removes it from the epoll set
        self.counters[OPEN_CONNECTIONS] -= 1
        self.doors.room()

    # -- generate on a miss

    def _on_completed(self) -> None:
        """Answer the parked requests whose thumbnails are ready, or cannot be."""
        assert self.misses is not None
        for pending, status in self.misses.completed():
            self._resolve(pending, status)

    def _resolve(self, pending: Pending, status: int) -> None:
        """Answer a parked request in its place in the output: with its thumbnail if `status` is 200."""
        assert self.misses is not None
        self.misses.forget(pending)
        request, respond = pending.request, self.respond
        if status == 200:
            self._answer_in_place(pending.conn, pending, lambda conn: respond.answer_path(conn, request, pending.path))
        else:
            body, extra = MISS_ANSWERS[status]
            self._answer_in_place(
                pending.conn, pending, lambda conn: respond.send_simple(conn, request, status, body, extra)
            )

    # -- gallery pages

    def _on_pages(self) -> None:
        """Answer the parked folder requests whose pages are made."""
        assert self.gallery is not None
        for wait, result in self.gallery.completed(self.respond.files.views, self.now):
            self._resolve_page(wait, result)

    def _resolve_page(self, wait: PageWait, result: Page | int) -> None:
        """Answer a parked folder request in its place: with its page, or a status (503 when too slow)."""
        assert self.gallery is not None
        self.gallery.forget(wait)
        request, respond = wait.request, self.respond
        self._answer_in_place(wait.conn, wait, lambda conn: respond.page_ready(conn, request, result))

    def _answer_in_place(self, conn: Connection, parked: Parked, answer: Callable[[Connection], None]) -> None:
        """Replace `parked` in the connection's output with what `answer` sends; later answers stay after it."""
        if conn.closed:
            return
        try:
            conn.answer_parked(parked, answer, self.now)
        except OSError:
            self._close(conn)
            return
        if conn.out:
            self._set_interest(conn, select.EPOLLOUT)
        self._on_writable(conn)
