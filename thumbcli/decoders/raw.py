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
from thumbcli.formats import jpeg_size
from thumbcli.spec import Limits

_LABEL = "RAW"
_IMAGE_WIDTH, _IMAGE_LENGTH, _COMPRESSION, _STRIP_OFFSETS, _STRIP_BYTE_COUNTS, _SUB_IFDS = 256, 257, 259, 273, 279, 330
_SHORT, _LONG = 3, 4
#: IFDs looked at for an RGB preview's strips: a hostile file's IFD chain may loop or run long.
_MAX_IFDS = 64
#: LibRaw's flip field -> the EXIF orientation that turns the sensor image upright.
_ORIENTATION_OF_FLIP = {0: 1, 3: 3, 5: 8, 6: 6}


def decode(data: bytes, limits: Limits, scale_needed: ScaleNeeded) -> Pixels | EmbeddedImage:
    """The embedded preview when it is large enough, else a half-size demosaic; size checked from the header."""
    try:
        import rawpy
    except (ImportError, OSError):  # OSError: a worker's account may not read the wheel
        raise MissingDecoder(_LABEL, "raw") from None
    try:
        with _stderr_silenced(), rawpy.imread(io.BytesIO(data)) as raw_image:
            sizes = raw_image.sizes
            flip = sizes.flip
            check_pixels(_LABEL, sizes.width, sizes.height, limits)
            upright_w, upright_h = (sizes.height, sizes.width) if flip in (5, 6) else (sizes.width, sizes.height)
            needed_edge = math.ceil(max(upright_w, upright_h) * scale_needed(upright_w, upright_h))
            orientation = _ORIENTATION_OF_FLIP.get(flip, 1)
            preview = _preview(raw_image, rawpy, data, needed_edge, orientation, limits)
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
        # Opened to read: a confined worker may open no file to write (thumbcli.sandbox), and
        # LibRaw's writes to a descriptor open only for reading fail just as silently.
        with open(os.devnull, "rb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _preview(
    raw_image: object, rawpy: object, data: bytes, needed_edge: int, orientation: int, limits: Limits
) -> Pixels | EmbeddedImage | None:
    """The embedded preview (JPEG or RGB) when its longer edge is at least `needed_edge`, else None.

    A JPEG preview's size is checked by `resample` from its header, as every embedded image's is;
    an RGB one's here, before its pixels are copied. rawpy wraps LibRaw's buffer of an RGB preview
    in an array of the size the IFD declares, however short the buffer (a 16 KB DNG may declare
    13000x13000): one is used only when the file's own strips hold all of it (`_rgb_strips_hold`).
    """
    try:
        thumb = raw_image.extract_thumb()  # type: ignore[attr-defined]
    except rawpy.LibRawError:  # type: ignore[attr-defined]
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:  # type: ignore[attr-defined]
        jpeg = bytes(thumb.data)
        return EmbeddedImage(jpeg, orientation) if max(jpeg_size(jpeg) or (0, 0)) >= needed_edge else None
    rgb = thumb.data
    if rgb.ndim == 3:
        check_pixels(_LABEL, rgb.shape[1], rgb.shape[0], limits, "embedded preview")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype.itemsize != 1 or max(rgb.shape[:2]) < needed_edge:
        return None
    if not _rgb_strips_hold(data, rgb.shape[1], rgb.shape[0]):
        return None
    return Pixels(rgb.tobytes(), rgb.shape[1], rgb.shape[0], 3, orientation=orientation)


def _rgb_strips_hold(data: bytes, width: int, height: int) -> bool:
    """Whether the TIFF IFDs of `data` that declare an uncompressed `width` x `height` image each start
    with a strip of all its 8-bit RGB bytes, inside the file (and there is one).

    LibRaw sizes its buffer of such a preview by the IFD's first strip byte count; rawpy reads
    width * height * 3 bytes from it whatever that count: a DNG declaring 2000x2000 over a 50 KB
    strip crashed the worker, and a smaller overshoot copied the memory after the buffer into the
    thumbnail. Other RAWs' RGB previews (and previews in several strips) are not used: the demosaic is.
    """
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return False
    order = "<" if data[:2] == b"II" else ">"
    needed = width * height * 3
    matched = False
    todo: list[int] = [struct.unpack_from(order + "I", data, 4)[0]]
    seen: set[int] = set()
    try:
        while todo and len(seen) < _MAX_IFDS:
            offset = todo.pop()
            if offset in seen:
                continue
            seen.add(offset)
            tags, next_ifd = _ifd(data, order, offset)
            todo.extend(tags.get(_SUB_IFDS, ()))
            if next_ifd:
                todo.append(next_ifd)
            size = (tags.get(_IMAGE_WIDTH, ()), tags.get(_IMAGE_LENGTH, ()), tags.get(_COMPRESSION, (1,)))
            if size != ((width,), (height,), (1,)):
                continue
            starts, counts = tags.get(_STRIP_OFFSETS, ()), tags.get(_STRIP_BYTE_COUNTS, ())
            if not starts or not counts or counts[0] < needed or starts[0] + needed > len(data):
                return False
            matched = True
    except struct.error:
        return False
    return matched


def _ifd(data: bytes, order: str, offset: int) -> tuple[dict[int, tuple[int, ...]], int]:
    """The SHORT and LONG fields of the TIFF IFD at `offset`, by tag, and the offset of the next IFD."""
    (count,) = struct.unpack_from(order + "H", data, offset)
    tags: dict[int, tuple[int, ...]] = {}
    for entry in range(offset + 2, offset + 2 + 12 * min(count, 512), 12):
        tag, kind, values = struct.unpack_from(order + "HHI", data, entry)
        if kind not in (_SHORT, _LONG) or values > 4096:
            continue
        code = "H" if kind == _SHORT else "I"
        at = entry + 8 if values * struct.calcsize(code) <= 4 else struct.unpack_from(order + "I", data, entry + 8)[0]
        tags[tag] = struct.unpack_from(f"{order}{values}{code}", data, at)
    (next_ifd,) = struct.unpack_from(order + "I", data, offset + 2 + 12 * count)
    return tags, next_ifd


def preload() -> None:
    """Import rawpy now if it is installed (a sandboxed worker may not be able to later)."""
    with contextlib.suppress(ImportError):
        import rawpy  # noqa: F401


def version() -> str | None:
    """rawpy's version and its LibRaw's, or None when it is not installed."""
    try:
        import rawpy
    except ImportError:
        return None
    return f"rawpy {getattr(rawpy, '__version__', '?')} (LibRaw {'.'.join(map(str, rawpy.libraw_version))})"
