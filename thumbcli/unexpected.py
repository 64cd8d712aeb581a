"""The per-file boundary's last word: a one-line reason for an exception no decoder expected, and where it came from.

Inside a resample worker every exception a decoder raises on a file is that file's failure
(third-party parsers raise anything on hostile bytes); this names what kind of thing went
wrong for the user, and keeps the traceback on one line for the fail log.
"""

from __future__ import annotations

import os
import re
import traceback

from thumbcli import formats

#: Where Pillow parses EXIF: an exception from there is damaged EXIF, whichever image carries it.
_EXIF_CODE = re.compile(r"(TiffImagePlugin|ExifTags)\.py$|exif", re.IGNORECASE)
_DETAIL_FRAMES = 6


def reason_and_detail(exc: Exception, source_format: formats.SourceFormat | None) -> tuple[str, str]:
    """A file's one-line reason for an exception no decoder expected, and the traceback on one line (the detail).

    The reason names what kind of thing went wrong and the exception's type; the detail
    says where, for the fail log.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    label = source_format.label if source_format is not None else "image"
    for frame in frames:
        module = frame.filename.replace(os.sep, "/")
        if "/thumbcli/decoders/" in module:
            # The decoder that raised names what it reads (a RAW's embedded JPEG is still a RAW).
            decoder = module.rsplit("/", 1)[-1].removesuffix(".py")
            label = next((known.label for known in formats.REGISTRY if known.decoder == decoder), label)
    kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
    if isinstance(exc, UnicodeError):
        what = f"{label} metadata is not UTF-8"
    elif any(_EXIF_CODE.search(frame.filename) or _EXIF_CODE.search(frame.name) for frame in frames):
        what = f"{label} EXIF metadata is damaged"
    elif isinstance(exc, RecursionError):
        what = f"{label} structure nests too deeply"
    else:
        what = f"{label} decoder failed on its content"
    where = " < ".join(
        f"{_short_path(frame.filename)}:{frame.lineno} {frame.name}" for frame in frames[::-1][:_DETAIL_FRAMES]
    )
    message = " ".join(str(exc).split())[:300]
    return f"could not decode: {what} ({kind})", f"{kind}: {message} (at {where})"


def _short_path(path: str) -> str:
    """A traceback's file name from its package on (`av/container/core.py`, `thumbcli/decoders/jxl.py`)."""
    parts = path.replace(os.sep, "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1 :])
    if "thumbcli" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("thumbcli") :])
    return parts[-1]
