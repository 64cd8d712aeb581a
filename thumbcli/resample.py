"""The only `import pyvips`: encoded image bytes plus specs in, encoded thumbnails out.

An image's fields are read with `image.get("width")`, not `image.width`: the attribute goes
through pyvips' `__getattr__` and costs twice as much (11 against 5 us), a dozen times per image.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from thumbcli import decodefailure, decoders, formats, icc
from thumbcli.decoders import check_pixels, heif, jpeg
from thumbcli.errors import FileRejected
from thumbcli.formats import SourceFormat
from thumbcli.spec import Limits, ThumbSpec
from thumbcli.spec import Thumbnail as Thumbnail  # re-exported: the value this module makes

os.environ.setdefault("VIPS_WARNING", "0")
import pyvips
from pyvips.voperation import Introspect

log = logging.getLogger(__name__)

# libvips' own text when its libheif lacks the HEIF file's codec (the pyvips wheel has no HEVC decoder).
_NO_LIBVIPS_DECODER = re.compile(r"has not been built in|no decoding plugin|decoder plugin", re.IGNORECASE)
# A first decode refuses truncated files instead of thumbnailing their grey
# remainder; only a file that fails so is decoded again leniently (`fail_on=none`).
# (The thumbnail operations ignore a fail_on keyword; the loader option string works.)
FailOn = Literal["truncated", "none"]
# Formats libvips decodes at full size whatever the thumbnail (no shrink-on-load), as a JPEG whose shrink is 1.
_NO_SHRINK_ON_LOAD = frozenset({"png", "gif"})
# No edge of a box can exceed this; used for the free edge of `200x` / `x200`.
_UNBOUNDED = 10_000_000


class DecodeFailed(FileRejected):
    """libvips could not decode a file: the message is the short reason, `detail` the raw libvips text."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.detail = detail


class Resampled(NamedTuple):
    """Thumbnails made from one file; with a warning when only part of it decoded (a degraded thumbnail)."""

    thumbnails: list[Thumbnail]
    warning: str = ""
    #: The raw libvips text behind the warning.
    detail: str = ""


def configure_libvips() -> None:
    """One libvips thread per worker, no operation cache, untrusted loaders blocked."""
    pyvips.concurrency_set(1)
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.block_untrusted_set(True)


def log_only_libvips_errors() -> None:
    """Hand Python logging libvips' warnings and errors only, for a process that logs nothing below errors.

    libvips reports a dozen info lines per image (loader chosen, reduce paths, ...), and
    pyvips' handler turns each into a Python call and a dropped log record: a twentieth of
    a 320x240 image's CPU. GLib's own handler drops them without leaving C.
    """
    handler = getattr(pyvips, "_log_handler_id", None)
    if not handler:
        return  # another pyvips: its logging stays as it is
    flags = pyvips.GLogLevelFlags
    domain = b"VIPS"
    pyvips.glib_lib.g_log_remove_handler(domain, handler)
    pyvips._log_handler_id = pyvips.glib_lib.g_log_set_handler(
        domain,
        flags.LEVEL_WARNING | flags.LEVEL_CRITICAL | flags.LEVEL_ERROR | flags.FLAG_FATAL | flags.FLAG_RECURSION,
        pyvips._log_handler_cb,
        pyvips.ffi.NULL,
    )


def _error_detail(exc: pyvips.Error) -> str:
    """The raw libvips error text on one line (repeated lines once)."""
    detail = str(getattr(exc, "detail", "") or exc.message or exc)
    lines: list[str] = []
    for line in detail.splitlines():
        line = line.strip()
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _orientation(image: pyvips.Image) -> int:
    """The image's EXIF orientation, 1 to 8, as libvips reads it (1 when it has none, or another number)."""
    if not image.get_typeof("orientation"):
        return 1
    orientation = image.get("orientation")
    return orientation if orientation in range(1, 9) else 1  # `in`: whatever type a loader stored, no exception


