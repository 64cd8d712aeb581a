"""Camera RAW through LibRaw (rawpy): the only `import rawpy`.

The embedded JPEG preview is used when it is at least as large as the largest thumbnail asked
for (no demosaic, and never a small preview enlarged); otherwise a half-size demosaic. Either
way the RAW's own flip field turns the image upright.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
from collections.abc import Iterator

from thumbcli.decoders import EmbeddedImage, MissingDecoder, Pixels, ScaleNeeded, check_pixels
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits

_LABEL = "RAW"
#: LibRaw's flip field -> the EXIF orientation that turns the sensor image upright.
_ORIENTATION_OF_FLIP = {0: 1, 3: 3, 5: 8, 6: 6}


def decode(data: bytes, limits: Limits, scale_needed: ScaleNeeded) -> Pixels | EmbeddedImage:
    """The embedded preview when it is large enough, else a half-size demosaic; size checked from the header."""
    try:
        import rawpy
    except ImportError:
        raise MissingDecoder(_LABEL, "raw") from None
    try:
        with _stderr_silenced(), rawpy.imread(io.BytesIO(data)) as raw_image:
            sizes = raw_image.sizes
            flip = sizes.flip
            check_pixels(_LABEL, sizes.width, sizes.height, limits)
            upright_w, upright_h = (sizes.height, sizes.width) if flip in (5, 6) else (sizes.width, sizes.height)
            needed_edge = math.ceil(max(upright_w, upright_h) * scale_needed(upright_w, upright_h))
            orientation = _ORIENTATION_OF_FLIP.get(flip, 1)
            preview = _preview(raw_image, rawpy, needed_edge, orientation, limits)
            if preview is not None:
                return preview
            rgb = raw_image.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    except rawpy.LibRawFileUnsupportedError:
        raise FileRejected(f"{_LABEL}: unsupported camera or not a RAW file") from None
    except (rawpy.LibRawIOError, rawpy.LibRawDataError, rawpy.LibRawTooBigError):
        raise FileRejected(f"{_LABEL}: truncated or damaged") from None
    except rawpy.LibRawError as exc:
        raise FileRejected(f"{_LABEL}: could not decode ({type(exc).__name__})") from None
    height, width = rgb.shape[:2]
    return Pixels(rgb.tobytes(), width, height, 3)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """LibRaw prints its own view of a damaged file on stderr ("unknown file: Unexpected end of file");
    the reason we give is the one line the user reads."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _preview(
    raw_image: object, rawpy: object, needed_edge: int, orientation: int, limits: Limits
) -> Pixels | EmbeddedImage | None:
    """The embedded preview (JPEG or RGB) when its longer edge is at least `needed_edge`, else None.

    A JPEG preview's size is checked by `resample` from its header, as every embedded image's is;
    an RGB one's here, before its pixels are copied: LibRaw hands over the size its IFD declares
    (a 16 KB DNG may declare 13000x13000) in memory it has not yet written.
    """
    try:
        thumb = raw_image.extract_thumb()  # type: ignore[attr-defined]
    except rawpy.LibRawError:  # type: ignore[attr-defined]
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:  # type: ignore[attr-defined]
        jpeg = bytes(thumb.data)
        return EmbeddedImage(jpeg, orientation) if max(_jpeg_size(jpeg)) >= needed_edge else None
    rgb = thumb.data
    if rgb.ndim == 3:
        check_pixels(_LABEL, rgb.shape[1], rgb.shape[0], limits, "embedded preview")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype.itemsize != 1 or max(rgb.shape[:2]) < needed_edge:
        return None
    return Pixels(rgb.tobytes(), rgb.shape[1], rgb.shape[0], 3, orientation=orientation)


def _jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """A JPEG's width and height from its frame header (0, 0 if it has none), without decoding it."""
    position = 2
    while position + 9 < len(jpeg):
        if jpeg[position] != 0xFF:
            return 0, 0
        marker = jpeg[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        (length,) = struct.unpack_from(">H", jpeg, position + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", jpeg, position + 5)
            return width, height
        position += 2 + length
    return 0, 0


def version() -> str | None:
    """rawpy's version and its LibRaw's, or None when it is not installed."""
    try:
        import rawpy
    except ImportError:
        return None
    return f"rawpy {getattr(rawpy, '__version__', '?')} (LibRaw {'.'.join(map(str, rawpy.libraw_version))})"
