"""One client connection: the httptools callbacks, the limits on a request head, and its output queue."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Any

import httptools

from thumbcli.serve.files import OpenFile, SentFile
from thumbcli.serve.http import (
    CONDITIONAL_HEADERS,
    END_CLOSE,
    END_KEEP_ALIVE,
    END_KEEP_ALIVE_10,
    FRAMING_HEADERS,
    LOGGED_HEADERS,
    NEGOTIATION_HEADERS,
    SINGLE_HEADERS,
)
from thumbcli.serve.metrics import BYTES_SENT, FALLBACK_BODIES, MEMORY_BODIES, SENDFILE_BODIES

log = logging.getLogger(__name__)

RECV_BYTES = 65536
FALLBACK_CHUNK_BYTES = 262144
#: The most one sendfile call sends before the loop turns to the other connections (nginx's
#: `sendfile_max_chunk`): a client reading a large file as fast as loopback goes would otherwise
#: keep the loop until its socket is full while the others' run dry. A large body also goes out
#: corked (nginx's `tcp_nopush`), in full segments only, where TCP_NODELAY would push a short one
#: at the end of each call. Together: 50 MB files at 1.06x the MB/s of before (wrk -c4, 5 rounds).
SENDFILE_CHUNK_BYTES = 2 << 20
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_SENDFILE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW})
#: How a body goes out: read from the fd and sent, by sendfile, or from the bytes kept in memory.
VIA_FALLBACK, VIA_SENDFILE, VIA_MEMORY = 0, 1, 2
_BODIES_VIA = (FALLBACK_BODIES, SENDFILE_BODIES, MEMORY_BODIES)


class Reject(Exception):
    """Raised from a parser callback to answer with an error status and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class HeadLimits:
    """Every bound on a request head, and the header fields worth keeping."""

    __slots__ = ("guard_bytes", "max_header_bytes", "max_uri_bytes", "wanted_headers")

    def __init__(self, max_uri_bytes: int, max_header_bytes: int, keep_logged_headers: bool) -> None:
        self.max_uri_bytes = max_uri_bytes  # -> 414
        self.max_header_bytes = max_header_bytes  # -> 431
        # httptools buffers a header field until it ends, so the unparsed head is bounded too.
        self.guard_bytes = max_header_bytes + max_uri_bytes + 4096
        wanted = CONDITIONAL_HEADERS | FRAMING_HEADERS | NEGOTIATION_HEADERS
        self.wanted_headers = wanted | LOGGED_HEADERS if keep_logged_headers else wanted


class Request:
    """One parsed request head: what answering it needs."""

    __slots__ = ("conditional", "end", "head", "headers", "http10", "keep_alive", "method", "target")

    def __init__(self, method: bytes, target: bytes, headers: dict[bytes, bytes], keep_alive: bool, http10: bool):
        self.method = method
        self.target = target
        self.headers = headers  # only the wanted fields, lower-case names
        self.keep_alive = keep_alive
        self.http10 = http10
        #: Whether a precondition or a Range is to be evaluated (most requests have none).
        self.conditional = not CONDITIONAL_HEADERS.isdisjoint(headers)
        #: The last header line and blank line: whether the connection stays open, said as the version needs.
        self.end = END_CLOSE if not keep_alive else END_KEEP_ALIVE_10 if http10 else END_KEEP_ALIVE
        #: The bytes of the head when they came in one read holding nothing else (see `repeats`).
        self.head: bytes | None = None

    def close_after(self) -> None:
        """Answer this request with Connection: close."""
        self.keep_alive = False
        self.end = END_CLOSE


class Body:
    """The part of a file still to send on one connection."""

    __slots__ = ("file", "offset", "remaining", "via")

    def __init__(self, file: SentFile, offset: int, remaining: int, via: int) -> None:
        self.file = file
        self.offset = offset
        self.remaining = remaining
        self.via = via  # VIA_FALLBACK, VIA_SENDFILE or VIA_MEMORY


class Parked:
    """A place in a connection's output held for a response not ready yet; nothing after it is sent."""

    __slots__ = ()


Output = bytes | memoryview | Body | Parked


