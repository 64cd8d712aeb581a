"""Generate-on-miss for `serve --source`: one thumbnail at a time, checked and made off the server's event loop.

Both the freshness check (a read of the batch run's state store, which a concurrent
`generate --cache` may hold locked) and the generation run on this module's threads,
never on the loop that answers requests. The decoding itself happens in resample
worker processes, as in `generate` and under the same limits: a source that crashes or
hangs a decoder costs its request and a replaced worker, and the server process never
loads libvips.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from thumbcli.cache import is_within
from thumbcli.discover import SourceFile, display_path, is_image_name
from thumbcli.errors import FileRejected
from thumbcli.pipeline import _reason, read_source
from thumbcli.spec import Limits, ThumbSpec
from thumbcli.targets.state import StateError
from thumbcli.workers import ResampleWorker

log = logging.getLogger(__name__)


#: What `OnDemand.request` did with a request at once.
Admission = Literal["queued", "joined", "busy", "missing"]


class Outcome(enum.Enum):
    """What became of one on-demand request, as the server answers it."""

    READY = "ready"  # the cached thumbnail is current, found so or made now: serve it
    MISSING = "missing"  # no such source image, or one that cannot be thumbnailed: 404
    FAILED = "failed"  # making it failed on our side (e.g. the cache disk is full): 500
    UNCHECKED = "unchecked"  # its freshness could not be judged (the state store failed): 503


class Completion(NamedTuple):
    """The outcome of one check-and-make, and whether a thumbnail was made (or tried) for it."""

    outcome: Outcome
    made: bool


Done = Callable[[Completion], None]


class WorkerPool:
    """Resample worker processes for the generator threads: one each, started on first use, replaced when killed."""

    def __init__(self, count: int, limits: Limits, *, strict: bool, decode_for: tuple[ThumbSpec, ...]) -> None:
        ceiling = limits.worker_memory(count)
        self._all = [
            ResampleWorker(limits, strict=strict, memory_ceiling=ceiling, decode_for=decode_for) for _ in range(count)
        ]
        self._idle: queue.SimpleQueue[ResampleWorker] = queue.SimpleQueue()
        for worker in self._all:
            self._idle.put(worker)

    @contextlib.contextmanager
    def worker(self) -> Iterator[ResampleWorker]:
        """A worker for one file, given back after (never waits: there is one per generator thread)."""
        worker = self._idle.get()
        try:
            yield worker
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Let every worker leave (call once no generation runs)."""
        for worker in self._all:
            worker.close()


