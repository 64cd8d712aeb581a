"""Request heads seen before, byte for byte, and how they were answered: sent again without parsing.

A client asks for the same thumbnail with the same head again and again (a browser's revalidations,
a CDN's or a load balancer's fetches). While the file it was answered from is open and current, the
same bytes get the same answer, so the parse and the decisions of the first answer are kept, not redone.
"""

from __future__ import annotations

from thumbcli.serve.files import OpenFile
from thumbcli.serve.http import Verdict
from thumbcli.serve.protocol import Request

#: Heads longer than this are parsed every time (a browser's head is 300-800 bytes).
REPEAT_HEAD_BYTES = 2048
#: At most this many heads are kept; a full table starts over (one parse per head to refill it).
REPEAT_LIMIT = 4096


class Repeat:
    """How one request head was answered: the parsed request, the file, and the header lines after Date."""

    __slots__ = ("count", "file", "request", "status_line", "tail", "verdict")

    def __init__(self, request: Request, file: OpenFile, verdict: Verdict, status_line: bytes, tail: bytes, count: int):
        self.request = request
        self.file = file
        self.verdict = verdict  # the status, for the metrics and the access log
        self.status_line = status_line
        self.tail = tail  # the header lines after Date and Server, through the blank line
        self.count = count  # body bytes sent: the file's size, or none (HEAD, 304)


class RepeatTable:
    """The answers kept by request head; an answer whose file was evicted is gone with it."""

    def __init__(self) -> None:
        self._answers: dict[bytes, Repeat] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def keep(self, head: bytes, repeat: Repeat) -> None:
        answers = self._answers
        if len(answers) >= REPEAT_LIMIT:
            answers.clear()
        answers[head] = repeat

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
