"""The layout of a resample worker's requests and replies: what it carries back whole, what it refuses."""

from __future__ import annotations

import pickle
import struct

import pytest

from thumbcli import wire
from thumbcli.spec import Limits, SizeBox, Thumbnail, ThumbSpec

SPECS = (
    ThumbSpec(SizeBox(256, 256), fit="cover", format="webp", quality=70, name="card"),
    ThumbSpec(SizeBox(None, 128), upscale=True, keep_metadata=True, rgba=True, format="png"),
)
DECODE_FOR = (ThumbSpec(SizeBox(1024, 768)),)


def made(*thumbnails: Thumbnail) -> bytes:
    """A reply's body (without its length) of `thumbnails`."""
    return wire.encode_reply(wire.Reply(wire.MADE, thumbnails, warning="truncated"))[wire.REPLY_HEAD_BYTES :]


def thumbnail(width: int, height: int, source_format: str = "jpeg") -> Thumbnail:
    return Thumbnail(b"\xff\xd8 some bytes", width, height, 4000, 3000, source_format)


def test_settings_come_back_equal_field_by_field() -> None:
    limits = Limits(max_file_size=5, max_pixels=7, max_decode_seconds=2.5, max_worker_memory=1 << 30)
    settings = wire.Settings(SPECS, DECODE_FOR, limits, strict=True)
    assert wire.decode_settings(wire.encode_settings(settings)) == settings


def test_settings_that_are_not_valid_specs_are_refused() -> None:
    encoded = bytearray(wire.encode_settings(wire.Settings(SPECS[:1], (), Limits(), strict=False)))
    name_at = encoded.index(b"card")
    encoded[name_at : name_at + 4] = b"../x"
    with pytest.raises(wire.MalformedMessage, match="invalid name"):
        wire.decode_settings(bytes(encoded))
    with pytest.raises(wire.MalformedMessage, match="cut short"):
        wire.decode_settings(wire.encode_settings(wire.Settings(SPECS, (), Limits(), strict=False))[:-1])


def test_a_reply_comes_back_equal_when_it_answers_what_was_asked() -> None:
    thumbnails = (thumbnail(256, 256), thumbnail(171, 128, "heif"))
    reply = wire.decode_reply(made(*thumbnails), SPECS)
    assert reply == wire.Reply(wire.MADE, thumbnails, warning="truncated")
    failed = wire.Reply(wire.FAILED, reason="JPEG: truncated", detail="Premature end of JPEG file \u2013 \u00e9")
    assert wire.decode_reply(wire.encode_reply(failed)[wire.REPLY_HEAD_BYTES :], SPECS) == failed


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (pickle.dumps(("made", [], "", "")), "unknown status"),
        (made(thumbnail(256, 256)), "1 thumbnails for 2 sizes"),
        (made(thumbnail(256, 256), thumbnail(200, 128), thumbnail(1, 1)), "3 thumbnails for 2 sizes"),
        (made(thumbnail(257, 256), thumbnail(200, 128)), "257x256 for a box of 256"),
        (made(thumbnail(256, 256), thumbnail(200, 129)), "200x129 for a box of x128"),
        (made(thumbnail(256, 256), thumbnail(200, 128, "exe")), "unknown source format 'exe'"),
        (made(thumbnail(256, 256), thumbnail(200, 128)) + b"\0", "1 bytes past the end"),
        (made(thumbnail(256, 256), thumbnail(200, 128))[:-1], "cut short"),
        (struct.pack("<BI", wire.FAILED, 3) + b"\xff\xfe\xfd", "not utf-8"),
        (struct.pack("<BI", wire.FAILED, wire.REASON_BYTES + 1), "a text of 1025 bytes"),
        (wire.encode_reply(wire.Reply(wire.NEEDS_WHEEL))[wire.REPLY_HEAD_BYTES :], "without its decoder's name"),
    ],
)
def test_a_reply_that_does_not_answer_what_was_asked_is_malformed(body: bytes, why: str) -> None:
    with pytest.raises(wire.MalformedMessage, match=why):
        wire.decode_reply(body, SPECS)


def test_a_reply_announcing_more_than_the_bound_is_refused_from_its_length() -> None:
    assert wire.reply_length(struct.pack("<I", 1000)) == 1000
    with pytest.raises(wire.MalformedMessage, match="bytes announced"):
        wire.reply_length(struct.pack("<I", wire.MAX_REPLY_BYTES + 1))


def test_a_worker_cuts_its_texts_to_their_bounds_on_a_character() -> None:
    reply = wire.Reply(wire.FAILED, reason="é" * wire.REASON_BYTES, detail="x" * (wire.DETAIL_BYTES + 5))
    decoded = wire.decode_reply(wire.encode_reply(reply)[wire.REPLY_HEAD_BYTES :], SPECS)
    assert decoded.reason == "é" * (wire.REASON_BYTES // 2)
    assert decoded.detail == "x" * wire.DETAIL_BYTES


def test_a_thumbnail_carries_its_capture_time_and_a_wild_one_is_malformed() -> None:
    dated = (
        Thumbnail(b"\xff\xd8 x", 256, 192, 4000, 3000, "jpeg", 1_625_390_130),
        Thumbnail(b"\xff\xd8 y", 171, 128, 4000, 3000, "jpeg", -86_400),  # 1969: before 1970 is a date too
    )
    assert wire.decode_reply(made(*dated), SPECS).thumbnails == dated
    wild = Thumbnail(b"\xff\xd8 x", 256, 192, 4000, 3000, "jpeg", 1 << 62)
    with pytest.raises(wire.MalformedMessage, match="a capture time of"):
        wire.decode_reply(made(wild, dated[1]), SPECS)
