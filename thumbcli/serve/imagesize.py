"""The pixel size of a thumbnail read from its header (JPEG, PNG, WebP, AVIF), never by decoding it."""

from __future__ import annotations

import os
import struct

#: Bytes read from the start of a file; a JPEG whose frame header lies further in has no size here.
HEADER_BYTES = 65536
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_ISOBMFF_CONTAINERS = frozenset({b"meta", b"iprp", b"ipco"})


def size_of_file(fd: int) -> tuple[int, int] | None:
    """(width, height) of the image open on `fd`, or None if its header does not say."""
    try:
        return size_of_header(os.pread(fd, HEADER_BYTES, 0))
    except OSError:
        return None


def size_of_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a JPEG, PNG, WebP or AVIF file, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[4:8] == b"ftyp":
        return _isobmff_size(data, 0, len(data))
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return (width, height) if width and height else None
        position += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _isobmff_size(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """The first `ispe` (image spatial extents) property found in meta/iprp/ipco boxes."""
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        header = 8
        if size == 1:
            if position + 16 > end:
                return None
            (size,) = struct.unpack(">Q", data[position + 8 : position + 16])
            header = 16
        elif size == 0:
            size = end - position
        if size < header:
            return None
        box_end = min(position + size, end)
        if kind == b"ispe" and position + header + 12 <= end:
            width, height = struct.unpack(">II", data[position + header + 4 : position + header + 12])
            return (width, height) if width and height else None
        if kind in _ISOBMFF_CONTAINERS:
            inner = position + header + (4 if kind == b"meta" else 0)  # meta is a full box
            found = _isobmff_size(data, inner, box_end)
            if found is not None:
                return found
        position += size
    return None
