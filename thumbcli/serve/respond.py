"""Answers to requests: from a request and the cache to a status line, headers and a body on a connection."""

from __future__ import annotations

import os
import time

from thumbcli.serve.accesslog import AccessLog
from thumbcli.serve.files import CacheFiles, OpenFile
from thumbcli.serve.gallery import GalleryDesk
from thumbcli.serve.http import (
    ALLOW,
    GET,
    HEAD,
    METRICS_TYPE,
    NO_STORE,
    REASONS,
    RETRY_AFTER,
    SERVER_NAME,
    STATUS_LINES,
    TEXT_TYPE,
    Verdict,
    entity_tag_matches,
    evaluate,
    http_date,
    origin_form,
)
from thumbcli.serve.metrics import OTHER_STATUS, REPEATED_HEADS, STATUS_SLOT, MetricsBoard
from thumbcli.serve.misses import MissDesk
from thumbcli.serve.options import ServeOptions
from thumbcli.serve.pages import ASSET_PREFIX, ASSETS, CSP, Page, PresetView, home_page
from thumbcli.serve.protocol import Connection, Request
from thumbcli.serve.repeats import RepeatTable
from thumbcli.serve.videos import VIDEO_PREFIX

_FULL = Verdict.FULL
_NOT_MODIFIED = Verdict.NOT_MODIFIED
_PARTIAL = Verdict.PARTIAL
_UNSATISFIABLE = Verdict.UNSATISFIABLE
_VERDICT_SLOT = {verdict: STATUS_SLOT[verdict] for verdict in Verdict}
_HEALTHZ = b"/healthz"
_HOME = b"/"
_ACCEPT = b"accept"
_METRICS = b"/metrics"
_ADMIN_PATHS = frozenset({_HEALTHZ, _METRICS})
_STATUS_200 = STATUS_LINES[200]
_STATUS_304 = STATUS_LINES[304]
_NO_HEADERS: dict[bytes, bytes] = {}


