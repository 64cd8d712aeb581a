"""JPEGs decoded by libjpeg-turbo directly: the same pixels and thumbnails as libvips' own JPEG load."""

from __future__ import annotations

from pathlib import Path

import pytest
import pyvips
from imagekit import CORPUS, draw_photo, make_cmyk_jpeg, make_oriented_jpeg, mean_abs_difference, needs_corpus, save

from thumbcli import icc, sandbox
from thumbcli.decoders import jpeg
from thumbcli.errors import FileRejected
from thumbcli.resample import DecodeFailed, resample, saver_keeps_metadata_by_keep
from thumbcli.spec import Limits, SizeBox, ThumbSpec
from thumbcli.workers import ResampleWorker

LIMITS = Limits()


def png_spec(size: str, **options: object) -> ThumbSpec:
    # PNG: lossless, so a thumbnail's pixels can be compared exactly with libvips' own.
    return ThumbSpec(SizeBox.parse(size), format="png", **options)  # type: ignore[arg-type]


def pixels(data: bytes) -> bytes:
    return bytes(pyvips.Image.new_from_buffer(data, "").write_to_memory())


def load_png(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


def libvips_thumbnail(data: bytes, width: int, height: int) -> bytes:
    """What libvips makes of the JPEG on its own: its `jpegload` at the shrink thumbcli picks, then its thumbnail.

    The shrink: the largest of 8, 4, 2 that leaves at least `width` x `height` (turned or not).
    """
    header = pyvips.Image.new_from_buffer(data, "")
    long_edge, short_edge = max(header.width, header.height), min(header.width, header.height)
    shrink = next(
        (
            f
            for f in (8, 4, 2)
            if -(-long_edge // f) >= max(width, height) and -(-short_edge // f) >= min(width, height)
        ),
        1,
    )
    loaded = pyvips.Image.jpegload_buffer(data, shrink=shrink)
    # An embedded profile but sRGB is converted to sRGB (libvips' thumbnail converts only CMYK on its own).
    profile = loaded.get("icc-profile-data") if loaded.get_typeof("icc-profile-data") else b""
    to_srgb = {"output_profile": "srgb"} if profile and not icc.is_srgb(profile) else {}
    thumbnail = loaded.thumbnail_image(width, height=height, size="force", **to_srgb)
    if thumbnail.interpretation not in ("srgb", "b-w"):
        thumbnail = thumbnail.colourspace("srgb")
    return bytes(thumbnail.cast("uchar").write_to_memory())


def test_libjpeg_turbo_is_installed() -> None:
    assert jpeg.available()


@pytest.mark.parametrize("shrink", [1, 2, 4, 8])
@pytest.mark.parametrize("bands", [1, 3])
def test_scaled_pixels_are_libvips_jpegload_pixels_at_the_same_shrink(tmp_path: Path, shrink: int, bands: int) -> None:
    # Odd edges: libjpeg-turbo rounds the scaled size up, libvips cuts the last part-pixel off.
    image = draw_photo(531, 373)
    if bands == 1:
        image = image.colourspace("b-w")
    data = save(image, tmp_path / "odd.jpg", Q=90).read_bytes()
    ours = jpeg.scaled_pixels(data, shrink, bands)
    assert ours is not None
    theirs = pyvips.Image.jpegload_buffer(data, shrink=shrink)
    assert ours.shape == (-(-373 // shrink), -(-531 // shrink), bands)
    cut = ours[: theirs.height, : theirs.width]
    assert cut.tobytes() == theirs.write_to_memory()


def test_scaled_pixels_decline_what_libjpeg_turbo_warns_about_or_cannot_give(tmp_path: Path) -> None:
    data = save(draw_photo(800, 600), tmp_path / "photo.jpg", Q=90).read_bytes()
    assert jpeg.scaled_pixels(data[: len(data) // 2], 4, 3) is None  # truncated
    assert jpeg.scaled_pixels(b"\xff\xd8\xff\xe0 not a jpeg", 4, 3) is None
    assert jpeg.scaled_pixels(make_cmyk_jpeg(tmp_path / "cmyk.jpg").read_bytes(), 4, 4) is None


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_small_jpeg_decoded_at_full_size_gives_libvips_own_thumbnail(tmp_path: Path, orientation: int) -> None:
    # 320x240 to 256: no shrink on load, so libjpeg-turbo decodes it whole, as libvips would.
    data = make_oriented_jpeg(tmp_path / f"small{orientation}.jpg", orientation, 320, 240).read_bytes()
    (thumb,) = resample(data, (png_spec("256"),), LIMITS, strict=True).thumbnails
    assert (thumb.source_width, thumb.source_height) == (320, 240)
    assert pixels(thumb.data) == libvips_thumbnail(data, thumb.width, thumb.height)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_as_libvips_turns_it(tmp_path: Path, orientation: int) -> None:
    data = make_oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation, 1200, 800).read_bytes()
    (thumb,) = resample(data, (png_spec("150"),), LIMITS, strict=True).thumbnails
    assert (thumb.width, thumb.height, thumb.source_width, thumb.source_height) == (150, 100, 1200, 800)
    assert pixels(thumb.data) == libvips_thumbnail(data, 150, 100)


@needs_corpus
@pytest.mark.parametrize("name", [f"{kind}_{n}.jpg" for kind in ("Landscape", "Portrait") for n in range(1, 9)])
def test_real_camera_orientations_match_libvips(name: str) -> None:
    data = (CORPUS / "orientation" / name).read_bytes()
    (thumb,) = resample(data, (png_spec("100"),), LIMITS, strict=True).thumbnails
    assert (thumb.width < thumb.height) == name.startswith("Portrait")
    assert pixels(thumb.data) == libvips_thumbnail(data, thumb.width, thumb.height)


def test_an_embedded_icc_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    in_p3 = draw_photo(1200, 800).icc_transform("p3", input_profile="srgb")
    data = save(in_p3, tmp_path / "p3.jpg", Q=90, keep="icc").read_bytes()
    assert pyvips.Image.new_from_buffer(data, "").get_typeof("icc-profile-data")
    (thumb,) = resample(data, (png_spec("150"),), LIMITS, strict=True).thumbnails
    # libvips' own conversion, within one level: the same littlecms and intent, its transform built here once.
    ours = load_png(thumb.data)
    libvips_own = pyvips.Image.new_from_memory(libvips_thumbnail(data, 150, 100), 150, 100, 3, "uchar")
    assert (ours.cast("int") - libvips_own.cast("int")).abs().max() <= 1
    assert mean_abs_difference(ours, libvips_own) < 0.05
    # The profile was applied: the same pixels read as sRGB give other colours, and the
    # converted thumbnail is close to the sRGB original's.
    untagged = save(in_p3, tmp_path / "untagged.jpg", Q=90, keep="none").read_bytes()
    (plain,) = resample(untagged, (png_spec("150"),), LIMITS, strict=True).thumbnails
    original = save(draw_photo(1200, 800), tmp_path / "srgb.jpg", Q=90, keep="none").read_bytes()
    (truth,) = resample(original, (png_spec("150"),), LIMITS, strict=True).thumbnails
    assert mean_abs_difference(load_png(thumb.data), load_png(truth.data)) < 1.5
    assert mean_abs_difference(load_png(plain.data), load_png(truth.data)) > 3 * max(
        0.5, mean_abs_difference(load_png(thumb.data), load_png(truth.data))
    )


@pytest.mark.parametrize("kept", [200, 440])
def test_a_damaged_profile_is_left_to_libvips_whatever_it_makes_of_it(tmp_path: Path, kept: int) -> None:
    in_p3 = draw_photo(1200, 800).icc_transform("p3", input_profile="srgb")
    profile = in_p3.get("icc-profile-data")
    in_p3.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile[:kept] + bytes(len(profile) - kept))
    data = save(in_p3, tmp_path / "damaged.jpg", Q=90, keep="icc").read_bytes()
    try:
        expected: bytes | None = libvips_thumbnail(data, 150, 100)
    except pyvips.Error:
        expected = None  # littlecms cannot link it (cut past its tags): a failure of its own, as before
    if expected is None:
        with pytest.raises(DecodeFailed, match="profile"):
            resample(data, (png_spec("150"),), LIMITS, strict=True)
    else:
        (thumb,) = resample(data, (png_spec("150"),), LIMITS, strict=True).thumbnails
        assert pixels(thumb.data) == expected


def test_an_srgb_profile_is_not_transformed(tmp_path: Path) -> None:
    tagged = draw_photo(1200, 800).icc_transform("srgb", input_profile="srgb")
    data = save(tagged, tmp_path / "srgb.jpg", Q=90, keep="icc").read_bytes()
    assert icc.is_srgb(pyvips.Image.new_from_buffer(data, "").get("icc-profile-data"))
    untagged = save(tagged, tmp_path / "untagged.jpg", Q=90, keep="none").read_bytes()
    made = [resample(d, (png_spec("150"),), LIMITS, strict=True).thumbnails[0] for d in (data, untagged)]
    assert pixels(made[0].data) == pixels(made[1].data)


def test_grey_progressive_and_cmyk_jpegs_give_libvips_thumbnails(tmp_path: Path) -> None:
    photo = draw_photo(1200, 800)
    sources = {
        "grey": save(photo.colourspace("b-w"), tmp_path / "grey.jpg", Q=90),
        "progressive": save(photo, tmp_path / "progressive.jpg", Q=90, interlace=True),
        "cmyk": make_cmyk_jpeg(tmp_path / "cmyk.jpg", 1200, 800),
        "444": save(photo, tmp_path / "444.jpg", Q=95, subsample_mode="off"),
    }
    for kind, path in sources.items():
        data = path.read_bytes()
        (thumb,) = resample(data, (png_spec("150"),), LIMITS, strict=True).thumbnails
        assert pixels(thumb.data) == libvips_thumbnail(data, 150, 100), kind


def test_several_sizes_from_one_decode_match_one_decode_per_size(tmp_path: Path) -> None:
    data = make_oriented_jpeg(tmp_path / "o6.jpg", 6, 2400, 1600).read_bytes()
    specs = (png_spec("128"), png_spec("256"), png_spec("512"))
    together = resample(data, specs, LIMITS, strict=True).thumbnails
    for made in together:
        (alone,) = resample(data, (png_spec(str(made.width)),), LIMITS, strict=True, decode_for=specs).thumbnails
        assert alone.data == made.data


def test_a_truncated_camera_jpeg_is_still_one_line_and_decodes_in_part_when_lenient(tmp_path: Path) -> None:
    data = save(draw_photo(2400, 1600), tmp_path / "big.jpg", Q=90).read_bytes()
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(DecodeFailed, match=r"^truncated$"):
        resample(cut, (png_spec("256"),), LIMITS, strict=True)
    degraded = resample(cut, (png_spec("256"),), LIMITS, strict=False)
    assert degraded.warning == "truncated"
    assert (degraded.thumbnails[0].width, degraded.thumbnails[0].height) == (256, 171)


def test_a_camera_jpeg_with_corrupt_data_is_left_to_libvips(tmp_path: Path) -> None:
    data = bytearray(save(draw_photo(2400, 1600), tmp_path / "big.jpg", Q=90).read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4000] = bytes(range(256)) * 15 + bytes(160)
    assert jpeg.scaled_pixels(bytes(data), 8, 3) is None  # libjpeg-turbo warns: declined
    (thumb,) = resample(bytes(data), (png_spec("256"),), LIMITS, strict=True).thumbnails
    assert pixels(thumb.data) == libvips_thumbnail(bytes(data), 256, 171)


def test_max_pixels_refuses_a_camera_jpeg_before_its_decode(tmp_path: Path) -> None:
    data = save(draw_photo(2400, 1600), tmp_path / "big.jpg", Q=90).read_bytes()
    with pytest.raises(FileRejected, match="max-pixels"):
        resample(data, (png_spec("256"),), Limits(max_pixels=2400 * 1600 - 1), strict=True)
    assert resample(data, (png_spec("256"),), Limits(max_pixels=2400 * 1600), strict=True).thumbnails


def test_a_confined_worker_imports_libjpeg_turbo_for_its_first_camera_jpeg_unless_it_cannot_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THUMBCLI_SANDBOX", raising=False)  # every layer the system has
    small = save(draw_photo(320, 240), tmp_path / "small.jpg", Q=85).read_bytes()
    camera = make_oriented_jpeg(tmp_path / "o6.jpg", 6, 2400, 1600).read_bytes()
    specs = (png_spec("256"), ThumbSpec(SizeBox.parse("256")))  # the JPEG one encoded by Pillow
    worker = ResampleWorker(LIMITS, strict=True, memory_ceiling=1 << 34)
    try:
        assert worker.resample(small, specs).thumbnails  # decoded whole: libvips alone
        assert "seccomp" in worker.confinement and "landlock" in worker.confinement
        assert worker.pid is not None
        maps = Path(f"/proc/{worker.pid}/maps")
        account = sandbox.account_for_workers(sandbox.layers_for_workers())
        # A worker whose account cannot read the wheels (an interpreter under /root) loads them all first.
        preloaded = account is not None and not sandbox.python_readable_by(account)
        assert ("simplejpeg" in maps.read_text()) == preloaded
        outcome = worker.resample(camera, specs)
        assert outcome.thumbnails and not outcome.reason, outcome.reason
        assert "simplejpeg" in maps.read_text()  # imported under seccomp and Landlock
        assert "PIL/_imaging" in maps.read_text()
    finally:
        worker.close()
    assert [thumb.data for thumb in outcome.thumbnails] == [
        thumb.data for thumb in resample(camera, specs, LIMITS, strict=True).thumbnails
    ]


def test_a_confined_worker_converts_a_display_p3_jpeg_as_this_process_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THUMBCLI_SANDBOX", raising=False)  # every layer the system has, the account switch too
    p3 = draw_photo(2400, 1600).icc_transform("p3", input_profile="srgb")
    data = save(p3, tmp_path / "p3.jpg", Q=90, keep="icc").read_bytes()
    specs = (png_spec("256"), ThumbSpec(SizeBox.parse("200")))
    worker = ResampleWorker(LIMITS, strict=True, memory_ceiling=1 << 34)
    try:
        outcome = worker.resample(data, specs)
        assert outcome.thumbnails and not outcome.reason, outcome.reason
        assert worker.pid is not None
        # Pillow's littlecms, loaded before the worker confined itself (or imported under Landlock).
        assert "_imagingcms" in Path(f"/proc/{worker.pid}/maps").read_text()
    finally:
        worker.close()
    # Converted by that transform: libvips' own conversion differs by a level here and there.
    assert [thumb.data for thumb in outcome.thumbnails] == [
        thumb.data for thumb in resample(data, specs, LIMITS, strict=True).thumbnails
    ]


def libvips_jpeg(image: pyvips.Image, quality: int) -> bytes:
    """What libvips' own `jpegsave` writes for a thumbnail that keeps no metadata."""
    stripped = {"keep": "none"} if saver_keeps_metadata_by_keep() else {"strip": True}
    return bytes(image.jpegsave_buffer(Q=quality, optimize_coding=True, **stripped))


@pytest.mark.parametrize("quality", [30, 85, 89, 90, 100])
@pytest.mark.parametrize("kind", ["rgb", "grey"])
def test_pillows_encoder_writes_the_bytes_libvips_would(kind: str, quality: int) -> None:
    photo = draw_photo(256, 171, seed=quality)
    if kind == "grey":
        photo = photo.colourspace("b-w")
    photo = photo.cast("uchar").copy_memory()
    assert jpeg.encodes(photo.width, photo.height, photo.bands)
    ours = jpeg.encoded(photo.write_to_memory(), photo.width, photo.height, photo.bands, quality)
    assert ours == libvips_jpeg(photo, quality)


def test_a_jpeg_thumbnail_is_libvips_own_encode_of_its_pixels(tmp_path: Path) -> None:
    data = make_oriented_jpeg(tmp_path / "o6.jpg", 6, 2400, 1600).read_bytes()
    (lossless,) = resample(data, (png_spec("256"),), LIMITS, strict=True).thumbnails
    for quality in (75, 95):
        jpeg_spec = ThumbSpec(SizeBox.parse("256"), quality=quality)
        (thumb,) = resample(data, (jpeg_spec,), LIMITS, strict=True).thumbnails
        assert thumb.data == libvips_jpeg(load_png(lossless.data), quality)
        kept = ThumbSpec(SizeBox.parse("256"), quality=quality, keep_metadata=True)
        (with_metadata,) = resample(data, (kept,), LIMITS, strict=True).thumbnails
        assert pyvips.Image.new_from_buffer(with_metadata.data, "").get_typeof("exif-data")  # libvips' encode


def test_a_thumbnail_too_big_to_hold_twice_or_with_other_bands_is_left_to_libvips() -> None:
    side = int(jpeg.ENCODED_PIXELS_MAX**0.5)
    assert jpeg.encodes(side, side, 3)
    assert not jpeg.encodes(side + 1, side, 3)  # libvips' save streams it instead
    assert jpeg.encoded(bytes((side + 1) * side * 3), side + 1, side, 3, 80) is None
    assert not jpeg.encodes(16, 16, 2) and not jpeg.encodes(16, 16, 4)