class OnDemand:
    """Makes single thumbnails on request (serve's generate-on-miss) with the pipeline's stages.

    Each request is checked against its source on a generator thread and made there if
    missing or stale. Concurrent requests for one thumbnail share one check-and-make; past
    `max_pending` outstanding ones a request is refused at once instead of queueing.
    A source the decoder refused is a known failure, recorded in the cache's state as
    `generate` records it: neither tries it again until it changes (targets/failures.py).
    Unless `strict`, a damaged source gives a thumbnail of what decodes, as in `generate`.
    `decode_for` are every preset of the cache (empty: `presets` are): each source is
    decoded for the largest, as `generate` decodes it, for the same bytes.
    Writes take no run lock: every write is atomic, so a concurrent batch run is harmless.
    """

    def __init__(
        self,
        sources: Path | Mapping[str, Path],
        cache_root: Path,
        presets: Mapping[str, ThumbSpec],
        *,
        workers: int = 2,
        max_pending: int = 16,
        limits: Limits | None = None,
        strict: bool = False,
        decode_for: tuple[ThumbSpec, ...] = (),
    ) -> None:
        from thumbcli.targets.served import CacheDirectory

        #: URL segment after the preset -> source root; a lone unnamed root (a Path) is under "": no such segment.
        self._sources = {"": sources} if isinstance(sources, Path) else dict(sources)
        self._presets = dict(presets)
        self._limits = limits or Limits()
        # The cache's folder of each named root is its name, as `generate` makes it.
        folders = {str(root): name for name, root in self._sources.items()} if "" not in self._sources else None
        self._target = CacheDirectory(
            cache_root, tuple(self._presets.values()), check_collisions=False, locked=False, source_folders=folders
        )
        self._max_pending = max_pending
        self._pending: dict[tuple[str, str], list[Done]] = {}
        self._lock = threading.Lock()
        self._workers = WorkerPool(
            workers, self._limits, strict=strict, decode_for=decode_for or tuple(self._presets.values())
        )
        from concurrent.futures import ThreadPoolExecutor  # only `serve --source` needs it

        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="on-demand")

    def source_for(self, url_relpath: str) -> SourceFile | None:
        """The source file a URL's path after the preset names, or None if there is no such image.

        With named sources the path starts with the source's name: `phone/2024/a.jpg`.
        """
        name = url_relpath.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in url_relpath.split("/")) or not is_image_name(name):
            return None
        root = self._sources.get("")
        relpath = url_relpath
        if root is None:
            source_name, _, relpath = url_relpath.partition("/")
            root = self._sources.get(source_name)
            if root is None or not relpath:
                return None
        path = root / relpath
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or not is_within(root, path):
            return None
        return SourceFile(str(path), str(root), relpath, st.st_size, st.st_mtime_ns)

    def is_fresh(self, preset: str, relpath: str) -> bool | None:
        """True if the cached thumbnail is current, False if it must be made, None if there is no source."""
        source = self.source_for(relpath)
        spec = self._presets.get(preset)
        if source is None or spec is None:
            return None
        return self._target.is_fresh(source, spec)

    def request(self, preset: str, relpath: str, done: Done) -> Admission:
        """Start (or join) checking and if need be making one thumbnail; `done` is called from a worker thread."""
        spec = self._presets.get(preset)
        if spec is None:
            return "missing"
        key = (preset, relpath)
        with self._lock:
            waiting = self._pending.get(key)
            if waiting is not None:
                waiting.append(done)
                return "joined"
            if len(self._pending) >= self._max_pending:
                return "busy"
            self._pending[key] = [done]
        self._executor.submit(self._complete, key, spec)
        return "queued"

    def _complete(self, key: tuple[str, str], spec: ThumbSpec) -> None:
        completion = Completion(Outcome.FAILED, made=False)
        try:
            completion = self._check_and_make(key, spec)
        except Exception:
            # A bug, not a bad file: loud in the log, a 500 for the waiting clients, the server stays up.
            log.exception("on-demand %s thumbnail of %s failed", spec.name, key[1])
        finally:
            with self._lock:
                waiting = self._pending.pop(key, [])
            for done in waiting:
                done(completion)

    def _check_and_make(self, key: tuple[str, str], spec: ThumbSpec) -> Completion:
        source = self.source_for(key[1])
        if source is None:
            return Completion(Outcome.MISSING, made=False)
        try:
            if self._target.is_fresh(source, spec):
                return Completion(Outcome.READY, made=False)
        except (OSError, StateError) as exc:
            log.warning("cannot check the %s thumbnail of %s: %s", spec.name, key[1], exc)
            return Completion(Outcome.UNCHECKED, made=False)
        if self._target.known_failure(source) is not None:
            return Completion(Outcome.MISSING, made=False)
        # The reasons name the source: they are logged, never sent to a client.
        try:
            data, source = read_source(source, self._limits, follow_symlinks=False)
        except (OSError, FileRejected) as exc:
            log.warning("cannot make %s thumbnail: %s: %s", spec.name, display_path(source.path), _reason(exc))
            return Completion(Outcome.MISSING, made=True)
        with self._workers.worker() as worker:
            outcome = worker.resample(data, (spec,))
        del data
        if outcome.reason:
            log.warning("cannot make %s thumbnail: %s: %s", spec.name, display_path(source.path), outcome.reason)
            try:
                self._target.record_failure(source, outcome.reason)
            except StateError as exc:  # not remembering it only means one more decode
                log.warning("cannot record the failure of %s: %s", display_path(source.path), exc)
            return Completion(Outcome.MISSING, made=True)
        if outcome.warning:
            log.warning(
                "made %s thumbnail of what decodes: %s: %s", spec.name, display_path(source.path), outcome.warning
            )
        thumbnail = outcome.thumbnails[0]
        try:
            self._target.write(source, [(spec, thumbnail)])
        except OSError as exc:
            log.warning("cannot make %s thumbnail: cannot write thumbnail: %s", spec.name, _reason(exc))
            return Completion(Outcome.FAILED, made=True)
        return Completion(Outcome.READY, made=True)

    def close(self, *, abandon: bool = False) -> None:
        """Finish the generations in flight, then release the cache.

        With `abandon` (a process about to exit), drop the queued generations and
        return at once; the running ones finish their atomic writes on their own.
        """
        if abandon:
            # The workers die with this process (they are told to on start).
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        self._executor.shutdown(wait=True)
        self._workers.close()
        self._target.close()
