"""The exception family and the named exit codes."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    SOME_FAILED = 1
    USAGE = 2
    CANNOT_RUN = 3
    CUT_SHORT = 4
    LOCKED = 5
    INTERRUPTED = 130


class ThumbcliError(Exception):
    """Base of every error thumbcli raises on purpose."""


class SpecError(ThumbcliError, ValueError):
    """An option value that cannot describe a valid run (a usage error).

    `settings` are what the message is about, by the library's names (`name_template`,
    `dask`): the message does not spell them as flags, the command line does (cli/options.py).
    """

    def __init__(self, message: str, *settings: str) -> None:
        super().__init__(message)
        self.settings = settings


class CannotRunError(ThumbcliError):
    """The run cannot start at all: output not writable, cache unusable, ..."""


class EndpointUnreachable(CannotRunError):
    """The object store does not answer at all (after retries): the run cannot go on."""


class LockedError(ThumbcliError):
    """Another run holds the lock on this cache."""


class FileRejected(ThumbcliError):
    """One source file cannot be thumbnailed; the message is its one-line reason."""
