"""What a destination remembers of its thumbnails and failures, behind one protocol: the SQLite store, or a
cluster task's records in memory, seeded by the client and handed back to it as a journal."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from thumbcli.targets.state import FailureRecord, FolderSignature, Origin, Record


class Records(Protocol):
    """The records an output tree plans against and writes to (`StateStore` and `TaskRecords`)."""

    def folder(self, folder: str) -> dict[str, Record]:
        """The records of one output folder (relative to the root), name -> record."""
        ...

    def get(self, out: str) -> Record | None:
        """The record of one output, from the folders read so far."""
        ...

    def fetch(self, out: str) -> Record | None:
        """The record of one output, read now (a long-running server sees a concurrent run's records)."""
        ...

    def origins(self) -> list[tuple[str, Origin]]:
        """Every output recorded, with what it was made from."""
        ...

    def record(self, out: str, origin: Origin) -> None:
        """Remember what the output at `out` was made from."""
        ...

    def forget(self, outs: Iterable[str]) -> None:
        """Drop the records of removed outputs."""
        ...

    def failures(self) -> dict[bytes, tuple[FailureRecord, str]]:
        """Every recorded decode failure: source path -> (what it failed as, the reason)."""
        ...

    def failure(self, source: bytes) -> tuple[FailureRecord, str] | None:
        """The failure recorded for one source, read now."""
        ...

    def record_failure(self, source: bytes, record: FailureRecord, reason: str) -> None:
        """Remember that a source failed to decode as it is now."""
        ...

    def forget_failure(self, source: bytes) -> None:
        """Forget a source's failure (it was made)."""
        ...

    def forget_failures(self, keep: Callable[[bytes], bool]) -> None:
        """Drop the failures recorded for the sources for which `keep` is false."""
        ...

    def knows(self, signature: FolderSignature | None) -> bool:
        """Whether a folder's signature is the one recorded when all its thumbnails were last found fresh."""
        ...

    def remember(self, signature: FolderSignature | None) -> None:
        """Record the signature of a folder whose thumbnails are all fresh."""
        ...

    def forget_signatures(self, keep: Callable[[bytes], bool]) -> None:
        """Drop the signatures of the source folders for which `keep` is false."""
        ...

    def save(self) -> None:
        """Keep what was recorded so far, now (a full disk: before it fills up further)."""
        ...

    def close(self) -> None:
        """Keep what was recorded."""
        ...


class TaskRecords:
    """A cluster task's records, in memory: seeded by the client, with a journal of what the task changed.

    Never touches a database: only the client writes the state store, from the journal.
    """

    def __init__(self, records: dict[str, dict[str, Record]], failures: dict[bytes, tuple[FailureRecord, str]]) -> None:
        self._seeded = {folder: dict(found) for folder, found in records.items()}
        self._failures = dict(failures)
        #: The journal: outputs made, signatures settled, failures met, failures forgotten.
        self.made: list[tuple[str, Origin]] = []
        self.signatures: list[FolderSignature] = []
        self.failed: list[tuple[bytes, FailureRecord, str]] = []
        self.forgotten: list[bytes] = []

    def folder(self, folder: str) -> dict[str, Record]:
        """The records of one output folder, as the client sent them plus what this task made."""
        return self._seeded.setdefault(folder, {})

    def get(self, out: str) -> Record | None:
        """The record of one output, as sent or made."""
        folder, _, name = out.rpartition("/")
        return self.folder(folder).get(name)

    def fetch(self, out: str) -> Record | None:
        """As `get`: there is no database to read again."""
        return self.get(out)

    def origins(self) -> list[tuple[str, Origin]]:
        """The outputs this task made (the client's records carry no source paths)."""
        return list(self.made)

    def record(self, out: str, origin: Origin) -> None:
        """Remember what the output at `out` was made from, for the client to record."""
        folder, _, name = out.rpartition("/")
        self.folder(folder)[name] = (origin.mtime_ns, origin.size, origin.preset, origin.digest)
        self.made.append((out, origin))

    def forget(self, outs: Iterable[str]) -> None:
        """Drop the records of removed outputs (a task removes none: prune runs on the client)."""
        for out in outs:
            folder, _, name = out.rpartition("/")
            self.folder(folder).pop(name, None)

    def failures(self) -> dict[bytes, tuple[FailureRecord, str]]:
        """The failures the client sent with the task, and those the task met."""
        return dict(self._failures)

    def failure(self, source: bytes) -> tuple[FailureRecord, str] | None:
        """The failure known for one source."""
        return self._failures.get(source)

    def record_failure(self, source: bytes, record: FailureRecord, reason: str) -> None:
        """Note a decode failure for the client to record."""
        self._failures[source] = (record, reason)
        self.failed.append((source, record, reason))

    def forget_failure(self, source: bytes) -> None:
        """Note that a source with a recorded failure was made, for the client to forget it."""
        if self._failures.pop(source, None) is not None:
            self.forgotten.append(source)

    def forget_failures(self, keep: Callable[[bytes], bool]) -> None:
        """Drop the failures the task knows of sources for which `keep` is false."""
        for source in [source for source in self._failures if not keep(source)]:
            self.forget_failure(source)

    def knows(self, signature: FolderSignature | None) -> bool:
        """The client already skipped the folders it knew fresh: a task knows none."""
        return False

    def remember(self, signature: FolderSignature | None) -> None:
        """Pass a settled signature of an all-fresh folder back to the client."""
        if signature is not None and signature.settled:
            self.signatures.append(signature)

    def forget_signatures(self, keep: Callable[[bytes], bool]) -> None:
        """Drop the settled signatures of folders for which `keep` is false."""
        self.signatures = [signature for signature in self.signatures if keep(signature.folder)]

    def save(self) -> None:
        """Nothing to keep here: the client records the journal."""

    def close(self) -> None:
        """Nothing to keep here: the client records the journal."""
