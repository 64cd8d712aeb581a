"""JPEG pixels from libjpeg-turbo at a DCT scale, through simplejpeg: libvips' own JPEG load costs more per image.

libvips' `jpegload` runs the same libjpeg-turbo decode behind its region pipeline and thread
hand-offs; calling libjpeg-turbo directly gives the same pixels (checked, bit for bit) for about
10% less CPU per camera JPEG shrunk on load, the largest part of a thumbnail's cost, and 14% less
per small JPEG decoded at full size. Only the plain case comes here: the first, strict decode of
a 1- or 3-band JPEG. Anything libjpeg-turbo warns about (truncated, corrupt data) is declined and
left to libvips, so every odd file is decoded, and fails, exactly as before.

The only `import simplejpeg`, imported when a file first needs it, as every decoder here is: it
brings numpy, a tenth of a second of CPU at a worker's start that a run of PNGs would pay for nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

#: A decode's band count -> the colour space libjpeg-turbo is asked for.
_COLORSPACE = {1: "GRAY", 3: "RGB"}

#: simplejpeg once imported, or None when it cannot be; empty until a file first needs it.
_imported: list[ModuleType | None] = []


def _simplejpeg() -> ModuleType | None:
    if not _imported:
        try:
            _imported.append(importlib.import_module("simplejpeg"))
        except (ImportError, OSError):  # a dependency; without it libvips decodes every JPEG
            _imported.append(None)
    return _imported[0]


def preload() -> None:
    """Import simplejpeg now (a worker about to lose the right to read where it lives)."""
    _simplejpeg()


def available() -> bool:
    """Whether simplejpeg (and its libjpeg-turbo) can be imported here."""
    return _simplejpeg() is not None


def scaled_pixels(data: bytes | memoryview, shrink: int, bands: int) -> Any | None:
    """`data` decoded at 1/`shrink` of its size into `bands` (1 or 3) interleaved 8-bit bands; None when declined.

    The pixels are a C-contiguous numpy array of height x width x bands; its size is the
    rounded-up scaled size libjpeg-turbo gives (libvips cuts the last part-pixel off).
    Declined: no simplejpeg, another band count, or any libjpeg-turbo warning or error.
    """
    colorspace = _COLORSPACE.get(bands)
    simplejpeg = _simplejpeg() if colorspace else None
    if simplejpeg is None:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return simplejpeg.decode_jpeg(
            data,
            colorspace=colorspace,
            min_height=-(-height // shrink),
            min_width=-(-width // shrink),
            strict=True,
        )
    except (ValueError, RuntimeError, TypeError):
        return None
