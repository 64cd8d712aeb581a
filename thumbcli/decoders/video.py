"""A representative frame of a video through PyAV (FFmpeg): the only `import av`.

Like desktop video thumbnailers, skip frames that are almost uniformly dark (fade-ins, black
leaders): seek a tenth of the way in (at most a minute), keyframe first, and take the first frame
of the next few dozen that is not; the brightest one if all are. Dimensions and duration come from
the container before any frame is decoded; the rotation the container records is applied.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime
import errno
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

from thumbcli.decoders import MissingDecoder, Pixels, ScaleNeeded, check_pixels
from thumbcli.errors import FileRejected
from thumbcli.spec import Limits

if TYPE_CHECKING:
    from av.video.frame import VideoFrame

_LABEL = "video"
_SEEK_FRACTION = 0.1
_SEEK_LIMIT_SECONDS = 60.0
_FRAMES_LOOKED_AT = 90  # a bounded search: three seconds at 30 frames per second
#: A frame darker than this mean luma (0-255), or flatter than this spread, is "almost uniformly dark".
_DARK_MEAN = 24.0
_FLAT_SPREAD = 8.0
#: The display matrix's counter-clockwise rotation -> the EXIF orientation that shows the frame so.
_ORIENTATION_OF_ROTATION = {0: 1, 90: 8, 180: 3, 270: 6}


def decode(data: bytes, limits: Limits, scale_needed: ScaleNeeded) -> Pixels:
    """The chosen frame, upright, as 8-bit RGB; the frame size checked from the container first."""
    del scale_needed  # a frame is decoded whole; libvips makes every size from it
    try:
        import av
    except (ImportError, OSError):  # OSError: a worker's account may not read the wheel
        raise MissingDecoder(_LABEL, "video") from None
    step = "open"  # what FFmpeg was asked to do, for a failure's reason
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise FileRejected(f"{_LABEL}: no video stream")
            stream = container.streams.video[0]
            if stream.codec_context is None:  # FFmpeg knows no decoder for the stream's codec
                raise FileRejected(f"{_LABEL}: unknown or unsupported codec")
            stream.codec_context.thread_count = 1
            check_pixels(_LABEL, stream.codec_context.width, stream.codec_context.height, limits)
            duration = container.duration / av.time_base if container.duration else 0.0
            target = min(duration * _SEEK_FRACTION, _SEEK_LIMIT_SECONDS)
            if target > 0:
                step = "seek in"
                container.seek(int(target * av.time_base), backward=True, any_frame=False)
            step = "decode"
            frame = _representative_frame(container.decode(stream))
            if frame is None:
                raise FileRejected(f"{_LABEL}: no frame could be decoded (truncated?)")
            rgb = frame.to_ndarray(format="rgb24")
            orientation = _ORIENTATION_OF_ROTATION.get(frame.rotation % 360, 1)
            captured = creation_time({**stream.metadata, **container.metadata})
    except av.error.InvalidDataError:
        raise FileRejected(f"{_LABEL}: truncated, damaged or not a video") from None
    except av.error.FFmpegError as exc:
        # FFmpeg fails many steps with a bare -1, which reads as EPERM ("Operation not permitted"): no reason at all.
        said = "" if exc.errno == errno.EPERM else f" ({exc.strerror})"
        raise FileRejected(f"{_LABEL}: damaged: FFmpeg could not {step} it{said}") from None
    return Pixels(rgb.tobytes(), rgb.shape[1], rgb.shape[0], 3, orientation=orientation, captured=captured)


def creation_time(metadata: dict[str, str]) -> int:
    """A container's `creation_time` tag (ISO 8601, as cameras and phones write it) in seconds since 1970; 0: none."""
    text = metadata.get("creation_time", "")
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC).replace(tzinfo=None)
    # An unset QuickTime date reads as 1904 or 1970: nothing to sort by.
    return calendar.timegm(when.timetuple()) if when.year > 1970 else 0


def _representative_frame(frames: Iterator[VideoFrame]) -> VideoFrame | None:
    """The first of the next frames that is not almost uniformly dark, else the brightest of them."""
    brightest, brightest_mean = None, -1.0
    for looked, frame in enumerate(frames):
        grey = frame.reformat(width=64, height=64, format="gray").to_ndarray()
        mean, spread = float(grey.mean()), float(grey.std())
        if mean >= _DARK_MEAN or spread >= _FLAT_SPREAD:
            return frame
        if mean > brightest_mean:
            brightest, brightest_mean = frame, mean
        if looked + 1 >= _FRAMES_LOOKED_AT:
            break
    return brightest


def preload() -> None:
    """Import PyAV now if it is installed (a sandboxed worker may not be able to later)."""
    with contextlib.suppress(ImportError):
        import av  # noqa: F401


def version() -> str | None:
    """PyAV's version and its FFmpeg's, or None when it is not installed."""
    try:
        import av
    except ImportError:
        return None
    ffmpeg = av.library_versions.get("libavcodec", ())
    return f"PyAV {av.__version__} (libavcodec {'.'.join(map(str, ffmpeg))})"
