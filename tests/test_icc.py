"""Which embedded ICC profiles count as sRGB (no transform), and the transform of the others: damaged ones too."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import pyvips
from imagekit import CORPUS, needs_corpus

from thumbcli import icc


def profile(name: str) -> bytes:
    """The profile libvips attaches after converting to `name` (its built-in srgb, p3, cmyk)."""
    image = pyvips.Image.black(4, 4).bandjoin([0, 0]).copy(interpretation="srgb")
    return bytes(image.icc_transform(name, input_profile="srgb").get("icc-profile-data"))


def test_the_srgb_profile_is_srgb_and_others_are_not() -> None:
    assert icc.description(profile("srgb")).startswith("sRGB")
    assert icc.is_srgb(profile("srgb"))
    assert not icc.is_srgb(profile("p3"))
    assert not icc.is_srgb(profile("cmyk"))


@needs_corpus
def test_a_v2_srgb_profile_and_an_adobe_rgb_one_are_told_apart() -> None:
    assert icc.is_srgb((CORPUS / "libvips" / "sRGB.icm").read_bytes())
    adobe = pyvips.Image.new_from_file(str(CORPUS / "libvips" / "sample.jpg")).get("icc-profile-data")
    assert "A98" in icc.description(adobe)
    assert not icc.is_srgb(adobe)


@pytest.mark.parametrize("cut", [0, 20, 130, 140, 200])
def test_a_damaged_profile_is_not_srgb_and_raises_nothing(cut: int) -> None:
    assert not icc.is_srgb(profile("srgb")[:cut])
    assert not icc.is_srgb(profile("srgb")[:128] + b"\xff" * 64)


def test_the_description_of_nothing_is_empty(tmp_path: Path) -> None:
    assert icc.description(b"") == ""


def test_pixels_in_display_p3_come_out_as_libvips_converts_them_within_a_level() -> None:
    # Every value of each band, in a 64x64 image of 4096 colours.
    ramp = pyvips.Image.xyz(64, 64)
    colours = ((ramp[0] * 4) % 256).bandjoin([(ramp[1] * 4) % 256, (ramp[0] + ramp[1] * 64) % 256]).cast("uchar")
    in_p3 = colours.copy(interpretation="srgb").icc_transform("p3", input_profile="srgb")
    pixels = icc.srgb_pixels(in_p3.write_to_memory(), 64, 64, in_p3.get("icc-profile-data"))
    assert pixels is not None
    ours = pyvips.Image.new_from_memory(pixels, 64, 64, 3, "uchar")
    libvips_own = in_p3.icc_transform("srgb", embedded=True, intent="relative")
    assert (ours.cast("int") - libvips_own.cast("int")).abs().max() <= 1
    assert (ours.cast("int") - colours.cast("int")).abs().avg() < 2  # back about where they came from


@pytest.mark.parametrize("cut", [0, 128, 200, 440])
def test_a_damaged_profile_is_declined_for_libvips_to_decide(cut: int) -> None:
    damaged = profile("p3")[:cut] + bytes(max(0, len(profile("p3")) - cut))
    assert icc.srgb_pixels(bytes(3 * 4 * 4), 4, 4, damaged) is None


def test_a_profile_of_megabytes_is_left_to_libvips_not_kept() -> None:
    pixels = bytes(3 * 4 * 4)
    assert icc.srgb_pixels(pixels, 4, 4, profile("p3") + bytes(1000)) is not None  # littlecms reads it padded
    assert icc.srgb_pixels(pixels, 4, 4, profile("p3") + bytes(4 << 20)) is None


def test_mutants_of_a_display_p3_profile_are_converted_or_declined_never_raised() -> None:
    # A hostile file's profile reaches Pillow's littlecms (in the worker): pixels or None, never an exception.
    p3 = profile("p3")
    rng = random.Random(22)
    pixels = bytes(range(256)) * 3 * 4  # 4 rows of 256 pixels, every value in each band
    outcomes = set()
    for _ in range(200):
        mutant = bytearray(p3)
        for _ in range(rng.randint(1, 8)):
            mutant[rng.randrange(len(mutant))] = rng.randrange(256)
        converted = icc.srgb_pixels(pixels, 256, 4, bytes(mutant))
        assert converted is None or len(converted) == len(pixels)
        outcomes.add(converted is None)
    assert outcomes == {True, False}  # some mutants still convert, some are declined
