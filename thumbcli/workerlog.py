"""What a resample worker writes on stderr: read as it comes and handed out per file, never the user's terminal."""

from __future__ import annotations

import os


class WorkerStderr:
    """The read end of a worker's stderr pipe, and what it said since the last file (its last KEPT bytes)."""

    KEPT = 2048

    def __init__(self) -> None:
        self.fd = -1
        self._said = bytearray()

    def open(self) -> int:
        """A new pipe for a new worker: the write end, which the caller closes once the worker holds it."""
        self.close()
        read, write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read, False)
        self.fd = read
        return write

    def drain(self) -> bool:
        """Read what is there (the worker must never block on a full pipe); False once the worker closed it."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._said += chunk
            del self._said[: -self.KEPT]

    def take(self) -> str:
        """What the worker said since the last call, on one line (for a file's detail in the fail log)."""
        if self.fd >= 0:
            self.drain()
        text = " ".join(self._said.decode("utf-8", "backslashreplace").split())
        self._said.clear()
        return text

    def close(self) -> None:
        """Forget the pipe (the worker is gone) and what it said."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._said.clear()
