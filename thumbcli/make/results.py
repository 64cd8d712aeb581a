"""What became of each source file, and a run's counts of it: what every driver of the engine reports."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from thumbcli.discover import display_path

#: "known-failure": refused by the decoder in an earlier run, unchanged since, so not tried (and not reported) again.
Status = Literal["made", "skipped", "failed", "planned", "known-failure"]
StopReason = Literal["interrupted", "max-time", "max-files"]


class FileResult(NamedTuple):
    """What happened to one source file (a NamedTuple: one is made per file)."""

    path: str
    status: Status
    reason: str = ""
    thumbnails: int = 0
    #: Made from only part of a damaged image: what was wrong with it (a degraded thumbnail).
    warning: str = ""
    #: The decoder's raw text behind the reason or the warning (for the fail log).
    detail: str = ""

    def describe(self) -> str:
        """One line naming the file and, for a failure, the reason."""
        text = display_path(self.path)
        return f"{text}: {self.reason}" if self.reason else text


@dataclass(slots=True)
class RunStats:
    """Counts and timings of one run."""

    found: int = 0
    made: int = 0
    thumbnails: int = 0
    skipped: int = 0
    failed: int = 0
    #: Files that failed in an earlier run and were not tried again (see targets/failures.py).
    known_failures: int = 0
    #: Files made from only the part of them that decodes (see FileResult.warning).
    degraded: int = 0
    #: Resample worker processes started, replacements of killed ones included.
    workers_started: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    stopped: StopReason | None = None
    failures: list[FileResult] = field(default_factory=list)
    warnings: list[FileResult] = field(default_factory=list)
    known: list[FileResult] = field(default_factory=list)
    #: With a dry run: files that would be made, and thumbnails per spec name.
    planned: int = 0
    planned_by_spec: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Source images decoded per second of wall time."""
        return self.made / self.seconds if self.seconds > 0 else 0.0

    def count(self, result: FileResult, weight: int = 1) -> None:
        """Count one file's outcome (`weight` files for a failure that stands for several, as a lost task's)."""
        if result.status == "made":
            self.made += 1
            self.thumbnails += result.thumbnails
            if result.warning:
                self.degraded += 1
                self.warnings.append(result)
        elif result.status == "skipped":
            self.skipped += 1
        elif result.status == "planned":
            self.planned += 1
        elif result.status == "known-failure":
            self.known_failures += 1
            self.known.append(result)
        else:
            self.failed += weight
            self.failures.append(result)

    def add_planned(self, by_spec: dict[str, int]) -> None:
        """Add a dry run's thumbnails per spec name."""
        for name, count in by_spec.items():
            self.planned_by_spec[name] = self.planned_by_spec.get(name, 0) + count


class RunTally:
    """A run's counts and the callbacks that follow them as they change (a progress bar); safe from any thread."""

    def __init__(
        self,
        on_found: Callable[[int], None] | None,
        on_skipped: Callable[[int], None] | None,
        on_result: Callable[[FileResult], None] | None,
    ) -> None:
        self.stats = RunStats()
        #: Held for every change to `stats`.
        self.lock = threading.Lock()
        self._on_found = on_found
        self._on_skipped = on_skipped
        self._on_result = on_result

    def found(self, found: int, skipped: int) -> None:
        """Count files found, of which `skipped` were fresh: called per folder, not per file."""
        with self.lock:
            self.stats.found += found
            self.stats.skipped += skipped
            if self._on_found is not None and found:
                self._on_found(found)
            if self._on_skipped is not None and skipped:
                self._on_skipped(skipped)

    def report(self, result: FileResult, weight: int = 1) -> None:
        """Count one file's outcome (see RunStats.count) and pass it on."""
        with self.lock:
            self.stats.count(result, weight)
            if self._on_result is not None:
                self._on_result(result)
