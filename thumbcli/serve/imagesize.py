"""The pixel size of a thumbnail read from its header (JPEG, PNG, WebP, AVIF), never by decoding it."""

from __future__ import annotations

import os
import struct

from thumbcli.formats import jpeg_size, webp_size

#: Bytes read from the start of a file; a JPEG whose frame header lies further in has no size here.
HEADER_BYTES = 65536
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
        return jpeg_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return webp_size(data)
    if data[4:8] == b"ftyp":
        return _isobmff_size(data, 0, len(data))
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
