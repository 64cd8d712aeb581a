"""The HTTP server for a thumbnail cache: `thumbcli serve`.

One single-threaded epoll loop per worker process drives non-blocking sockets,
parses with httptools (llhttp) and sends bodies with `os.sendfile`. Workers
share the port through SO_REUSEPORT; a parent process supervises them.

With a source folder (`--source`), a missing or stale thumbnail of a served
preset is made on request by `thumbcli.pipeline.OnDemand` (threads beside the
loop, one per worker process); the request waits, parked in its connection's
output, and is then answered like any other.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import mmap
import os
import queue
import re
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate, mktime_tz, parsedate_tz
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httptools

from thumbcli.cache import MANIFEST_NAME, is_within, read_manifest, resolve_url, split_url_path
from thumbcli.errors import CannotRunError, ExitCode, SpecError
from thumbcli.spec import Format, ThumbSpec

if TYPE_CHECKING:
    from thumbcli.ondemand import GenerationFailure, OnDemand

log = logging.getLogger(__name__)

_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_SavedSignals = tuple[_SignalHandler, _SignalHandler, int]

#: How long an opened thumbnail (fd, stat, headers) is reused before it is re-checked;
#: a replaced or deleted thumbnail can be served in its old version for this long.
OPEN_FILE_SECONDS = 1.0
OPEN_FILE_LIMIT = 1024
MANIFEST_CHECK_SECONDS = 1.0
#: After a response that closes the connection, unread client bytes are drained this long
#: so that closing does not reset the connection before the client has read the response.
LINGER_SECONDS = 2.0
#: Responses queued on one connection before reading from it pauses (pipelining backpressure).
PIPELINE_DEPTH = 32
RECV_BYTES = 65536
FALLBACK_CHUNK_BYTES = 262144
ACCEPT_BATCH = 64
ACCEPT_RETRY_SECONDS = 0.5
MAX_WORKERS = 256
MAX_GENERATORS = 64
SERVER_NAME = b"thumbcli"
#: Seconds a client is told to wait after a 503 (generation queue full or too slow).
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How `thumbcli serve` listens, limits clients and answers."""

    cache_root: Path
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # processes sharing the port with SO_REUSEPORT
    admin_port: int | None = None  # /healthz and /metrics here instead of on the main port
    access_log: str | None = None  # None = off, "-" = stderr, else a file path; combined log format
    cache_control: str = "public, max-age=86400"
    max_connections: int = 1024  # per worker; past it stop accepting (kernel backlog holds the rest)
    header_timeout: float = 10.0  # seconds to receive a complete request head (slowloris)
    idle_timeout: float = 15.0  # keep-alive idle
    send_timeout: float = 30.0  # a response that makes no progress for this long is dropped
    max_requests_per_connection: int = 1000
    max_header_bytes: int = 16384  # -> 431
    max_uri_bytes: int = 8192  # -> 414
    grace_period: float = 10.0  # on SIGTERM/SIGINT: stop accepting, finish in-flight, exit 0
    use_sendfile: bool = True  # env THUMBCLI_NO_SENDFILE=1 also forces the plain-send fallback
    # Generate on a miss: with a source folder, a missing or stale thumbnail of one of
    # `presets` is made on request; other presets are served from the cache only.
    source_root: Path | None = None
    presets: tuple[ThumbSpec, ...] = ()
    max_pending: int = 16  # per worker: generations in flight before further misses get 503
    generators: int = 2  # per worker: threads making thumbnails
    # A request waits for its thumbnail at most `send_timeout` seconds, then gets 503 + Retry-After.

    def __post_init__(self) -> None:
        if not self.host:
            raise SpecError("the host to listen on cannot be empty")
        if not 0 <= self.port <= 65535:
            raise SpecError(f"port must be between 0 and 65535, not {self.port}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise SpecError(f"workers must be between 1 and {MAX_WORKERS}, not {self.workers}")
        if self.admin_port is not None:
            if not 0 <= self.admin_port <= 65535:
                raise SpecError(f"admin port must be between 0 and 65535, not {self.admin_port}")
            if self.admin_port == self.port and self.port != 0:
                raise SpecError("the admin port must differ from the main port")
        if self.access_log == "":
            raise SpecError("access log must be '-' (stderr) or a file path")
        if any(not 0x20 <= ord(ch) < 0x7F for ch in self.cache_control):
            raise SpecError("cache control must be printable ASCII on one line")
        for name in ("max_connections", "max_requests_per_connection"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name.replace('_', ' ')} must be at least 1")
        if self.max_header_bytes < 256:
            raise SpecError("max header bytes must be at least 256")
        if self.max_uri_bytes < 16:
            raise SpecError("max URI bytes must be at least 16")
        for name in ("header_timeout", "idle_timeout", "send_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SpecError(f"{name.replace('_', ' ')} must be a positive number of seconds")
        if not (math.isfinite(self.grace_period) and self.grace_period >= 0):
            raise SpecError("grace period must be zero or a positive number of seconds")
        if self.source_root is None:
            if self.presets:
                raise SpecError("presets to make on a miss need a source folder (--source)")
        elif not self.presets:
            raise SpecError("a source folder needs at least one preset to make (define presets in thumbcli.toml)")
        names = [spec.name for spec in self.presets]
        if len(set(names)) != len(names):
            raise SpecError(f"preset names must be unique, not {', '.join(names)}")
        if self.max_pending < 1:
            raise SpecError(f"max pending must be at least 1, not {self.max_pending}")
        if not 1 <= self.generators <= MAX_GENERATORS:
            raise SpecError(f"generators must be between 1 and {MAX_GENERATORS}, not {self.generators}")


# --- metrics shared by all workers -------------------------------------------------

_STATUS_CODES = (200, 206, 304, 400, 404, 405, 412, 413, 414, 416, 431, 500, 503, 505)
_STATUS_SLOT = {code: slot for slot, code in enumerate(_STATUS_CODES)}
_OTHER_STATUS = len(_STATUS_CODES)
_BYTES_SENT = _OTHER_STATUS + 1
_OPEN_CONNECTIONS = _BYTES_SENT + 1
_CONNECTIONS_ACCEPTED = _OPEN_CONNECTIONS + 1
_SENDFILE_BODIES = _CONNECTIONS_ACCEPTED + 1
_FALLBACK_BODIES = _SENDFILE_BODIES + 1
_TIMEOUT_HEADER = _FALLBACK_BODIES + 1
_TIMEOUT_IDLE = _TIMEOUT_HEADER + 1
_TIMEOUT_SEND = _TIMEOUT_IDLE + 1
_GENERATIONS_STARTED = _TIMEOUT_SEND + 1
_GENERATIONS_JOINED = _GENERATIONS_STARTED + 1
_GENERATIONS_REFUSED = _GENERATIONS_JOINED + 1
_GENERATIONS_FAILED = _GENERATIONS_REFUSED + 1
_GENERATIONS_TIMED_OUT = _GENERATIONS_FAILED + 1
_GENERATION_WAITING = _GENERATIONS_TIMED_OUT + 1
_COUNTER_SLOTS = _GENERATION_WAITING + 1


class MetricsBoard:
    """Counters in anonymous shared memory: one row per worker, summed when scraped."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # An anonymous mmap is MAP_SHARED, so forked workers write into the same pages.
        self._memory = mmap.mmap(-1, workers * _COUNTER_SLOTS * 8)
        self._all = memoryview(self._memory).cast("q")

    def row(self, worker: int) -> memoryview:
        """The counters one worker writes to."""
        return self._all[worker * _COUNTER_SLOTS : (worker + 1) * _COUNTER_SLOTS]

    def totals(self) -> list[int]:
        """Every counter summed over the workers."""
        rows = [self._all[w * _COUNTER_SLOTS : (w + 1) * _COUNTER_SLOTS].tolist() for w in range(self.workers)]
        return [sum(column) for column in zip(*rows, strict=True)]

    def render(self) -> bytes:
        """The counters in the Prometheus text exposition format."""
        totals = self.totals()
        lines = [
            "# HELP thumbcli_requests_total Requests answered, by status code.",
            "# TYPE thumbcli_requests_total counter",
        ]
        lines += [f'thumbcli_requests_total{{code="{code}"}} {totals[_STATUS_SLOT[code]]}' for code in _STATUS_CODES]
        lines += [
            f'thumbcli_requests_total{{code="other"}} {totals[_OTHER_STATUS]}',
            "# HELP thumbcli_sent_bytes_total Bytes written to clients, headers and bodies.",
            "# TYPE thumbcli_sent_bytes_total counter",
            f"thumbcli_sent_bytes_total {totals[_BYTES_SENT]}",
            "# HELP thumbcli_open_connections Client connections open now.",
            "# TYPE thumbcli_open_connections gauge",
            f"thumbcli_open_connections {totals[_OPEN_CONNECTIONS]}",
            "# HELP thumbcli_connections_total Client connections accepted.",
            "# TYPE thumbcli_connections_total counter",
            f"thumbcli_connections_total {totals[_CONNECTIONS_ACCEPTED]}",
            "# HELP thumbcli_bodies_total Response bodies sent, by how they were sent.",
            "# TYPE thumbcli_bodies_total counter",
            f'thumbcli_bodies_total{{via="sendfile"}} {totals[_SENDFILE_BODIES]}',
            f'thumbcli_bodies_total{{via="fallback"}} {totals[_FALLBACK_BODIES]}',
            "# HELP thumbcli_timeouts_total Connections closed by a timeout, by which one.",
            "# TYPE thumbcli_timeouts_total counter",
            f'thumbcli_timeouts_total{{kind="header"}} {totals[_TIMEOUT_HEADER]}',
            f'thumbcli_timeouts_total{{kind="idle"}} {totals[_TIMEOUT_IDLE]}',
            f'thumbcli_timeouts_total{{kind="send"}} {totals[_TIMEOUT_SEND]}',
            "# HELP thumbcli_generations_total Thumbnails made on a miss (--source), by event: started,"
            " joined (a request shared one in flight), refused (503, too many pending), failed, timed_out (503).",
            "# TYPE thumbcli_generations_total counter",
            f'thumbcli_generations_total{{event="started"}} {totals[_GENERATIONS_STARTED]}',
            f'thumbcli_generations_total{{event="joined"}} {totals[_GENERATIONS_JOINED]}',
            f'thumbcli_generations_total{{event="refused"}} {totals[_GENERATIONS_REFUSED]}',
            f'thumbcli_generations_total{{event="failed"}} {totals[_GENERATIONS_FAILED]}',
            f'thumbcli_generations_total{{event="timed_out"}} {totals[_GENERATIONS_TIMED_OUT]}',
            "# HELP thumbcli_generation_waiting Requests waiting now for a thumbnail being made.",
            "# TYPE thumbcli_generation_waiting gauge",
            f"thumbcli_generation_waiting {totals[_GENERATION_WAITING]}",
            "# HELP thumbcli_workers Worker processes configured.",
            "# TYPE thumbcli_workers gauge",
            f"thumbcli_workers {self.workers}",
        ]
        return ("\n".join(lines) + "\n").encode("ascii")


# --- HTTP pieces -----------------------------------------------------------------

_REASONS = {
    200: b"OK",
    206: b"Partial Content",
    304: b"Not Modified",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    412: b"Precondition Failed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_END_KEEP_ALIVE = b"\r\n"
_END_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n\r\n"
_END_CLOSE = b"Connection: close\r\n\r\n"
_ALLOW = b"Allow: GET, HEAD\r\n"
_GET = b"GET"
_HEAD = b"HEAD"
_HEALTHZ = b"/healthz"
_METRICS = b"/metrics"
_METRICS_TYPE = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
_TEXT_TYPE = b"Content-Type: text/plain; charset=utf-8\r\n"
_NO_STORE = b"Cache-Control: no-store\r\n"
_RETRY_AFTER = b"Retry-After: %d\r\n" % RETRY_AFTER_SECONDS
#: What `_open_or_generate` returns when the thumbnail must be made first (the key is in `_Worker.miss`).
_MISS = -1

_CONDITIONAL_HEADERS = frozenset(
    {b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"if-range", b"range"}
)
_FRAMING_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding"})
_LOGGED_HEADERS = frozenset({b"referer", b"user-agent"})
#: Fields that may appear once only; lists (If-Match, If-None-Match) may be split over lines.
_SINGLE_HEADERS = frozenset(
    {b"host", b"range", b"if-range", b"if-modified-since", b"if-unmodified-since", b"content-length"}
)

_ENTITY_TAG = re.compile(rb'(W/)?("[^"]*")')
_UNSATISFIABLE = (-1, -1)
_MAX_POSITION_DIGITS = 18
_SENDFILE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW})
_NOT_FOUND_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO}
)
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LOG_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')


def etag_for(size: int, mtime_ns: int) -> bytes:
    """A strong entity tag from size and modification time, as aiohttp makes them."""
    return b'"%x-%x"' % (mtime_ns, size)


def entity_tag_matches(field_value: bytes, etag: bytes, *, weak: bool) -> bool:
    """Whether an If-Match/If-None-Match list matches `etag` (RFC 9110 §8.8.3.2 comparison)."""
    if field_value.strip() == b"*":
        return True
    for match in _ENTITY_TAG.finditer(field_value):
        if match.group(2) == etag and (weak or match.group(1) is None):
            return True
    return False


def parse_http_date(field_value: bytes) -> int | None:
    """Seconds since the epoch of an HTTP-date (RFC 9110 §5.6.7), or None if it is not one."""
    try:
        parsed = parsedate_tz(field_value.decode("latin-1"))
        return None if parsed is None else mktime_tz(parsed)
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


def parse_single_range(field_value: bytes, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single-range Range field (RFC 9110 §14.1.2).

    None means ignore the field and send the whole file (a multi-range or invalid
    request, which §14.2 lets a server ignore); `_UNSATISFIABLE` means 416.
    """
    unit, sep, ranges = field_value.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes" or b"," in ranges:
        return None
    first_text, sep, last_text = ranges.strip().partition(b"-")
    if not sep or not (first_text.isdigit() or first_text == b"") or not (last_text.isdigit() or last_text == b""):
        return None
    if not first_text:
        if not last_text:
            return None
        # §14.1.2: a suffix range; a zero suffix or an empty file cannot be satisfied.
        suffix = size if len(last_text) > _MAX_POSITION_DIGITS else int(last_text)
        return _UNSATISFIABLE if suffix == 0 or size == 0 else (max(0, size - suffix), size - 1)
    if len(first_text) > _MAX_POSITION_DIGITS:
        return _UNSATISFIABLE
    first = int(first_text)
    last = size - 1 if not last_text or len(last_text) > _MAX_POSITION_DIGITS else int(last_text)
    if last_text and last < first:
        return None  # §14.1.1: last-pos before first-pos makes the whole field invalid
    if first >= size:
        return _UNSATISFIABLE
    return first, min(last, size - 1)


def _escape_for_log(value: bytes) -> bytes:
    return _LOG_UNSAFE.sub(lambda match: b"\\x%02X" % match.group()[0], value)


class _Reject(Exception):
    """Raised from a parser callback to answer with an error status and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --- open thumbnails ------------------------------------------------------------


class _OpenFile:
    """An opened thumbnail with its validators and ready-made header lines."""

    __slots__ = (
        "etag",
        "evicted",
        "expires",
        "fd",
        "full_lines",
        "last_modified",
        "mtime_s",
        "size",
        "type_line",
        "users",
        "validator_lines",
    )

    def __init__(self, fd: int, st: os.stat_result, content_type: str, cache_control: bytes, expires: float) -> None:
        self.fd = fd
        self.size = st.st_size
        self.mtime_s = int(st.st_mtime)
        self.etag = etag_for(st.st_size, st.st_mtime_ns)
        self.last_modified = formatdate(self.mtime_s, usegmt=True).encode("ascii")
        self.type_line = b"Content-Type: %s\r\n" % content_type.encode("ascii")
        self.validator_lines = b"ETag: %s\r\nLast-Modified: %s\r\n%s" % (self.etag, self.last_modified, cache_control)
        self.full_lines = b"%sContent-Length: %d\r\n%sAccept-Ranges: bytes\r\n" % (
            self.type_line,
            self.size,
            self.validator_lines,
        )
        self.expires = expires
        self.users = 0
        self.evicted = False

    def release(self) -> None:
        self.users -= 1
        if self.evicted and self.users == 0:
            os.close(self.fd)


class _Body:
    """The part of a file still to send on one connection."""

    __slots__ = ("file", "offset", "remaining", "via_sendfile")

    def __init__(self, file: _OpenFile, offset: int, remaining: int, via_sendfile: bool) -> None:
        self.file = file
        self.offset = offset
        self.remaining = remaining
        self.via_sendfile = via_sendfile


class _Pending:
    """A response waiting for its thumbnail to be made, parked in its connection's output.

    Responses to later pipelined requests queue behind it, so they keep their order.
    """

    __slots__ = ("conn", "end", "headers", "http10", "method", "path", "resolved", "since", "started", "target")

    def __init__(
        self,
        conn: _Connection,
        path: bytes,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes],
        end: bytes,
        http10: bool,
        since: float,
    ) -> None:
        self.conn = conn
        self.path = path
        self.method = method
        self.target = target
        self.headers = headers
        self.end = end
        self.http10 = http10
        self.since = since
        self.started = False  # this request started the generation (others joined it)
        self.resolved = False  # answered (or its connection closed); a late completion is ignored


# A parsed request: method, target, the headers we look at, keep-alive, is HTTP/1.0.
_Request = tuple[bytes, bytes, dict[bytes, bytes], bool, bool]


class _Connection:
    """One client connection; also the httptools callback object."""

    __slots__ = (
        "admin",
        "closed",
        "closing",
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
        "lingering",
        "out",
        "parser",
        "peer",
        "requests",
        "served",
        "sock",
        "url",
        "worker",
    )

    def __init__(self, sock: socket.socket, peer: str, admin: bool, worker: _Worker, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.admin = admin
        self.worker = worker
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes | memoryview | _Body | _Pending] = []
        self.interest = select.EPOLLIN
        # The header deadline runs from accept until the first request head is complete.
        self.in_message = True
        self.head_start = now
        self.idle_since = now
        self.last_progress = now
        self.head_bytes = 0
        self.header_bytes = 0
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.requests: list[_Request] = []
        self.served = 0
        self.closing = False
        self.lingering = False
        self.eof = False
        self.closed = False

    def on_message_begin(self) -> None:
        if not self.in_message:
            self.in_message = True
            self.head_start = self.worker.now
        self.url = b""
        self.headers = {}
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url = url if not self.url else self.url + url
        if len(self.url) > self.worker.max_uri_bytes:
            raise _Reject(414)  # RFC 9110 §15.5.15

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.worker.max_header_bytes:
            raise _Reject(431)  # RFC 6585 §5
        key = name.lower()
        if key in self.worker.wanted_headers:
            headers = self.headers
            previous = headers.get(key)
            if previous is None:
                headers[key] = value
            elif key in _SINGLE_HEADERS:
                raise _Reject(400)  # RFC 9112 §3.2: more than one Host is a bad request
            else:
                headers[key] = previous + b", " + value  # RFC 9110 §5.3: combine list fields

    def on_headers_complete(self) -> None:
        self.in_message = False
        self.idle_since = self.worker.now
        parser = self.parser
        version = parser.get_http_version()
        headers = self.headers
        if version not in ("1.1", "1.0"):
            raise _Reject(505)  # RFC 9110 §15.6.6
        if version == "1.1" and b"host" not in headers:
            raise _Reject(400)  # RFC 9112 §3.2
        length = headers.get(b"content-length")
        if b"transfer-encoding" in headers or (length is not None and length.strip() != b"0"):
            raise _Reject(413)  # RFC 9110 §15.5.14: GET and HEAD take no body; refuse and close
        keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        self.requests.append((parser.get_method(), self.url, headers, keep_alive, version == "1.0"))


# --- the worker loop -----------------------------------------------------------------


class _Worker:
    """One process's event loop: listeners, connections, timers, open files."""

    def __init__(
        self,
        options: ServeOptions,
        board: MetricsBoard,
        index: int,
        listener: socket.socket,
        admin_listener: socket.socket | None,
    ) -> None:
        self.options = options
        self.board = board
        self.counters = board.row(index)
        self.index = index
        self.cache_root = options.cache_root
        self.real_root = os.path.realpath(options.cache_root)
        self.max_uri_bytes = options.max_uri_bytes
        self.max_header_bytes = options.max_header_bytes
        self.head_guard_bytes = options.max_header_bytes + options.max_uri_bytes + 4096
        self.use_sendfile = options.use_sendfile and os.environ.get("THUMBCLI_NO_SENDFILE", "") in ("", "0")
        self.answering_http10 = False
        self.cache_control = (
            b"Cache-Control: %s\r\n" % options.cache_control.encode("ascii") if options.cache_control else b""
        )
        self.wanted_headers = _CONDITIONAL_HEADERS | _FRAMING_HEADERS
        self.access_log_fd = -1
        self.log_lines: list[bytes] = []
        if options.access_log is not None:
            self.wanted_headers |= _LOGGED_HEADERS
            if options.access_log == "-":
                self.access_log_fd = sys.stderr.fileno()
            else:
                try:
                    self.access_log_fd = os.open(
                        options.access_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
                    )
                except OSError as exc:
                    raise CannotRunError(f"{options.access_log}: cannot open access log: {exc}") from exc
        self.listener: socket.socket | None = listener
        self.admin_listener = admin_listener
        self.serve_admin_here = admin_listener is None and options.admin_port is None
        self.epoll = select.epoll()
        self.connections: dict[int, _Connection] = {}
        self.files: dict[bytes, _OpenFile] = {}
        self.presets: dict[str, Format] = {}
        self.manifest_key: tuple[int, int, int] | None = None
        self.now = time.monotonic()
        self.date_until = 0.0
        self.date_lines = b""
        self.log_time_until = 0.0
        self.log_time = b""
        self.accepting = False
        self.accept_retry_at = 0.0
        self.draining = False
        self.drain_deadline = 0.0
        self.signals_seen = 0
        self.parent_pid = os.getppid()
        self.tick = min(1.0, max(0.02, min(options.header_timeout, options.idle_timeout, options.send_timeout) / 10))
        self.next_sweep = 0.0
        self.next_manifest_check = 0.0
        self.wake_reader: socket.socket | None = None
        # Generate on a miss: set up only with a source folder, so that the plain server never
        # imports the pipeline, and here, after fork, so that the generator threads are this process's.
        self.on_demand: OnDemand | None = None
        self.generated: dict[str, Format] = {}
        self.miss = ("", "")
        self.generations_in_flight = 0
        self.done_fd = -1
        self.completions: queue.SimpleQueue[tuple[_Pending, GenerationFailure | None]] = queue.SimpleQueue()
        self.freshness_errors: tuple[type[Exception], ...] = (OSError,)
        self.open_thumbnail: Callable[[bytes], _OpenFile | int | None] = self._open
        if options.source_root is not None:
            self._start_generating(options.source_root)
        self._load_manifest(force=True)

    # -- lifecycle

    def run(self, handle_signals: bool) -> int:
        """Serve until told to stop; the exit code says whether the drain was clean."""
        previous = self._install_signals() if handle_signals else None
        try:
            self._start_accepting()
            if self.admin_listener is not None:
                self.epoll.register(self.admin_listener.fileno(), select.EPOLLIN)
            return self._loop()
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            if self.on_demand is not None:
                self._stop_generating()
            for file in self.files.values():
                file.evicted = True
                if file.users == 0:
                    os.close(file.fd)
            self.files.clear()
            self._flush_access_log()
            if self.access_log_fd > 2:
                os.close(self.access_log_fd)
            for sock in (self.listener, self.admin_listener):
                if sock is not None:
                    sock.close()
            self.epoll.close()
            if previous is not None:
                self._restore_signals(previous)

    def _loop(self) -> int:
        poll = self.epoll.poll
        connections = self.connections
        monotonic = time.monotonic
        wall_clock = time.time
        listen_fd = self.listener.fileno() if self.listener is not None else -1
        admin_fd = self.admin_listener.fileno() if self.admin_listener is not None else -1
        wake_fd = self.wake_reader.fileno() if self.wake_reader is not None else -1
        done_fd = self.done_fd
        readable = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
        writable = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
        while True:
            events = poll(self.tick)
            self.now = now = monotonic()
            if wall_clock() >= self.date_until:
                self._refresh_date()
            for fd, event in events:
                conn = connections.get(fd)
                if conn is not None:
                    if event & writable and conn.out:
                        self._on_writable(conn)
                    if event & readable and not conn.closed:
                        self._on_readable(conn)
                elif fd == listen_fd:
                    self._accept(self.listener, admin=False)
                elif fd == admin_fd:
                    self._accept(self.admin_listener, admin=True)
                elif fd == done_fd:
                    self._on_generated()
                elif fd == wake_fd:
                    code = self._on_signal()
                    if code is not None:
                        return code
            if (
                self.draining
                and not any(not c.lingering for c in connections.values())
                and not self.generations_in_flight
            ):
                return ExitCode.OK
            if now >= self.next_sweep:
                code = self._sweep(now)
                if code is not None:
                    return code

    def _install_signals(self) -> _SavedSignals | None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: signals are left alone")
            return None
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self.wake_reader = reader
        self._wake_writer = writer
        self.epoll.register(reader.fileno(), select.EPOLLIN)
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        old_term = signal.signal(signal.SIGTERM, _note_signal)
        old_int = signal.signal(
            signal.SIGINT, _note_signal if self.index == 0 and self.board.workers == 1 else signal.SIG_IGN
        )
        return old_term, old_int, old_fd

    def _restore_signals(self, previous: _SavedSignals) -> None:
        old_term, old_int, old_fd = previous
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        signal.set_wakeup_fd(old_fd)
        if self.wake_reader is not None:
            self.wake_reader.close()
            self._wake_writer.close()

    def _on_signal(self) -> int | None:
        assert self.wake_reader is not None
        try:
            received = self.wake_reader.recv(64)
        except BlockingIOError:
            return None
        signals = [s for s in received if s in (signal.SIGTERM, signal.SIGINT)]
        if not signals:
            return None
        self.signals_seen += len(signals)
        if self.signals_seen >= 2:
            log.warning("second signal: closing %d connections at once", len(self.connections))
            return ExitCode.INTERRUPTED
        self._begin_drain()
        return None

    def _begin_drain(self) -> None:
        log.info("draining %d connections for up to %.1f s", len(self.connections), self.options.grace_period)
        self.draining = True
        self.drain_deadline = self.now + self.options.grace_period
        for listener, admin in ((self.listener, False), (self.admin_listener, True)):
            if listener is not None:
                # Connections already in this socket's backlog would be reset when it closes.
                self._accept(listener, admin=admin, drain_backlog=True)
                listener.close()
        self.listener = self.admin_listener = None
        self.accepting = False
        for conn in list(self.connections.values()):
            if not conn.out and not conn.in_message and not conn.lingering:
                self._close(conn)

    def _sweep(self, now: float) -> int | None:
        options = self.options
        self.next_sweep = now + self.tick
        counters = self.counters
        for conn in list(self.connections.values()):
            if conn.lingering:
                if now - conn.idle_since > LINGER_SECONDS:
                    self._close(conn)
            elif conn.out:
                if now - conn.last_progress > options.send_timeout:
                    head = conn.out[0]
                    if not isinstance(head, _Pending):
                        counters[_TIMEOUT_SEND] += 1
                        self._close(conn)
                    elif now - head.since > options.send_timeout:
                        # Nothing can be sent while a thumbnail is made, so the wait has its own bound;
                        # the generation goes on, and a retry joins it or finds the thumbnail made.
                        counters[_GENERATIONS_TIMED_OUT] += 1
                        self._resolve(head, 503, b"", _RETRY_AFTER)
            elif conn.in_message:
                if now - conn.head_start > options.header_timeout:
                    counters[_TIMEOUT_HEADER] += 1
                    self._close(conn)
            elif now - conn.idle_since > options.idle_timeout:
                counters[_TIMEOUT_IDLE] += 1
                self._close(conn)
        if self.draining and now >= self.drain_deadline:
            cut = sum(1 for conn in self.connections.values() if conn.out)
            if cut:
                log.warning("grace period over: cutting %d responses short", cut)
                return ExitCode.CUT_SHORT
            return ExitCode.OK
        if not self.draining and not self.accepting and self.accept_retry_at and now >= self.accept_retry_at:
            self.accept_retry_at = 0.0
            self._start_accepting()
        if now >= self.next_manifest_check:
            self.next_manifest_check = now + MANIFEST_CHECK_SECONDS
            self._load_manifest(force=False)
            for key, file in list(self.files.items()):
                if file.expires <= now:
                    self._evict(key, file)
            if os.getppid() != self.parent_pid and not self.draining:
                log.warning("parent process is gone: draining")
                self._begin_drain()
        self._flush_access_log()
        return None

    def _load_manifest(self, force: bool) -> None:
        path = self.cache_root / MANIFEST_NAME
        try:
            st = os.stat(path)
            key: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if not force and key == self.manifest_key:
            return
        try:
            presets = read_manifest(self.cache_root)
        except CannotRunError:
            if force:
                raise
            log.warning("cache manifest unreadable; keeping the presets %s", sorted(self.presets))
            return
        # The presets made on a miss are served in the format they are made in, manifest or not.
        presets.update(self.generated)
        self.manifest_key = key
        if presets != self.presets:
            log.info("serving presets %s", sorted(presets))
            self.presets = presets
            for file_key, file in list(self.files.items()):
                self._evict(file_key, file)

    def _refresh_date(self) -> None:
        wall = time.time()
        second = int(wall)
        self.date_until = second + 1.0
        self.date_lines = b"Date: %s\r\nServer: %s\r\n" % (formatdate(second, usegmt=True).encode("ascii"), SERVER_NAME)

    # -- accepting

    def _start_accepting(self) -> None:
        if self.listener is not None and not self.accepting:
            self.epoll.register(self.listener.fileno(), select.EPOLLIN)
            self.accepting = True

    def _stop_accepting(self) -> None:
        if self.listener is not None and self.accepting:
            self.epoll.unregister(self.listener.fileno())
            self.accepting = False

    def _accept(self, listener: socket.socket | None, admin: bool, drain_backlog: bool = False) -> None:
        if listener is None:
            return
        limit = self.options.max_connections
        for _ in range(limit if drain_backlog else ACCEPT_BATCH):
            if len(self.connections) >= limit and not admin:
                self._stop_accepting()
                return
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept (%s); pausing for %.1f s", exc.strerror, ACCEPT_RETRY_SECONDS)
                    if not admin:
                        self._stop_accepting()
                        self.accept_retry_at = self.now + ACCEPT_RETRY_SECONDS
                    return
                raise
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, str(address[0]) if isinstance(address, tuple) else "-", admin, self, self.now)
            self.connections[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLIN)
            self.counters[_CONNECTIONS_ACCEPTED] += 1
            self.counters[_OPEN_CONNECTIONS] += 1

    # -- connection events

    def _on_readable(self, conn: _Connection) -> None:
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
        was_in_message = conn.in_message
        reject = 0
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Reject):
                raise
            reject = exc.__context__.status
        except httptools.HttpParserUpgrade:
            pass  # the upgrade request was queued as not keep-alive; we never switch protocols
        except httptools.HttpParserError:
            reject = 400  # RFC 9112 §2.2: a malformed request message
        if conn.requests:
            requests = conn.requests
            conn.requests = []
            for request in requests:
                if conn.closing:
                    break
                self._answer(conn, *request)
                if conn.closed:
                    return
        if not reject and conn.in_message:
            # httptools buffers a header field until it ends, so bound the unparsed head here too.
            conn.head_bytes = conn.head_bytes + len(data) if was_in_message else 0
            if conn.head_bytes > self.head_guard_bytes:
                reject = 431
        else:
            conn.head_bytes = 0
        if reject and not conn.closing:
            self._answer_error(conn, reject)
        if conn.closed:
            return
        if conn.out:
            self._set_interest(conn, select.EPOLLOUT)
        elif conn.closing:
            self._linger(conn)
        else:
            self._set_interest(conn, select.EPOLLIN)

    def _on_writable(self, conn: _Connection) -> None:
        self._pump(conn)
        if conn.closed or conn.out:
            return
        if conn.closing or self.draining:
            self._linger(conn)
        elif conn.eof:
            self._close(conn)
        else:
            conn.idle_since = self.now
            self._set_interest(conn, select.EPOLLIN)

    def _set_interest(self, conn: _Connection, interest: int) -> None:
        if conn.interest != interest:
            conn.interest = interest
            self.epoll.modify(conn.fd, interest)

    def _linger(self, conn: _Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering = True
        conn.idle_since = self.now
        self._set_interest(conn, select.EPOLLIN)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for item in conn.out:
            if isinstance(item, _Body):
                item.file.release()
            elif isinstance(item, _Pending):
                self._forget(item)
        conn.out.clear()
        del self.connections[conn.fd]
        conn.sock.close()  # also removes it from the epoll set
        self.counters[_OPEN_CONNECTIONS] -= 1
        below_limit = len(self.connections) < self.options.max_connections
        if below_limit and not self.accepting and not self.draining and not self.accept_retry_at:
            self._start_accepting()

    # -- answering

    def _answer(
        self,
        conn: _Connection,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes],
        keep_alive: bool,
        http10: bool,
    ) -> None:
        conn.served += 1
        self.answering_http10 = http10
        if conn.served >= self.options.max_requests_per_connection or self.draining:
            keep_alive = False
        if not keep_alive:
            conn.closing = True
            end = _END_CLOSE
        else:
            end = _END_KEEP_ALIVE_10 if http10 else _END_KEEP_ALIVE
        if target[:1] != b"/":
            # RFC 9112 §3.2.2: absolute-form; the path starts after the authority.
            scheme_end = target.find(b"://")
            slash = target.find(b"/", scheme_end + 3) if scheme_end > 0 else -1
            target = target[slash:] if slash > 0 else b""
        if method != _GET and method != _HEAD:
            # RFC 9110 §15.5.6: 405 names the allowed methods in Allow.
            self._send_simple(conn, 405, method, target, headers, end, b"method not allowed\n", _ALLOW)
            return
        path = target.split(b"?", 1)[0]
        if path in (_HEALTHZ, _METRICS) and (conn.admin or self.serve_admin_here):
            body = b"ok\n" if path == _HEALTHZ else self.board.render()
            content_type = _TEXT_TYPE if path == _HEALTHZ else _METRICS_TYPE
            self._send_simple(conn, 200, method, target, headers, end, body, content_type + _NO_STORE)
            return
        file = None if conn.admin else self.open_thumbnail(path)
        if file is None:
            self._send_simple(conn, 404, method, target, headers, end, b"not found\n")
            return
        if isinstance(file, int):
            if file == _MISS:
                self._generate(_Pending(conn, path, method, target, headers, end, http10, self.now))
            else:
                self._send_simple(conn, file, method, target, headers, end, b"service unavailable\n")
            return
        self._answer_file(conn, file, method, target, headers, end, http10)

    def _answer_file(
        self,
        conn: _Connection,
        file: _OpenFile,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes],
        end: bytes,
        http10: bool,
    ) -> None:
        """Answer a GET or HEAD for an opened thumbnail: preconditions, range, then the body."""
        status = 200
        first, last = 0, file.size - 1
        if headers:
            status, first, last = self._evaluate(method, headers, file)
        if status == 200:
            head = b"".join((_STATUS_LINES[200], self.date_lines, file.full_lines, end))
            count = file.size if method == _GET else 0
        elif status == 304:
            # RFC 9110 §15.4.5: a 304 carries the validators and Cache-Control, no content.
            head = b"".join((_STATUS_LINES[304], self.date_lines, file.validator_lines, end))
            count = 0
        elif status == 206:
            # RFC 9110 §15.3.7 and §14.4: one part, described by Content-Range.
            count = last - first + 1
            head = b"".join(
                (
                    _STATUS_LINES[206],
                    self.date_lines,
                    file.type_line,
                    b"Content-Length: %d\r\nContent-Range: bytes %d-%d/%d\r\n" % (count, first, last, file.size),
                    file.validator_lines,
                    b"Accept-Ranges: bytes\r\n",
                    end,
                )
            )
        elif status == 416:
            # RFC 9110 §15.5.17: Content-Range with an unsatisfied-range gives the current length.
            extra = b"Content-Range: bytes */%d\r\n" % file.size
            self._send_simple(conn, 416, method, target, headers, end, b"range not satisfiable\n", extra)
            return
        else:
            self._send_simple(conn, status, method, target, headers, end, b"precondition failed\n")
            return
        counters = self.counters
        counters[_STATUS_SLOT[status]] += 1
        if self.access_log_fd >= 0:
            self._log_access(conn, method, target, http10, status, count, headers)
        self._send(conn, head, file, first, count)

    def _evaluate(self, method: bytes, headers: dict[bytes, bytes], file: _OpenFile) -> tuple[int, int, int]:
        """The status for a request with header fields, per the order of RFC 9110 §13.2.2."""
        if_match = headers.get(b"if-match")
        if if_match is not None:
            # §13.1.1: If-Match uses the strong comparison; no current tag matches -> 412.
            if not entity_tag_matches(if_match, file.etag, weak=False):
                return 412, 0, 0
        else:
            if_unmodified = headers.get(b"if-unmodified-since")
            if if_unmodified is not None:
                # §13.1.4: modified after the date -> 412; an invalid date is ignored.
                since = parse_http_date(if_unmodified)
                if since is not None and file.mtime_s > since:
                    return 412, 0, 0
        if_none_match = headers.get(b"if-none-match")
        if if_none_match is not None:
            # §13.1.2: If-None-Match uses the weak comparison; a match on GET/HEAD -> 304.
            if if_none_match == file.etag or entity_tag_matches(if_none_match, file.etag, weak=True):
                return 304, 0, 0
        else:
            if_modified = headers.get(b"if-modified-since")
            if if_modified is not None:
                # §13.1.3: evaluated only without If-None-Match; not modified since -> 304.
                if if_modified == file.last_modified:
                    return 304, 0, 0
                since = parse_http_date(if_modified)
                if since is not None and file.mtime_s <= since:
                    return 304, 0, 0
        range_value = headers.get(b"range")
        # §14.2: Range is defined for GET only; other methods ignore it.
        if range_value is not None and method == _GET:
            if_range = headers.get(b"if-range")
            if if_range is None or self._if_range_holds(if_range, file):
                span = parse_single_range(range_value, file.size)
                if span is _UNSATISFIABLE:
                    return 416, 0, 0
                if span is not None:
                    return 206, span[0], span[1]
        return 200, 0, file.size - 1

    @staticmethod
    def _if_range_holds(if_range: bytes, file: _OpenFile) -> bool:
        # RFC 9110 §13.1.5: an entity-tag must match strongly (a weak tag never does);
        # a date must equal Last-Modified exactly. Otherwise send the whole representation.
        value = if_range.strip()
        if value.startswith(b'"') or value.startswith(b"W/"):
            return value == file.etag
        return parse_http_date(value) == file.mtime_s

    def _send_simple(
        self,
        conn: _Connection,
        status: int,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes],
        end: bytes,
        body: bytes,
        extra: bytes = b"",
    ) -> None:
        if b"Content-Type" not in extra:
            extra = _TEXT_TYPE + extra
        head = b"".join((_STATUS_LINES[status], self.date_lines, extra, b"Content-Length: %d\r\n" % len(body), end))
        self.counters[_STATUS_SLOT.get(status, _OTHER_STATUS)] += 1
        with_body = method != _HEAD
        if self.access_log_fd >= 0:
            body_bytes = len(body) if with_body else 0
            self._log_access(conn, method, target, self.answering_http10, status, body_bytes, headers)
        self._send(conn, head + body if with_body else head, None, 0, 0)

    def _answer_error(self, conn: _Connection, status: int) -> None:
        conn.closing = True
        self.answering_http10 = False
        self._send_simple(conn, status, b"-", b"", {}, _END_CLOSE, _REASONS[status] + b"\n")

    # -- generating on a miss

    def _start_generating(self, source_root: Path) -> None:
        import sqlite3

        from thumbcli.ondemand import OnDemand

        options = self.options
        self.on_demand = OnDemand(
            source_root,
            options.cache_root,
            {spec.name: spec for spec in options.presets},
            workers=options.generators,
            max_pending=options.max_pending,
        )
        self.generated = {spec.name: spec.format for spec in options.presets}
        self.freshness_errors = (OSError, sqlite3.Error)
        self.done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.done_fd, select.EPOLLIN)
        self.open_thumbnail = self._open_or_generate
        log.info("making %s thumbnails from %s on a miss", ", ".join(sorted(self.generated)), source_root)

    def _stop_generating(self) -> None:
        assert self.on_demand is not None
        self._on_generated()  # count the completions that came after the loop's last look
        if self.generations_in_flight:
            # Joining them could outlast the grace period (writes are atomic, so leaving them is safe):
            # drop the queued ones; their threads may still signal done_fd, so it stays open.
            log.warning("leaving %d thumbnail generations unfinished", self.generations_in_flight)
            self.on_demand.close(abandon=True)
            return
        self.on_demand.close()
        self.on_demand = None
        os.close(self.done_fd)
        self.done_fd = -1

    def _open_or_generate(self, path: bytes) -> _OpenFile | int | None:
        """`_open` with a source folder: a preset made on a miss is checked against its source first.

        None (404) when no such source image exists, so a bad URL never reaches libvips;
        `_MISS` when the thumbnail is missing or stale and must be made (`self.miss` names it).
        A thumbnail opened less than OPEN_FILE_SECONDS ago was fresh when opened and is not
        checked again: the check (stat, realpath, a database read) would cost more than serving.
        """
        file = self.files.get(path)
        if file is not None and file.expires > self.now:
            return file
        parts = split_url_path(path)
        if parts is None or parts[0] not in self.generated:
            return self._open(path)
        assert self.on_demand is not None
        try:
            fresh = self.on_demand.is_fresh(*parts)
        except self.freshness_errors as exc:
            log.warning("cannot check the %s thumbnail of %s: %s", parts[0], parts[1], exc)
            return 503
        if fresh is None:
            return None
        if fresh:
            return self._open(path)
        stale = self.files.get(path)
        if stale is not None:
            self._evict(path, stale)
        self.miss = parts
        return _MISS

    def _generate(self, pending: _Pending) -> None:
        """Start or join making the thumbnail `self.miss` names, and park the request until it is made."""
        assert self.on_demand is not None
        preset, relpath = self.miss
        conn, method, target, headers, end = pending.conn, pending.method, pending.target, pending.headers, pending.end
        outcome = self.on_demand.request(preset, relpath, functools.partial(self._generated, pending))
        counters = self.counters
        if outcome == "busy":
            # RFC 9110 §15.6.4: refuse at once instead of queueing without end; the connection stays usable.
            counters[_GENERATIONS_REFUSED] += 1
            self._send_simple(conn, 503, method, target, headers, end, b"", _RETRY_AFTER)
            return
        if outcome == "missing":  # the source went away since the freshness check
            self._send_simple(conn, 404, method, target, headers, end, b"not found\n")
            return
        if outcome == "queued":
            pending.started = True
            self.generations_in_flight += 1
            counters[_GENERATIONS_STARTED] += 1
        else:
            counters[_GENERATIONS_JOINED] += 1
        counters[_GENERATION_WAITING] += 1
        conn.out.append(pending)

    def _generated(self, pending: _Pending, failure: GenerationFailure | None) -> None:
        """OnDemand's `done`, called on a generator thread: hand the outcome to the loop thread."""
        self.completions.put((pending, failure))
        os.eventfd_write(self.done_fd, 1)

    def _on_generated(self) -> None:
        """Answer the parked requests whose thumbnails are made or have failed."""
        # Read the eventfd before emptying the queue: a completion queued after this read wakes us again.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.done_fd)
        completions = self.completions
        while True:
            try:
                pending, failure = completions.get_nowait()
            except queue.Empty:
                return
            if pending.started:
                self.generations_in_flight -= 1
                if failure is not None:
                    self.counters[_GENERATIONS_FAILED] += 1
            if pending.resolved:
                continue
            if failure is None:
                self._resolve(pending, 0, b"", b"")
            elif failure.source_problem:
                # The reason names the source: it is logged (by OnDemand), never sent.
                # A source that cannot be thumbnailed has no thumbnail: 404.
                self._resolve(pending, 404, b"not found\n", b"")
            else:
                # RFC 9110 §15.6.1: the server failed (e.g. cache disk full), not the request.
                self._resolve(pending, 500, b"internal server error\n", b"")

    def _forget(self, pending: _Pending) -> None:
        if not pending.resolved:
            pending.resolved = True
            self.counters[_GENERATION_WAITING] -= 1

    def _resolve(self, pending: _Pending, status: int, body: bytes, extra: bytes) -> None:
        """Answer a parked request in its place in the output: with its thumbnail if `status` is 0."""
        self._forget(pending)
        conn = pending.conn
        if conn.closed:
            return
        out = conn.out
        index = next(i for i, item in enumerate(out) if item is pending)
        later = out[index + 1 :]
        del out[index:]
        self.answering_http10 = http10 = pending.http10
        method, target, headers, end = pending.method, pending.target, pending.headers, pending.end
        if not status:
            file = self._open(pending.path)
            if file is None:
                status, body = 404, b"not found\n"  # made, then removed at once (a prune)
            elif isinstance(file, int):
                status, body = file, b"service unavailable\n"
            else:
                self._answer_file(conn, file, method, target, headers, end, http10)
        if status:
            self._send_simple(conn, status, method, target, headers, end, body, extra)
        if conn.closed:
            for item in later:
                if isinstance(item, _Body):
                    item.file.release()
                elif isinstance(item, _Pending):
                    self._forget(item)
            return
        conn.out.extend(later)
        conn.last_progress = self.now
        if conn.in_message:
            conn.head_start = self.now  # the rest of its head waited unread while this thumbnail was made
        if conn.out:
            self._set_interest(conn, select.EPOLLOUT)
        self._on_writable(conn)

    # -- opening thumbnails

    def _open(self, path: bytes) -> _OpenFile | int | None:
        """The open thumbnail for a URL path, None if there is none, or an error status."""
        now = self.now
        file = self.files.get(path)
        if file is not None:
            if file.expires > now:
                return file
            self._evict(path, file)
        thumb = resolve_url(self.cache_root, path, self.presets)
        if thumb is None or not is_within(self.cache_root, thumb.path):
            return None
        try:
            fd = os.open(thumb.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno in _NOT_FOUND_ERRNOS:
                return None
            log.warning("%s: cannot open: %s", thumb.path, exc.strerror)
            return 503
        try:
            st = os.fstat(fd)
            # Only regular files, and only if what was opened is still inside the cache:
            # this closes the race between the path check above and the open.
            if not stat.S_ISREG(st.st_mode) or not self._opened_within_root(fd):
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return None
        if len(self.files) >= OPEN_FILE_LIMIT:
            oldest = next(iter(self.files))
            self._evict(oldest, self.files[oldest])
        file = _OpenFile(fd, st, thumb.content_type, self.cache_control, now + OPEN_FILE_SECONDS)
        self.files[path] = file
        return file

    def _opened_within_root(self, fd: int) -> bool:
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return True  # no /proc: the realpath check before opening stands alone
        return os.path.commonpath([self.real_root, opened]) == self.real_root

    def _evict(self, key: bytes, file: _OpenFile) -> None:
        del self.files[key]
        file.evicted = True
        if file.users == 0:
            os.close(file.fd)

    # -- sending

    def _send(self, conn: _Connection, head: bytes, file: _OpenFile | None, offset: int, count: int) -> None:
        out = conn.out
        if not out:
            try:
                sent = conn.sock.send(head, _MSG_MORE if count else 0)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            self.counters[_BYTES_SENT] += sent
            conn.last_progress = self.now
            if sent == len(head):
                if not count:
                    return
                assert file is not None
                body = _Body(file, offset, count, self.use_sendfile)
                if self._send_body(conn, body):
                    return
                if conn.closed:
                    return
                file.users += 1
                out.append(body)
                return
            out.append(memoryview(head)[sent:])
        else:
            out.append(head)
        if count:
            assert file is not None
            file.users += 1
            out.append(_Body(file, offset, count, self.use_sendfile))

    def _send_body(self, conn: _Connection, body: _Body) -> bool:
        """Send as much of a body as the socket takes; True once all of it is sent."""
        counters = self.counters
        while body.remaining:
            try:
                if body.via_sendfile:
                    sent = os.sendfile(conn.fd, body.file.fd, body.offset, body.remaining)
                else:
                    chunk = os.pread(body.file.fd, min(body.remaining, FALLBACK_CHUNK_BYTES), body.offset)
                    sent = conn.sock.send(chunk) if chunk else 0
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if body.via_sendfile and exc.errno in _SENDFILE_UNSUPPORTED:
                    log.debug("sendfile unsupported here (%s): plain send", exc.strerror)
                    body.via_sendfile = False
                    continue
                self._close(conn)
                return False
            if sent == 0:
                # The file shrank under us: the promised Content-Length cannot be kept.
                self._close(conn)
                return False
            body.offset += sent
            body.remaining -= sent
            counters[_BYTES_SENT] += sent
            conn.last_progress = self.now
        counters[_SENDFILE_BODIES if body.via_sendfile else _FALLBACK_BODIES] += 1
        return True

    def _pump(self, conn: _Connection) -> None:
        out = conn.out
        while out:
            item = out[0]
            if isinstance(item, _Body):
                if not self._send_body(conn, item):
                    return
                item.file.release()
                del out[0]
                continue
            if isinstance(item, _Pending):
                self._set_interest(conn, 0)  # parked: read nothing, send nothing, until the thumbnail is made
                return
            more = _MSG_MORE if len(out) > 1 else 0
            try:
                sent = conn.sock.send(item, more)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            self.counters[_BYTES_SENT] += sent
            conn.last_progress = self.now
            if sent < len(item):
                out[0] = memoryview(item)[sent:]
                return
            del out[0]

    # -- access log

    def _log_access(
        self,
        conn: _Connection,
        method: bytes,
        target: bytes,
        http10: bool,
        status: int,
        body_bytes: int,
        headers: dict[bytes, bytes],
    ) -> None:
        if time.time() >= self.log_time_until:
            wall = int(time.time())
            self.log_time_until = wall + 1.0
            local = time.localtime(wall)
            offset = local.tm_gmtoff // 60
            self.log_time = b"%02d/%s/%04d:%02d:%02d:%02d %s%02d%02d" % (
                local.tm_mday,
                _MONTHS[local.tm_mon - 1].encode("ascii"),
                local.tm_year,
                local.tm_hour,
                local.tm_min,
                local.tm_sec,
                b"-" if offset < 0 else b"+",
                abs(offset) // 60,
                abs(offset) % 60,
            )
        request = b"-" if method == b"-" else b"%s %s HTTP/%s" % (method, target, b"1.0" if http10 else b"1.1")
        referer = headers.get(b"referer", b"-")
        agent = headers.get(b"user-agent", b"-")
        self.log_lines.append(
            b'%s - - [%s] "%s" %d %s "%s" "%s"\n'
            % (
                conn.peer.encode("ascii", "replace"),
                self.log_time,
                _escape_for_log(request),
                status,
                b"%d" % body_bytes if body_bytes else b"-",
                _escape_for_log(referer),
                _escape_for_log(agent),
            )
        )
        if len(self.log_lines) >= 256:
            self._flush_access_log()

    def _flush_access_log(self) -> None:
        if not self.log_lines:
            return
        data = b"".join(self.log_lines)
        self.log_lines.clear()
        try:
            while data:
                written = os.write(self.access_log_fd, data)
                data = data[written:]
        except OSError as exc:
            log.warning("access log write failed: %s", exc.strerror)


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """Signal handler: the wakeup fd carries the signal number into the loop."""


# --- sockets, processes, the entry point -------------------------------------------


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotRunError(f"cannot resolve host {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CannotRunError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = _bind(host, port, reuse_port)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def serve(options: ServeOptions, ready: Callable[[str, int], None] | None = None) -> int:
    """Serve the cache until SIGTERM/SIGINT; return the exit code (0 after a clean drain).

    `ready(host, port)` is called once the port accepts connections, with the real
    port when 0 was asked for.
    """
    if not options.cache_root.is_dir():
        raise CannotRunError(f"{options.cache_root}: not a directory")
    read_manifest(options.cache_root)  # a broken manifest stops us before we listen
    if options.source_root is not None:
        if not options.source_root.is_dir():
            raise CannotRunError(f"{options.source_root}: source is not a directory")
        if not os.access(options.cache_root, os.W_OK | os.X_OK):
            raise CannotRunError(f"{options.cache_root}: not writable, and --source makes thumbnails there")
    if options.workers == 1:
        board = MetricsBoard(1)
        listener = _listen(options.host, options.port, reuse_port=False)
        admin = None
        try:
            if options.admin_port is not None:
                admin = _listen(options.host, options.admin_port, reuse_port=False)
                log.info("admin endpoints on %s:%d", options.host, admin.getsockname()[1])
            worker = _Worker(options, board, 0, listener, admin)
        except BaseException:
            listener.close()
            if admin is not None:
                admin.close()
            raise
        if ready is not None:
            ready(options.host, listener.getsockname()[1])
        return worker.run(handle_signals=True)
    return _Supervisor(options).run(ready)


class _Supervisor:
    """The parent of several workers: holds the ports, forwards signals, replaces dead workers."""

    RESPAWN_LIMIT = 5  # deaths per minute before giving up
    READY_SECONDS = 30.0

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.board = MetricsBoard(options.workers)
        self.children: dict[int, int] = {}  # pid -> worker index
        self.deaths: list[float] = []

    def run(self, ready: Callable[[str, int], None] | None) -> int:
        options = self.options
        # Bound but never listening, these hold the port numbers; only listening sockets get connections.
        port_holder = _bind(options.host, options.port, reuse_port=True)
        admin_holder = None
        wake_reader, wake_writer = socket.socketpair()
        ready_reader, ready_writer = os.pipe()
        previous: _SavedSignals | None = None
        try:
            if options.admin_port is not None:
                admin_holder = _bind(options.host, options.admin_port, reuse_port=True)
                log.info("admin endpoints on %s:%d", options.host, admin_holder.getsockname()[1])
            self.port = port_holder.getsockname()[1]
            self.admin_port = admin_holder.getsockname()[1] if admin_holder is not None else None
            for index in range(options.workers):
                self._spawn(index, ready_writer, (port_holder, admin_holder, wake_reader, wake_writer))
            self._wait_ready(ready_reader)
            wake_reader.setblocking(False)
            wake_writer.setblocking(False)
            if threading.current_thread() is threading.main_thread():
                previous = (
                    signal.signal(signal.SIGTERM, _note_signal),
                    signal.signal(signal.SIGINT, _note_signal),
                    signal.set_wakeup_fd(wake_writer.fileno(), warn_on_full_buffer=False),
                )
            if ready is not None:
                ready(options.host, self.port)
            return self._supervise(wake_reader, ready_writer, (port_holder, admin_holder, wake_reader, wake_writer))
        finally:
            for pid in list(self.children):
                _kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous[0])
                signal.signal(signal.SIGINT, previous[1])
                signal.set_wakeup_fd(previous[2])
            for sock in (port_holder, admin_holder, wake_reader, wake_writer):
                if sock is not None:
                    sock.close()
            os.close(ready_reader)
            os.close(ready_writer)

    def _spawn(self, index: int, ready_writer: int, inherited: tuple[socket.socket | None, ...]) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = index
            return
        code: int = ExitCode.CANNOT_RUN
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # A terminal's Ctrl-C reaches every process in the group; workers drain on the
            # SIGTERM their parent forwards instead, so one Ctrl-C is not counted twice.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for sock in inherited:
                if sock is not None:
                    sock.close()
            options = self.options
            listener = _listen(options.host, self.port, reuse_port=True)
            admin = None
            if self.admin_port is not None:
                admin = _listen(options.host, self.admin_port, reuse_port=True)
            worker = _Worker(options, self.board, index, listener, admin)
            os.write(ready_writer, b"r")
            code = worker.run(handle_signals=True)
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _wait_ready(self, ready_reader: int) -> None:
        deadline = time.monotonic() + self.READY_SECONDS
        started = 0
        while started < self.options.workers:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([ready_reader], [], [], max(0.0, min(left, 0.2)))
            if readable:
                started += len(os.read(ready_reader, 64))
            elif left <= 0 or self._reap():
                raise CannotRunError("workers did not start")

    def _reap(self) -> list[int]:
        codes = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.children.pop(pid, None)
            codes.append(os.waitstatus_to_exitcode(status))
        return codes

    def _supervise(
        self, wake_reader: socket.socket, ready_writer: int, inherited: tuple[socket.socket | None, ...]
    ) -> int:
        signals = 0
        gave_up = False
        codes: list[int] = []
        while self.children:
            readable, _, _ = select.select([wake_reader], [], [], 0.2)
            if readable:
                try:
                    received = wake_reader.recv(64)
                except BlockingIOError:
                    received = b""
                for signum in received:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        signals += 1
                        for pid in self.children:
                            _kill(pid, signal.SIGTERM)
            while self.children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    self.children.clear()
                    break
                if pid == 0:
                    break
                index = self.children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                if signals or gave_up:
                    codes.append(code)
                    continue
                log.warning("worker %d (pid %d) exited with %d; starting another", index, pid, code)
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < 60] + [now]
                if len(self.deaths) > self.RESPAWN_LIMIT:
                    log.error("workers keep dying; stopping")
                    gave_up = True
                    for other in self.children:
                        _kill(other, signal.SIGTERM)
                    continue
                self._spawn(index, ready_writer, inherited)
        if gave_up:
            return ExitCode.CANNOT_RUN
        if signals >= 2 or ExitCode.INTERRUPTED in codes:
            return ExitCode.INTERRUPTED
        return ExitCode.OK if all(code == 0 for code in codes) else ExitCode.CUT_SHORT


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
