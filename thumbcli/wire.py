"""The fixed binary layout of a resample worker's requests and replies: nothing across the boundary is unpickled.

A decoder runs on hostile bytes, so the parent treats everything its worker sends as hostile
too: unpickling a reply would run whatever code a compromised decoder wrote into it. Each
field here has a fixed type and a bound, and the parent checks a reply against what it asked
for (one thumbnail per spec, each within its box) before any of it is used. The worker does
the same with its requests, so neither side ever unpickles.

The socket and pipe reads and writes that carry them are here too: a request is one message on
a Unix socket, with the descriptor of the local file it names (the worker maps the file itself).
All integers are little-endian. A text is a 4-byte length and that many bytes of UTF-8 (ASCII
for a format name and a spec's name), each within its bound.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Literal

from thumbcli import formats
from thumbcli.errors import SpecError
from thumbcli.spec import FITS, FORMATS, MAX_EDGE, Limits, SizeBox, Thumbnail, ThumbSpec

#: A reply's first byte after its length. NEEDS_WHEEL: the file needs a decoder whose wheel the
#: worker could not import after it switched accounts (its reason names the decoder); the parent
#: starts a worker that imports it first and sends the file again. UNREADABLE: the worker could
#: not read the file it was handed (a disk's error, not the file's content; its reason says why).
MADE, FAILED, BUG, NEEDS_WHEEL, UNREADABLE = 0, 1, 2, 3, 4

#: Bounds of a reply's texts: a reason is one line, a detail a traceback on one line, a bug's text a traceback.
REASON_BYTES = 1024
DETAIL_BYTES = 16 << 10
BUG_BYTES = 64 << 10
FORMAT_NAME_BYTES = 32
SPEC_NAME_BYTES = 255
#: Thumbnails in one reply (and specs in one request).
MAX_SPECS = 64
#: A reply longer than this is refused from its length alone, before it is read: a thumbnail of
#: MAX_EDGE x MAX_EDGE RGBA as PNG stays below it.
MAX_REPLY_BYTES = 1 << 30

_LIMITS = struct.Struct("<QQdQ?")  # max_file_size, max_pixels, max_decode_seconds, max_worker_memory, strict
_COUNTS = struct.Struct("<HH")  # specs, decode_for
_SPEC = struct.Struct("<IIBBB???")  # box width, height (0: none), fit, format, quality (0: default), flags
_STATUS = struct.Struct("<B")
_LENGTH = struct.Struct("<I")
_THUMBNAIL = struct.Struct("<IIIIqQ")  # width, height, source width, source height, captured, data length
#: Capture times (seconds since 1970) a reply may carry: years 1 to 9999, as Python's datetime can show them.
#: A request's head: the length of its settings, the source's length, the memory file that holds it (unless
#: a file's descriptor comes with the request).
REQUEST = struct.Struct("<IQI")
#: The most a request's settings take: limits, counts, and every spec with the longest name.
MAX_SETTINGS_BYTES = _LIMITS.size + _COUNTS.size + 2 * MAX_SPECS * (_SPEC.size + _LENGTH.size + SPEC_NAME_BYTES)
_REQUEST_BYTES = REQUEST.size + MAX_SETTINGS_BYTES
_CAPTURED_RANGE = range(-62135596800, 253402300800)
_MAX_SOURCE_EDGE = (1 << 31) - 1


class MalformedMessage(ValueError):
    """Bytes that are not a message of this layout, or not the answer to what was asked: why, in one line."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What a request asks besides the source: the thumbnails, every size of the destination, limits, strictness."""

    specs: tuple[ThumbSpec, ...]
    decode_for: tuple[ThumbSpec, ...]
    limits: Limits
    strict: bool


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's reply: thumbnails and a warning when made, a reason when failed, a traceback for a bug."""

    status: int
    thumbnails: tuple[Thumbnail, ...] = ()
    reason: str = ""
    detail: str = ""
    warning: str = ""


# -- requests ---------------------------------------------------------------------------


