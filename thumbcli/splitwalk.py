"""Walk the sources in several processes: a no-change run is a stat per source, and the GIL serializes threads."""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from thumbcli.discover import DirBatch, WalkProblem, is_image_name, walk_batches
from thumbcli.spec import WalkOptions

#: More stop paying off: each lists every folder that has subfolders, and their stat calls contend.
MAX_PROCESSES = 4

_HEADER = 4  # bytes of length before each message
_FLUSH_FOLDERS = 32  # walked folders between reports of fresh files (for progress) and reads from helpers


def default_processes() -> int:
    """One walking process per core this process may run on, at most MAX_PROCESSES."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_PROCESSES, cores))


class SplitWalk:
    """Walks part 0 of the folders in the calling thread while forked helpers walk the others.

    Iterating yields, in no fixed order, each folder that `known_fresh` could not vouch
    for (a DirBatch to plan), each WalkProblem, and counts (int) of the files found fresh
    by `known_fresh`. A zero count now and then lets the consumer check for a stop while
    it waits for a helper.

    The helpers are forked in the constructor, which must run before the process starts
    any thread: with none, forking is safe. When threads already run (inside a test
    runner, a server), or on one core, the whole walk happens in the calling thread.
    """

    def __init__(
        self,
        sources: Sequence[str],
        options: WalkOptions,
        is_image_name: Callable[[str], bool],
        excluded_dirs: Sequence[str],
        known_fresh: Callable[[DirBatch], bool],
        processes: int,
    ) -> None:
        self._sources = list(sources)
        self._options = options
        self._is_image_name = is_image_name
        self._excluded_dirs = list(excluded_dirs)
        self._known_fresh = known_fresh
        if threading.active_count() > 1 or not hasattr(os, "fork"):
            processes = 1
        self.processes = max(1, processes)
        #: Helper pid -> read end of its pipe, for the helpers not yet reaped.
        self._helpers: dict[int, int] = {}
        for part in range(1, self.processes):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the helper's coverage is not collected
                os.close(read_fd)
                self._helper(part, write_fd)
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            self._helpers[pid] = read_fd

    @classmethod
    def of_images(
        cls,
        sources: Sequence[str],
        options: WalkOptions,
        excluded_dirs: Sequence[str],
        known_fresh: Callable[[DirBatch], bool] | None,
    ) -> SplitWalk:
        """A run's walk of image files, forked now (before any thread starts); `known_fresh` None: none is."""
        return cls(
            sources,
            options,
            is_image_name,
            excluded_dirs,
            known_fresh or (lambda batch: False),
            options.processes or default_processes(),
        )

    def __iter__(self) -> Iterator[DirBatch | WalkProblem | int]:
        buffers = {pid: bytearray() for pid in self._helpers}
        fresh = 0
        for count, item in enumerate(
            walk_batches(self._sources, self._options, self._is_image_name, self._excluded_dirs, (0, self.processes))
        ):
            if isinstance(item, DirBatch) and self._known_fresh(item):
                fresh += len(item.files)
            else:
                yield item
            if count % _FLUSH_FOLDERS == 0:
                # Not after every folder: this process also runs the pipeline, so it is the slower walker.
                yield fresh
                fresh = 0
                if self._helpers:
                    yield from self._receive(buffers, timeout=0)
        yield fresh
        while self._helpers:
            yield from self._receive(buffers, timeout=0.2)
            yield 0

    def _receive(self, buffers: dict[int, bytearray], timeout: float) -> Iterator[DirBatch | WalkProblem | int]:
        readable, _, _ = select.select(list(self._helpers.values()), [], [], timeout)
        for pid, fd in list(self._helpers.items()):
            if fd not in readable:
                continue
            buffer = buffers[pid]
            ended = False
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    ended = True
                    break
                buffer += chunk
            while len(buffer) >= _HEADER:
                length = int.from_bytes(buffer[:_HEADER], "little")
                if len(buffer) < _HEADER + length:
                    break
                message = marshal.loads(buffer[_HEADER : _HEADER + length])
                del buffer[: _HEADER + length]
                kind = message[0]
                if kind == "fresh":
                    yield message[1]
                elif kind == "batch":
                    yield DirBatch(*message[1:])
                elif kind == "problem":
                    yield WalkProblem(message[1], message[2])
                elif kind == "crash":
                    self._reap(pid)
                    raise RuntimeError(f"walk helper process failed:\n{message[1]}")
                elif kind == "end":
                    self._reap(pid)
                    ended = False
                    break
            if ended:
                status = self._reap(pid)
                how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
                for source in self._sources:
                    yield WalkProblem(source, f"part of this tree was not walked: a walk helper process ended ({how})")

    def _reap(self, pid: int) -> int:
        os.close(self._helpers.pop(pid))
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """End and reap any helper still running (after a stop, or when the consumer gave up)."""
        for pid in list(self._helpers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._reap(pid)

    def _helper(self, part: int, write_fd: int) -> NoReturn:  # pragma: no cover - runs in the forked helper
        # The parent decides when to stop and kills us then: Ctrl-C and a service manager's
        # SIGTERM reach every process of the group, and would read as a helper that failed.
        # A parent that exits without that (a second Ctrl-C) is noticed at the next folder.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        parent = os.getppid()
        code = 0

        def send(message: tuple[Any, ...]) -> None:
            data = marshal.dumps(message)
            view = memoryview(len(data).to_bytes(_HEADER, "little") + data)
            while view:
                view = view[os.write(write_fd, view) :]

        try:
            fresh = 0
            folders = 0
            for item in walk_batches(
                self._sources, self._options, self._is_image_name, self._excluded_dirs, (part, self.processes)
            ):
                if os.getppid() != parent:
                    break
                if isinstance(item, WalkProblem):
                    send(("problem", item.path, item.reason))
                elif self._known_fresh(item):
                    fresh += len(item.files)
                    folders += 1
                    if folders % _FLUSH_FOLDERS == 0:
                        send(("fresh", fresh))
                        fresh = 0
                else:
                    send(("batch", *item))
            send(("fresh", fresh))
            send(("end",))
        except BrokenPipeError:
            code = 1  # the parent is gone
        except BaseException:
            code = 1
            with contextlib.suppress(OSError):
                send(("crash", traceback.format_exc()))
        finally:
            os._exit(code)