class Responder:
    """Builds and sends each answer of one worker; an OSError out of it means: close that connection."""

    def __init__(
        self,
        options: ServeOptions,
        board: MetricsBoard,
        counters: memoryview,
        files: CacheFiles,
        misses: MissDesk | None,
        gallery: GalleryDesk | None,
        access_log: AccessLog | None,
        serve_admin_here: bool,
    ) -> None:
        self._max_requests = options.max_requests_per_connection
        self._board = board
        self._counters = counters
        self.files = files
        self._misses = misses
        self._gallery = gallery
        self._home: tuple[dict[str, PresetView], Page] | None = None
        self._access_log = access_log
        self._serve_admin_here = serve_admin_here
        self.use_sendfile = options.use_sendfile and os.environ.get("THUMBCLI_NO_SENDFILE", "") in ("", "0")
        self.now = time.monotonic()
        self.draining = False
        self._date_until = 0.0
        self._date_lines = b""
        self.repeats = RepeatTable(self.use_sendfile)

    def tick(self, now: float, wall: float) -> None:
        """Set the loop's time for the answers that follow; the Date line changes once a second."""
        self.now = now
        if wall >= self._date_until:
            second = int(wall)
            self._date_until = second + 1.0
            self._date_lines = b"Date: %s\r\nServer: %s\r\n" % (http_date(second), SERVER_NAME)

    def answer(self, conn: Connection, request: Request) -> None:
        """Answer one parsed request: admin endpoints, a thumbnail, or an error."""
        conn.served += 1
        if not request.keep_alive or conn.served >= self._max_requests or self.draining:
            request.close_after()
            conn.closing = True
        target = request.target
        if target[:1] != b"/":
            request.target = target = origin_form(target)
        method = request.method
        if method != GET and method != HEAD:
            # RFC 9110 §15.5.6: 405 names the allowed methods in Allow.
            self.send_simple(conn, request, 405, b"method not allowed\n", ALLOW)
            return
        path = target.partition(b"?")[0] if b"?" in target else target
        # The server's own URLs: a folder's (and `/`), its assets and videos, the admin endpoints.
        if (
            conn.admin or path[-1:] == b"/" or path.startswith(ASSET_PREFIX) or path in _ADMIN_PATHS
        ) and self._answer_own(conn, request, path):
            return
        gallery = self._gallery
        if gallery is not None and gallery.names_folder(path, self.files.views):
            # RFC 9110 §15.4.2: a folder's URL is the one with its trailing slash; the query goes along.
            query = target[len(path) :]
            self.send_simple(conn, request, 301, b"moved permanently\n", b"Location: %s/%s\r\n" % (path, query))
            return
        misses = self._misses
        if misses is not None and self.files.recent(path, self.now, request.headers.get(_ACCEPT)) is None:
            # A thumbnail opened less than OPEN_FILE_SECONDS ago was current then and is not checked again.
            thumbnail = misses.thumbnail_of(path)
            if thumbnail is not None:
                misses.park(conn, request, path, thumbnail, self.now)
                return
        self.answer_path(conn, request, path)

    def _answer_own(self, conn: Connection, request: Request, path: bytes) -> bool:
        """Answer a request for one of the server's own URLs; False when `path` is none here after all."""
        if path in _ADMIN_PATHS and (conn.admin or self._serve_admin_here):
            status, body, content_type = 200, b"ok\n", TEXT_TYPE
            if path == _METRICS:
                body, content_type = self._board.render(), METRICS_TYPE
            elif self._board.generation_broken():
                # RFC 9110 §15.6.4: serving the cache works, making thumbnails on a miss does not.
                status, body = 503, b"not ok: thumbnails cannot be made on a miss (see the server's log)\n"
            self.send_simple(conn, request, status, body, content_type + NO_STORE)
            return True
        if conn.admin:
            self.send_simple(conn, request, 404, b"not found\n")
            return True
        if path == _HOME:
            self.send_page(conn, request, self._home_page())
            return True
        gallery = self._gallery
        if gallery is not None and path.startswith(VIDEO_PREFIX):
            video = gallery.videos.open(path, self.now)
            if video is None:
                self.send_simple(conn, request, 404, b"not found\n")
            else:
                self._answer_file(conn, request, video)
                video.evict()  # opened for this answer only: closed once its body is sent
            return True
        if path.endswith(b"/") or path.startswith(ASSET_PREFIX):
            self._answer_page(conn, request, path)
            return True
        return False  # /healthz or /metrics, served on the admin port only: a path like any other here

    def _home_page(self) -> Page:
        """The `/` page, made again only when the presets change."""
        views = self.files.views
        if self._home is None or self._home[0] is not views:
            page = home_page(
                list(views.values()), browse=self._gallery is not None, generate_on_miss=self._misses is not None
            )
            self._home = (views, page)
        return self._home[1]

    def _answer_page(self, conn: Connection, request: Request, path: bytes) -> None:
        """A page asset, or a folder: its gallery page is made off the loop (with --browse; else 404)."""
        asset = ASSETS.get(path)
        if asset is not None:
            self.send_page(conn, request, asset)
            return
        if self._gallery is None or path.startswith(ASSET_PREFIX):
            self.send_simple(conn, request, 404, b"not found\n")
            return
        page = self._gallery.answer(conn, request, self.files.views, self.now)
        if isinstance(page, Page):
            self.send_page(conn, request, page)
        elif page:
            self.send_simple(conn, request, page, *PAGE_ANSWERS[page])

    def page_ready(self, conn: Connection, request: Request, page: Page | int) -> None:
        """Answer a parked folder request: with its page, or a status (503 when it took too long)."""
        if isinstance(page, Page):
            self.send_page(conn, request, page)
        else:
            self.send_simple(conn, request, page, *PAGE_ANSWERS[page])

    def send_page(self, conn: Connection, request: Request, page: Page) -> None:
        """Answer with a page or asset made here: 200, or 304 when the client holds this version."""
        validators = b"ETag: %s\r\nCache-Control: %s\r\n%s" % (page.etag, page.cache_control, CSP)
        if_none_match = request.headers.get(b"if-none-match")
        # RFC 9110 §13.1.2: a matching If-None-Match on GET/HEAD -> 304 with the validators.
        if if_none_match is not None and entity_tag_matches(if_none_match, page.etag, weak=True):
            status, body = 304, b""
            head = b"".join((STATUS_LINES[304], self._date_lines, validators, request.end))
        else:
            status, body = 200, page.body if request.method == GET else b""
            length = b"Content-Type: %s\r\nContent-Length: %d\r\n" % (page.content_type, len(page.body))
            head = b"".join((STATUS_LINES[200], self._date_lines, length, validators, request.end))
        self._counters[STATUS_SLOT[status]] += 1
        if self._access_log is not None:
            self._access_log.write(
                conn.peer, request.method, request.target, request.http10, status, len(body), request.headers
            )
        conn.send(head + body, None, 0, 0, self.use_sendfile, self.now)

    def answer_path(self, conn: Connection, request: Request, path: bytes) -> None:
        """Answer with the cached thumbnail for `path` as it is now."""
        file = self.files.open(path, self.now, request.headers.get(_ACCEPT))
        if file is None:
            self.send_simple(conn, request, 404, b"not found\n")
        elif isinstance(file, int):
            self.send_simple(conn, request, file, b"service unavailable\n")
        else:
            self._answer_file(conn, request, file)

    def _answer_file(self, conn: Connection, request: Request, file: OpenFile) -> None:
        """Answer a GET or HEAD for an opened thumbnail: preconditions, range, then the body."""
        method, end = request.method, request.end
        verdict, first = _FULL, 0
        if request.conditional:
            verdict, first, last = evaluate(
                method, request.headers, file.etag, file.last_modified, file.mtime_s, file.size
            )
        if verdict is _FULL:
            status_line, lines = _STATUS_200, file.full_lines
            count = file.size if method == GET else 0
        elif verdict is _NOT_MODIFIED:
            # RFC 9110 §15.4.5: a 304 carries the validators and Cache-Control, no content.
            status_line, lines, count = _STATUS_304, file.validator_lines, 0
        elif verdict is _PARTIAL:
            # RFC 9110 §15.3.7 and §14.4: one part, described by Content-Range.
            count = last - first + 1
            status_line = STATUS_LINES[206]
            lines = b"%sContent-Length: %d\r\nContent-Range: bytes %d-%d/%d\r\n%sAccept-Ranges: bytes\r\n" % (
                file.type_line,
                count,
                first,
                last,
                file.size,
                file.validator_lines,
            )
        elif verdict is _UNSATISFIABLE:
            # RFC 9110 §15.5.17: Content-Range with an unsatisfied-range gives the current length.
            extra = b"Content-Range: bytes */%d\r\n" % file.size
            self.send_simple(conn, request, 416, b"range not satisfiable\n", extra)
            return
        else:
            self.send_simple(conn, request, 412, b"precondition failed\n")
            return
        self._counters[_VERDICT_SLOT[verdict]] += 1
        if self._access_log is not None:
            self._access_log.write(conn.peer, method, request.target, request.http10, verdict, count, request.headers)
        conn.send(
            b"".join((status_line, self._date_lines, lines, end)), file, first, count, self.use_sendfile, self.now
        )
        if request.head is not None and request.keep_alive and verdict is not _PARTIAL:
            self.repeats.keep(request.head, request, file, verdict, status_line, lines + end, count)

    def answer_again(self, conn: Connection, head: bytes) -> bool:
        """Answer a head read whole, if it was answered before and nothing that answer hung on changed."""
        repeat = self.repeats.find(head, self.now)
        if repeat is None or conn.admin or conn.closing or self.draining or conn.served + 1 >= self._max_requests:
            return False
        conn.served += 1
        conn.head_taken(self.now)
        counters = self._counters
        counters[_VERDICT_SLOT[repeat.verdict]] += 1
        counters[REPEATED_HEADS] += 1
        if self._access_log is not None:
            request = repeat.request
            self._access_log.write(
                conn.peer, request.method, request.target, request.http10, repeat.verdict, repeat.count, request.headers
            )
        arena = self.repeats.in_arena(repeat, self._date_until, self._date_lines) if repeat.count else None
        if arena is not None:
            conn.send_whole(arena, repeat.offset, repeat.length, self.now)
        else:
            head = b"".join((repeat.status_line, self._date_lines, repeat.tail))
            conn.send(head, repeat.file, 0, repeat.count, self.use_sendfile, self.now)
        return True

    def send_simple(self, conn: Connection, request: Request, status: int, body: bytes, extra: bytes = b"") -> None:
        """A short answer made here: a status, a text body (none for HEAD) and `extra` header lines."""
        if b"Content-Type" not in extra:
            extra = TEXT_TYPE + extra
        length = b"Content-Length: %d\r\n" % len(body)
        head = b"".join((STATUS_LINES[status], self._date_lines, extra, length, request.end))
        self._counters[STATUS_SLOT.get(status, OTHER_STATUS)] += 1
        with_body = request.method != HEAD
        if self._access_log is not None:
            body_bytes = len(body) if with_body else 0
            self._access_log.write(
                conn.peer, request.method, request.target, request.http10, status, body_bytes, request.headers
            )
        conn.send(head + body if with_body else head, None, 0, 0, self.use_sendfile, self.now)

    def answer_error(self, conn: Connection, status: int) -> None:
        """Answer a request that could not be parsed, and close."""
        conn.closing = True
        request = Request(b"-", b"", _NO_HEADERS, keep_alive=False, http10=False)
        self.send_simple(conn, request, status, REASONS[status] + b"\n")


#: A generate-on-miss answer other than the thumbnail, by status: its body and extra header lines.
MISS_ANSWERS = {
    404: (b"not found\n", b""),  # no such source, or one that cannot be thumbnailed (the reason is logged only)
    500: (b"internal server error\n", b""),  # RFC 9110 §15.6.1: we failed (e.g. cache disk full), not the request
    503: (b"", RETRY_AFTER),  # RFC 9110 §15.6.4: too many in flight, too slow, or the state store is busy
}


#: A folder request answered without its page, by status: its body and extra header lines.
PAGE_ANSWERS = {
    404: (b"not found\n", b""),
    500: (b"internal server error\n", b""),
    503: (b"", RETRY_AFTER),  # RFC 9110 §15.6.4: too many pages being made, or one took too long
}
