"""SIGTERM and SIGINT carried into a poll loop as bytes on a socket (`signal.set_wakeup_fd`)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """Signal handler: the wakeup fd carries the signal number into the loop."""


class StopSignals:
    """While installed, SIGTERM (and SIGINT unless ignored) make `reader` readable; `count` reads them."""

    def __init__(self, *, ignore_sigint: bool = False) -> None:
        self._ignore_sigint = ignore_sigint
        self._previous: tuple[_Handler, _Handler, int] | None = None
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        """The fd to poll for readability."""
        return self._reader.fileno()

    def install(self) -> bool:
        """Take over the signals; False (and nothing done) outside the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: signals are left alone")
            return False
        old_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        old_term = signal.signal(signal.SIGTERM, _note_signal)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN if self._ignore_sigint else _note_signal)
        self._previous = (old_term, old_int, old_fd)
        return True

    def count(self) -> int:
        """How many stop signals arrived since the last call."""
        try:
            received = self._reader.recv(64)
        except BlockingIOError:
            return 0
        return sum(1 for signum in received if signum in _STOP_SIGNALS)

    def close(self) -> None:
        """Give the signals back as they were and close the socket pair."""
        if self._previous is not None:
            old_term, old_int, old_fd = self._previous
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
            signal.set_wakeup_fd(old_fd)
            self._previous = None
        self._reader.close()
        self._writer.close()
