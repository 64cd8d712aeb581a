"""The source videos `serve --source --browse` plays: a gallery's video opens the video itself, not a still.

Only files of the video kind in the folders `--source` names are served, under
`/_thumbcli/video/<path below the source>` (after the source's name when sources are named),
each judged as a thumbnail URL is (`thumbcli.cache.url_segments`: no `..`, no hidden segment),
opened without following a symlink at its name and checked to be inside its source once open.
They are answered as thumbnails are, ranges included, so a player can seek.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from thumbcli.cache import url_segments
from thumbcli.formats import BY_NAME, mimetype_of
from thumbcli.serve.files import OpenFile

VIDEO_PREFIX = b"/_thumbcli/video/"
_VIDEO_SUFFIXES = tuple(suffix.encode("ascii") for suffix in BY_NAME["video"].suffixes)


def is_video_name(name: bytes) -> bool:
    """Whether a source's name is a video's (by its suffix, as the walk takes it)."""
    return name.lower().endswith(_VIDEO_SUFFIXES)


class SourceVideos:
    """Opens the source videos a gallery links, each for one answer."""

    def __init__(self, sources: Mapping[str, Path], cache_control: str) -> None:
        #: By URL segment (b"": the one unnamed source), each resolved once.
        self._roots = {os.fsencode(name): os.fsencode(os.path.realpath(root)) for name, root in sources.items()}
        self._cache_control = b"Cache-Control: %s\r\n" % cache_control.encode("ascii") if cache_control else b""

    def url_of(self, segments: tuple[bytes, ...]) -> bytes | None:
        """The URL path of the video a gallery lists at `segments` below its preset, None without sources."""
        if not self._roots or not is_video_name(segments[-1]):
            return None
        return VIDEO_PREFIX + b"/".join(quote(segment, safe="").encode("ascii") for segment in segments)

    def open(self, path: bytes, now: float) -> OpenFile | None:
        """The video a `/_thumbcli/video/...` URL path names, opened; None when there is no such video."""
        segments = url_segments(b"/" + path[len(VIDEO_PREFIX) :])
        if segments is None or any(segment.startswith(b".") for segment in segments):
            return None
        if not is_video_name(segments[-1]):
            return None
        root = self._roots.get(b"")
        if root is None:
            root = self._roots.get(segments[0])
            segments = segments[1:]
            if root is None or not segments:
                return None
        file_path = os.path.join(root, *segments)
        try:
            fd = os.open(file_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            opened = os.readlink(os.fsencode(f"/proc/self/fd/{fd}"))
            if not stat.S_ISREG(st.st_mode) or os.path.commonpath([root, opened]) != root:
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return None
        content_type = mimetype_of("video", os.fsdecode(file_path))
        return OpenFile(fd, st, content_type, self._cache_control, now)