def _scale_for(spec: ThumbSpec, width: int, height: int) -> float:
    """The factor that turns an upright width x height into what `spec` asks for."""
    scales = []
    if spec.box.width is not None:
        scales.append(spec.box.width / width)
    if spec.box.height is not None:
        scales.append(spec.box.height / height)
    scale = max(scales) if spec.fit != "inside" else min(scales)
    return scale if spec.upscale else min(scale, 1.0)


def _thumbnail_args(spec: ThumbSpec, width: int, height: int) -> tuple[int, dict[str, Any]]:
    """Arguments of `thumbnail` for an upright `width` x `height` source."""
    if spec.fit == "inside":
        # The exact output size, from the source size: libvips would round from
        # its shrunk-on-load (or shared base) image, so one decode for several
        # sizes would give other dimensions (off by one) than one decode per size.
        scale = _scale_for(spec, width, height)
        return _round_edge(width * scale), {"height": _round_edge(height * scale), "size": "force"}
    kwargs: dict[str, Any] = {
        "height": spec.box.height or _UNBOUNDED,
        "size": "both" if spec.upscale else "down",
        "crop": "centre" if spec.fit == "cover" else "attention",
    }
    return spec.box.width or _UNBOUNDED, kwargs


def _jpeg_shrink(width: int, height: int, scale: float) -> int:
    """The largest JPEG decode shrink (8, 4, 2) that still leaves at least `scale` of the image.

    Only a shrink that makes both edges smaller: libvips refuses to shrink a 1x1 (or 1xN) image.
    """
    for factor in (8, 4, 2):
        if min(width, height) < factor:
            continue
        if math.ceil(width / factor) >= width * scale and math.ceil(height / factor) >= height * scale:
            return factor
    return 1


def _round_edge(length: float) -> int:
    return max(1, math.floor(length + 0.5))


def _to_8bit_srgb(image: pyvips.Image, spec: ThumbSpec) -> pyvips.Image:
    interpretation = image.get("interpretation")
    if interpretation == "rgb16":
        image = image.colourspace("srgb")
    elif interpretation == "grey16":
        image = image.colourspace("b-w")
    elif interpretation not in ("srgb", "b-w"):
        image = image.colourspace("srgb")
    if image.get("format") != "uchar":
        image = image.cast("uchar")
    if spec.format == "jpeg" and image.hasalpha():
        # JPEG has no alpha channel: composite transparent areas onto white.
        image = image.flatten(background=[255] * (image.get("bands") - 1))
    if spec.rgba:
        if image.get("bands") < 3:
            image = image.colourspace("srgb")
        if not image.hasalpha():
            image = image.bandjoin(255)
    return image


def _encode(image: pyvips.Image, spec: ThumbSpec, width: int, height: int) -> bytes:
    metadata = _METADATA_OPTION[spec.keep_metadata]
    quality = spec.effective_quality
    if spec.format == "jpeg":
        bands = image.get("bands")
        if not spec.keep_metadata and jpeg.encodes(width, height, bands):
            pixels = image.write_to_memory()
            encoded = jpeg.encoded(pixels, width, height, bands, quality)
            if encoded is not None:
                return encoded
            image = pyvips.Image.new_from_memory(pixels, width, height, bands, "uchar")
        return bytes(image.jpegsave_buffer(Q=quality, optimize_coding=True, **metadata))
    if spec.format == "webp":
        return bytes(image.webpsave_buffer(Q=quality, **metadata))
    if spec.format == "avif":
        return bytes(image.heifsave_buffer(Q=quality, compression="av1", effort=2, **metadata))
    return bytes(image.pngsave_buffer(compression=6, **metadata))


def saver_keeps_metadata_by_keep() -> bool:
    """Whether this libvips' savers take `keep` (8.15 on) rather than `strip` (8.14, Debian 12's)."""
    return bool(pyvips.at_least_libvips(8, 15))


#: --keep-metadata -> the saver option saying so, in this libvips' words.
_METADATA_OPTION: dict[bool, dict[str, Any]] = (
    {True: {"keep": "all"}, False: {"keep": "none"}}
    if saver_keeps_metadata_by_keep()
    else {True: {"strip": False}, False: {"strip": True}}
)


