"""JPEG pixels from libjpeg-turbo at a DCT scale, through simplejpeg: libvips' own JPEG load costs more per image.

libvips' `jpegload` at shrink 8 runs the same libjpeg-turbo decode behind its region pipeline
and thread hand-offs; calling libjpeg-turbo directly gives the same pixels (checked, bit for bit)
for about 10% less CPU per camera JPEG, the largest part of a thumbnail's cost. Only the plain
case comes here: the first, strict decode of a 1- or 3-band JPEG. Anything libjpeg-turbo warns
about (truncated, corrupt data) is declined and left to libvips, so every odd file is decoded,
and fails, exactly as before. The only `import simplejpeg`; imported with `resample`, so a
worker loads it before it is confined.
"""

from __future__ import annotations

from typing import Any

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; libvips decodes every JPEG without it
    simplejpeg = None

#: A decode's band count -> the colour space libjpeg-turbo is asked for.
_COLORSPACE = {1: "GRAY", 3: "RGB"}


def available() -> bool:
    """Whether simplejpeg (and its libjpeg-turbo) is installed here."""
    return simplejpeg is not None


def scaled_pixels(data: bytes | memoryview, shrink: int, bands: int) -> Any | None:
    """`data` decoded at 1/`shrink` of its size into `bands` (1 or 3) interleaved 8-bit bands; None when declined.

    The pixels are a C-contiguous numpy array of height x width x bands; its size is the
    rounded-up scaled size libjpeg-turbo gives (libvips cuts the last part-pixel off).
    Declined: no simplejpeg, another band count, or any libjpeg-turbo warning or error.
    """
    colorspace = _COLORSPACE.get(bands)
    if simplejpeg is None or colorspace is None:
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
