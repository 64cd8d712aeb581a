"""The one pool of resample worker processes every driver decodes in, and its one memory policy."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thumbcli.spec import Limits, ThumbSpec

if TYPE_CHECKING:
    from thumbcli.workers import ResampleWorker
    from thumbcli.workerspawn import ForkServer


@dataclass(frozen=True, slots=True)
class DecoderSettings:
    """What a resample worker decodes with: the limits, damaged-image policy and every size of the destination."""

    limits: Limits
    #: Refuse images that only partly decode (--strict) instead of making degraded thumbnails.
    strict: bool = False
    #: Every size of the destination: each image is decoded for the largest (see `resample.resample`).
    decode_for: tuple[ThumbSpec, ...] = ()


class DecoderPool:
    """Resample workers made on first use, lent one at a time, each started at its first file.

    `sharing` is how many resample workers may decode on this host at once, this pool's and
    any others' (a Dask worker's neighbours, serve's other processes): each may reach that
    share of the memory (`Limits.worker_memory`) before it is killed, whichever driver runs it.
    The first workers are each kept on one of `cores`; a worker replaced keeps its core.
    """

    def __init__(self, settings: DecoderSettings, *, sharing: int, cores: Sequence[int | None] = ()) -> None:
        self.settings = settings
        self.memory_ceiling = settings.limits.worker_memory(sharing)
        #: Cores no worker is kept on yet, handed out in order.
        self._free_cores = list(cores)
        self._lock = threading.Lock()
        self._idle: list[ResampleWorker] = []
        self._core_of: dict[int, int | None] = {}
        self._closed = False
        #: Worker processes started by workers already closed.
        self._started_before = 0
        self._made: list[ResampleWorker] = []
        #: What the workers are forked from, made with the first; ended after the last has left.
        self._forks: ForkServer | None = None

    @property
    def started(self) -> int:
        """Worker processes started so far, replacements of killed ones included."""
        with self._lock:
            return self._started_before + sum(worker.started for worker in self._made)

    @contextlib.contextmanager
    def lend(self) -> Iterator[ResampleWorker]:
        """A worker for the caller alone until the block ends; one left holding files by an error is replaced."""
        with self._lock:
            worker = self._idle.pop() if self._idle else self._new()
        try:
            yield worker
        except BaseException:
            self._retire(worker)  # it may hold files it never answered
            raise
        if worker.waiting:
            self._retire(worker)
            return
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        self._retire(worker)

    def close(self) -> None:
        """Let the idle workers leave; those lent out leave when they are given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            self._retire(worker)
        self._end_forks()

    def _new(self) -> ResampleWorker:
        from thumbcli.workers import ResampleWorker  # at the first file: a no-change rerun never needs it
        from thumbcli.workerspawn import ForkServer

        if self._forks is None:
            self._forks = ForkServer()
        core = self._free_cores.pop(0) if self._free_cores else None
        settings = self.settings
        worker = ResampleWorker(
            settings.limits,
            strict=settings.strict,
            memory_ceiling=self.memory_ceiling,
            decode_for=settings.decode_for,
            cpu=core,
            forks=self._forks,
        )
        self._made.append(worker)
        self._core_of[id(worker)] = core
        return worker

    def _retire(self, worker: ResampleWorker) -> None:
        worker.close()
        with self._lock:
            if worker in self._made:
                self._made.remove(worker)
                self._started_before += worker.started
            core = self._core_of.pop(id(worker), None)
            if core is not None:
                self._free_cores.append(core)
        self._end_forks()

    def _end_forks(self) -> None:
        """End the fork server once the pool is closed and its last worker has left (its end kills its workers)."""
        with self._lock:
            if not self._closed or self._made or self._forks is None:
                return
            forks, self._forks = self._forks, None
        forks.close()
