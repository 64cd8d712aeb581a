"""Issue 10: HEIC, camera RAW, JPEG XL and video through the same pipeline, and a system libvips.

Every file here is made by the tests with the real encoders (pillow-heif's x265, tifffile, PyAV's
libx264, libjxl) and thumbnailed by the real CLI in a subprocess.
"""

from __future__ import annotations

import ctypes.util
import gzip
import importlib.metadata
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pillow_heif
import pytest
import pyvips
import tifffile
from imagekit import assert_clean_failure, draw_photo, load, mean_abs_difference, run_cli
from PIL import Image

from thumbcli import decoders, formats
from thumbcli.cache import CAPTURED_ATTRIBUTE
from thumbcli.discover import IMAGE_SUFFIXES, is_image_name
from thumbcli.targets.freedesktop import file_uri, thumbnail_name
from thumbcli.targets.pngtext import read_png_text

#: The inverse of what a viewer applies for each EXIF orientation: stored pixels that show `upright`.
STORED_FOR = {
    1: lambda image: image,
    2: lambda image: image.fliphor(),
    3: lambda image: image.rot180(),
    4: lambda image: image.flipver(),
    5: lambda image: image.rot90().fliphor(),
    6: lambda image: image.rot270(),
    7: lambda image: image.rot270().fliphor(),
    8: lambda image: image.rot90(),
}


def as_array(image: pyvips.Image) -> np.ndarray:
    """An 8-bit image's pixels as a height x width x bands array."""
    return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8, shape=(image.height, image.width, image.bands))


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def make_heic(path: Path, upright: pyvips.Image, orientation: int = 1, *, icc_profile: bytes = b"") -> Path:
    """A HEVC-coded HEIC (the bundled x265) showing `upright` after its orientation; pixels in `icc_profile`."""
    stored = STORED_FOR[orientation](upright)
    heif_file = pillow_heif.from_bytes(mode="RGB", size=(stored.width, stored.height), data=stored.write_to_memory())
    if icc_profile:
        heif_file.info["icc_profile"] = icc_profile
    output = io.BytesIO()
    heif_file.save(output, quality=95, exif=exif_with_orientation(orientation))
    path.write_bytes(output.getvalue())
    return path


def bayer_mosaic(image: pyvips.Image) -> np.ndarray:
    """`image`'s pixels as a camera sensor would record them: linear 12-bit values through an RGGB mosaic."""
    linear = (as_array(image).astype(np.float64) / 255.0) ** 2.2 * 4000 + 64
    mosaic = np.empty((image.height, image.width), np.uint16)
    mosaic[0::2, 0::2] = linear[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = linear[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = linear[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = linear[1::2, 1::2, 2]
    return mosaic


def make_dng(
    path: Path,
    upright: pyvips.Image,
    *,
    orientation: int = 1,
    preview: bool = False,
    preview_image: pyvips.Image | None = None,
) -> Path:
    """A DNG whose raw data is `upright`'s pixels through an RGGB Bayer mosaic; optionally an RGB preview in IFD0.

    The preview is `upright` itself unless `preview_image` is given.
    """
    stored = STORED_FOR[orientation](upright)
    shown = STORED_FOR[orientation](preview_image if preview_image is not None else upright)
    mosaic = bayer_mosaic(stored)
    identity = (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)
    camera = [
        (50706, "B", 4, (1, 4, 0, 0), False),  # DNGVersion
        (50708, "s", 0, "thumbcli test camera", False),  # UniqueCameraModel
        (50721, "2i", 9, identity, False),  # ColorMatrix1
        (50778, "H", 1, (21,), False),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), False),  # AsShotNeutral
        (271, "s", 0, "thumbcli", False),  # Make
        (274, "H", 1, (orientation,), False),  # Orientation
    ]
    sensor = [
        (33421, "H", 2, (2, 2), False),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), False),  # CFAPattern: RGGB
        (50717, "I", 1, (4095,), False),  # WhiteLevel
        (50714, "H", 1, (64,), False),  # BlackLevel
    ]
    with tifffile.TiffWriter(path) as tif:
        if preview:
            tif.write(as_array(shown), photometric="rgb", subfiletype=1, subifds=1, extratags=camera)
            tif.write(mosaic, photometric=32803, subfiletype=0, extratags=sensor)
        else:
            tif.write(mosaic, photometric=32803, subfiletype=0, extratags=camera + sensor)
    return path


