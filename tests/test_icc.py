"""Which embedded ICC profiles count as sRGB (no transform): libvips' own profiles and damaged ones."""

from __future__ import annotations

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
