"""What a failed decode is reported as: libvips' raw error text, and the file's first and last bytes, in one reason."""

from __future__ import annotations

import re


def describe_head(head: bytes) -> str:
    """Why bytes no decoder recognised are not an image: empty, text, or which bytes they start with."""
    if not head:
        return "file is empty"
    sample = head[:16]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in sample):
        return f"content is not an image (starts with text {sample.decode('ascii')!r})"
    return f"content is not a supported image (starts with bytes {sample.hex(' ')})"


#: Raw libvips text -> the short reason that says it, first match wins.
_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), reason)
    for pattern, reason in (
        (r"premature end|unexpected end|truncated|insufficient input data|out of data", "truncated"),
        (r"old-style jpeg compression", "unsupported TIFF compression (old-style JPEG)"),
        (r"compression method is not configured|compression scheme .* not implemented", "unsupported TIFF compression"),
        (r"heif: (invalid input|no 'ftyp'|unsupported filetype)", "not a HEIF/HEVC file"),
        (r"heif: unsupported", "unsupported HEIF/AVIF feature"),
        (r"libpng read error|libspng read error|png.*crc", "damaged PNG data"),
        (r"no frames in gif", "GIF has no frames"),
        (r"corrupt jpeg data|invalid jpeg file structure|bogus", "damaged JPEG data"),
        (r"out of memory", "libvips ran out of memory"),
    )
)


def describe(detail: str) -> str:
    """The short reason for a raw libvips error text: what is wrong first, not a libvips dump."""
    for pattern, reason in _REASONS:
        if pattern.search(detail):
            return reason
    return _error_line(detail)


def cut_short(data: bytes | memoryview, source_format: str) -> bool:
    """Whether `data` lacks the end its format always has (the usual damage: a half-copied file).

    libpng says only "read error" for a file cut short, whatever the cut.
    """
    # Near the end, not at it: some cameras and editors append data after the image.
    tail = bytes(data[-4096:]).rstrip(b"\0")
    if source_format == "jpeg":
        return b"\xff\xd9" not in tail
    if source_format == "png":
        return b"IEND" not in tail
    if source_format == "gif":
        return not tail.endswith(b"\x3b")
    return False


def _error_line(detail: str) -> str:
    """The most useful part of a raw text no pattern knows: its lines but the noise."""
    useful = [
        line
        for line in detail.split("; ")
        if line and not line.startswith("unable to call") and not line.startswith("source: bad seek")
    ]
    return "; ".join(useful)[:300] or "libvips could not decode the image"