def resample(
    data: bytes | memoryview,
    specs: tuple[ThumbSpec, ...],
    limits: Limits,
    *,
    strict: bool,
    decode_for: tuple[ThumbSpec, ...] = (),
) -> Resampled:
    """Make one thumbnail per spec from `data`; unless `strict`, from what decodes of a damaged image.

    `data` may be a view of a JPEG, which libvips reads where it is; other formats are bytes.
    `decode_for` are every size of the destination (empty: `specs` are). The image is decoded
    once, as the largest of them needs, and each thumbnail is cut from that decode: a
    thumbnail's bytes depend on its source, its spec and `decode_for`, never on which
    other specs were made with it (`serve --source` makes one, `generate` several).

    Raises FileRejected (DecodeFailed for what libvips refused) with a one-line reason.
    """
    plan = _decode_plan(specs, decode_for)
    source = formats.sniff(data)
    if source is None:
        raise FileRejected(decodefailure.describe_head(bytes(data[:16])))
    source_format = source.name
    if source_format != "jpeg":
        data = bytes(data)  # their loaders (pyvips' *_buffer) and the decoders beside libvips take bytes
    if source.probe is not None:
        size = source.probe(data)
        if size is None:
            raise FileRejected(f"{source.label}: no image size in its header (damaged, or not a {source.label} file)")
        check_pixels(source.label, *size, limits)
    if source.decoder and not (source.loader and libvips_loads(source.loader)):
        return Resampled(_thumbnails_beside_libvips(bytes(data), specs, plan, limits, source))
    try:
        return Resampled(_make_thumbnails(data, specs, plan, limits, source_format, "truncated"))
    except pyvips.Error as exc:
        detail = _error_detail(exc)
    if source.decoder and _NO_LIBVIPS_DECODER.search(detail):
        return Resampled(_thumbnails_beside_libvips(bytes(data), specs, plan, limits, source))
    reason = "truncated" if decodefailure.cut_short(data, source_format) else decodefailure.describe(detail)
    failure = DecodeFailed(reason, detail)
    if strict:
        raise failure
    try:
        thumbnails = _make_thumbnails(data, specs, plan, limits, source_format, "none")
    except pyvips.Error:
        raise failure from None
    return Resampled(thumbnails, str(failure), detail)


def _decode_plan(specs: tuple[ThumbSpec, ...], decode_for: tuple[ThumbSpec, ...]) -> tuple[ThumbSpec, ...]:
    """The sizes one decode serves: `specs` and `decode_for`, one spec per geometry (formats aside)."""
    return tuple({(spec.box, spec.fit, spec.upscale): spec for spec in (*decode_for, *specs)}.values())


