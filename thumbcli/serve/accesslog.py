"""The access log in the combined log format, buffered and written whole lines at a time."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

from thumbcli.errors import CannotRunError
from thumbcli.fsutil import open_for_append

log = logging.getLogger(__name__)

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LOG_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')
_FLUSH_LINES = 256


def escape_for_log(value: bytes) -> bytes:
    """Client-supplied bytes made safe for one log line: quotes, backslashes and controls as \\xNN."""
    return _LOG_UNSAFE.sub(lambda match: b"\\x%02X" % match.group()[0], value)


class AccessLog:
    """One worker's access log: "-" is stderr, anything else a file opened for appending."""

    __slots__ = ("_fd", "_lines", "_time", "_time_until")

    def __init__(self, destination: str) -> None:
        if destination == "-":
            self._fd = sys.stderr.fileno()
        else:
            try:
                # Never through a symlink at its name: a server started as root must not append to its target.
                self._fd = open_for_append(destination)
            except OSError as exc:
                raise CannotRunError(f"{destination}: cannot open access log: {exc}") from exc
        self._lines: list[bytes] = []
        self._time_until = 0.0
        self._time = b""

    def write(
        self,
        peer: str,
        method: bytes,
        target: bytes,
        http10: bool,
        status: int,
        body_bytes: int,
        headers: dict[bytes, bytes],
    ) -> None:
        """Note one answered request (method "-" for a request that could not be parsed)."""
        if time.time() >= self._time_until:
            self._refresh_time()
        request = b"-" if method == b"-" else b"%s %s HTTP/%s" % (method, target, b"1.0" if http10 else b"1.1")
        referer = headers.get(b"referer", b"-")
        agent = headers.get(b"user-agent", b"-")
        self._lines.append(
            b'%s - - [%s] "%s" %d %s "%s" "%s"\n'
            % (
                peer.encode("ascii", "replace"),
                self._time,
                escape_for_log(request),
                status,
                b"%d" % body_bytes if body_bytes else b"-",
                escape_for_log(referer),
                escape_for_log(agent),
            )
        )
        if len(self._lines) >= _FLUSH_LINES:
            self.flush()

    def _refresh_time(self) -> None:
        wall = int(time.time())
        self._time_until = wall + 1.0
        local = time.localtime(wall)
        offset = local.tm_gmtoff // 60
        self._time = b"%02d/%s/%04d:%02d:%02d:%02d %s%02d%02d" % (
            local.tm_mday,
            _MONTHS[local.tm_mon - 1].encode("ascii"),
            local.tm_year,
            local.tm_hour,
            local.tm_min,
            local.tm_sec,
            b"-" if offset < 0 else b"+",
            abs(offset) // 60,
            abs(offset) % 60,
        )

    def flush(self) -> None:
        """Write the buffered lines; a failed write is logged, never fatal."""
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as exc:
            log.warning("access log write failed: %s", exc.strerror)

    def close(self) -> None:
        """Flush, and close the file (never stderr)."""
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
