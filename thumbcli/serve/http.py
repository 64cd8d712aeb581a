"""Pure HTTP/1.1 semantics for serving a file: status lines, validators, dates, ranges, preconditions.

No sockets and no files here: bytes in, answers out. Every rule cites its RFC section.
"""

from __future__ import annotations

import enum
import re
from email.utils import formatdate, mktime_tz, parsedate_tz

SERVER_NAME = b"thumbcli"
#: Seconds a client is told to wait after a 503 (generation queue full or too slow).
RETRY_AFTER_SECONDS = 1

REASONS = {
    200: b"OK",
    206: b"Partial Content",
    301: b"Moved Permanently",
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
STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()}
END_KEEP_ALIVE = b"\r\n"
END_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n\r\n"
END_CLOSE = b"Connection: close\r\n\r\n"
ALLOW = b"Allow: GET, HEAD\r\n"
GET = b"GET"
HEAD = b"HEAD"
TEXT_TYPE = b"Content-Type: text/plain; charset=utf-8\r\n"
METRICS_TYPE = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
NO_STORE = b"Cache-Control: no-store\r\n"
RETRY_AFTER = b"Retry-After: %d\r\n" % RETRY_AFTER_SECONDS

CONDITIONAL_HEADERS = frozenset(
    {b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"if-range", b"range"}
)
FRAMING_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding"})
#: Read for presets made in several formats (RFC 9110 §12.5.1).
NEGOTIATION_HEADERS = frozenset({b"accept"})
LOGGED_HEADERS = frozenset({b"referer", b"user-agent"})
#: Fields that may appear once only; lists (If-Match, If-None-Match) may be split over lines.
SINGLE_HEADERS = frozenset(
    {b"host", b"range", b"if-range", b"if-modified-since", b"if-unmodified-since", b"content-length"}
)

_ENTITY_TAG = re.compile(rb'(W/)?("[^"]*")')
UNSATISFIABLE = (-1, -1)
_MAX_POSITION_DIGITS = 18


class Verdict(enum.IntEnum):
    """What the preconditions and Range of a GET or HEAD decide (RFC 9110 §13.2.2), as its status code."""

    FULL = 200
    PARTIAL = 206
    NOT_MODIFIED = 304
    PRECONDITION_FAILED = 412
    UNSATISFIABLE = 416


#: Verdicts without a byte span, made once (reading a member off an enum class is slow on 3.11).
_PRECONDITION_FAILED = (Verdict.PRECONDITION_FAILED, 0, 0)
_NOT_MODIFIED = (Verdict.NOT_MODIFIED, 0, 0)
_UNSATISFIABLE = (Verdict.UNSATISFIABLE, 0, 0)
_FULL = Verdict.FULL
_PARTIAL = Verdict.PARTIAL


def etag_for(size: int, mtime_ns: int) -> bytes:
    """A strong entity tag from size and modification time, as aiohttp makes them."""
    return b'"%x-%x"' % (mtime_ns, size)


def http_date(seconds: int) -> bytes:
    """An IMF-fixdate (RFC 9110 §5.6.7) for a time in seconds since the epoch."""
    return formatdate(seconds, usegmt=True).encode("ascii")


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
    request, which §14.2 lets a server ignore); `UNSATISFIABLE` means 416.
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
        return UNSATISFIABLE if suffix == 0 or size == 0 else (max(0, size - suffix), size - 1)
    if len(first_text) > _MAX_POSITION_DIGITS:
        return UNSATISFIABLE
    first = int(first_text)
    last = size - 1 if not last_text or len(last_text) > _MAX_POSITION_DIGITS else int(last_text)
    if last_text and last < first:
        return None  # §14.1.1: last-pos before first-pos makes the whole field invalid
    if first >= size:
        return UNSATISFIABLE
    return first, min(last, size - 1)


def if_range_holds(if_range: bytes, etag: bytes, mtime_s: int) -> bool:
    """Whether an If-Range field lets the Range apply (RFC 9110 §13.1.5)."""
    # An entity-tag must match strongly (a weak tag never does); a date must equal
    # Last-Modified exactly. Otherwise the whole representation is sent.
    value = if_range.strip()
    if value.startswith(b'"') or value.startswith(b"W/"):
        return value == etag
    return parse_http_date(value) == mtime_s


def evaluate(
    method: bytes, headers: dict[bytes, bytes], etag: bytes, last_modified: bytes, mtime_s: int, size: int
) -> tuple[Verdict, int, int]:
    """The verdict and byte span for a GET or HEAD with header fields, in the order of RFC 9110 §13.2.2."""
    if_match = headers.get(b"if-match")
    if if_match is not None:
        # §13.1.1: If-Match uses the strong comparison; no current tag matches -> 412.
        if not entity_tag_matches(if_match, etag, weak=False):
            return _PRECONDITION_FAILED
    else:
        if_unmodified = headers.get(b"if-unmodified-since")
        if if_unmodified is not None:
            # §13.1.4: modified after the date -> 412; an invalid date is ignored.
            since = parse_http_date(if_unmodified)
            if since is not None and mtime_s > since:
                return _PRECONDITION_FAILED
    if_none_match = headers.get(b"if-none-match")
    if if_none_match is not None:
        # §13.1.2: If-None-Match uses the weak comparison; a match on GET/HEAD -> 304.
        if if_none_match == etag or entity_tag_matches(if_none_match, etag, weak=True):
            return _NOT_MODIFIED
    else:
        if_modified = headers.get(b"if-modified-since")
        if if_modified is not None:
            # §13.1.3: evaluated only without If-None-Match; not modified since -> 304.
            if if_modified == last_modified:
                return _NOT_MODIFIED
            since = parse_http_date(if_modified)
            if since is not None and mtime_s <= since:
                return _NOT_MODIFIED
    range_value = headers.get(b"range")
    # §14.2: Range is defined for GET only; other methods ignore it.
    if range_value is not None and method == GET:
        if_range = headers.get(b"if-range")
        if if_range is None or if_range_holds(if_range, etag, mtime_s):
            span = parse_single_range(range_value, size)
            if span is UNSATISFIABLE:
                return _UNSATISFIABLE
            if span is not None:
                return _PARTIAL, span[0], span[1]
    return _FULL, 0, size - 1


def origin_form(target: bytes) -> bytes:
    """A request target in origin-form: absolute-form loses its scheme and authority (RFC 9112 §3.2.2)."""
    if target[:1] == b"/":
        return target
    scheme_end = target.find(b"://")
    slash = target.find(b"/", scheme_end + 3) if scheme_end > 0 else -1
    return target[slash:] if slash > 0 else b""