def encode_settings(settings: Settings) -> bytes:
    """`settings` in the request layout."""
    limits = settings.limits
    parts = [
        _LIMITS.pack(
            limits.max_file_size,
            limits.max_pixels,
            limits.max_decode_seconds,
            limits.max_worker_memory,
            settings.strict,
        ),
        _COUNTS.pack(len(settings.specs), len(settings.decode_for)),
    ]
    for spec in (*settings.specs, *settings.decode_for):
        parts.append(
            _SPEC.pack(
                spec.box.width or 0,
                spec.box.height or 0,
                FITS.index(spec.fit),
                FORMATS.index(spec.format),
                spec.quality or 0,
                spec.upscale,
                spec.keep_metadata,
                spec.rgba,
            )
        )
        parts.append(_text(spec.name, SPEC_NAME_BYTES, "ascii"))
    return b"".join(parts)


def decode_settings(data: bytes) -> Settings:
    """The settings `encode_settings` wrote; MalformedMessage for anything else."""
    reader = _Reader(data)
    max_file_size, max_pixels, seconds, memory, strict = reader.unpack(_LIMITS)
    specs_count, decode_for_count = reader.unpack(_COUNTS)
    if specs_count > MAX_SPECS or decode_for_count > MAX_SPECS:
        raise MalformedMessage(f"{specs_count} specs and {decode_for_count} sizes: at most {MAX_SPECS} each")
    try:
        limits = Limits(max_file_size, max_pixels, seconds, memory)
        specs = [_read_spec(reader) for _ in range(specs_count + decode_for_count)]
    except SpecError as exc:
        raise MalformedMessage(f"invalid settings: {exc}") from None
    reader.end()
    return Settings(tuple(specs[:specs_count]), tuple(specs[specs_count:]), limits, bool(strict))


def _read_spec(reader: _Reader) -> ThumbSpec:
    width, height, fit, image_format, quality, upscale, keep_metadata, rgba = reader.unpack(_SPEC)
    if fit >= len(FITS) or image_format >= len(FORMATS):
        raise MalformedMessage(f"unknown fit {fit} or format {image_format}")
    name = reader.text(SPEC_NAME_BYTES, "ascii")
    return ThumbSpec(
        SizeBox(width or None, height or None),
        FITS[fit],
        FORMATS[image_format],
        quality or None,
        bool(upscale),
        bool(keep_metadata),
        name,
        bool(rgba),
    )


# -- replies ----------------------------------------------------------------------------


def encode_reply(reply: Reply) -> bytes:
    """`reply` with its length in front, its texts cut to their bounds (a decoder's message may be anything)."""
    bound = BUG_BYTES if reply.status == BUG else DETAIL_BYTES
    parts = [
        _STATUS.pack(reply.status),
        _text(reply.reason, REASON_BYTES, "utf-8"),
        _text(reply.detail, bound, "utf-8"),
        _text(reply.warning, REASON_BYTES, "utf-8"),
        _LENGTH.pack(len(reply.thumbnails)),
    ]
    for thumbnail in reply.thumbnails:
        parts.append(
            _THUMBNAIL.pack(
                thumbnail.width,
                thumbnail.height,
                thumbnail.source_width,
                thumbnail.source_height,
                thumbnail.captured,
                len(thumbnail.data),
            )
        )
        parts.append(_text(thumbnail.source_format, FORMAT_NAME_BYTES, "ascii"))
        parts.append(thumbnail.data)
    body = b"".join(parts)
    return _LENGTH.pack(len(body)) + body


def reply_length(head: bytes | bytearray) -> int:
    """The length of the reply body that `head` (its first 4 bytes) announces; MalformedMessage past the bound."""
    length: int = _LENGTH.unpack_from(head)[0]
    if length > MAX_REPLY_BYTES:
        raise MalformedMessage(f"a reply of {length} bytes announced (at most {MAX_REPLY_BYTES})")
    return length


#: Bytes before a reply's body: its length.
REPLY_HEAD_BYTES = _LENGTH.size


