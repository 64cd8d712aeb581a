"""Encoded bytes plus specs in, encoded thumbnails out: real libvips decodes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pyvips
from imagekit import (
    CORPUS,
    draw_photo,
    make_cmyk_jpeg,
    make_oriented_jpeg,
    make_photo,
    make_png16,
    make_png_bomb,
    make_rgba_png,
    mean_abs_difference,
    needs_corpus,
)

from thumbcli.decodefailure import describe
from thumbcli.errors import FileRejected
from thumbcli.resample import DecodeFailed, resample
from thumbcli.spec import Fit, Format, Limits, SizeBox, Thumbnail, ThumbSpec

LIMITS = Limits()


def spec(size: str, **options: object) -> ThumbSpec:
    return ThumbSpec(SizeBox.parse(size), **options)  # type: ignore[arg-type]


def make_thumbnails(data: bytes, specs: tuple[ThumbSpec, ...], limits: Limits) -> list[Thumbnail]:
    """One thumbnail per spec, or FileRejected for anything not wholly decodable (a truncated file too)."""
    return resample(data, specs, limits, strict=True).thumbnails


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


@pytest.fixture(scope="module")
def photo_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_photo(tmp_path_factory.mktemp("src") / "photo.jpg").read_bytes()


@pytest.mark.parametrize(
    ("size", "fit", "expected"),
    [
        ("256", "inside", (256, 171)),
        ("320x240", "inside", (320, 213)),
        ("200x", "inside", (200, 133)),
        ("x200", "inside", (300, 200)),
        ("320x240", "cover", (320, 240)),
        ("320x240", "smart", (320, 240)),
        ("100", "cover", (100, 100)),
    ],
)
def test_thumbnail_has_the_dimensions_the_box_and_fit_ask_for(
    photo_bytes: bytes, size: str, fit: Fit, expected: tuple[int, int]
) -> None:
    (thumb,) = make_thumbnails(photo_bytes, (spec(size, fit=fit),), LIMITS)
    image = decode(thumb.data)
    assert (image.width, image.height) == (thumb.width, thumb.height) == expected


def test_small_image_is_not_enlarged_unless_upscale(photo_bytes: bytes) -> None:
    (kept,) = make_thumbnails(photo_bytes, (spec("1200"),), LIMITS)
    (enlarged,) = make_thumbnails(photo_bytes, (spec("1200", upscale=True),), LIMITS)
    assert (kept.width, kept.height) == (600, 400)
    assert (enlarged.width, enlarged.height) == (1200, 800)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif", "png"])
def test_every_output_format_decodes_back_as_8bit_srgb(photo_bytes: bytes, fmt: Format) -> None:
    (thumb,) = make_thumbnails(photo_bytes, (spec("128", format=fmt),), LIMITS)
    image = decode(thumb.data)
    assert image.get("vips-loader").startswith({"jpeg": "jpeg", "webp": "webp", "avif": "heif", "png": "png"}[fmt])
    assert (image.width, image.height, image.bands, image.format) == (128, 85, 3, "uchar")
    assert mean_abs_difference(image, draw_photo()) < 12


def test_jpeg_of_transparent_source_is_flattened_on_white(tmp_path: Path) -> None:
    data = make_rgba_png(tmp_path / "rgba.png").read_bytes()
    (thumb,) = make_thumbnails(data, (spec("300"),), LIMITS)
    image = decode(thumb.data)
    assert image.bands == 3
    assert all(value > 245 for value in image(10, 100))


def test_png_of_transparent_source_keeps_alpha(tmp_path: Path) -> None:
    data = make_rgba_png(tmp_path / "rgba.png").read_bytes()
    (thumb,) = make_thumbnails(data, (spec("300", format="png"),), LIMITS)
    image = decode(thumb.data)
    assert image.bands == 4 and image(10, 100)[3] == 0 and image(250, 100)[3] == 255


def test_metadata_is_stripped_unless_kept(photo_bytes: bytes) -> None:
    assert decode(photo_bytes).get_typeof("exif-data")
    stripped, kept = (
        make_thumbnails(photo_bytes, (spec("128", keep_metadata=keep),), LIMITS)[0] for keep in (False, True)
    )
    assert not decode(stripped.data).get_typeof("exif-data")
    assert decode(kept.data).get_typeof("exif-data")


def test_cmyk_source_comes_out_srgb_with_three_bands(tmp_path: Path) -> None:
    data = make_cmyk_jpeg(tmp_path / "cmyk.jpg").read_bytes()
    assert decode(data).interpretation == "cmyk"
    for fmt in ("jpeg", "png"):
        (thumb,) = make_thumbnails(data, (spec("200", format=fmt),), LIMITS)
        image = decode(thumb.data)
        assert (image.bands, image.interpretation) == (3, "srgb")
        assert mean_abs_difference(image, draw_photo()) < 20


def test_16bit_source_comes_out_8bit(tmp_path: Path) -> None:
    data = make_png16(tmp_path / "deep.png").read_bytes()
    assert decode(data).format == "ushort"
    (thumb,) = make_thumbnails(data, (spec("200", format="png"),), LIMITS)
    image = decode(thumb.data)
    assert (image.format, image.bands) == ("uchar", 3)
    assert mean_abs_difference(image, draw_photo()) < 12


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    data = make_oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation).read_bytes()
    single = make_thumbnails(data, (spec("240"),), LIMITS)
    several = make_thumbnails(data, (spec("240"), spec("120")), LIMITS)
    for thumb in (*single, *several):
        image = decode(thumb.data)
        assert image.width > image.height
        assert mean_abs_difference(image, draw_photo()) < 12


@pytest.mark.parametrize(
    "sizes",
    [
        ("256", "128", "64"),
        ("320x240", "200x", "x200", "50"),
        ("1000", "256"),
    ],
)
@pytest.mark.parametrize("fit", ["inside", "cover"])
@pytest.mark.parametrize("upscale", [False, True])
def test_several_sizes_from_one_decode_match_single_size_runs(
    photo_bytes: bytes, sizes: tuple[str, ...], fit: Fit, upscale: bool
) -> None:
    if fit != "inside" and any(size.startswith("x") or size.endswith("x") for size in sizes):
        sizes = tuple(size for size in sizes if not (size.startswith("x") or size.endswith("x")))
    specs = tuple(spec(size, fit=fit, upscale=upscale) for size in sizes)
    together = make_thumbnails(photo_bytes, specs, LIMITS)
    alone = [make_thumbnails(photo_bytes, (one,), LIMITS)[0] for one in specs]
    assert [(t.width, t.height) for t in together] == [(t.width, t.height) for t in alone]
    for a, b in zip(together, alone, strict=True):
        assert mean_abs_difference(decode(a.data), decode(b.data)) < 6


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, this is text and not a picture\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 10, "."),
    ],
)
def test_non_images_are_rejected_with_a_one_line_reason(data: bytes, reason: str) -> None:
    with pytest.raises(FileRejected, match=reason) as info:
        make_thumbnails(data, (spec("128"),), LIMITS)
    assert "\n" not in str(info.value) and str(info.value)


def test_truncated_jpeg_is_rejected_not_thumbnailed_grey(photo_bytes: bytes) -> None:
    with pytest.raises(FileRejected) as info:
        make_thumbnails(photo_bytes[: len(photo_bytes) // 2], (spec("128"),), LIMITS)
    assert "\n" not in str(info.value)


def test_decompression_bomb_is_refused_from_its_header_quickly(tmp_path: Path) -> None:
    data = make_png_bomb(tmp_path / "bomb.png").read_bytes()
    started = time.monotonic()
    with pytest.raises(FileRejected, match="max-pixels"):
        make_thumbnails(data, (spec("128"), spec("64")), LIMITS)
    assert time.monotonic() - started < 5


def test_max_pixels_applies_to_ordinary_images(photo_bytes: bytes) -> None:
    with pytest.raises(FileRejected, match="max-pixels"):
        make_thumbnails(photo_bytes, (spec("128"),), Limits(max_pixels=600 * 400 - 1))
    assert make_thumbnails(photo_bytes, (spec("128"),), Limits(max_pixels=600 * 400))


@pytest.mark.parametrize("suffix", ["jpg", "png", "gif"])
def test_a_truncated_image_decodes_in_part_with_a_warning_unless_strict(tmp_path: Path, suffix: str) -> None:
    data = make_photo(tmp_path / f"photo.{suffix}").read_bytes()
    cut = data[: len(data) * 2 // 3]
    degraded = resample(cut, (spec("128"),), LIMITS, strict=False)
    (thumb,) = degraded.thumbnails
    assert (thumb.width, thumb.height) == (128, 85)
    assert degraded.warning == "truncated" and degraded.detail
    with pytest.raises(DecodeFailed, match=r"^truncated$") as info:
        resample(cut, (spec("128"),), LIMITS, strict=True)
    assert info.value.detail == degraded.detail
    assert resample(data, (spec("128"),), LIMITS, strict=False).warning == ""


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        (
            "tiff2vips: Old-style JPEG compression support is not configured",
            "unsupported TIFF compression (old-style JPEG)",
        ),
        ("source: bad seek to 1024; heif: Invalid input: No 'ftyp' box", "not a HEIF/HEVC file"),
        ("VipsJpeg: premature end of JPEG image", "truncated"),
        ("source: bad seek to 513; frobload: the frob is broken", "frobload: the frob is broken"),
        ("", "libvips could not decode the image"),
    ],
)
def test_a_libvips_failure_is_told_in_a_short_reason_with_the_useful_part_first(detail: str, reason: str) -> None:
    assert describe(detail) == reason


@needs_corpus
def test_an_old_style_jpeg_tiff_is_refused_as_unsupported_compression() -> None:
    data = (CORPUS / "libvips" / "ojpeg-strip.tif").read_bytes()
    with pytest.raises(DecodeFailed, match=r"^unsupported TIFF compression \(old-style JPEG\)$") as info:
        resample(data, (spec("128"),), LIMITS, strict=False)
    assert "Old-style JPEG" in info.value.detail


def _dated_jpeg(when: str) -> bytes:
    image = draw_photo(320, 240).copy()
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd2-DateTimeOriginal", when)
    return bytes(image.jpegsave_buffer(keep="exif"))


@pytest.mark.parametrize(
    ("when", "captured"),
    [
        ("2021:07:04 09:15:30", 1_625_390_130),  # as the camera's clock read, no time zone
        ("1999:12:31 23:59:59", 946_684_799),
        ("0000:00:00 00:00:00", 0),  # a camera without a clock
        ("    :  :     :  :  ", 0),
        ("garbage", 0),
    ],
)
def test_thumbnails_carry_the_exif_capture_time(when: str, captured: int) -> None:
    specs = (ThumbSpec(SizeBox(128, 128)), ThumbSpec(SizeBox(64, 64), format="webp"))
    made = make_thumbnails(_dated_jpeg(when), specs, Limits())
    assert [thumbnail.captured for thumbnail in made] == [captured, captured]


def test_a_thumbnail_of_an_undated_image_has_no_capture_time() -> None:
    png = bytes(draw_photo(100, 80).pngsave_buffer())
    assert make_thumbnails(png, (ThumbSpec(SizeBox(64, 64)),), Limits())[0].captured == 0


@pytest.mark.parametrize("size", ["256", "100x", "x37", "1000x700", "7"])
@pytest.mark.parametrize("kind", ["rgb", "grey", "rgba"])
def test_a_cut_has_the_pixels_of_libvips_own_thumbnail(kind: str, size: str) -> None:
    # 8-bit sRGB and grey are resized directly, without thumbnail's other operations; alpha goes through it.
    image = draw_photo(333, 222, seed=5)
    if kind == "grey":
        image = image.colourspace("b-w")
    elif kind == "rgba":
        image = image.bandjoin(pyvips.Image.xyz(333, 222)[0].cast("uchar"))
    data = image.pngsave_buffer(compression=1)
    (thumb,) = make_thumbnails(data, (spec(size, format="png", upscale=True),), LIMITS)
    expected = pyvips.Image.thumbnail_buffer(data, thumb.width, height=thumb.height, size="force")
    assert decode(thumb.data).write_to_memory() == expected.write_to_memory()
