"""The Target protocol every destination implements, the Plan it returns, and the one freshness judgement."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from thumbcli.discover import DirBatch, SourceFile, display_path
from thumbcli.spec import ThumbSpec

if TYPE_CHECKING:
    from thumbcli.resample import Thumbnail

#: "known-failure": the decoder refused the source as it is now; it is not tried again (targets/failures.py).
Freshness = Literal["fresh", "missing", "stale", "rejected", "known-failure"]


@dataclass(frozen=True, slots=True)
class Plan:
    """Which thumbnails of one source must be made, and why (or why it cannot be)."""

    freshness: Freshness
    specs: tuple[ThumbSpec, ...]
    problem: str = ""


FRESH = Plan("fresh", ())


@dataclass(frozen=True, slots=True)
class Removal:
    """A thumbnail (or folder of them) that prune removes, or in a dry run would remove, and why."""

    path: Path
    bytes: int
    reason: str
    #: A thumbnail in a bucket by its URL (`path` is then under the local folder of its records).
    url: str = ""

    @property
    def shown(self) -> str:
        """Where the thumbnail is, as a person would look for it: its URL or its path."""
        return self.url or display_path(self.path)


def judge(recorded: Hashable | None, wanted: Hashable, force: bool) -> Freshness:
    """The one freshness judgement: how a thumbnail stands, from what it records of its making.

    `recorded` is what the thumbnail was made from (None when there is no thumbnail);
    `wanted` is the same for the source and settings as they are now. Every destination
    says what the two are: a state record, or the Thumb:: text of a desktop thumbnail.
    """
    if recorded is None:
        return "missing"
    if force or recorded != wanted:
        return "stale"
    return "fresh"


def worst(a: Freshness, b: Freshness) -> Freshness:
    """The more urgent of two verdicts: missing before stale before fresh."""
    return "missing" if "missing" in (a, b) else "stale" if "stale" in (a, b) else a


def plan_from(verdicts: Iterable[tuple[ThumbSpec, Freshness]]) -> Plan:
    """The plan of one source from the verdict on each spec's thumbnail."""
    needed: list[ThumbSpec] = []
    freshness: Freshness = "fresh"
    for spec, verdict in verdicts:
        if verdict != "fresh":
            needed.append(spec)
            freshness = worst(freshness, verdict)
    return Plan(freshness, tuple(needed)) if needed else FRESH


def plan_each(target: Target, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
    """Plan a folder's files one by one: (how many are fresh, the others with their plans)."""
    fresh = 0
    todo = []
    for source in batch.sources():
        plan = target.plan(source, force)
        if plan.freshness == "fresh":
            fresh += 1
        else:
            todo.append((source, plan))
    return fresh, todo


class Target(Protocol):
    """A destination the pipeline plans against and writes to."""

    root: Path
    specs: tuple[ThumbSpec, ...]

    def plan(self, source: SourceFile, force: bool) -> Plan:
        """Which of `specs` this source needs made, from its stat and the records (no reading)."""
        ...

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        """`plan` for a folder's files: how many are fresh, and the others with their plans."""
        ...

    def known_fresh(self, batch: DirBatch) -> bool:
        """Whether all of a folder's files are fresh by what is recorded of the folder as a whole.

        Must not touch the database: forked walk helpers call it.
        """
        ...

    def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
        """Write the thumbnails atomically and record what they were made from (called from writer threads)."""
        ...

    def record_failure(self, source: SourceFile, reason: str) -> None:
        """Note that libvips rejected the source (called from resample workers)."""
        ...

    def typical_size(self, spec: ThumbSpec) -> int | None:
        """The bytes a thumbnail of `spec` usually takes here, from those made so far (None: not known)."""
        ...

    def close(self) -> None:
        """Commit records and release locks."""
        ...