def decode_reply(body: bytes | bytearray | memoryview, specs: tuple[ThumbSpec, ...]) -> Reply:
    """The reply in `body`, checked against the `specs` asked for; MalformedMessage for anything else."""
    reader = _Reader(body)
    (status,) = reader.unpack(_STATUS)
    if status not in (MADE, FAILED, BUG, NEEDS_WHEEL, UNREADABLE):
        raise MalformedMessage(f"unknown status {status}")
    reason = reader.text(REASON_BYTES, "utf-8")
    detail = reader.text(BUG_BYTES if status == BUG else DETAIL_BYTES, "utf-8")
    warning = reader.text(REASON_BYTES, "utf-8")
    (count,) = reader.unpack(_LENGTH)
    if count != (len(specs) if status == MADE else 0):
        raise MalformedMessage(f"{count} thumbnails for {len(specs)} sizes asked, status {status}")
    if status in (FAILED, UNREADABLE) and not reason:
        raise MalformedMessage("a failure without a reason")
    if status == NEEDS_WHEEL and not reason:
        raise MalformedMessage("a wheel needed without its decoder's name")
    thumbnails = tuple(_read_thumbnail(reader, spec) for spec in specs[:count])
    reader.end()
    return Reply(status, thumbnails, reason, detail, warning)


def _read_thumbnail(reader: _Reader, spec: ThumbSpec) -> Thumbnail:
    width, height, source_width, source_height, captured, length = reader.unpack(_THUMBNAIL)
    for edge, bound in ((width, spec.box.width), (height, spec.box.height)):
        if not 1 <= edge <= (bound or MAX_EDGE * MAX_EDGE):
            raise MalformedMessage(f"a thumbnail of {width}x{height} for a box of {spec.box.label}")
    if not (1 <= source_width <= _MAX_SOURCE_EDGE and 1 <= source_height <= _MAX_SOURCE_EDGE):
        raise MalformedMessage(f"a source of {source_width}x{source_height}")
    source_format = reader.text(FORMAT_NAME_BYTES, "ascii")
    if source_format not in formats.BY_NAME:
        raise MalformedMessage(f"an unknown source format {source_format!r}")
    if length == 0:
        raise MalformedMessage("an empty thumbnail")
    if captured not in _CAPTURED_RANGE:
        raise MalformedMessage(f"a capture time of {captured}")
    return Thumbnail(reader.take(length), width, height, source_width, source_height, source_format, captured)


# -- fields -----------------------------------------------------------------------------


def _text(text: str, bound: int, encoding: Literal["utf-8", "ascii"]) -> bytes:
    data = text.encode(encoding, "replace")
    if len(data) > bound:  # cut on a character boundary
        data = data[:bound].decode(encoding, "ignore").encode(encoding)
    return _LENGTH.pack(len(data)) + data


class _Reader:
    """Reads fields off a message, each within the message and its bound."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data)
        self._at = 0

    def take(self, length: int) -> bytes:
        end = self._at + length
        if end > len(self._data):
            raise MalformedMessage(f"cut short: {length} bytes wanted at {self._at} of {len(self._data)}")
        taken = bytes(self._data[self._at : end])
        self._at = end
        return taken

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def text(self, bound: int, encoding: Literal["utf-8", "ascii"]) -> str:
        (length,) = self.unpack(_LENGTH)
        if length > bound:
            raise MalformedMessage(f"a text of {length} bytes (at most {bound})")
        try:
            return self.take(length).decode(encoding)
        except UnicodeDecodeError:
            raise MalformedMessage(f"a text that is not {encoding}") from None

    def end(self) -> None:
        if self._at != len(self._data):
            raise MalformedMessage(f"{len(self._data) - self._at} bytes past the end")


def send_request(channel: socket.socket, request: bytes, source: int | None) -> None:
    """Send one request as one message, with `source`, the descriptor of the local file it names, if any."""
    if source is None:
        channel.send(request)
    else:
        socket.send_fds(channel, [request], [source])


def receive_request(channel: socket.socket) -> tuple[bytes, int | None] | None:
    """The next request and the descriptor of the file sent with it (or None); None at the end of the requests."""
    message, fds, flags, _ = socket.recv_fds(channel, _REQUEST_BYTES, 1)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
        for fd in fds:
            os.close(fd)
        raise MalformedMessage("a request longer than any the parent sends")
    if not message:
        return None
    return message, fds[0] if fds else None


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the pipe `fd`, however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exactly(fd: int, length: int) -> bytes | None:
    """`length` bytes from `fd`, or None at end of file before the first byte."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    got = 0
    while got < length:
        count = os.readv(fd, [view[got:]])
        if count == 0:
            if got == 0:
                return None
            raise EOFError("request cut short")
        got += count
    return bytes(buffer)
