"""The option objects: parsing, validation and the settings digest."""

from __future__ import annotations

import pytest

from thumbcli.errors import SpecError
from thumbcli.spec import Limits, RunOptions, SizeBox, ThumbSpec


@pytest.mark.parametrize(
    ("text", "width", "height", "label"),
    [
        ("256", 256, 256, "256"),
        ("320x240", 320, 240, "320x240"),
        ("200x", 200, None, "200x"),
        ("x200", None, 200, "x200"),
    ],
)
def test_size_box_parses_every_documented_form(text: str, width: int | None, height: int | None, label: str) -> None:
    box = SizeBox.parse(text)
    assert (box.width, box.height, box.label) == (width, height, label)


@pytest.mark.parametrize("text", ["", "x", "0", "-5", "12.5", "abc", "20000", "100y100", "320x240x2"])
def test_size_box_rejects_nonsense(text: str) -> None:
    with pytest.raises(SpecError):
        SizeBox.parse(text)


def test_thumb_spec_defaults_its_name_to_the_box_label() -> None:
    assert ThumbSpec(SizeBox.parse("200x")).name == "200x"


def test_thumb_spec_refuses_cover_without_both_edges() -> None:
    with pytest.raises(SpecError, match="both edges"):
        ThumbSpec(SizeBox.parse("200x"), fit="cover")


def test_thumb_spec_refuses_quality_out_of_range() -> None:
    with pytest.raises(SpecError):
        ThumbSpec(SizeBox.parse("256"), quality=0)


def test_thumb_spec_digest_changes_with_each_output_affecting_field() -> None:
    base = ThumbSpec(SizeBox.parse("256"))
    variants = [
        ThumbSpec(SizeBox.parse("255")),
        ThumbSpec(SizeBox.parse("256"), fit="cover"),
        ThumbSpec(SizeBox.parse("256"), format="webp"),
        ThumbSpec(SizeBox.parse("256"), quality=81),
        ThumbSpec(SizeBox.parse("256"), upscale=True),
        ThumbSpec(SizeBox.parse("256"), keep_metadata=True),
    ]
    digests = {base.digest, *(spec.digest for spec in variants)}
    assert len(digests) == len(variants) + 1


def test_thumb_spec_digest_treats_default_quality_as_explicit() -> None:
    assert ThumbSpec(SizeBox.parse("256")).digest == ThumbSpec(SizeBox.parse("256"), quality=80).digest


def test_run_options_default_queue_depth_follows_workers() -> None:
    assert RunOptions(workers=3).queue_depth == 6


def test_limits_refuse_zero() -> None:
    with pytest.raises(SpecError):
        Limits(max_pixels=0)
