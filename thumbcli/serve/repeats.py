"""Request heads seen before, byte for byte, and how they were answered: sent again without parsing.

A client asks for the same thumbnail with the same head again and again (a browser's revalidations,
a CDN's or a load balancer's fetches). While the file it was answered from is open and current, the
same bytes get the same answer, so the parse and the decisions of the first answer are kept, not redone.

A thumbnail kept in memory that is asked for again within the same second is also written whole,
head with that second's Date and body, to the second's `Arena`, a memory file: each later answer
in that second is one zero-copy sendfile(2) from it instead of a copy into the socket.
"""

from __future__ import annotations

import errno
import logging
import os

from thumbcli.serve.files import OpenFile, SentFile
from thumbcli.serve.http import Verdict
from thumbcli.serve.protocol import Request

#: Heads longer than this are parsed every time (a browser's head is 300-800 bytes).
REPEAT_HEAD_BYTES = 2048
#: At most this many heads are kept; a full table starts over (one parse per head to refill it).
REPEAT_LIMIT = 4096
#: A second's arena holds at most this much (two arenas live at a second's turn); answers past it go
#: out as the first did.
ARENA_BYTES = 32 * 1024 * 1024

log = logging.getLogger(__name__)


class Arena(SentFile):
    """One second's whole answers to repeated heads, in a memory file; replaced when the second ends."""

    __slots__ = ("second", "size")

    def __init__(self, second: float) -> None:
        super().__init__(os.memfd_create("thumbcli-answers", os.MFD_CLOEXEC))
        self.second = second
        self.size = 0

    def add(self, *parts: bytes) -> int:
        """Write a whole answer at the end; its offset. OSError if it could not be written whole."""
        offset, length = self.size, sum(map(len, parts))
        if os.pwritev(self.fd, parts, offset) != length:
            raise OSError(errno.ENOSPC, "short write to the memory file")
        self.size += length
        return offset


class Repeat:
    """How one request head was answered: the parsed request, the file, and the header lines after Date."""

    __slots__ = (
        "arena",
        "count",
        "file",
        "length",
        "offset",
        "request",
        "seen_second",
        "status_line",
        "tail",
        "verdict",
    )

    def __init__(self, request: Request, file: OpenFile, verdict: Verdict, status_line: bytes, tail: bytes, count: int):
        self.request = request
        self.file = file
        self.verdict = verdict  # the status, for the metrics and the access log
        self.status_line = status_line
        self.tail = tail  # the header lines after Date and Server, through the blank line
        self.count = count  # body bytes sent: the file's size, or none (HEAD, 304)
        self.seen_second = 0.0  # the second it was last answered in
        #: Where the whole answer is in an arena (of `arena.second`), once asked for twice in a second.
        self.arena: Arena | None = None
        self.offset = self.length = 0


class RepeatTable:
    """The answers kept by request head; an answer whose file was evicted is gone with it."""

    def __init__(self, use_arenas: bool) -> None:
        self._answers: dict[bytes, Repeat] = {}
        self._arena: Arena | None = None
        #: Off without sendfile, or where a memory file cannot be made or sent from.
        self._use_arenas = use_arenas and hasattr(os, "memfd_create")

    def keep(
        self,
        head: bytes,
        request: Request,
        file: OpenFile,
        verdict: Verdict,
        status_line: bytes,
        tail: bytes,
        count: int,
    ) -> None:
        """Keep how `head` was answered, unless it is kept already for the same open file, or is too long."""
        if len(head) > REPEAT_HEAD_BYTES:
            return
        answers = self._answers
        kept = answers.get(head)
        if kept is not None and kept.file is file:
            return  # the file was checked again, not changed: the same answer, and its place in the arena
        if len(answers) >= REPEAT_LIMIT:
            answers.clear()
        answers[head] = Repeat(request, file, verdict, status_line, tail, count)

    def find(self, head: bytes, now: float) -> Repeat | None:
        """The answer to `head` if its file is still open and was checked less than OPEN_FILE_SECONDS ago."""
        repeat = self._answers.get(head)
        if repeat is None:
            return None
        file = repeat.file
        if file.evicted:
            del self._answers[head]
            return None
        # An expired file is checked again by the full answer, which keeps a new Repeat.
        return repeat if file.expires > now else None

    def in_arena(self, repeat: Repeat, second: float, date_lines: bytes) -> Arena | None:
        """The arena holding `repeat`'s whole answer for `second` (see `Arena`), or None: send it as before."""
        arena = repeat.arena
        if arena is not None and arena.second == second:
            return arena
        body = repeat.file.body
        if repeat.seen_second != second or body is None or not self._use_arenas or repeat.count != len(body):
            repeat.seen_second = second  # the first answer this second is not worth copying for later ones
            return None
        parts = (repeat.status_line, date_lines, repeat.tail, body)
        try:
            arena = self._arena
            if arena is None or arena.second != second:
                if arena is not None:
                    arena.evict()  # its fd closes once the bodies sent from it are
                arena = self._arena = Arena(second)
            if arena.size + sum(map(len, parts)) > ARENA_BYTES:
                return None
            repeat.offset = arena.add(*parts)
        except OSError as exc:
            # No memory file here, or no memory for it: the server goes on as without arenas.
            log.warning("cannot keep repeated answers in a memory file (%s): sending them as before", exc)
            self.close()
            self._use_arenas = False
            return None
        repeat.arena, repeat.length = arena, arena.size - repeat.offset
        return arena

    def close(self) -> None:
        """Evict the arena (the worker stops)."""
        if self._arena is not None:
            self._arena.evict()
            self._arena = None
