"""Each kind of source thumbcli reads, declared once: how to recognise it, its names, its header size, its decoder.

As Pillow's plugins register themselves, a format is one `SourceFormat` in `REGISTRY` (plus, when
libvips cannot read it, a module under `thumbcli.decoders`). The walker takes its suffixes from
here, `resample` its content test, header probe and decoder, the freedesktop cache its MIME type,
and `thumbcli formats` all of it. Nothing here imports libvips or a decoder wheel: the CLI and the
walker import this module at start-up.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: What sniffing and probing read: a file's bytes, or a view of a mapped JPEG.
Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class SourceFormat:
    """One kind of source: recognised by content, walked by suffix, decoded by libvips or a module beside it."""

    #: The name `sniff` gives, thumbnails record (`Thumbnail.source_format`) and `thumbcli formats` lists.
    name: str
    #: How a one-line reason names the format ("JPEG XL: truncated").
    label: str
    #: Whether a file's bytes are of this format. The tests of the registry exclude one another.
    matches: Callable[[Buffer], bool]
    #: Lowercase file suffixes the walker takes as this format; none for a format never walked.
    suffixes: tuple[str, ...]
    #: The shared-mime-info type (freedesktop.org's Thumb::Mimetype, an HTTP Content-Type).
    mimetype: str
    #: Suffixes whose file has a more precise type than `mimetype` (a .dng is image/x-adobe-dng).
    mimetypes_by_suffix: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: (width, height) from the header, for --max-pixels before anything is decoded; None when the
    #: decoder itself reads the header first and checks it (libvips, pillow-heif, LibRaw, PyAV).
    probe: Callable[[Buffer], tuple[int, int] | None] | None = None
    #: The libvips loader (without `_buffer`); used whenever this libvips has it, trusted.
    loader: str = ""
    #: The module under `thumbcli.decoders` for when libvips has no loader (or no codec) for a file.
    decoder: str = ""
    #: The distribution that brings `decoder`'s library ("" for libvips alone).
    wheel: str = ""

    def mimetype_for(self, suffix: str) -> str:
        """The MIME type of a file of this format named with `suffix` (lowercase, with its dot)."""
        return self.mimetypes_by_suffix.get(suffix, self.mimetype)


def _starts(data: Buffer, *prefixes: bytes, at: int = 0) -> bool:
    head = bytes(data[at : at + max(map(len, prefixes))])
    return head.startswith(prefixes)


# -- content tests --------------------------------------------------------------------

_HEIF_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_VIDEO_BRANDS = (
    *(b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"qt  ", b"M4V ", b"M4VH"),
    *(b"M4VP", b"3gp4", b"3gp5", b"3g2a", b"dash", b"MSNV", b"XAVC", b"mmp4"),
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_DNG_VERSION, _SUB_IFDS, _MAKE = 50706, 330, 271


def _ftyp_brand(data: Buffer, brands: tuple[bytes, ...]) -> bool:
    return _starts(data, b"ftyp", at=4) and _starts(data, *brands, at=8)


def is_camera_raw(data: Buffer) -> bool:
    """Whether a TIFF-structured file is a camera RAW (DNG, CR2, NEF, ARW, PEF, SRW), by its content."""
    if not _starts(data, *_TIFF_MAGIC):
        return False
    if _starts(data, b"CR", at=8):
        return True  # Canon CR2
    order = "<" if _starts(data, b"II") else ">"
    try:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, offset)
        tags = {struct.unpack_from(order + "H", data, offset + 2 + 12 * i)[0] for i in range(min(count, 512))}
    except struct.error:
        return False
    # A camera's TIFF keeps its raw data in sub-IFDs and names the camera; plain TIFFs do neither.
    return _DNG_VERSION in tags or (_SUB_IFDS in tags and _MAKE in tags)


def _is_raw(data: Buffer) -> bool:
    return (
        is_camera_raw(data)
        or _ftyp_brand(data, (b"crx ",))  # Canon CR3
        or _starts(data, b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")  # RAF, ORF, RW2
    )


def _is_video(data: Buffer) -> bool:
    return (
        _ftyp_brand(data, _VIDEO_BRANDS)
        or _starts(data, b"\x1a\x45\xdf\xa3")  # Matroska, WebM
        or (_starts(data, b"RIFF") and _starts(data, b"AVI ", at=8))
    )


def _svg_text(data: Buffer) -> bool:
    text = bytes(data[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<?xml", b"<svg", b"<!--", b"<!doctype svg")) and b"<svg" in text


# -- JPEG XL's header ---------------------------------------------------------------

_JXL_CODESTREAM = b"\xff\x0a"
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
#: SizeHeader.ratio -> width / height (ISO/IEC 18181-1, libjxl's FixedAspectRatios).
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
#: Bytes of codestream that always hold the signature and the SizeHeader (2 + at most 68 bits).
_JXL_HEADER_BYTES = 11
_JXL_MAX_BOXES = 64


def jxl_size(data: Buffer) -> tuple[int, int] | None:
    """(width, height) from a JPEG XL file's SizeHeader, bare codestream or ISOBMFF container; None if unreadable.

    libjxl, and so the Pillow plugin, decodes the whole image when the file is opened; this reads
    the few bits that say its size without it.
    """
    head = _jxl_codestream_head(data) if _starts(data, _JXL_CONTAINER) else bytes(data[:_JXL_HEADER_BYTES])
    # Every codestream is longer than its longest SizeHeader; fewer bytes are a file cut short.
    if len(head) < _JXL_HEADER_BYTES or not head.startswith(_JXL_CODESTREAM):
        return None
    bits = int.from_bytes(head[2:], "little")  # fields are packed from each byte's lowest bit up

    def take(count: int) -> int:
        nonlocal bits
        value = bits & ((1 << count) - 1)
        bits >>= count
        return value

    def edge(small: int) -> int:
        if small:
            return (take(5) + 1) * 8
        return take((9, 13, 18, 30)[take(2)]) + 1  # U32(BitsOffset(9, 1), (13, 1), (18, 1), (30, 1))

    small = take(1)
    height = edge(small)
    ratio = take(3)
    if ratio:
        numerator, denominator = _JXL_RATIOS[ratio]
        return height * numerator // denominator, height
    return edge(small), height


def _jxl_codestream_head(data: Buffer) -> bytes:
    """The first bytes of the codestream in a JPEG XL container: its `jxlc` box, or its `jxlp` parts in order."""
    head = b""
    position = 0
    for _ in range(_JXL_MAX_BOXES):
        if position + 8 > len(data) or len(head) >= _JXL_HEADER_BYTES:
            break
        size, kind = struct.unpack_from(">I4s", data, position)
        start = position + 8
        if size == 1:  # a 64-bit size follows the type
            if position + 16 > len(data):
                break
            (size,) = struct.unpack_from(">Q", data, start)
            start += 8
        elif size == 0:  # the last box runs to the end of the file
            size = len(data) - position
        if size < start - position:
            break
        end = min(position + size, len(data))
        if kind == b"jxlc":
            head += bytes(data[start:end])
        elif kind == b"jxlp":  # each part starts with its 4-byte index
            head += bytes(data[start + 4 : end])
        position += size
    return head[:_JXL_HEADER_BYTES]


# -- the registry ---------------------------------------------------------------------

_RAW_MIMETYPES = {
    ".dng": "image/x-adobe-dng",
    ".cr2": "image/x-canon-cr2",
    ".cr3": "image/x-canon-cr3",
    ".nef": "image/x-nikon-nef",
    ".arw": "image/x-sony-arw",
    ".orf": "image/x-olympus-orf",
    ".rw2": "image/x-panasonic-rw2",
    ".raf": "image/x-fuji-raf",
    ".pef": "image/x-pentax-pef",
    ".srw": "image/x-samsung-srw",
}
_VIDEO_MIMETYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}

#: Every kind of source, in the order `thumbcli formats` lists them.
REGISTRY: tuple[SourceFormat, ...] = (
    SourceFormat(
        "jpeg",
        "JPEG",
        # SOI alone, as libvips tests: files recovered from damaged cards often have a stray byte after it.
        lambda data: _starts(data, b"\xff\xd8"),
        (".jpg", ".jpeg", ".jpe", ".jfif"),
        "image/jpeg",
        loader="jpegload",
    ),
    SourceFormat(
        "png", "PNG", lambda data: _starts(data, b"\x89PNG\r\n\x1a\n"), (".png",), "image/png", loader="pngload"
    ),
    SourceFormat(
        "gif", "GIF", lambda data: _starts(data, b"GIF87a", b"GIF89a"), (".gif",), "image/gif", loader="gifload"
    ),
    SourceFormat(
        "webp",
        "WebP",
        lambda data: _starts(data, b"RIFF") and _starts(data, b"WEBP", at=8),
        (".webp",),
        "image/webp",
        loader="webpload",
    ),
    SourceFormat(
        "tiff",
        "TIFF",
        lambda data: _starts(data, *_TIFF_MAGIC) and not is_camera_raw(data),
        (".tif", ".tiff"),
        "image/tiff",
        loader="tiffload",
    ),
    # libvips first (AVIF, and HEVC where its libheif has the codec); pillow-heif for the HEIC it cannot decode.
    SourceFormat(
        "heif",
        "HEIC",
        lambda data: _ftyp_brand(data, _HEIF_BRANDS),
        (".heic", ".heif", ".avif"),
        "image/heif",
        {".heic": "image/heic", ".avif": "image/avif"},
        loader="heifload",
        decoder="heif",
        wheel="pillow-heif",
    ),
    SourceFormat(
        "jxl",
        "JPEG XL",
        lambda data: _starts(data, _JXL_CODESTREAM, _JXL_CONTAINER),
        (".jxl",),
        "image/jxl",
        probe=jxl_size,
        loader="jxlload",
        decoder="jxl",
        wheel="pillow-jxl-plugin",
    ),
    # Always LibRaw, never libvips' dcrawload: LibRaw hands over the embedded preview without a demosaic.
    SourceFormat(
        "raw",
        "RAW",
        _is_raw,
        tuple(_RAW_MIMETYPES),
        "image/x-dcraw",
        _RAW_MIMETYPES,
        decoder="raw",
        wheel="rawpy",
    ),
    SourceFormat(
        "video",
        "video",
        _is_video,
        tuple(_VIDEO_MIMETYPES),
        "video/x-generic",
        _VIDEO_MIMETYPES,
        decoder="video",
        wheel="av",
    ),
    # Recognised, never walked: libvips marks svgload untrusted and `resample.configure_libvips`
    # blocks untrusted loaders, so every SVG would fail on every run ("not in a known format").
    SourceFormat(
        "svgz", "SVG", lambda data: _starts(data, b"\x1f\x8b"), (), "image/svg+xml-compressed", loader="svgload"
    ),
    SourceFormat("svg", "SVG", _svg_text, (), "image/svg+xml", loader="svgload"),
)

BY_NAME: dict[str, SourceFormat] = {source.name: source for source in REGISTRY}
#: Suffixes of every format the walker takes (lowercase, with their dot).
SOURCE_SUFFIXES = frozenset(suffix for source in REGISTRY for suffix in source.suffixes)


def sniff(data: Buffer) -> SourceFormat | None:
    """The format `data`'s content announces, or None if it announces none thumbcli reads."""
    return next((source for source in REGISTRY if source.matches(data)), None)


