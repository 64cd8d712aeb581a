"""Generate-on-miss for `serve --source`: one thumbnail at a time, made off the server's event loop."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from thumbcli.cache import is_within
from thumbcli.discover import SourceFile, display_path, is_image_name
from thumbcli.errors import FileRejected
from thumbcli.pipeline import _load_resample, _reason, read_source
from thumbcli.spec import Limits, ThumbSpec

log = logging.getLogger(__name__)


OnDemandStatus = Literal["queued", "joined", "busy", "missing"]


class GenerationFailure(NamedTuple):
    """Why an on-demand thumbnail was not made: the source's fault (no thumbnail can exist) or ours."""

    reason: str
    source_problem: bool


class OnDemand:
    """Makes single thumbnails on request (serve's generate-on-miss) with the pipeline's stages.

    Concurrent requests for one thumbnail share one generation; past `max_pending`
    outstanding generations a request is refused at once instead of queueing.
    A source that could not be thumbnailed is not tried again until it changes.
    Writes take no run lock: every write is atomic, so a concurrent batch run is harmless.
    """

    _REMEMBERED_FAILURES = 4096

    def __init__(
        self,
        source_root: Path,
        cache_root: Path,
        presets: Mapping[str, ThumbSpec],
        *,
        workers: int = 2,
        max_pending: int = 16,
        limits: Limits | None = None,
    ) -> None:
        from thumbcli.targets.served import CacheDirectory

        self._source_root = source_root
        self._presets = dict(presets)
        self._limits = limits or Limits()
        self._target = CacheDirectory(cache_root, tuple(self._presets.values()), check_collisions=False, locked=False)
        self._max_pending = max_pending
        self._pending: dict[tuple[str, str], list[Callable[[GenerationFailure | None], None]]] = {}
        self._lock = threading.Lock()
        #: (preset, relpath) -> (mtime_ns, size) of sources that could not be thumbnailed.
        self._failed: dict[tuple[str, str], tuple[int, int]] = {}
        from concurrent.futures import ThreadPoolExecutor  # only `serve --source` needs it

        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="on-demand")

    def source_for(self, relpath: str) -> SourceFile | None:
        """The source file a URL's relative path names, or None if there is no such image."""
        name = relpath.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in relpath.split("/")) or not is_image_name(name):
            return None
        path = self._source_root / relpath
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or not is_within(self._source_root, path):
            return None
        return SourceFile(str(path), str(self._source_root), relpath, st.st_size, st.st_mtime_ns)

    def is_fresh(self, preset: str, relpath: str) -> bool | None:
        """True if the cached thumbnail is current, False if it must be made, None if there is no source."""
        source = self.source_for(relpath)
        spec = self._presets.get(preset)
        if source is None or spec is None:
            return None
        return self._target.is_fresh(source, spec)

    def request(self, preset: str, relpath: str, done: Callable[[GenerationFailure | None], None]) -> OnDemandStatus:
        """Start (or join) making one thumbnail; `done(None)` on success or `done(failure)`, from a worker thread."""
        spec = self._presets.get(preset)
        source = self.source_for(relpath)
        if spec is None or source is None:
            return "missing"
        key = (preset, relpath)
        with self._lock:
            if self._failed.get(key) == (source.mtime_ns, source.size):
                return "missing"
            waiting = self._pending.get(key)
            if waiting is not None:
                waiting.append(done)
                return "joined"
            if len(self._pending) >= self._max_pending:
                return "busy"
            self._pending[key] = [done]
        self._executor.submit(self._make, key, source, spec)
        return "queued"

    def _make(self, key: tuple[str, str], source: SourceFile, spec: ThumbSpec) -> None:
        failure: GenerationFailure | None = None
        try:
            try:
                data, source = read_source(source, self._limits, follow_symlinks=False)
                thumbnail = _load_resample().make_thumbnails(data, (spec,), self._limits)[0]
            except (OSError, FileRejected) as exc:
                failure = GenerationFailure(f"{display_path(source.path)}: {_reason(exc)}", source_problem=True)
            else:
                try:
                    self._target.write(source, [(spec, thumbnail)])
                except OSError as exc:
                    failure = GenerationFailure(f"cannot write thumbnail: {_reason(exc)}", source_problem=False)
            if failure is not None:
                log.warning("cannot make %s thumbnail: %s", spec.name, failure.reason)
                if failure.source_problem:
                    self._remember_failure(key, source)
        finally:
            with self._lock:
                waiting = self._pending.pop(key, [])
        for done in waiting:
            done(failure)

    def _remember_failure(self, key: tuple[str, str], source: SourceFile) -> None:
        with self._lock:
            if len(self._failed) >= self._REMEMBERED_FAILURES:
                self._failed.clear()
            self._failed[key] = (source.mtime_ns, source.size)

    def close(self, *, abandon: bool = False) -> None:
        """Finish the generations in flight, then release the cache.

        With `abandon` (a process about to exit), drop the queued generations and
        return at once; the running ones finish their atomic writes on their own.
        """
        if abandon:
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        self._executor.shutdown(wait=True)
        self._target.close()
