"""The Target protocol every destination implements, the Plan it returns, and the one freshness judgement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from thumbcli.discover import DirBatch, SourceFile
from thumbcli.spec import ThumbSpec
from thumbcli.targets.state import Record

if TYPE_CHECKING:
    from thumbcli.resample import Thumbnail

Freshness = Literal["fresh", "missing", "stale", "rejected"]


@dataclass(frozen=True, slots=True)
class Plan:
    """Which thumbnails of one source must be made, and why (or why it cannot be)."""

    freshness: Freshness
    specs: tuple[ThumbSpec, ...]
    problem: str = ""


FRESH = Plan("fresh", ())


def judge(record: Record | None, exists: bool, mtime_ns: int, size: int, spec: ThumbSpec, force: bool) -> Freshness:
    """How one thumbnail stands: made from a source with this mtime and size, with these settings?"""
    if record is None or not exists:
        return "missing"
    if force or record[0] != mtime_ns or record[1] != size or record[3] != spec.digest:
        return "stale"
    return "fresh"


def worst(a: Freshness, b: Freshness) -> Freshness:
    return "missing" if "missing" in (a, b) else "stale" if "stale" in (a, b) else a


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

    def close(self) -> None:
        """Commit records and release locks."""
        ...