def mimetype_of(name: str, path: str | os.PathLike[str]) -> str:
    """The MIME type of a source of format `name` (a `sniff` name) at `path`."""
    source = BY_NAME.get(name)
    if source is None:
        return "application/octet-stream"
    return source.mimetype_for(os.path.splitext(path)[1].lower())


#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic; not DHT, JPG or DAC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: Buffer) -> tuple[int, int] | None:
    """A JPEG's frame size from its SOF segment, walking the segments before it; None when its bytes do not say."""
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return (width, height) if width and height else None
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


def webp_size(data: Buffer) -> tuple[int, int] | None:
    """A WebP's canvas size from its first chunk (VP8X, VP8 or VP8L); None when its bytes do not say."""
    chunk = bytes(data[12:16])
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30 and bytes(data[23:26]) == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def header_size(data: Buffer) -> tuple[str, int, int] | None:
    """(format label, width, height) from a source's first bytes, for --max-pixels before the rest is fetched.

    JPEG, PNG, GIF and WebP say it in their first bytes (a format's `probe` covers others);
    None when the bytes do not tell (then the decoder's own header check still judges it).
    """
    source = sniff(data)
    if source is None:
        return None
    size: tuple[int, int] | None = None
    if source.probe is not None:
        size = source.probe(data)
    elif source.name == "jpeg":
        size = jpeg_size(data)
    elif source.name == "png" and len(data) >= 24:
        size = struct.unpack_from(">II", data, 16)
    elif source.name == "gif" and len(data) >= 10:
        size = struct.unpack_from("<HH", data, 6)
    elif source.name == "webp":
        size = webp_size(data)
    return None if size is None else (source.label, size[0], size[1])
