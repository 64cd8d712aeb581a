"""Known failures: sources the decoder refused, not tried again until they change, thumbcli changes, or a retry.

The one place every target asks whether a source is a known failure. A failure is
recorded in the target's state store keyed by the source's absolute path, with what
the source was (mtime, size) and which thumbcli refused it, and judged by the same
`judge` as a thumbnail: a known failure is one whose record is "fresh".
Only decode failures are recorded (the source's fault); I/O errors may heal and are not.
"""

from __future__ import annotations

import logging
import os
import threading

import thumbcli
from thumbcli.discover import SourceFile, absolute_source, display_path
from thumbcli.targets.plan import Plan, judge
from thumbcli.targets.records import Records
from thumbcli.targets.state import FailureRecord, StateError

log = logging.getLogger(__name__)


def failure_key(path: str) -> bytes:
    """How a source is named in the failure records: its absolute path, as bytes."""
    return os.fsencode(absolute_source(path))


class FailureBook:
    """The decode failures a target remembers, read once when the run starts and kept up to date by it.

    With `retry` (`--retry-failed`, or `--force`) no failure is known: every source is tried again.
    """

    def __init__(self, state: Records, *, retry: bool = False, version: str | None = None) -> None:
        self._state = state
        self._retry = retry
        self.version = version if version is not None else thumbcli.__version__
        # Read now: forked walk helpers consult `has` without the database.
        self._known = state.failures()
        self._lock = threading.Lock()

    def _wanted(self, source: SourceFile) -> FailureRecord:
        return (source.mtime_ns, source.size, self.version)

    def _judged(self, source: SourceFile, entry: tuple[FailureRecord, str] | None) -> str | None:
        if entry is None or self._retry:
            return None
        recorded, reason = entry
        return reason if judge(recorded, self._wanted(source), False) == "fresh" else None

    def known(self, source: SourceFile) -> str | None:
        """Why `source` failed before, if it failed as it is now with this thumbcli; else None (try it)."""
        return self._judged(source, self._known.get(failure_key(source.path)))

    def known_now(self, source: SourceFile) -> str | None:
        """Like `known`, but read from the database, where another process may have recorded it."""
        try:
            return self._judged(source, self._state.failure(failure_key(source.path)))
        except StateError:
            return None  # not knowing only means one more decode

    def has(self, path: str) -> bool:
        """Whether any failure (current or not) was recorded for the source at `path` when the run started."""
        return failure_key(path) in self._known

    def plan(self, source: SourceFile, plan: Plan) -> Plan:
        """`plan`, or a known-failure plan when the thumbnails it asks for would only fail again."""
        if not plan.specs:
            return plan
        reason = self.known(source)
        return plan if reason is None else Plan("known-failure", (), reason)

    def record(self, source: SourceFile, reason: str) -> None:
        """Remember that the decoder refused `source` as it is now."""
        key = failure_key(source.path)
        entry = (self._wanted(source), reason)
        try:
            self._state.record_failure(key, *entry)
        except StateError as exc:  # a full disk: not remembering it only means one more decode next run
            log.warning("%s: cannot record the failure: %s", display_path(source.path), exc)
        with self._lock:
            self._known[key] = entry

    def forget(self, source: SourceFile) -> None:
        """`source` was thumbnailed: forget a failure recorded for it."""
        key = failure_key(source.path)
        with self._lock:
            if self._known.pop(key, None) is None:
                return
        try:
            self._state.forget_failure(key)
        except StateError as exc:  # the failure stays known until a run can forget it: one more decode then
            log.warning("%s: cannot forget the failure: %s", display_path(source.path), exc)