def dng_with_jpeg_preview(
    jpeg: bytes, jw: int, jh: int, mosaic: np.ndarray, orientation: int = 1, *, rgb: bool = False
) -> bytes:
    """A little-endian DNG written by hand (tifffile needs imagecodecs to write JPEG strips):
    IFD0 the JPEG preview (or, with `rgb`, uncompressed RGB bytes), its one SubIFD a 16-bit RGGB mosaic."""
    SHORT, LONG, ASCII, BYTE, SRATIONAL, RATIONAL = 3, 4, 2, 1, 10, 5

    def ifd(entries: list[tuple[int, int, Any]], data_at: int) -> bytes:
        """An IFD of (tag, type, values) entries, its longer values after it (it starts at `data_at`)."""
        entries = sorted(entries)
        size = 2 + 12 * len(entries) + 4
        extra = bytearray()
        body = bytearray(struct.pack("<H", len(entries)))
        fmt = {SHORT: "H", LONG: "I", BYTE: "B", SRATIONAL: "i", RATIONAL: "I"}
        for tag, kind, values in entries:
            if kind == ASCII:
                raw = values.encode() + b"\0"
                count = len(raw)
            else:
                raw = struct.pack(f"<{len(values)}{fmt[kind]}", *values)
                count = len(values) // (2 if kind in (SRATIONAL, RATIONAL) else 1)
            if len(raw) <= 4:
                body += struct.pack("<HHI", tag, kind, count) + raw.ljust(4, b"\0")
            else:
                body += struct.pack("<HHII", tag, kind, count, data_at + size + len(extra))
                extra += raw + (b"\0" if len(raw) % 2 else b"")
        body += struct.pack("<I", 0)
        return bytes(body + extra)

    h, w = mosaic.shape
    raw_bytes = mosaic.astype("<u2").tobytes()
    # layout: header(8) | jpeg | raw | ifd0 | subifd
    jpeg_at = 8
    raw_at = jpeg_at + len(jpeg) + (len(jpeg) % 2)
    ifd0_at = raw_at + len(raw_bytes)

    def ifd0(sub_at: int) -> bytes:
        return ifd(
            [
                (254, LONG, (1,)),
                (256, LONG, (jw,)),
                (257, LONG, (jh,)),
                (258, SHORT, (8, 8, 8)),
                (259, SHORT, (1 if rgb else 7,)),
                (262, SHORT, (2 if rgb else 6,)),
                (271, ASCII, "thumbcli"),
                (273, LONG, (jpeg_at,)),
                (274, SHORT, (orientation,)),
                (277, SHORT, (3,)),
                (278, LONG, (jh,)),
                (279, LONG, (len(jpeg),)),
                (330, LONG, (sub_at,)),
                (50706, BYTE, (1, 4, 0, 0)),
                (50708, ASCII, "thumbcli test camera"),
                (50721, SRATIONAL, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)),
                (50728, RATIONAL, (1, 1, 1, 1, 1, 1)),
            ],
            ifd0_at,
        )

    sub_at = ifd0_at + len(ifd0(0))
    first = ifd0(sub_at)
    sub = ifd(
        [
            (254, LONG, (0,)),
            (256, LONG, (w,)),
            (257, LONG, (h,)),
            (258, SHORT, (16,)),
            (259, SHORT, (1,)),
            (262, SHORT, (32803,)),
            (273, LONG, (raw_at,)),
            (277, SHORT, (1,)),
            (278, LONG, (h,)),
            (279, LONG, (len(raw_bytes),)),
            (33421, SHORT, (2, 2)),
            (33422, BYTE, (0, 1, 1, 2)),
            (50717, LONG, (4095,)),
        ],
        sub_at,
    )
    return b"II*\0" + struct.pack("<I", ifd0_at) + jpeg + b"\0" * (len(jpeg) % 2) + raw_bytes + first + sub


def make_dng_with_jpeg_preview(path: Path, preview: pyvips.Image, *, orientation: int = 1) -> Path:
    """A 600x400 DNG of flat grey sensor data whose embedded JPEG preview shows `preview` once turned."""
    stored = STORED_FOR[orientation](preview)
    jpeg = bytes(stored.jpegsave_buffer(Q=92))
    sensor = np.full((400, 600) if orientation < 5 else (600, 400), 1000, np.uint16)
    path.write_bytes(dng_with_jpeg_preview(jpeg, stored.width, stored.height, sensor, orientation))
    return path


