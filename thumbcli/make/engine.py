"""Make one source's thumbnails once: plan, read, decode in a pool's worker, write through the target.

Every driver (the local pipeline, a cluster task, generate-on-miss, watch mode) goes through
these steps, so a file is judged, read, named in its failure and recorded the same way whoever
asked for it. The drivers only decide what runs when: threads and queues, a task, a request.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from thumbcli.discover import SourceFile, display_path
from thumbcli.errors import FileRejected
from thumbcli.formats import header_size
from thumbcli.make.results import FileResult
from thumbcli.objectstores import is_bucket_url
from thumbcli.spec import Limits, ThumbSpec
from thumbcli.targets.plan import Plan, Target
from thumbcli.targets.state import StateError

if TYPE_CHECKING:
    from thumbcli.workers import SourceData, WorkerOutcome

log = logging.getLogger(__name__)

#: One source and the thumbnails of it to make.
Job = tuple[SourceFile, tuple[ThumbSpec, ...]]


def failure_reason(exc: BaseException) -> str:
    """An exception as the one-line reason of a file's failure (an OSError by its text, without the errno)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)


def read_source(source: SourceFile, limits: Limits, follow_symlinks: bool) -> tuple[SourceData, SourceFile]:
    """A source to hand to a worker, refusing what is not a regular file or is too big.

    A local file is opened and checked, and the kernel starts reading it ahead: the worker is
    handed it open and maps it, so its bytes never pass through this process. An object in a bucket
    is read (by its URL), its size and version as the read found them. Either way the source
    comes back re-stated as it was opened or read: what is decoded is what is recorded.
    """
    if is_bucket_url(source.path):
        from thumbcli import bucket  # a local file never needs the object-store side

        read = bucket.read_object(source.path, source.size, limits.max_file_size, header_limit(limits))
        if (read.version_ns, read.size) != (source.mtime_ns, source.size):
            source = SourceFile(source.path, source.root, source.relpath, read.size, read.version_ns)
        return read.data, source
    # Here, at the first file to make: the worker side (subprocess, sockets, ctypes) is no rerun's cost.
    from thumbcli.workers import OpenedFile

    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(source.path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRejected("not a regular file")
        limit = limits.max_file_size
        if st.st_size > limit:
            raise FileRejected(f"file is {st.st_size} bytes, over the max-file-size limit of {limit}")
        with contextlib.suppress(OSError):  # only a hint
            os.posix_fadvise(fd, 0, st.st_size, os.POSIX_FADV_WILLNEED)
    except BaseException:
        os.close(fd)
        raise
    if (st.st_mtime_ns, st.st_size) != (source.mtime_ns, source.size):
        # Record what was actually opened, not what the walk saw.
        source = SourceFile(source.path, source.root, source.relpath, st.st_size, st.st_mtime_ns)
    return OpenedFile(fd, st.st_size), source


def header_limit(limits: Limits) -> Callable[[bytes], None]:
    """A check of a source's first bytes against --max-pixels, where its header says its size."""
    from thumbcli.decoders import check_pixels  # here: only an object read from a bucket is checked so

    def check(head: bytes) -> None:
        found = header_size(head)
        if found is not None:
            check_pixels(*found, limits)

    return check


@dataclass(slots=True)
class Sorted:
    """A folder's plans sorted: results to report now, and the files to make, missing ones apart from stale."""

    results: list[FileResult] = field(default_factory=list)
    missing: list[Job] = field(default_factory=list)
    stale: list[Job] = field(default_factory=list)
    #: With a dry run: thumbnails that would be made, per spec name.
    planned_by_spec: dict[str, int] = field(default_factory=dict)


class SourceMaker:
    """The engine's steps for one source, against one target; safe from any thread the target is.

    `shown` names a source in results as the caller knows it (a cluster task's client has its own paths).
    """

    def __init__(
        self,
        target: Target,
        limits: Limits,
        *,
        follow_symlinks: bool,
        dry_run: bool = False,
        shown: Callable[[str], str] = str,
    ) -> None:
        self.target = target
        self._limits = limits
        self._follow_symlinks = follow_symlinks
        self._dry_run = dry_run
        self._shown = shown

    def sort(self, todo: list[tuple[SourceFile, Plan]]) -> Sorted:
        """Sort the plans of files that are not fresh: refused and known failures are reported, not made.

        Missing thumbnails come before stale ones, so runs cut short by a budget converge on full coverage.
        """
        found = Sorted()
        for source, plan in todo:
            shown = self._shown(source.path)
            if plan.freshness == "rejected":
                found.results.append(FileResult(shown, "failed", plan.problem))
            elif plan.freshness == "known-failure":
                found.results.append(FileResult(shown, "known-failure", plan.problem))
            elif self._dry_run:
                for spec in plan.specs:
                    found.planned_by_spec[spec.name] = found.planned_by_spec.get(spec.name, 0) + 1
                found.results.append(FileResult(shown, "planned", thumbnails=len(plan.specs)))
            else:
                (found.stale if plan.freshness == "stale" else found.missing).append((source, plan.specs))
        return found

    def read(self, source: SourceFile) -> tuple[SourceData, SourceFile] | FileResult:
        """The source to hand to a worker and its stat as read, or the failure that reading it was."""
        try:
            return read_source(source, self._limits, self._follow_symlinks)
        except (OSError, FileRejected) as exc:
            return FileResult(self._shown(source.path), "failed", failure_reason(exc))

    def refused(self, source: SourceFile, outcome: WorkerOutcome) -> FileResult | None:
        """The failure a worker's outcome is, recorded as the source's known failure; None if it made thumbnails."""
        if not outcome.reason:
            return None
        if not outcome.transient:
            self._record(source, outcome.reason)
        return FileResult(self._shown(source.path), "failed", outcome.reason, detail=outcome.detail)

    def write(self, source: SourceFile, specs: tuple[ThumbSpec, ...], outcome: WorkerOutcome) -> FileResult:
        """Write what a worker made of the source through the target."""
        shown = self._shown(source.path)
        try:
            self.target.write(source, list(zip(specs, outcome.thumbnails, strict=True)))
        except OSError as exc:
            reason = f"cannot write thumbnail: {failure_reason(exc)}"
            if exc.errno == errno.ENAMETOOLONG:
                # The source's name, not the disk: no later run can write it either until it changes.
                self._record(source, reason)
            return FileResult(shown, "failed", reason)
        return FileResult(shown, "made", thumbnails=len(specs), warning=outcome.warning, detail=outcome.detail)

    def _record(self, source: SourceFile, reason: str) -> None:
        """Remember that the source cannot be made as it is now, so that later runs do not try it again."""
        try:
            self.target.record_failure(source, reason)
        except StateError as exc:  # not remembering it only costs one more try, next time
            log.warning("cannot record the failure of %s: %s", display_path(source.path), exc)