def _make_thumbnails(
    data: bytes | memoryview,
    specs: tuple[ThumbSpec, ...],
    plan: tuple[ThumbSpec, ...],
    limits: Limits,
    source_format: str,
    fail_on: FailOn,
) -> list[Thumbnail]:
    load_options = f"fail_on={fail_on}"
    # The header alone is parsed here; no pixel is decoded before the size check.
    if source_format == "jpeg":
        header = pyvips.Image.new_from_source(_in_place(data), load_options, access="sequential")
    else:
        header = pyvips.Image.new_from_buffer(data, load_options, access="sequential")
    width, height = header.get("width"), header.get("height")
    check_pixels(formats.BY_NAME[source_format].label, width, height, limits)
    upright_w, upright_h = (height, width) if _orientation(header) >= 5 else (width, height)
    origin = (upright_w, upright_h, source_format, capture_time(header))
    if source_format in _NO_SHRINK_ON_LOAD:
        # Nothing to shrink on load: every size is cut from the image opened for the header,
        # which spares thumbnail_buffer a second parse (a tenth of the cost of a small image).
        opened = header.copy_memory() if len(specs) > 1 else header
        return [_cut(opened, spec, upright_w, upright_h, origin) for spec in specs]
    if source_format != "jpeg":
        # libvips chooses its own shrink-on-load per size for these (WebP, HEIF, SVG, TIFF
        # pyramids): one decode per spec.
        thumbnails = []
        for spec in specs:
            width, kwargs = _thumbnail_args(spec, upright_w, upright_h)
            kwargs.update(_to_srgb(header))
            image = pyvips.Image.thumbnail_buffer(data, width, option_string=load_options, **kwargs)
            thumbnails.append(_finish(image, spec, origin))
        return thumbnails
    # JPEG: one decode, at the shrink-on-load factor the largest size of the plan needs. libvips'
    # own choice keeps a 2x margin for its final resize (a 4000x3000 JPEG is decoded at 1/4 for
    # a 256 thumbnail); the DCT scaling of a decode straight at 1/8 is as good for a thumbnail,
    # and the decode is most of the cost of the whole run.
    shrink = min(_jpeg_shrink(upright_w, upright_h, _scale_for(spec, upright_w, upright_h)) for spec in plan)
    decoded = None
    if fail_on == "truncated" and not any(spec.keep_metadata for spec in specs):
        # At full size too: a small JPEG's own decode costs libvips about 1.2 ms more than
        # libjpeg-turbo's 0.4 (a 320x240 image; its thumbnail took 14% less CPU, byte for byte the same).
        # Only a PNG records the resolution when it keeps no metadata (its pHYs chunk).
        with_resolution = any(spec.format == "png" for spec in specs)
        decoded = _decoded_by_libjpeg_turbo(data, header, shrink, with_resolution)  # its pixels are in memory already
    plain = decoded is not None
    if decoded is None:
        if shrink == 1:  # full size: the image opened for the header is that decode
            decoded = header
        else:
            decoded = pyvips.Image.jpegload_source(_in_place(data), shrink=shrink, fail_on=fail_on, access="sequential")
        if len(specs) > 1:  # several cuts of one lazy decode: decode once
            decoded = decoded.copy_memory()
    return [_cut(decoded, spec, upright_w, upright_h, origin, plain=plain) for spec in specs]


def _decoded_by_libjpeg_turbo(
    data: bytes | memoryview, header: pyvips.Image, shrink: int, with_resolution: bool
) -> pyvips.Image | None:
    """The JPEG decoded at 1/`shrink` by libjpeg-turbo itself, as libvips' `jpegload` would; None to let libvips do it.

    The same pixels as libvips' decode at that shrink, cut to its size, with what the thumbnail
    reads from the header: orientation, ICC profile, and the resolution `with_resolution`. (Only
    for thumbnails that keep no metadata: libvips' loader attaches EXIF, XMP and IPTC too.)
    """
    bands = header.get("bands")
    # CMYK and YCCK stay with libvips (it inverts Adobe's CMYK); these two are what an image from
    # memory is taken for.
    if header.get("interpretation") != ("b-w" if bands == 1 else "srgb"):
        return None
    if not str(header.get("vips-loader")).startswith("jpegload"):
        return None  # another loader read the header (uhdrload: Ultra HDR), with other metadata
    pixels = jpeg.scaled_pixels(data, shrink, bands)
    if pixels is None:
        return None
    height, width, bands = pixels.shape
    image = pyvips.Image.new_from_memory(pixels, width, height, bands, "uchar")
    if with_resolution:  # one operation more, 0.2 ms of a 320x240 JPEG's 5 (pinned, the other core busy)
        image = image.copy(xres=header.get("xres"), yres=header.get("yres"))
    cut_width, cut_height = header.get("width") // shrink, header.get("height") // shrink
    if (width, height) != (cut_width, cut_height):
        image = image.crop(0, 0, cut_width, cut_height)
    for name in ("orientation", "icc-profile-data"):
        kind = header.get_typeof(name)
        if kind:
            image.set_type(kind, name, header.get(name))
    return image


