"""One worker's listening sockets: accepting in batches, pausing, and making room at the connection limit."""

from __future__ import annotations

import errno
import heapq
import logging
import select
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from thumbcli.serve.protocol import Connection

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
ACCEPT_RETRY_SECONDS = 0.5
_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Out of descriptors: closing a connection frees one, so a waiting connection is shed as at the limit.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


class Doors:
    """The main and admin listeners: accepted in batches, the main one up to the connection limit.

    At the limit, each newcomer takes the place of a connection that waits on its client
    (`waiting_on_clients`), closed through `shed`; when none does, the main listener leaves
    the epoll set until a connection waits on its client again or closes (`room`), and the
    kernel's backlog holds the newcomers meanwhile.
    """

    def __init__(
        self,
        listeners: tuple[socket.socket, socket.socket | None],
        epoll: select.epoll,
        max_connections: int,
        shed: Callable[[Connection], None],
    ) -> None:
        self.listener: socket.socket | None = listeners[0]
        self.admin_listener = listeners[1]
        self._epoll = epoll
        self._limit = max_connections
        self._shed = shed
        #: Whether the main listener is in the epoll set (False: at the limit, paused, or closed).
        self.accepting = False
        self._retry_at = 0.0  # paused (out of memory or descriptors) until then; 0: not paused

    def open(self) -> None:
        """Start listening on both sockets."""
        self._start()
        if self.admin_listener is not None:
            self._epoll.register(self.admin_listener.fileno(), select.EPOLLIN)

    def fds(self) -> tuple[int, int]:
        """The main and admin listeners' descriptors (-1: none)."""
        main, admin = self.listener, self.admin_listener
        return (main.fileno() if main is not None else -1, admin.fileno() if admin is not None else -1)

    def accept(
        self, admin: bool, connections: Mapping[int, Connection], now: float, drain_backlog: bool = False
    ) -> Iterator[tuple[socket.socket, Any]]:
        """Accept a batch (or, with `drain_backlog`, the whole backlog); the caller adds each to `connections`."""
        listener = self.admin_listener if admin else self.listener
        if listener is None:
            return
        # Found once per batch, the one to shed first last; only when needed, so a wakeup with
        # nobody left in the backlog sheds no one.
        victims: list[Connection] | None = None
        batch = self._limit if drain_backlog else ACCEPT_BATCH
        for _ in range(batch):
            full = len(connections) >= self._limit and not admin
            if full:
                victims = waiting_on_clients(connections.values(), batch) if victims is None else victims
                if not victims:
                    self._stop()
                    return
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    victims = waiting_on_clients(connections.values(), batch) if victims is None else victims
                    if victims:
                        self._shed(victims.pop())
                        continue
                if exc.errno in _PAUSE_ERRNOS:
                    log.warning("cannot accept (%s); pausing for %.1f s", exc.strerror, ACCEPT_RETRY_SECONDS)
                    if not admin:
                        self._stop()
                        self._retry_at = now + ACCEPT_RETRY_SECONDS
                    return
                raise
            if full:
                assert victims
                self._shed(victims.pop())
            yield sock, address

    def room(self) -> None:
        """A connection closed or waits on its client again: if accepting stopped at the limit, resume."""
        if not self.accepting and not self._retry_at:
            self._start()

    def tick(self, now: float) -> None:
        """Resume accepting once a pause is over."""
        if self._retry_at and now >= self._retry_at:
            self._retry_at = 0.0
            self._start()

    def close(self) -> None:
        """Stop listening: close both sockets (a connection still in a backlog is reset)."""
        for sock in (self.listener, self.admin_listener):
            if sock is not None:
                sock.close()
        self.listener = self.admin_listener = None
        self.accepting = False

    def _start(self) -> None:
        if self.listener is not None and not self.accepting:
            self._epoll.register(self.listener.fileno(), select.EPOLLIN)
            self.accepting = True

    def _stop(self) -> None:
        if self.listener is not None and self.accepting:
            self._epoll.unregister(self.listener.fileno())
            self.accepting = False


def waiting_on_clients(connections: Iterable[Connection], count: int) -> list[Connection]:
    """Up to `count` connections that wait on their client, the one to shed first last.

    They have nothing to send and nothing being made: a request head not yet complete (a
    slowloris, or a client that has not sent yet), an idle keep-alive, or a finished one
    lingering. Lingering ones go first (answered already), then the longest waiting: a
    newcomer that sends its request at once is answered long before enough others arrive
    to make it the oldest. Admin connections are the operator's and never shed.
    """
    waiting = (conn for conn in connections if not conn.out and not conn.admin)
    oldest = heapq.nsmallest(count, waiting, key=_shedding_order)
    oldest.reverse()
    return oldest


def _shedding_order(conn: Connection) -> tuple[bool, float]:
    return (not conn.lingering, conn.head_start if conn.in_message else conn.idle_since)