class Connection:
    """One client connection; also the httptools callback object."""

    __slots__ = (
        "admin",
        "clean",
        "closed",
        "closing",
        "corked",
        "counters",
        "eof",
        "fd",
        "head_bytes",
        "head_start",
        "header_bytes",
        "headers",
        "idle_since",
        "in_message",
        "interest",
        "last_progress",
        "limits",
        "lingering",
        "now",
        "out",
        "parser",
        "peer",
        "requests",
        "served",
        "sock",
        "tcp",
        "url",
    )

    def __init__(
        self, sock: socket.socket, address: Any, admin: bool, limits: HeadLimits, counters: memoryview, now: float
    ) -> None:
        sock.setblocking(False)
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if self.tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.corked = False  # a large body is going out in full segments only (TCP_CORK)
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = str(address[0]) if isinstance(address, tuple) else "-"
        self.admin = admin
        self.limits = limits
        self.counters = counters
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[Output] = []
        self.interest = select.EPOLLIN
        # The header deadline runs from accept until the first request head is complete.
        self.in_message = True
        self.head_start = now
        self.idle_since = now
        self.last_progress = now
        self.now = now  # the loop's time of the bytes being parsed
        self.head_bytes = 0
        self.header_bytes = 0
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.requests: list[Request] = []
        self.served = 0
        self.closing = False
        self.lingering = False
        self.eof = False
        self.closed = False
        #: Whether the parser holds nothing of a next head: the next read starts a head.
        self.clean = True

    # -- parser callbacks (no on_message_begin: one Python call less per request; `feed` and
    # `on_url` start a head's deadline, `on_headers_complete` makes ready for the next head)

    def on_url(self, url: bytes) -> None:
        """A piece of the request target: bounded by max URI bytes."""
        if not self.in_message:
            self.in_message = True  # the next of several requests in one read
            self.head_start = self.now
        self.url = url if not self.url else self.url + url
        if len(self.url) > self.limits.max_uri_bytes:
            raise Reject(414)  # RFC 9110 §15.5.15

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header field: counted against max header bytes, kept if wanted."""
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header_bytes:
            raise Reject(431)  # RFC 6585 §5
        key = name.lower()
        if key in self.limits.wanted_headers:
            headers = self.headers
            previous = headers.get(key)
            if previous is None:
                headers[key] = value
            elif key in SINGLE_HEADERS:
                raise Reject(400)  # RFC 9112 §3.2: more than one Host is a bad request
            else:
                headers[key] = previous + b", " + value  # RFC 9110 §5.3: combine list fields

    def on_headers_complete(self) -> None:
        """The head is complete: check version, Host and body framing, then queue the request."""
        self.in_message = False
        self.idle_since = self.now
        parser = self.parser
        version = parser.get_http_version()
        headers = self.headers
        if version not in ("1.1", "1.0"):
            raise Reject(505)  # RFC 9110 §15.6.6
        if version == "1.1" and b"host" not in headers:
            raise Reject(400)  # RFC 9112 §3.2
        length = headers.get(b"content-length")
        if b"transfer-encoding" in headers or (length is not None and length.strip() != b"0"):
            raise Reject(413)  # RFC 9110 §15.5.14: GET and HEAD take no body; refuse and close
        keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        self.requests.append(Request(parser.get_method(), self.url, headers, keep_alive, version == "1.0"))
        self.url = b""
        self.headers = {}
        self.header_bytes = 0

    # -- input

    def feed(self, data: bytes, now: float) -> int:
        """Parse bytes received at `now` into `requests`; the error status to answer with, or 0."""
        self.now = now
        was_in_message = self.in_message
        was_clean = self.clean
        if not was_in_message:
            # Bytes after a complete head begin the next: its header deadline runs from now.
            self.in_message = True
            self.head_start = now
        reject = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, Reject):
                raise
            reject = exc.__context__.status
        except httptools.HttpParserUpgrade:
            pass  # the upgrade request was queued as not keep-alive; we never switch protocols
        except httptools.HttpParserError:
            reject = 400  # RFC 9112 §2.2: a malformed request message
        if not reject and self.in_message:
            self.head_bytes = self.head_bytes + len(data) if was_in_message else 0
            if self.head_bytes > self.limits.guard_bytes:
                reject = 431
        else:
            self.head_bytes = 0
        self.clean = not reject and not self.in_message and data[-4:] == b"\r\n\r\n"
        if was_clean and self.clean and len(self.requests) == 1:
            self.requests[0].head = data
        return reject

    def head_taken(self, now: float) -> None:
        """A whole head read at `now` was answered without the parser: the header deadline stops."""
        self.now = self.idle_since = now
        self.in_message = False
        self.head_bytes = 0

    # -- output (an OSError out of these means the connection is broken: close it)

    def send(self, head: bytes, file: OpenFile | None, offset: int, count: int, via_sendfile: bool, now: float) -> None:
        """Send a response head and `count` bytes of `file`, or queue what the socket does not take now.

        A file kept in memory goes out with its head in one send; any other by sendfile (or the
        plain-send fallback when `via_sendfile` is False) after its head.
        """
        out = self.out
        if not count:
            if out:
                out.append(head)
            else:
                self._send_head(head, 0, now)
            return
        assert file is not None
        memory = file.body
        via = VIA_MEMORY if memory is not None else VIA_SENDFILE if via_sendfile else VIA_FALLBACK
        if out:
            out.append(head)
        elif memory is not None:
            part = memory if count == len(memory) else memoryview(memory)[offset : offset + count]
            try:
                sent = self.sock.sendmsg((head, part))
            except (BlockingIOError, InterruptedError):
                sent = 0
            self.counters[BYTES_SENT] += sent
            self.last_progress = now
            sent -= len(head)
            if sent == count:
                self.counters[MEMORY_BODIES] += 1
                return
            if sent < 0:
                out.append(memoryview(head)[len(head) + sent :])
                sent = 0
            offset += sent
            count -= sent
        else:
            if via == VIA_SENDFILE and self.tcp:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                self.corked = True
            if self._send_head(head, _MSG_MORE, now):
                body = Body(file, offset, count, via)
                if self._send_body(body, now):
                    return
                file.users += 1
                out.append(body)
                return
        file.users += 1
        out.append(Body(file, offset, count, via))

    def send_whole(self, file: SentFile, offset: int, count: int, now: float) -> None:
        """Send a whole response, head and body, that is `count` bytes of `file` from `offset`, by sendfile."""
        body = Body(file, offset, count, VIA_SENDFILE)
        if self.out or not self._send_body(body, now):
            file.users += 1
            self.out.append(body)

    def _send_head(self, head: bytes, flags: int, now: float) -> bool:
        """Send `head` now, queueing what the socket does not take; True when all of it went."""
        try:
            sent = self.sock.send(head, flags)
        except (BlockingIOError, InterruptedError):
            sent = 0
        self.counters[BYTES_SENT] += sent
        self.last_progress = now
        if sent < len(head):
            self.out.append(memoryview(head)[sent:])
            return False
        return True

    def _send_body(self, body: Body, now: float) -> bool:
        """Send as much of a body as the socket takes; True once all of it is sent."""
        counters = self.counters
        while body.remaining:
            try:
                if body.via == VIA_SENDFILE:
                    sent = os.sendfile(self.fd, body.file.fd, body.offset, min(body.remaining, SENDFILE_CHUNK_BYTES))
                elif body.via == VIA_MEMORY:
                    memory = body.file.body
                    assert memory is not None
                    sent = self.sock.send(memoryview(memory)[body.offset : body.offset + body.remaining])
                else:
                    chunk = os.pread(body.file.fd, min(body.remaining, FALLBACK_CHUNK_BYTES), body.offset)
                    sent = self.sock.send(chunk) if chunk else 0
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if body.via == VIA_SENDFILE and exc.errno in _SENDFILE_UNSUPPORTED:
                    log.debug("sendfile unsupported here (%s): plain send", exc.strerror)
                    body.via = VIA_FALLBACK
                    continue
                raise
            if sent == 0:
                raise OSError(errno.EIO, "the file shrank: the promised Content-Length cannot be kept")
            body.offset += sent
            body.remaining -= sent
            counters[BYTES_SENT] += sent
            self.last_progress = now
            if sent == SENDFILE_CHUNK_BYTES and body.remaining and body.via == VIA_SENDFILE:
                return False  # the others' turn; epoll reports this socket writable again after it
        counters[_BODIES_VIA[body.via]] += 1
        if self.corked:
            self.corked = False
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        return True

    def answer_parked(self, parked: Parked, answer: Callable[[Connection], None], now: float) -> None:
        """Put what `answer` sends in `parked`'s place in the output; later answers stay after it."""
        out = self.out
        index = next(i for i, item in enumerate(out) if item is parked)
        later = out[index + 1 :]
        del out[index:]
        try:
            answer(self)
        finally:
            out.extend(later)
        self.last_progress = now
        if self.in_message:
            self.head_start = now  # the rest of its head waited unread while the answer was made

    def pump(self, now: float) -> bool:
        """Send queued output until the socket is full or a parked response blocks; True if parked."""
        out = self.out
        while out:
            item = out[0]
            if isinstance(item, Body):
                if not self._send_body(item, now):
                    return False
                item.file.release()
                del out[0]
                continue
            if isinstance(item, Parked):
                return True
            try:
                sent = self.sock.send(item, _MSG_MORE if len(out) > 1 else 0)
            except (BlockingIOError, InterruptedError):
                return False
            self.counters[BYTES_SENT] += sent
            self.last_progress = now
            if sent < len(item):
                out[0] = memoryview(item)[sent:]
                return False
            del out[0]
        return False
