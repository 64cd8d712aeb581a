"""Generate-on-miss for `serve --source`: one thumbnail at a time, checked and made off the server's event loop.

Both the freshness check (a read of the batch run's state store, which a concurrent
`generate --cache` may hold locked) and the generation run on this module's threads,
never on the loop that answers requests. The decoding itself happens in resample
worker processes, as in `generate` and under the same limits: a source that crashes or
hangs a decoder costs its request and a replaced worker, and the server process never
loads libvips.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from thumbcli.bucket import ObjectError, stat_object
from thumbcli.cache import is_hidden, is_within
from thumbcli.discover import SourceFile, is_image_name
from thumbcli.make.engine import SourceMaker
from thumbcli.make.pool import DecoderPool, DecoderSettings
from thumbcli.make.results import FileResult
from thumbcli.spec import Limits, ThumbSpec, by_preset
from thumbcli.targets.state import StateError

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


def _object_for(root: str, relpath: str) -> SourceFile | None:
    """The object of a bucket source a URL's path names, by a HEAD request; None if there is none."""
    if any(segment in ("", ".", "..") for segment in relpath.split("/")):
        return None
    url = f"{root.rstrip('/')}/{relpath}"
    try:
        found = stat_object(url)
    except ObjectError as exc:
        log.warning("cannot look up %s: %s", url, exc.strerror)
        return None
    return None if found is None else SourceFile(url, root, relpath, *found)


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
        sources: Path | str | Mapping[str, Path | str],
        cache_root: Path,
        presets: tuple[ThumbSpec, ...],
        *,
        workers: int = 2,
        sharing: int = 0,
        max_pending: int = 16,
        limits: Limits | None = None,
        strict: bool = False,
        decode_for: tuple[ThumbSpec, ...] = (),
    ) -> None:
        """`workers` generator threads, each decoding in a resample worker; `sharing` resample workers on
        this host in all (0: `workers`), as serve's processes each have theirs."""
        from thumbcli.targets.served import CacheDirectory

        #: URL segment after the preset -> source root; a lone unnamed root (a Path) is under "": no such segment.
        self._sources = {"": sources} if isinstance(sources, (Path, str)) else dict(sources)
        #: Preset name -> its specs, one per format: a miss makes them all, from one decode.
        self._presets = by_preset(presets)
        self._limits = limits or Limits()
        # The cache's folder of each named root is its name, as `generate` makes it.
        folders = {str(root): name for name, root in self._sources.items()} if "" not in self._sources else None
        # Only `generate` changes the presets of the manifest; a miss adds those it lacks.
        self._target = CacheDirectory(
            cache_root, presets, check_collisions=False, locked=False, source_folders=folders, manifest="add"
        )
        self._max_pending = max_pending
        self._pending: dict[tuple[str, str], list[Done]] = {}
        self._lock = threading.Lock()
        self._maker = SourceMaker(self._target, self._limits, follow_symlinks=False)
        settings = DecoderSettings(self._limits, strict, decode_for or presets)
        self._pool = DecoderPool(settings, sharing=max(workers, sharing))
        from concurrent.futures import ThreadPoolExecutor  # only `serve --source` needs it

        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="on-demand")

    def source_for(self, url_relpath: str) -> SourceFile | None:
        """The source file a URL's path after the preset names, or None if there is no such image.

        With named sources the path starts with the source's name: `phone/2024/a.jpg`.
        """
        name = url_relpath.rsplit("/", 1)[-1]
        if not is_image_name(name):
            return None
        root = self._sources.get("")
        relpath = url_relpath
        if root is None:
            source_name, _, relpath = url_relpath.partition("/")
            root = self._sources.get(source_name)
            if root is None or not relpath:
                return None
        if isinstance(root, str):
            return _object_for(root, relpath)
        path = root / relpath
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or not is_within(root, path):
            return None
        return SourceFile(str(path), str(root), relpath, st.st_size, st.st_mtime_ns)

    def request(self, preset: str, relpath: str, done: Done) -> Admission:
        """Start (or join) checking and if need be making one thumbnail; `done` is called from a worker thread."""
        specs = self._presets.get(preset)
        if specs is None:
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
        self._executor.submit(self._complete, key, specs)
        return "queued"

    def _complete(self, key: tuple[str, str], specs: tuple[ThumbSpec, ...]) -> None:
        completion = Completion(Outcome.FAILED, made=False)
        try:
            completion = self._check_and_make(key, specs)
        except Exception:
            # A bug, not a bad file: loud in the log, a 500 for the waiting clients, the server stays up.
            log.exception("on-demand %s thumbnail of %s failed", key[0], key[1])
        finally:
            with self._lock:
                waiting = self._pending.pop(key, [])
            for done in waiting:
                done(completion)

    def check(self, preset: str, relpath: str) -> Outcome | SourceFile:
        """Judge one thumbnail without making it, on the caller's thread and outside the bounded queue.

        An Outcome if that is the answer (READY: current in the cache), else the source to make it
        from (`request` makes it). A stat of the source and a read of its record: serve checks a
        cached thumbnail this way, so that it never waits behind generations.
        """
        specs = self._presets.get(preset)
        source = self.source_for(relpath) if specs is not None else None
        if specs is None or source is None:
            return Outcome.MISSING
        try:
            if all(self._target.is_fresh(source, spec) for spec in specs):
                return Outcome.READY
            if is_hidden(relpath):
                return Outcome.MISSING
        except (OSError, StateError) as exc:
            log.warning("cannot check the %s thumbnail of %s: %s", preset, relpath, exc)
            return Outcome.UNCHECKED
        if self._target.known_failure(source) is not None:
            return Outcome.MISSING
        return source

    def _check_and_make(self, key: tuple[str, str], specs: tuple[ThumbSpec, ...]) -> Completion:
        source = self.check(*key)
        preset = key[0]
        if isinstance(source, Outcome):
            return Completion(source, made=False)
        # The reasons name the source: they are logged, never sent to a client.
        read = self._maker.read(source)
        if isinstance(read, FileResult):
            log.warning("cannot make %s thumbnail: %s", preset, read.describe())
            return Completion(Outcome.MISSING, made=True)
        data, source = read
        with self._pool.lend() as worker:
            outcome = worker.resample(data, specs)
        del data
        refused = self._maker.refused(source, outcome)
        if refused is not None:
            log.warning("cannot make %s thumbnail: %s", preset, refused.describe())
            return Completion(Outcome.MISSING, made=True)
        result = self._maker.write(source, specs, outcome)
        if result.status == "failed":
            log.warning("cannot make %s thumbnail: %s", preset, result.describe())
            return Completion(Outcome.FAILED, made=True)
        if result.warning:
            log.warning("made %s thumbnail of what decodes: %s: %s", preset, result.describe(), result.warning)
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
        self._pool.close()
        self._target.close()
