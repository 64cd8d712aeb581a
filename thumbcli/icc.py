"""Embedded ICC profiles: which is sRGB already (no transform), and the transform of any other, built once.

Most camera and phone JPEGs carry an sRGB profile; building a colour transform for each of
them costs about 2 ms a thumbnail, for pixels that would come out (nearly) the same.

The others repeat too: every iPhone JPEG carries the same Display P3 profile. libvips builds
its transform again for each image (2 ms of littlecms): a 12 MP P3 JPEG took 5.9 ms of CPU
beyond its decode, against 3.0 for an sRGB one. Here littlecms, through Pillow, builds one
per profile and converts the thumbnail's pixels: 4.5 ms, within one level of libvips' pixels
(the same littlecms and intent).
"""

from __future__ import annotations

import codecs
import functools
import io
import struct
from typing import Any

_HEADER_BYTES = 128
_TAG_ENTRY = struct.Struct(">4sII")
#: The largest profile whose transform is kept (a phone's or camera's is 0.5-4 KB): a hostile file may
#: embed megabytes, and a few kept would count against its worker's memory ceiling on later files.
_KEPT_PROFILE_BYTES = 64 << 10


def is_srgb(profile: bytes) -> bool:
    """Whether `profile` is an RGB profile whose description names sRGB ("sRGB IEC61966-2.1", "sRGB built-in")."""
    if len(profile) < _HEADER_BYTES + 4 or profile[16:20] != b"RGB ":
        return False
    return description(profile).lower().startswith("srgb")


def description(profile: bytes) -> str:
    """The profile's description tag (`desc`, ICC v2 text or v4 multi-language), "" when it has none readable."""
    try:
        (count,) = struct.unpack_from(">I", profile, _HEADER_BYTES)
        for index in range(min(count, 100)):
            signature, offset, size = _TAG_ENTRY.unpack_from(profile, _HEADER_BYTES + 4 + 12 * index)
            if signature == b"desc":
                return _text(profile[offset : offset + size])
    except struct.error:
        pass
    return ""


def _text(tag: bytes) -> str:
    kind = tag[:4]
    if kind == b"desc":  # ICC v2 textDescriptionType: a counted ASCII string
        (length,) = struct.unpack_from(">I", tag, 8)
        return tag[12 : 12 + length].split(b"\0", 1)[0].decode("latin-1")
    if kind == b"mluc":  # ICC v4 multiLocalizedUnicodeType: the first record, UTF-16BE
        (records,) = struct.unpack_from(">I", tag, 8)
        if records:
            length, offset = struct.unpack_from(">II", tag, 20)
            # The codec itself, not `.decode("utf-16-be")`: that looks its module up by name on first
            # use, and a worker switched to a user who cannot read the standard library cannot import it.
            text, _ = codecs.utf_16_be_decode(tag[offset : offset + length], "replace")
            return text.split("\0", 1)[0]
    return ""


def srgb_pixels(pixels: bytes, width: int, height: int, profile: bytes) -> bytes | None:
    """8-bit interleaved RGB `pixels` in `profile`, converted to sRGB; None when Pillow or the profile cannot.

    None too for a profile over _KEPT_PROFILE_BYTES: libvips converts with it, as before.
    """
    transform = _transform_to_srgb(profile) if len(profile) <= _KEPT_PROFILE_BYTES else None
    if transform is None:
        return None
    from PIL import Image, ImageCms

    try:
        image = Image.frombytes("RGB", (width, height), pixels)
        ImageCms.applyTransform(image, transform, inPlace=True)
    except (ImageCms.PyCMSError, ValueError, OSError):
        return None
    return image.tobytes()


@functools.lru_cache(maxsize=8)
def _transform_to_srgb(profile: bytes) -> Any | None:
    """The transform from `profile` to sRGB (what libvips' thumbnail applies), or None; a few profiles kept."""
    try:
        from PIL import ImageCms
    except (ImportError, OSError):  # OSError: a worker's account may not read where Pillow lives
        return None
    try:
        return ImageCms.buildTransform(
            ImageCms.ImageCmsProfile(io.BytesIO(profile)),
            ImageCms.createProfile("sRGB"),
            "RGB",
            "RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):  # a damaged or hostile profile: libvips decides
        return None