def _in_place(data: bytes | memoryview) -> pyvips.Source:
    """`data` for a loader to read where it is (the caller keeps it alive until the thumbnails are made).

    pyvips copies a `*_buffer` loader's bytes first: for a camera JPEG opened, then decoded,
    that is two copies of a few MB, 6% of the time of each (in-process, 40 4000x3000 JPEGs).
    """
    return pyvips.Source.new_from_memory(data)


def _cut(
    image: pyvips.Image, spec: ThumbSpec, upright_w: int, upright_h: int, origin: Origin, *, plain: bool = False
) -> Thumbnail:
    """The thumbnail for `spec` of an opened (or decoded) image; `plain`: known to be as `_resized_as_it_is` asks.

    (A decode of libjpeg-turbo's is: the 7 fields that check reads cost 0.08 ms of a 320x240 JPEG.)
    """
    width, kwargs = _thumbnail_args(spec, upright_w, upright_h)
    to_srgb = _to_srgb(image)
    if spec.fit == "inside" and (plain or _resized_as_it_is(image)):
        resized = _resized(image, width, kwargs["height"])
        if not to_srgb:
            return _finish(resized, spec, origin)
        if not spec.keep_metadata and (converted := _converted_to_srgb(resized)) is not None:
            return _finish(converted, spec, origin)
    return _finish(pyvips.Image.thumbnail_image(image, width, **kwargs, **to_srgb), spec, origin)


def _converted_to_srgb(image: pyvips.Image) -> pyvips.Image | None:
    """A resized RGB `image` in sRGB, through its profile's transform built once (see `icc`); None when declined."""
    width, height, bands = image.get("width"), image.get("height"), image.get("bands")
    profile = image.get("icc-profile-data")
    pixels = icc.srgb_pixels(image.write_to_memory(), width, height, profile) if bands == 3 else None
    if pixels is None:
        return None
    converted = pyvips.Image.new_from_memory(pixels, width, height, 3, "uchar")
    return converted.copy(xres=image.get("xres"), yres=image.get("yres"))  # what a PNG's pHYs records


def _resized_as_it_is(image: pyvips.Image) -> bool:
    """Whether `thumbnail` would only resize (and turn) `image`: 8-bit sRGB or grey, no alpha, one page, no gain map."""
    return (
        image.get("format") == "uchar"
        and image.get("bands") in (1, 3)
        and image.get("interpretation") in ("srgb", "b-w")
        and image.get("coding") == "none"
        and image.get_page_height() == image.get("height")
        and not image.get_typeof("gainmap")
        and not image.get_typeof("cicp-transfer-characteristics")
    )


