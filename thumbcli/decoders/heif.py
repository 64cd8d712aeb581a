"""HEIC/HEIF through pillow-heif (libheif with its HEVC decoder bundled): the only `import pillow_heif`.

Used when libvips cannot decode a HEIF file itself (the pyvips wheel's libheif has no HEVC decoder).
libheif turns the image by its `irot`/`imir` transforms while decoding; the EXIF orientation an
iPhone also writes describes the same turn, so it is not applied again.
"""

from __future__ import annotations

import contextlib
import io
from typing import cast

from thumbcli.decoders import MissingDecoder, Pixels, ScaleNeeded, check_pixels
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits

_LABEL = "HEIC"


def decode(data: bytes, limits: Limits, scale_needed: ScaleNeeded | None = None) -> Pixels:
    """The primary image of a HEIF file, upright, 8-bit, with its ICC profile; the size checked from the header."""
    del scale_needed  # libheif decodes the whole image; libvips makes every size from it
    try:
        import pillow_heif
    except (ImportError, OSError):  # OSError: a worker's account may not read the wheel
        raise MissingDecoder(_LABEL, "heif") from None
    pillow_heif.options.THUMBNAILS = False
    pillow_heif.options.DEPTH_IMAGES = False
    pillow_heif.options.AUX_IMAGES = False
    pillow_heif.options.DECODE_THREADS = 1
    try:
        heif_file = pillow_heif.open_heif(data, convert_hdr_to_8bit=True)
    except (ValueError, RuntimeError, OSError) as exc:
        raise FileRejected(_reason(str(exc))) from None
    if len(heif_file) == 0:
        raise FileRejected(f"{_LABEL}: no image item")
    primary = heif_file[heif_file.primary_index]
    width, height = primary.size
    check_pixels(_LABEL, width, height, limits)
    try:
        pixels = cast(bytes, primary.data)  # decodes
        stride = primary.stride
    except (ValueError, RuntimeError, OSError) as exc:
        raise FileRejected(_reason(str(exc))) from None
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(primary.mode)
    if bands is None:
        raise FileRejected(f"{_LABEL}: unsupported pixel layout {primary.mode}")
    row = width * bands
    packed = bytes(pixels) if stride == row else b"".join(pixels[y * stride : y * stride + row] for y in range(height))
    profile = primary.info.get("icc_profile")
    return Pixels(packed, width, height, bands, profile if isinstance(profile, bytes) else b"")


def _reason(text: str) -> str:
    """A one-line reason from libheif's text: what is wrong first."""
    lowered = text.lower()
    if "no 'ftyp'" in lowered or "unsupported filetype" in lowered or "not supported" in lowered:
        return f"{_LABEL}: not a HEIF file"
    if "end of data" in lowered or "truncated" in lowered or "premature" in lowered or "not enough data" in lowered:
        return f"{_LABEL}: truncated"
    if "no 'pitm'" in lowered or "no image" in lowered or "no item" in lowered:
        return f"{_LABEL}: no image item"
    first = text.strip().splitlines()[0] if text.strip() else "could not decode"
    return f"{_LABEL}: {first[:200]}"


def preload() -> None:
    """Import pillow-heif now if it is installed (a sandboxed worker may not be able to later)."""
    with contextlib.suppress(ImportError):
        import pillow_heif  # noqa: F401


def version() -> str | None:
    """pillow-heif's version and its libheif's, or None when it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return None
    return f"pillow-heif {pillow_heif.__version__} (libheif {pillow_heif.libheif_version()})"


def sample_hevc_file() -> bytes | None:
    """A tiny HEVC-coded HEIC made by the bundled encoder (to ask libvips whether it reads HEVC), or None."""
    try:
        import pillow_heif
    except ImportError:
        return None
    try:
        heif_file = pillow_heif.from_bytes(mode="RGB", size=(16, 16), data=bytes(16 * 16 * 3))
        output = io.BytesIO()
        heif_file.save(output, quality=50)
    except (ValueError, RuntimeError, OSError):
        return None  # no HEVC encoder in this build
    return output.getvalue()
