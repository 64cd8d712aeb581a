"""Decoders beside libvips for what it may not read (HEIC with HEVC, camera RAW, JPEG XL, video).

Each module here is the only importer of its wheel and imports it when a file first needs it,
so a missing wheel is one reason naming the package (never an ImportError at start-up).
A decoder hands `resample` either upright 8-bit pixels or an embedded image for libvips to decode.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from thumbcli import formats
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits

#: The scale (of an upright width x height) the largest requested thumbnail needs.
ScaleNeeded = Callable[[int, int], float]


@dataclass(frozen=True, slots=True)
class Pixels:
    """Decoded pixels: 8-bit, interleaved, 1 to 4 bands, in their ICC profile (b"" if sRGB), turned by `orientation`."""

    data: bytes
    width: int
    height: int
    bands: int
    icc_profile: bytes = b""
    #: EXIF orientation (1-8) that turns these pixels upright; 1 when they already are.
    orientation: int = 1
    #: When it was captured (a video's creation time), seconds since 1970; 0: unknown.
    captured: int = 0


@dataclass(frozen=True, slots=True)
class EmbeddedImage:
    """An encoded image inside the file (a RAW's JPEG preview) for libvips, turned by `orientation` (EXIF 1-8)."""

    data: bytes
    orientation: int = 1


Decoded = Pixels | EmbeddedImage


class Decoder(Protocol):
    """What each module here offers: a file's image for libvips, and the version of the library behind it."""

    def decode(self, data: bytes, limits: Limits, scale_needed: ScaleNeeded, /) -> Decoded:
        """The image of `data`, its size checked against `limits` from the header before decoding."""

    def version(self) -> str | None:
        """The wheel's version and its library's, or None when it is not installed."""

    def preload(self) -> None:
        """Import the wheel now, if it is installed."""


#: Every decoder module here. `jpeg` is no format's decoder: libjpeg-turbo's fast path beside libvips' JPEG load.
EVERY_DECODER = tuple(sorted({source.decoder for source in formats.REGISTRY if source.decoder} | {"jpeg"}))
#: The wheels a worker that cannot import later loads before it switches accounts: what plain JPEGs
#: need. The others (rawpy with numpy, PyAV, Pillow, pillow-heif) cost about 0.18 s of CPU and 50 MB
#: per worker; a worker loads one when a file first needs it (see `workers`).
COMMON_DECODERS = frozenset({"jpeg"})


def preload(names: Iterable[str]) -> None:
    """Import every decoder module and the installed wheels of `names` (for a worker about to lose read access)."""
    for name in EVERY_DECODER:
        decoder = load(name)
        if name in names:
            decoder.preload()


def load(name: str) -> Decoder:
    """The decoder module a format names (`SourceFormat.decoder`); its wheel is imported only when it decodes."""
    return cast(Decoder, importlib.import_module(f"{__name__}.{name}"))


class MissingDecoder(FileRejected):
    """A file of a supported kind whose decoder wheel is not installed."""

    def __init__(self, label: str, format_name: str) -> None:
        source = formats.BY_NAME[format_name]
        wheel = source.wheel
        #: The decoder module (under `thumbcli.decoders`) that could not import its wheel.
        self.decoder = source.decoder
        super().__init__(f"{label}: no decoder installed (pip install {wheel}, or reinstall thumbcli)")


def check_pixels(label: str, width: int, height: int, limits: Limits, what: str = "image") -> None:
    """Refuse a header's `width` x `height` over --max-pixels (or empty), before anything is decoded.

    The one place the limit is judged: libvips' headers, each decoder's, the registry's probes
    and a RAW's embedded preview all come here.
    """
    if width < 1 or height < 1:
        raise FileRejected(f"{label}: {what} has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise FileRejected(
            f"{what} is {width}x{height} ({pixels / 1e6:.0f} megapixels), "
            f"over the max-pixels limit of {limits.max_pixels / 1e6:g} megapixels"
        )
