"""JPEG through libjpeg-turbo directly, beside libvips: the decode through simplejpeg, the encode through Pillow.

libvips' `jpegload` runs the same libjpeg-turbo decode behind its region pipeline and thread
hand-offs; calling libjpeg-turbo directly gives the same pixels (checked, bit for bit) for about
10% less CPU per camera JPEG shrunk on load, the largest part of a thumbnail's cost, and 14% less
per small JPEG decoded at full size. Only the plain case comes here: the first, strict decode of
a 1- or 3-band JPEG. Anything libjpeg-turbo warns about (truncated, corrupt data) is declined and
left to libvips, so every odd file is decoded, and fails, exactly as before.

Its `jpegsave` likewise: Pillow's encoder is the same libjpeg-turbo with the same settings, and
writes the same bytes for a third of the CPU (0.6 against 1.4 ms for a 256-pixel thumbnail).

The only `import simplejpeg` and the only use of Pillow's encoder, imported when a file first needs
them, as every decoder here is: simplejpeg brings numpy, a tenth of a second of CPU at a worker's
start that a run of PNGs would pay for nothing.
"""

from __future__ import annotations

import importlib
import io
from types import ModuleType
from typing import Any

#: A decode's band count -> the colour space libjpeg-turbo is asked for.
_COLORSPACE = {1: "GRAY", 3: "RGB"}
#: An encode's band count -> Pillow's mode for those pixels.
_PILLOW_MODE = {1: "L", 3: "RGB"}
#: The largest thumbnail (in pixels) handed to Pillow whole: its pixels are held twice over while it
#: encodes (about 7 bytes a pixel), where libvips' own save streams a few rows at a time.
ENCODED_PIXELS_MAX = 2048 * 2048
#: The JFIF header Pillow always writes first (after the SOI marker); libvips writes none for a stripped thumbnail.
_JFIF_HEADER = b"\xff\xe0\x00\x10JFIF\x00"
_JFIF_LENGTH = 18

#: Each module once imported, or None when it cannot be; absent until a file first needs it.
_imported: dict[str, ModuleType | None] = {}


def _module(name: str) -> ModuleType | None:
    if name not in _imported:
        try:
            _imported[name] = importlib.import_module(name)
        except (ImportError, OSError):  # dependencies; without them libvips decodes and encodes every JPEG
            _imported[name] = None
    return _imported[name]


def preload() -> None:
    """Import simplejpeg and Pillow's JPEG plugin now (a worker about to lose the right to read where it lives).

    And Pillow's littlecms, which converts a thumbnail whose profile is not sRGB (see `icc`).
    """
    _module("simplejpeg")
    pillow = _module("PIL.JpegImagePlugin")
    if pillow is not None:
        pillow.Image.preinit()  # the plugins Pillow's first save would import
    _module("PIL.ImageCms")


def available() -> bool:
    """Whether simplejpeg (and its libjpeg-turbo) can be imported here."""
    return _module("simplejpeg") is not None


def encodes(width: int, height: int, bands: int) -> bool:
    """Whether `encoded` takes these 8-bit pixels: 1 or 3 bands, at most ENCODED_PIXELS_MAX, and Pillow imports here."""
    return bands in _PILLOW_MODE and width * height <= ENCODED_PIXELS_MAX and _module("PIL.JpegImagePlugin") is not None


def scaled_pixels(data: bytes | memoryview, shrink: int, bands: int) -> Any | None:
    """`data` decoded at 1/`shrink` of its size into `bands` (1 or 3) interleaved 8-bit bands; None when declined.

    The pixels are a C-contiguous numpy array of height x width x bands; its size is the
    rounded-up scaled size libjpeg-turbo gives (libvips cuts the last part-pixel off).
    Declined: no simplejpeg, another band count, or any libjpeg-turbo warning or error.
    """
    colorspace = _COLORSPACE.get(bands)
    simplejpeg = _module("simplejpeg") if colorspace else None
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


def encoded(pixels: bytes, width: int, height: int, bands: int, quality: int) -> bytes | None:
    """8-bit interleaved pixels as the JPEG libvips' `jpegsave_buffer(Q=quality, optimize_coding=True)` writes
    when it keeps no metadata, byte for byte; None when declined (see `encodes`) or Pillow fails.
    """
    pillow = _module("PIL.JpegImagePlugin")
    if pillow is None or not encodes(width, height, bands):
        return None
    mode = _PILLOW_MODE[bands]
    out = io.BytesIO()
    try:
        image = pillow.Image.frombytes(mode, (width, height), pixels)
        # libvips' chroma rule: 4:2:0 below quality 90, none from 90; and a grey image sampled 1x1.
        subsampling = 0 if quality >= 90 or bands == 1 else 2
        image.save(out, "JPEG", quality=quality, optimize=True, subsampling=subsampling)
    except (OSError, ValueError, MemoryError):
        return None
    data = out.getbuffer()
    if data[2 : 2 + len(_JFIF_HEADER)] != _JFIF_HEADER:
        return None  # not the layout this drops the header from: libvips' own bytes instead
    return bytes(data[:2]) + bytes(data[2 + _JFIF_LENGTH :])