def make_video(
    path: Path, *, dark_frames: int, rotation: int = 0, width: int = 96, height: int = 64, creation_time: str = ""
) -> Path:
    """An H.264 video of 40 frames at 10 fps: `dark_frames` black ones, then `draw_photo`; rotated `rotation` CCW."""
    picture = as_array(draw_photo(width, height))
    black = np.zeros_like(picture)
    with av.open(str(path), mode="w") as container:
        if creation_time:
            container.metadata["creation_time"] = creation_time
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for index in range(40):
            frame = av.VideoFrame.from_ndarray(black if index < dark_frames else picture, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_jxl(path: Path, upright: pyvips.Image) -> Path:
    import pillow_jxl  # noqa: F401 - registers JPEG XL with Pillow

    image = Image.frombytes("RGB", (upright.width, upright.height), upright.write_to_memory())
    image.save(path, format="JXL", quality=95)
    return path


def generate(source: Path, out: Path, *args: str) -> tuple[int, list[str]]:
    run = run_cli("generate", str(source), "-o", str(out), "-s", "128", "--format", "png", *args, timeout=120)
    return run.rc, run.failure_lines


def thumbnail_of(out: Path, name: str) -> pyvips.Image:
    return load(out / "128" / f"{name}.png")


# -- HEIC ------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_heic_of_every_orientation_is_made_upright(tmp_path: Path, orientation: int) -> None:
    upright = draw_photo(240, 160)
    (tmp_path / "src").mkdir()
    make_heic(tmp_path / "src" / "a.heic", upright, orientation)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    thumbnail = thumbnail_of(tmp_path / "out", "a.heic")
    # Turned once: by the file's irot/imir, not again by the EXIF orientation it also carries.
    assert (thumbnail.width, thumbnail.height) == (128, 85)
    assert mean_abs_difference(thumbnail, upright) < 12


def test_heic_in_display_p3_is_converted_to_srgb(tmp_path: Path) -> None:
    red_srgb = pyvips.Image.black(64, 64).new_from_image([255, 0, 0]).copy(interpretation="srgb")
    in_p3 = red_srgb.icc_export(output_profile="p3")
    stored_red = in_p3(0, 0)
    assert stored_red[0] < 240 and stored_red[1] > 30  # the P3 numbers of sRGB red are not (255, 0, 0)
    (tmp_path / "src").mkdir()
    make_heic(tmp_path / "src" / "p3.heic", in_p3, icc_profile=bytes(in_p3.get("icc-profile-data")))
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    red, green, blue = thumbnail_of(tmp_path / "out", "p3.heic")(32, 32)[:3]
    assert red > 245 and green < 20 and blue < 20, (red, green, blue)


def test_a_heic_in_display_p3_is_converted_in_each_size_cut_from_its_one_decode(tmp_path: Path) -> None:
    # Converted after the resize, as a JPEG is (at full size, 12 MP took 150 ms more): each cut converts.
    red_srgb = pyvips.Image.black(300, 200).new_from_image([255, 0, 0]).copy(interpretation="srgb")
    in_p3 = red_srgb.icc_export(output_profile="p3")
    (tmp_path / "src").mkdir()
    make_heic(tmp_path / "src" / "p3.heic", in_p3, 6, icc_profile=bytes(in_p3.get("icc-profile-data")))
    rc, failures = generate(tmp_path / "src", tmp_path / "out", "-s", "64")
    assert (rc, failures) == (0, [])
    for size in ("128", "64"):
        thumb = load(tmp_path / "out" / size / "p3.heic.png")
        assert thumb.width > thumb.height  # stored turned (orientation 6), shown upright
        red, green, blue = thumb(thumb.width // 2, thumb.height // 2)[:3]
        assert red > 245 and green < 20 and blue < 20, (size, red, green, blue)


def test_heic_over_max_pixels_is_refused_from_its_header(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    make_heic(tmp_path / "src" / "big.heic", draw_photo(400, 300))
    rc, failures = generate(tmp_path / "src", tmp_path / "out", "--max-pixels", "0.1")
    assert rc == 1
    assert len(failures) == 1 and "over the max-pixels limit" in failures[0] and "400x300" in failures[0]


def test_heic_decoder_checks_max_pixels_from_the_header_before_decoding(tmp_path: Path) -> None:
    from thumbcli.decoders import heif
    from thumbcli.errors import FileRejected
    from thumbcli.spec import Limits

    data = make_heic(tmp_path / "a.heic", draw_photo(400, 300)).read_bytes()
    assert heif.decode(data, Limits(max_pixels=400 * 300)).width == 400
    with pytest.raises(FileRejected, match=r"400x300 .* over the max-pixels limit"):
        heif.decode(data, Limits(max_pixels=400 * 300 - 1))


# -- camera RAW ------------------------------------------------------------


@pytest.mark.parametrize("preview", [False, True], ids=["demosaic", "embedded-preview"])
def test_dng_thumbnail_matches_the_photo_it_was_made_from(tmp_path: Path, preview: bool) -> None:
    upright = draw_photo(600, 400)
    (tmp_path / "src").mkdir()
    make_dng(tmp_path / "src" / "a.dng", upright, preview=preview)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    thumbnail = thumbnail_of(tmp_path / "out", "a.dng")
    assert (thumbnail.width, thumbnail.height) == (128, 85)
    grey, photo = thumbnail.colourspace("b-w"), upright.colourspace("b-w")
    assert mean_abs_difference(grey, photo) < (12 if preview else 40)
    assert mean_abs_difference(grey, photo) < mean_abs_difference(grey, photo.rot180()) / 1.5


def test_dng_is_turned_by_its_own_orientation(tmp_path: Path) -> None:
    upright = draw_photo(600, 400)
    (tmp_path / "src").mkdir()
    make_dng(tmp_path / "src" / "r.dng", upright, orientation=6)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    thumbnail = thumbnail_of(tmp_path / "out", "r.dng").colourspace("b-w")
    assert (thumbnail.width, thumbnail.height) == (128, 85)
    assert mean_abs_difference(thumbnail, upright.colourspace("b-w")) < 40


@pytest.mark.parametrize(("size", "from_preview"), [(128, True), (256, False)])
def test_embedded_preview_is_used_only_when_large_enough(tmp_path: Path, size: int, from_preview: bool) -> None:
    photo = draw_photo(600, 400)
    # A 160x107 preview of another picture (the photo inverted), so each thumbnail shows which it came from.
    preview = (255 - draw_photo(160, 107)).cast("uchar").copy(interpretation="srgb")
    (tmp_path / "src").mkdir()
    make_dng(tmp_path / "src" / "a.dng", photo, preview=True, preview_image=preview)
    run = run_cli("generate", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "-s", str(size), "--format", "png")
    assert (run.rc, run.failure_lines) == (0, [])
    thumbnail = load(tmp_path / "out" / str(size) / "a.dng.png").colourspace("b-w")
    assert thumbnail.width == size  # from a 300-wide half-size demosaic when the preview is too small
    to_photo = mean_abs_difference(thumbnail, photo.colourspace("b-w"))
    to_preview = mean_abs_difference(thumbnail, preview.colourspace("b-w"))
    assert (to_preview < to_photo) is from_preview, (to_photo, to_preview)


@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_dng_embedded_jpeg_preview_is_shrunk_on_load_and_turned_by_the_raw(tmp_path: Path, orientation: int) -> None:
    photo = draw_photo(600, 400)
    (tmp_path / "src").mkdir()
    make_dng_with_jpeg_preview(tmp_path / "src" / "j.dng", photo, orientation=orientation)
    run = run_cli(
        "generate", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "-s", "128", "-s", "64", "--format", "png"
    )
    assert (run.rc, run.failure_lines) == (0, [])
    for size, height in ((128, 85), (64, 43)):
        thumbnail = load(tmp_path / "out" / str(size) / "j.dng.png")
        assert (thumbnail.width, thumbnail.height) == (size, height)
        # The sensor data is flat grey: a thumbnail that shows the photo came from the preview.
        assert mean_abs_difference(thumbnail, photo) < 12


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its frame header (SOF) patched to declare `width` x `height`; its scans unchanged."""
    patched = bytearray(jpeg)
    position = 2
    while patched[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + struct.unpack_from(">H", patched, position + 2)[0]
    struct.pack_into(">HH", patched, position + 5, height, width)
    return bytes(patched)


def test_dng_whose_preview_declares_a_huge_size_is_refused_before_the_preview_is_decoded(tmp_path: Path) -> None:
    preview = draw_photo(160, 107)
    # Progressive, the costliest to decode: libjpeg keeps every coefficient of the declared size.
    jpeg = jpeg_declaring(bytes(preview.jpegsave_buffer(Q=90, interlace=True)), 65500, 65500)
    assert pyvips.Image.new_from_buffer(jpeg, "").width == 65500
    sensor = np.full((48, 64), 1000, np.uint16)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "jpeg.dng").write_bytes(dng_with_jpeg_preview(jpeg, 160, 107, sensor))
    # An uncompressed RGB preview whose IFD declares 13000x13000 (169 megapixels; the file holds 50 KB
    # of it): LibRaw hands it over in memory it has not written, and its bytes are never copied.
    rgb = dng_with_jpeg_preview(bytes(preview.write_to_memory()), 13000, 13000, sensor, rgb=True)
    (tmp_path / "src" / "rgb.dng").write_bytes(rgb)
    assert all(path.stat().st_size < 70_000 for path in (tmp_path / "src").iterdir())
    # Five seconds to decode: a decode of either preview would be killed, and the reason would say so.
    run = run_cli("generate", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--max-decode-time", "5")
    assert run.rc == 1
    for name, size in (("jpeg.dng", "65500x65500 (4290"), ("rgb.dng", "13000x13000 (169")):
        line = assert_clean_failure(run, name)
        assert f"embedded preview is {size} megapixels), over the max-pixels limit" in line, line
    # The same DNG with an honest preview is thumbnailed from it.
    honest = tmp_path / "honest"
    honest.mkdir()
    (honest / "a.dng").write_bytes(dng_with_jpeg_preview(bytes(preview.jpegsave_buffer(Q=90)), 160, 107, sensor))
    run = run_cli("generate", str(honest), "-o", str(tmp_path / "made"), "-s", "64", "--format", "png")
    assert (run.rc, run.failure_lines) == (0, [])
    assert mean_abs_difference(load(tmp_path / "made" / "64" / "a.dng.png"), preview) < 12


def test_dng_rgb_preview_declared_larger_than_its_strip_is_not_read_past_it(tmp_path: Path) -> None:
    # rawpy hands LibRaw's buffer of an RGB preview over at the size the IFD declares, however short
    # the strip: 2000x2000 over 51 KB crashed the worker on the copy, 200x200 copied whatever memory
    # followed the buffer into the thumbnail. The flat grey sensor data is used instead.
    preview = bytes(draw_photo(160, 107).write_to_memory())
    sensor = np.full((48, 64), 1000, np.uint16)
    (tmp_path / "src").mkdir()
    for side in (200, 2000):
        (tmp_path / "src" / f"{side}.dng").write_bytes(dng_with_jpeg_preview(preview, side, side, sensor, rgb=True))
    run = run_cli("generate", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--format", "png")
    assert (run.rc, run.failure_lines) == (0, []), run.stderr
    for side in (200, 2000):
        thumbnail = load(tmp_path / "out" / "256" / f"{side}.dng.png")
        assert thumbnail.width < side and thumbnail.deviate() < 1, side


# -- video -----------------------------------------------------------------


def test_video_thumbnail_skips_the_dark_opening(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    make_video(tmp_path / "src" / "clip.mp4", dark_frames=20)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    thumbnail = thumbnail_of(tmp_path / "out", "clip.mp4")
    assert (thumbnail.width, thumbnail.height) == (96, 64)  # never enlarged
    assert thumbnail.avg() > 60
    assert mean_abs_difference(thumbnail, draw_photo(96, 64)) < 20


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_video_with_rotation_metadata_is_made_upright(tmp_path: Path, rotation: int) -> None:
    (tmp_path / "src").mkdir()
    make_video(tmp_path / "src" / "turned.mov", dark_frames=0, rotation=rotation)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    thumbnail = thumbnail_of(tmp_path / "out", "turned.mov")
    # The display matrix turns the coded frame counter-clockwise by `rotation` degrees.
    coded = draw_photo(96, 64)
    shown = {90: coded.rot270(), 180: coded.rot180(), 270: coded.rot90()}[rotation]
    assert (thumbnail.width, thumbnail.height) == (shown.width, shown.height)
    assert mean_abs_difference(thumbnail, shown) < 20


def test_video_thumbnail_carries_the_video_creation_time(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    make_video(tmp_path / "src" / "dated.mp4", dark_frames=0, creation_time="2019-05-01T10:20:30.000000Z")
    make_video(tmp_path / "src" / "undated.mp4", dark_frames=0)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    dated = os.fsencode(tmp_path / "out" / "128" / "dated.mp4.png")
    assert os.getxattr(dated, CAPTURED_ATTRIBUTE) == b"1556706030"
    with pytest.raises(OSError):
        os.getxattr(os.fsencode(tmp_path / "out" / "128" / "undated.mp4.png"), CAPTURED_ATTRIBUTE)


def test_video_without_a_video_stream_says_so(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with av.open(str(tmp_path / "src" / "sound.mp4"), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert rc == 1
    assert failures == [f"failed: {tmp_path / 'src' / 'sound.mp4'}: video: no video stream"]


def generate_into_desktop_cache(source: Path, cache_home: Path) -> Path:
    """Run `thumbcli generate SOURCE --freedesktop normal` with XDG_CACHE_HOME at `cache_home`; its normal/ folder."""
    run = subprocess.run(
        [sys.executable, "-m", "thumbcli", "generate", str(source), "--freedesktop", "normal"],
        env={**os.environ, "XDG_CACHE_HOME": str(cache_home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return cache_home / "thumbnails" / "normal"


def test_video_and_raw_carry_their_own_mimetype_into_the_desktop_cache(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    make_video(tmp_path / "src" / "clip.mp4", dark_frames=0)
    make_heic(tmp_path / "src" / "a.heic", draw_photo(120, 80))
    make_dng(tmp_path / "src" / "b.dng", draw_photo(120, 80))
    pngs = list(generate_into_desktop_cache(tmp_path / "src", tmp_path / "xdg").glob("*.png"))
    mimetypes = sorted(read_png_text(png)["Thumb::Mimetype"] for png in pngs)
    assert mimetypes == ["image/heic", "image/x-adobe-dng", "video/mp4"]


# -- JPEG XL ---------------------------------------------------------------


def test_jxl_is_thumbnailed(tmp_path: Path) -> None:
    upright = draw_photo(240, 160)
    (tmp_path / "src").mkdir()
    make_jxl(tmp_path / "src" / "a.jxl", upright)
    rc, failures = generate(tmp_path / "src", tmp_path / "out")
    assert (rc, failures) == (0, [])
    assert mean_abs_difference(thumbnail_of(tmp_path / "out", "a.jxl"), upright) < 12


def jxl_container(codestream: bytes, boxes: str) -> bytes:
    """`codestream` in JPEG XL's ISOBMFF container: in one `jxlc` box, or split in two `jxlp` boxes
    after its third byte, so that its size header straddles them."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    head = b"\x00\x00\x00\x0cJXL \r\n\x87\n" + box(b"ftyp", b"jxl \x00\x00\x00\x00jxl ")
    if boxes == "jxlc":
        return head + box(b"jxlc", codestream)
    first, last = codestream[:3], codestream[3:]
    return head + box(b"jxlp", struct.pack(">I", 0) + first) + box(b"jxlp", struct.pack(">I", 0x80000001) + last)


def jxl_in(codestream: bytes, variant: str) -> bytes:
    return codestream if variant == "codestream" else jxl_container(codestream, variant)


def jxl_size_header(width: int, height: int) -> bytes:
    """A JPEG XL codestream's signature and SizeHeader declaring `width` x `height`, both edges as 30-bit fields.

    Its bits, lowest first: small (0), selector 3, height - 1, ratio 0 (the width follows), selector 3, width - 1.
    """
    bits = 3 << 1 | (height - 1) << 3 | 3 << 36 | (width - 1) << 38
    return b"\xff\x0a" + bits.to_bytes(9, "little")


JXL_VARIANTS = ["codestream", "jxlc", "jxlp"]


@pytest.mark.parametrize("variant", JXL_VARIANTS)
def test_jxl_over_max_pixels_is_refused_from_its_header_before_the_plugin_decodes_it(
    tmp_path: Path, variant: str
) -> None:
    codestream = make_jxl(tmp_path / "real.jxl", draw_photo(300, 200)).read_bytes()
    assert codestream.startswith(b"\xff\x0a")  # the plugin writes a bare codestream; the container is made here
    data = jxl_in(codestream, variant)
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "a.jxl").write_bytes(data)
    # The container and the codestream inside it are whole: under the limit, the plugin thumbnails it.
    rc, failures = generate(tmp_path / "whole", tmp_path / "made")
    assert (rc, failures) == (0, [])
    assert mean_abs_difference(thumbnail_of(tmp_path / "made", "a.jxl"), draw_photo(300, 200)) < 12
    # Over the limit, the file is refused; and so is its first bytes alone (the header and 16 bytes
    # of codestream): the size came from the header, not from an image the plugin decoded.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jxl").write_bytes(data)
    (tmp_path / "src" / "head.jxl").write_bytes(data[: len(data) - len(codestream) + 16])
    run = run_cli("generate", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--max-pixels", "0.05")
    assert run.rc == 1
    for name in ("a.jxl", "head.jxl"):
        line = assert_clean_failure(run, name)
        assert "image is 300x200" in line and "over the max-pixels limit of 0.05 megapixels" in line, line


@pytest.mark.parametrize("variant", JXL_VARIANTS)
def test_jxl_header_declaring_65500_square_is_refused_before_anything_is_decoded(tmp_path: Path, variant: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bomb.jxl").write_bytes(jxl_in(jxl_size_header(65500, 65500) + bytes(256), variant))
    run = run_cli("generate", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--max-decode-time", "5")
    line = assert_clean_failure(run, "bomb.jxl")
    assert "image is 65500x65500 (4290 megapixels), over the max-pixels limit of 100 megapixels" in line, line


def test_jxl_size_header_of_every_shape_is_read_as_libjxl_wrote_it(tmp_path: Path) -> None:
    # Small (multiples of 8 up to 256), each fixed aspect ratio, and each width of U32 field.
    for width, height in ((64, 64), (256, 128), (8, 256), (240, 160), (300, 200), (9, 7), (123, 4567), (4000, 3000)):
        image = Image.new("RGB", (width, height))
        encoded = io.BytesIO()
        image.save(encoded, format="JXL", quality=50)
        assert formats.jxl_size(encoded.getvalue()) == (width, height)
        assert formats.jxl_size(jxl_container(encoded.getvalue(), "jxlp")) == (width, height)
    assert formats.jxl_size(jxl_size_header(70000, 3)) == (70000, 3)
    assert formats.jxl_size(b"\xff\x0a\x00") is None  # cut inside its size header


# -- damaged files: one line each, in the format's own words ---------------


def _good_files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    photo = draw_photo(240, 160)
    return {
        "heic": make_heic(folder / "a.heic", photo),
        "dng": make_dng(folder / "a.dng", photo),
        "mp4": make_video(folder / "a.mp4", dark_frames=0),
        "jxl": make_jxl(folder / "a.jxl", photo),
    }


def test_truncated_and_garbage_files_of_each_format_fail_with_one_line_each(tmp_path: Path) -> None:
    good = _good_files(tmp_path / "good")
    src = tmp_path / "src"
    src.mkdir()
    for suffix, path in good.items():
        data = path.read_bytes()
        (src / f"truncated.{suffix}").write_bytes(data[: len(data) // 3])
        # Garbage that starts like the format, so it reaches its decoder.
        (src / f"garbage.{suffix}").write_bytes(data[:512] + os.urandom(2000))
    run = run_cli("generate", str(src), "-o", str(tmp_path / "out"), "-s", "64", timeout=120)
    assert run.rc == 1
    lines = run.failure_lines
    assert len(lines) == 8, run.stderr
    assert all(line.count("\n") == 0 and len(line) < 300 + len(str(src)) for line in lines)
    joined = "\n".join(lines)
    # Nothing else on stderr: no decoder's own dump.
    assert [line for line in run.stderr.splitlines() if not line.startswith("failed: ")] == [
        run.stderr.splitlines()[-1]
    ]
    assert run.stderr.splitlines()[-1].startswith("thumbcli: made 0")
    for suffix in good:
        for kind in ("truncated", "garbage"):
            assert f"{kind}.{suffix}: " in joined
    labels = {"heic": ("HEIC", "HEIF", "truncated"), "dng": ("RAW",), "mp4": ("video",), "jxl": ("JPEG XL",)}
    for line in lines:
        suffix = line.split(":")[1].rsplit(".", 1)[1]
        assert any(label in line for label in labels[suffix]), line


# -- formats and the libvips in use ----------------------------------------


def test_formats_names_the_libvips_and_a_decoder_for_every_kind() -> None:
    run = run_cli("formats", "--json")
    assert run.rc == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["libvips"]["version"] == ".".join(str(pyvips.version(part)) for part in range(3))
    kinds = {kind["kind"]: kind for kind in report["formats"]}
    assert {"jpeg", "png", "heif", "jxl", "raw", "video"} <= set(kinds)
    assert all(kind["decoder"] for kind in kinds.values()), kinds
    assert "rawpy" in kinds["raw"]["decoder"] and "PyAV" in kinds["video"]["decoder"]
    assert ".cr2" in kinds["raw"]["suffixes"] and ".mov" in kinds["video"]["suffixes"]
    text = run_cli("formats")
    assert text.rc == 0 and text.stdout.startswith(f"libvips {report['libvips']['version']} (")


def real_files_of_each_format(folder: Path) -> dict[str, list[Path]]:
    """Files of every registry entry in `folder`, made by the real encoders: by format name, the same
    content under each of its format's suffixes (one file for a format never walked)."""
    made = folder.with_name(f"{folder.name}-made")
    made.mkdir()
    photo = draw_photo(96, 64)
    originals = {
        "heif": make_heic(made / "a.heic", photo),
        "jxl": make_jxl(made / "a.jxl", photo),
        "raw": make_dng(made / "a.dng", draw_photo(120, 80)),
        "video": make_video(made / "a.mp4", dark_frames=0),
    }
    for name in ("jpeg", "png", "gif", "webp", "tiff"):
        originals[name] = made / f"a.{name}"
        photo.write_to_file(str(originals[name]))
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>\n'
    originals["svg"] = made / "a.svg"
    originals["svg"].write_bytes(svg)
    originals["svgz"] = made / "a.svgz"
    originals["svgz"].write_bytes(gzip.compress(svg))
    folder.mkdir()
    files: dict[str, list[Path]] = {}
    for name, original in originals.items():
        files[name] = [folder / f"{name}{suffix}" for suffix in formats.BY_NAME[name].suffixes or (original.suffix,)]
        for path in files[name]:
            path.write_bytes(original.read_bytes())
    return files


def test_registry_each_format_is_sniffed_from_a_real_file_of_it_and_no_other(tmp_path: Path) -> None:
    files = real_files_of_each_format(tmp_path / "src")
    assert set(files) == set(formats.BY_NAME)  # a new entry needs a real file here
    avif = tmp_path / "a.avif"
    draw_photo(96, 64).heifsave(str(avif), compression="av1")
    for name, path in [*((name, paths[0]) for name, paths in files.items()), ("heif", avif)]:
        data = path.read_bytes()
        assert [source.name for source in formats.REGISTRY if source.matches(data)] == [name], path
        sniffed = formats.sniff(memoryview(data))
        assert sniffed is not None and sniffed.name == name


def test_registry_suffixes_are_walked_and_mimetypes_reach_the_desktop_cache(tmp_path: Path) -> None:
    files = real_files_of_each_format(tmp_path / "src")
    walked = {suffix for source in formats.REGISTRY for suffix in source.suffixes}
    assert walked == IMAGE_SUFFIXES
    for suffix in walked:
        assert is_image_name(f"a{suffix}") and is_image_name(f"A{suffix.upper()}"), suffix
    assert not is_image_name("a.svg") and not is_image_name("a.svgz")  # recognised, never walked
    normal = generate_into_desktop_cache(tmp_path / "src", tmp_path / "xdg")
    made = 0
    for name, paths in files.items():
        for path in paths if formats.BY_NAME[name].suffixes else []:
            png = normal / thumbnail_name(file_uri(path))
            mimetype = read_png_text(png)["Thumb::Mimetype"]
            assert mimetype == formats.BY_NAME[name].mimetype_for(path.suffix), path
            assert mimetype.startswith(("image/", "video/")), path
            made += 1
    assert made == len(walked)


def test_registry_is_what_thumbcli_formats_lists_and_each_decoder_module_and_wheel_exist() -> None:
    run = run_cli("formats", "--json")
    assert run.rc == 0, run.stderr
    listed = [
        (kind["kind"], tuple(kind["suffixes"]), kind["mimetype"], kind["wheel"])
        for kind in json.loads(run.stdout)["formats"]
    ]
    walked = [source for source in formats.REGISTRY if source.suffixes]
    assert listed == [(source.name, source.suffixes, source.mimetype, source.wheel) for source in walked]
    for source in formats.REGISTRY:
        assert bool(source.decoder) == bool(source.wheel), source.name
        if source.decoder:
            assert decoders.load(source.decoder).version() is not None, source.name
            assert importlib.metadata.version(source.wheel)


SYSTEM_LIBVIPS = ctypes.util.find_library("vips")


@pytest.mark.skipif(SYSTEM_LIBVIPS is None, reason="no system libvips (apt-get install libvips42)")
def test_a_system_libvips_is_detected_and_used(tmp_path: Path) -> None:
    # pyvips falls back to the system libvips (ABI mode) when its compiled module cannot be imported,
    # as where pyvips-binary is not installed; a package of that name that refuses to import does so here.
    blocker = tmp_path / "no-binary" / "_libvips"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('use the system libvips')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}

    def thumbcli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "thumbcli", *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    report = json.loads(thumbcli("formats", "--json").stdout)
    libvips = report["libvips"]
    assert libvips["origin"] == "system" and "pyvips_binary" not in libvips["path"]
    major, minor = map(int, libvips["version"].split(".")[:2])
    assert libvips["metadata_option"] == ("keep" if (major, minor) >= (8, 15) else "strip")
    photo = draw_photo(240, 160)
    (tmp_path / "src").mkdir()
    photo.write_to_file(str(tmp_path / "src" / "a.jpg"))
    make_heic(tmp_path / "src" / "b.heic", photo)
    for keep in ([], ["--keep-metadata"]):
        made = thumbcli("generate", str(tmp_path / "src"), "-o", str(tmp_path / f"out{len(keep)}"), *keep)
        assert made.returncode == 0, made.stderr
        assert mean_abs_difference(load(tmp_path / f"out{len(keep)}" / "256" / "b.heic.jpg"), photo) < 12