def _resized(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """`image` resized to an upright `width` x `height`, then turned by its EXIF orientation.

    The pixels `thumbnail_image(image, width, height=height, size="force")` gives for such an image
    (see `_resized_as_it_is`): its `resize`, with its arguments, without the operations around it
    that change nothing here. Building those cost 0.25 of the 1.5 ms of a 320x240 JPEG's cut to
    256x192 (one core, the other busy).
    """
    orientation = _orientation(image)
    target_w, target_h = (height, width) if orientation >= 5 else (width, height)
    in_w, in_h = image.get("width"), image.get("height")
    hshrink = min(in_w / target_w, in_w)
    vshrink = min(in_h / target_h, in_h)
    resized = image.resize(1.0 / hshrink, vscale=1.0 / vshrink)
    return resized.autorot() if orientation != 1 else resized


def _to_srgb(image: pyvips.Image) -> dict[str, str]:
    """The `thumbnail` option that converts `image`'s embedded ICC profile to sRGB (none when it is sRGB already).

    libvips' thumbnail converts only CMYK on its own: without it, a JPEG in Adobe RGB or
    Display P3 would be shown with the wrong colours once its profile is stripped.
    """
    if not image.get_typeof("icc-profile-data") or icc.is_srgb(image.get("icc-profile-data")):
        return {}
    return {"output_profile": "srgb"}


#: What each thumbnail of one source says of it: upright width and height, format, capture time.
Origin = tuple[int, int, str, int]
_CAPTURED = re.compile(r"(\d{4}):(\d\d):(\d\d)[ T](\d\d):(\d\d):(\d\d)")


def capture_time(header: pyvips.Image) -> int:
    """When the image was taken, from its EXIF DateTimeOriginal (as the camera's clock read), 0 if it does not say."""
    try:
        if header.get_typeof("exif-ifd2-DateTimeOriginal") == 0:
            return 0
        match = _CAPTURED.match(header.get("exif-ifd2-DateTimeOriginal"))
        if match is None:
            return 0
        year, month, day, hour, minute, second = map(int, match.groups())
        return calendar.timegm(datetime.datetime(year, month, day, hour, minute, second).timetuple())
    except (pyvips.Error, ValueError, TypeError):  # "0000:00:00 00:00:00", as cameras without a clock write
        return 0


def _finish(image: pyvips.Image, spec: ThumbSpec, origin: Origin) -> Thumbnail:
    image = _to_8bit_srgb(image, spec)
    width, height = image.get("width"), image.get("height")
    return Thumbnail(_encode(image, spec, width, height), width, height, *origin)


# -- formats decoded beside libvips -------------------------------------------------


def libvips_loads(loader: str) -> bool:
    """Whether this libvips has `loader` (a `SourceFormat.loader`, such as "jxlload"), trusted, asked of the library.

    Untrusted loaders count as absent: `configure_libvips` blocks them (Debian's 8.14 marks jxlload so).
    """
    if pyvips.type_find("VipsOperation", f"{loader}_buffer") == 0:
        return False
    flags = int(Introspect.get(f"{loader}_buffer").flags)
    return not flags & (_OPERATION_UNTRUSTED | _OPERATION_BLOCKED)


_OPERATION_UNTRUSTED, _OPERATION_BLOCKED = 16, 32  # VipsOperationFlags


@dataclass(frozen=True, slots=True)
class Libvips:
    """The libvips in use: its version, the file it was loaded from, and where that came from."""

    version: str
    path: str
    origin: Literal["pyvips-binary wheel", "system"]
    metadata_option: Literal["keep", "strip"]


@dataclass(frozen=True, slots=True)
class FormatSupport:
    """One kind of source: its suffixes and MIME type, and what decodes it here (empty when nothing can)."""

    kind: str
    suffixes: tuple[str, ...]
    mimetype: str
    decoder: str
    #: The distribution that brings its decoder beside libvips ("" for none).
    wheel: str


def libvips_in_use() -> Libvips:
    """Which libvips this process loaded (its file from /proc/self/maps), and how its savers take metadata."""
    version = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    path = ""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "/libvips" in line}
        path = min(paths, default="")
    except OSError:
        pass
    origin: Literal["pyvips-binary wheel", "system"] = "pyvips-binary wheel" if "pyvips_binary" in path else "system"
    return Libvips(version, path, origin, "keep" if saver_keeps_metadata_by_keep() else "strip")


def format_support() -> list[FormatSupport]:
    """Every kind of source thumbcli walks, from the registry, with the decoder behind it in this installation."""
    libvips = f"libvips {libvips_in_use().version}"
    support = []
    for source in formats.REGISTRY:
        if not source.suffixes:
            continue  # recognised, never walked (SVG)
        if source.name == "heif":
            decoder = _heif_decoders(libvips)
        elif source.loader and libvips_loads(source.loader):
            decoder = f"{libvips} ({source.loader})"
        else:
            decoder = (decoders.load(source.decoder).version() if source.decoder else None) or ""
        support.append(FormatSupport(source.name, source.suffixes, source.mimetype, decoder, source.wheel))
    return support


def _heif_decoders(libvips: str) -> str:
    """AVIF through libvips; HEVC (HEIC) through libvips when its libheif decodes the bundled encoder's sample."""
    sample = heif.sample_hevc_file()
    libvips_reads_hevc = False
    if sample is not None and libvips_loads("heifload"):
        try:
            pyvips.Image.new_from_buffer(sample, "").avg()
            libvips_reads_hevc = True
        except pyvips.Error:
            pass
    avif = f"AVIF: {libvips} (heifload)" if libvips_loads("heifload") else "AVIF: none"
    hevc = f"HEIC: {libvips} (heifload)" if libvips_reads_hevc else f"HEIC: {heif.version() or 'none'}"
    return f"{hevc}; {avif}"


