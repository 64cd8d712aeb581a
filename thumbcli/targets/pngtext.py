"""PNG text chunks: add tEXt/iTXt entries after IHDR, read them back from before IDAT."""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import BinaryIO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_KINDS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
# Larger text chunks are skipped unread: no thumbnail needs them to be judged.
_MAX_TEXT_CHUNK = 64 * 1024


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _text_chunk(key: str, value: str) -> bytes:
    keyword = key.encode("latin-1")
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        raise ValueError(f"invalid PNG text keyword {key!r}")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # Uncompressed iTXt, no language tag: the only way to store non-Latin-1 text.
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def add_png_text(png: bytes, text: dict[str, str]) -> bytes:
    """`png` with a text chunk per entry inserted right after IHDR, where readers find them first."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG starting with IHDR")
    (length,) = struct.unpack(">I", png[8:12])
    end = 8 + 12 + length
    return png[:end] + b"".join(_text_chunk(k, v) for k, v in text.items()) + png[end:]


def read_png_text(source: str | bytes | os.PathLike[str]) -> dict[str, str]:
    """The text entries of a PNG (file path or the bytes themselves) stored before its image data.

    Only the chunks before IDAT are read, so judging a thumbnail costs one open
    and one small read. Anything that is not a PNG yields an empty dict; the
    first value of a repeated keyword wins.
    """
    if isinstance(source, bytes):
        return _read_text_chunks(io.BytesIO(source))
    with open(source, "rb") as stream:
        return _read_text_chunks(stream)


def _read_text_chunks(stream: BinaryIO) -> dict[str, str]:
    if stream.read(8) != PNG_SIGNATURE:
        return {}
    text: dict[str, str] = {}
    while len(header := stream.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind in (b"IDAT", b"IEND") or length > 0x7FFFFFFF:
            break
        if kind not in _TEXT_KINDS or length > _MAX_TEXT_CHUNK:
            stream.seek(length + 4, io.SEEK_CUR)
            continue
        body = stream.read(length)
        crc = stream.read(4)
        if len(body) < length or len(crc) < 4:
            break
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            continue
        entry = _decode_text(kind, body)
        if entry is not None:
            text.setdefault(*entry)
    return text


def _decode_text(kind: bytes, body: bytes) -> tuple[str, str] | None:
    keyword, sep, rest = body.partition(b"\0")
    if not sep or not keyword:
        return None
    try:
        if kind == b"tEXt":
            return keyword.decode("latin-1"), rest.decode("latin-1")
        if kind == b"zTXt":
            return keyword.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
        compressed, _method = rest[:2]
        _language, _, rest = rest[2:].partition(b"\0")
        _translated, _, value = rest.partition(b"\0")
        return keyword.decode("latin-1"), (_inflate(value) if compressed else value).decode("utf-8")
    except (ValueError, zlib.error):
        return None


def _inflate(data: bytes) -> bytes:
    return zlib.decompressobj().decompress(data, _MAX_TEXT_CHUNK)


def blank_png(text: dict[str, str]) -> bytes:
    """A 1x1 transparent RGBA PNG carrying `text`: the body of a fail marker."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\0" * 5)
    png = PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return add_png_text(png, text)