def _thumbnails_beside_libvips(
    data: bytes, specs: tuple[ThumbSpec, ...], plan: tuple[ThumbSpec, ...], limits: Limits, source: SourceFormat
) -> list[Thumbnail]:
    """Thumbnails of a file another decoder reads: its upright pixels (or embedded image) into libvips once."""

    def scale_needed(width: int, height: int) -> float:
        return max(_scale_for(spec, width, height) for spec in plan)

    decoded = decoders.load(source.decoder).decode(data, limits, scale_needed)
    source_format = source.name
    try:
        image, (upright_w, upright_h) = _image_of(decoded, plan, limits, source)
        origin = (upright_w, upright_h, source_format, decoded.captured if isinstance(decoded, decoders.Pixels) else 0)
        if len(plan) > 1:
            # As for a JPEG: one base at the largest scale of the plan, every size cut from it.
            scale = max(_scale_for(spec, upright_w, upright_h) for spec in plan)
            base_w, base_h = max(1, math.ceil(upright_w * scale)), max(1, math.ceil(upright_h * scale))
            image = image.thumbnail_image(base_w, height=base_h, size="both" if scale > 1 else "down").copy_memory()
        thumbnails = [_cut(image, spec, upright_w, upright_h, origin) for spec in specs]
    except pyvips.Error as exc:
        detail = _error_detail(exc)
        raise DecodeFailed(f"{source_format}: {decodefailure.describe(detail)}", detail) from None
    return thumbnails


def _image_of(
    decoded: decoders.Decoded, plan: tuple[ThumbSpec, ...], limits: Limits, source: SourceFormat
) -> tuple[pyvips.Image, tuple[int, int]]:
    """A libvips image, upright, with its ICC profile, of what a decoder gave, and the upright size it stands for.

    An embedded image (a RAW's preview) is checked against --max-pixels from its own header, as
    any source is: a 10 KB RAW may carry a preview that declares 65500x65500. An embedded JPEG is
    decoded shrunk on load (by 2, 4 or 8) when every size of the plan allows it.
    """
    if isinstance(decoded, decoders.EmbeddedImage):
        header = pyvips.Image.new_from_buffer(decoded.data, "")
        width, height = header.get("width"), header.get("height")
        check_pixels(source.label, width, height, limits, "embedded preview")
        turned = decoded.orientation in (5, 6, 7, 8)
        upright = (height, width) if turned else (width, height)
        scale = max(_scale_for(spec, *upright) for spec in plan)
        is_jpeg = formats.sniff(decoded.data) is formats.BY_NAME["jpeg"]
        shrink = _jpeg_shrink(width, height, scale) if is_jpeg else 1
        if shrink > 1:
            image = pyvips.Image.jpegload_buffer(decoded.data, shrink=shrink)
        else:
            image = pyvips.Image.new_from_buffer(decoded.data, "")
        image = image.copy()
        # The RAW's own flip field decides, whatever orientation the preview's EXIF says.
        image.set_type(pyvips.GValue.gint_type, "orientation", decoded.orientation)
        return image.autorot(), upright
    image = pyvips.Image.new_from_memory(decoded.data, decoded.width, decoded.height, decoded.bands, "uchar")
    image = image.copy(interpretation="b-w" if decoded.bands < 3 else "srgb")
    if decoded.icc_profile:  # each cut converts it, small (`_to_srgb`): a whole 12 MP decode in P3 took 150 ms
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", decoded.icc_profile)
    if decoded.orientation != 1:
        image.set_type(pyvips.GValue.gint_type, "orientation", decoded.orientation)
        image = image.autorot()
    return image, (image.get("width"), image.get("height"))
