"""Resample worker processes: each decodes one file at a time with libvips, and is killed and replaced past a limit.

A worker is a separate process so that what goes wrong in a decoder stays with its
file: libvips' error buffer is per process (threads got each other's messages), a
decode that hangs or balloons can be killed from outside, a segfault ends one worker
rather than the run, and the GIL no longer caps the decoding.

Workers are forked from a fork server (`workerspawn`): one process that loaded a worker's
interpreter and libraries (a quarter of a second of CPU) for all of the pool's workers and their
replacements. Not from the parent: it starts and replaces workers while its loader and writer
threads run, where a fork could inherit a lock held by another thread. Without a server (one
could not start, or no pool) a worker is an interpreter of its own (`python -c ...`).

The transport: a Unix socket carries each request (a small header) with the open descriptor
of the local file it names, which the worker maps: the bytes of a local file are read from
the page cache where they are, and copied by no one. Bytes the parent holds (an object from a
bucket) go into one of a few memory files (memfd) per worker, which the worker maps too. A
pipe carries the reply (the thumbnails). Both are in the fixed layout of `wire`: a decoder is
hostile, so nothing it sends is unpickled. The worker confines itself (`sandbox`) before it
takes its first file, and needs no right to open anything: its files come open.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from thumbcli import decoders, sandbox, wire
from thumbcli.forbiddencalls import ForbiddenCallWatch
from thumbcli.spec import Limits, Thumbnail, ThumbSpec, human_bytes
from thumbcli.workerlog import WorkerStderr
from thumbcli.workerloop import READY, SHRANK
from thumbcli.workerspawn import START_SECONDS, ForkedWorker, ForkServer, WorkerSettings, readable, spawn

log = logging.getLogger(__name__)

#: Files a worker may have waiting at once, each in a memory file of its own.
SLOTS = 4
#: A memory file bigger than this is cut back to what the next file needs (memory is kept
#: for files of a usual size, not for the biggest one seen).
_SLOT_KEPT_BYTES = 64 << 20
_PIPE_BYTES = 1 << 20  # pipe buffer asked for: a large thumbnail's reply in fewer wakeups
#: Each worker's reply buffer, allocated once: `os.read` of this size maps and unmaps a fresh buffer per read.
_READ_BYTES = 1 << 20
_WATCH_SECONDS = 0.1  # how often a waiting parent checks a worker's memory
_EXIT_SECONDS = 2.0  # how long a closed worker may take to leave before it is killed
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: Why a file failed when its worker was killed by the seccomp filter.
FORBIDDEN_CALL = "decoder tried a forbidden system call"
MALFORMED_REPLY = "decoder sent a malformed reply"
#: Why a file failed when the fork server its worker came from ended (and took the worker with it).
SERVER_LOST = "its resample worker ended with the fork server it came from"


class WorkerOutcome(NamedTuple):
    """What a worker made of one file: thumbnails, or a failure reason; a warning for a degraded decode."""

    thumbnails: list[Thumbnail]
    #: Why no thumbnail was made (empty when made): one line, what is wrong first.
    reason: str = ""
    #: The raw decoder text behind the reason or the warning, for the fail log.
    detail: str = ""
    #: Made from only part of the image (truncated or damaged): what was wrong.
    warning: str = ""
    #: Given up on by the caller (its run's time was up), not the file's fault: nothing to report of it.
    abandoned: bool = False
    #: A failure of the file's reading (a disk error), not of its content: not remembered as the file's.
    transient: bool = False


class OpenedFile:
    """A local source open for reading, `size` bytes as opened: handed to a worker open, which maps it.

    Read into the parent's memory first, each camera JPEG was copied twice there (into fresh
    pages, then into a memory file for the worker) and took most of the parent's time per image.
    """

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a file dropped unsent (a run stopping) closes with it
        self.close()

    def why_lost(self) -> str:
        """Why a worker that mapped this file was killed by SIGBUS: a page of it could not be read."""
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_size < self.size:
                return SHRANK
        return "cannot read: a page of it could not be read (SIGBUS)"


#: A source's bytes as the engine hands them to a worker: read (an object in a bucket) or open (a local file).
SourceData = bytes | OpenedFile


def _write_at_start(fd: int, data: bytes) -> int:
    """Write all of `data` at the start of file `fd`; its length."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], written)
    return written


def _resident_bytes(pid: int) -> int:
    """The resident memory of process `pid`; 0 where /proc does not tell (the ceiling is not watched)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class WorkerBug(RuntimeError):
    """A worker failed in a way no file explains (a bug, or a broken install): the run stops."""


class ResampleWorker:
    """One resample worker process, started on first use and replaced after it is killed.

    Requests are pipelined: `send` queues a file and returns at once, `receive` gives the
    outcomes in order. With the next file already in its pipe, the worker goes on to it
    while the parent turns the last one around (on small images that turnaround left each
    worker idle a quarter of the time). A worker that dies takes only the file it was on:
    the files queued behind it go to its replacement.

    Not thread-safe: one pipeline thread drives one worker.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        strict: bool,
        memory_ceiling: int,
        decode_for: tuple[ThumbSpec, ...] = (),
        cpu: int | None = None,
        forks: ForkServer | None = None,
    ) -> None:
        self._limits = limits
        self._strict = strict
        #: Every size of the destination: each image is decoded for the largest (see `resample.resample`).
        self._decode_for = decode_for
        self._memory_ceiling = memory_ceiling
        #: The core the worker (and libvips' thread in it) runs on; None: wherever the kernel puts it.
        self._cpu = cpu
        #: Where its process is forked from (None: each is spawned, an interpreter of its own).
        self._forks = forks
        self._process: subprocess.Popen[bytes] | ForkedWorker | None = None
        self._stderr = WorkerStderr()
        self._forbidden = ForbiddenCallWatch()
        self._requests: socket.socket | None = None
        self._replies = -1
        #: A slot per file a worker may have waiting: the memory files that carry bytes, their sizes,
        #: the local file sent instead (until its outcome), and the slots not in use.
        self._slots: list[int] = []
        self._slot_sizes: list[int] = []
        self._opened: list[OpenedFile | None] = []
        self._free_slots: deque[int] = deque()
        #: Requests not yet answered, oldest first: (request, slot, specs asked for) each.
        self._waiting: deque[tuple[bytes, int, tuple[ThumbSpec, ...]]] = deque()
        self._inbox = bytearray()
        self._chunk = bytearray(_READ_BYTES)
        #: When the worker began the oldest request: its decode time limit runs from here.
        self._head_since = 0.0
        #: The encoded settings of the last request, and the specs they were encoded for.
        self._header_specs: tuple[ThumbSpec, ...] | None = None
        self._header = b""
        #: Workers started so far (replacements included).
        self.started = 0
        #: Why the last request ended in a WorkerBug (a worker that cannot start, or that broke
        #: outside any file); cleared by the next reply a worker gives. See `broken`.
        self._broken = ""
        #: The decoders whose wheels a worker imports before it switches accounts; grown when a file
        #: needs another (see `_start_with_wheel`), for the rest of the run.
        self._wheels = decoders.COMMON_DECODERS
        #: The sandbox layers the running worker reported in force (empty before it starts).
        self.confinement: tuple[sandbox.Layer, ...] = ()

    @property
    def pid(self) -> int | None:
        """The running worker's process id, or None before the first file and after a kill."""
        return self._process.pid if self._process is not None else None

    @property
    def waiting(self) -> int:
        """Files sent and not yet received."""
        return len(self._waiting)

    @property
    def broken(self) -> str:
        """Why this worker cannot decode now ("" when it can, or has not been needed): for a health check.

        Set when a request ends in WorkerBug (its process could not start, or failed outside any
        file); cleared once a worker answers a file again, whatever the file's outcome.
        """
        return self._broken

    def start(self) -> None:
        """Start the worker process now rather than at its first file (watch: the first arrival finds it ready)."""
        if self._process is None:
            if not self._slots:
                self._open_slots()
            try:
                self._start()
            except BaseException as exc:
                self._give_up(exc)
                raise

    def resample(self, data: SourceData, specs: tuple[ThumbSpec, ...]) -> WorkerOutcome:
        """Have the worker thumbnail `data` with nothing else waiting; a file that kills or overruns it fails."""
        self.send(data, specs)
        return self.receive()

    def send(self, data: SourceData, specs: tuple[ThumbSpec, ...]) -> None:
        """Queue `data` for the worker without waiting (at most SLOTS files); `receive` gives the outcomes in order."""
        if specs != self._header_specs:  # a run sends the same specs with nearly every file
            self._header_specs = specs
            settings = wire.Settings(specs, self._decode_for, self._limits, self._strict)
            self._header = wire.encode_settings(settings)
        if not self._slots:
            self._open_slots()
        if not self._free_slots:
            raise ValueError(f"a resample worker takes at most {SLOTS} files at once")
        slot = self._free_slots.popleft()
        try:
            if isinstance(data, OpenedFile):
                self._opened[slot], length = data, data.size
            else:
                length = self._fill(slot, data)
        except BaseException:
            self._release(slot)
            raise
        header = self._header
        request = (wire.REQUEST.pack(len(header), length, slot) + header, slot, specs)
        if not self._waiting:
            self._head_since = time.monotonic()
        self._waiting.append(request)
        if self._process is not None:
            self._write_request(request[0], slot)
            return
        try:
            self._start()  # sends everything waiting
        except BaseException as exc:
            self._give_up(exc)
            # Not sent: the caller will not ask for it, so its slot must not stay taken. The
            # files queued before it stay queued, for the next start.
            self._waiting.pop()
            self._release(slot)
            raise

    def receive(self, abandon: Callable[[], bool] | None = None) -> WorkerOutcome:
        """The outcome of the oldest file sent, waiting for it within the limits.

        `abandon` is asked ten times a second while the worker decodes: once true, the worker
        is ended and the outcome is `abandoned` (the files behind it go to a replacement, if asked for).

        Whatever happens, the file is done with once this returns or raises: its slot is free
        again. On an exception (a WorkerBug, an interrupt) the worker is ended too, since its
        reply stream can no longer be trusted; the files behind go to its replacement.
        """
        if not self._waiting:
            raise ValueError("nothing was sent")
        try:
            if self._process is None:
                self._start()
            outcome = self._with_what_it_said(self._await_reply(abandon))
        except BaseException as exc:
            self._give_up(exc)
            raise
        else:
            self._broken = ""
            return outcome
        finally:
            _, slot, _ = self._waiting.popleft()
            self._release(slot)
            self._head_since = time.monotonic()

    def close(self) -> None:
        """Let the worker leave (end of its requests), killing it if it does not; reap it."""
        while self._waiting:
            self._release(self._waiting.popleft()[1])
        process = self._process
        if process is not None:
            assert self._requests is not None
            self._requests.close()
            try:
                process.wait(_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.close(self._replies)
            self._process = None
        self._stderr.close()
        self._forbidden.close()
        for fd in self._slots:
            os.close(fd)
        self._slots, self._slot_sizes, self._opened = [], [], []
        self._free_slots.clear()

    def _give_up(self, exc: BaseException) -> None:
        """After a request ended in `exc`: end the worker (its replies can no longer be trusted), note a WorkerBug."""
        if self._process is not None:
            self._kill()
        if isinstance(exc, WorkerBug):
            self._broken = str(exc).splitlines()[0]

    def _open_slots(self) -> None:
        self._slots = [os.memfd_create(f"thumbcli-source-{index}", os.MFD_CLOEXEC) for index in range(SLOTS)]
        self._slot_sizes = [0] * SLOTS
        self._opened = [None] * SLOTS
        self._free_slots = deque(range(SLOTS))

    def _fill(self, slot: int, data: bytes) -> int:
        """Put `data` into memory file `slot`, sized to hold it; its length there (what the worker maps)."""
        fd, size = self._slots[slot], self._slot_sizes[slot]
        if size < len(data) or size > max(_SLOT_KEPT_BYTES, 2 * len(data)):
            os.ftruncate(fd, len(data))
            self._slot_sizes[slot] = len(data)
        return _write_at_start(fd, data)

    def _release(self, slot: int) -> None:
        """The file in `slot` is done with: close it if it was a local file, free the slot."""
        opened, self._opened[slot] = self._opened[slot], None
        if opened is not None:
            opened.close()
        self._free_slots.append(slot)

    # -- parent side -------------------------------------------------------

    def _start(self) -> None:
        requests, worker_requests = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request_read = worker_requests.detach()
        reply_read, reply_write = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(reply_write, _F_SETPIPE_SZ, _PIPE_BYTES)
        try:
            layers = sandbox.layers_for_workers()
            account = sandbox.account_for_workers(layers)
        except sandbox.SandboxSettingError as exc:
            requests.close()
            for fd in (request_read, reply_read, reply_write):
                os.close(fd)
            raise WorkerBug(f"a resample worker could not start: {exc}") from None
        stderr_write, watch = self._stderr.open(), self._forbidden.open()
        fds = (request_read, reply_write, stderr_write, watch, *self._slots)
        settings = WorkerSettings(self._cpu, self._memory_ceiling, layers, account, tuple(sorted(self._wheels)))
        try:
            forked = self._forks.fork(fds, settings) if self._forks is not None else None
            self._process = forked or spawn(fds, settings)
        except OSError as exc:  # no process to be had (out of processes or memory)
            requests.close()
            os.close(reply_read)
            raise WorkerBug(f"a resample worker could not start: {exc.strerror or exc}") from exc
        finally:
            os.close(request_read)
            os.close(reply_write)
            os.close(stderr_write)
            os.close(watch)
        self._requests, self._replies = requests, reply_read
        self.started += 1
        # Wait until it is loaded and confined: the decode time limit is the file's, not the start's.
        ready = readable(reply_read, START_SECONDS)
        greeting = wire.read_exactly(reply_read, 2) if ready else None
        if greeting is None or greeting[:1] != READY:
            status = self._kill()
            why = f"it ended (status {status}) before it was ready" if ready else f"not ready in {START_SECONDS:g} s"
            said = self._stderr.take()
            raise WorkerBug(f"a resample worker could not start: {why}" + (f": it said: {said}" if said else ""))
        self.confinement = tuple(layer for bit, layer in enumerate(sandbox.LAYERS) if greeting[1] & (1 << bit))
        self._forbidden.take_listener()  # sent before the greeting, where the filter has one
        sandbox.warn_of_missing_layers(layers, self.confinement)
        log.debug("started resample worker %d", self._process.pid)
        self._inbox.clear()
        self._head_since = time.monotonic()
        for request, slot, _ in self._waiting:
            self._write_request(request, slot)

    def _write_request(self, request: bytes, slot: int) -> None:
        # A request is a few hundred bytes (the source is in its file): SLOTS of them fit in the
        # socket's buffer, so this never waits on a worker that hangs.
        opened = self._opened[slot]
        assert self._requests is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the worker is gone: its replies say how
            wire.send_request(self._requests, request, opened.fd if opened is not None else None)

    def _await_reply(self, abandon: Callable[[], bool] | None) -> WorkerOutcome:
        seconds = self._limits.max_decode_seconds
        poller = select.poll()
        poller.register(self._replies, select.POLLIN)
        poller.register(self._stderr.fd, select.POLLIN)
        if self._forbidden.fd >= 0:
            poller.register(self._forbidden.fd, select.POLLIN)
        while True:
            try:
                reply = self._next_reply()
            except wire.MalformedMessage as exc:
                # Whatever else the worker sends can no longer be trusted to line up with our files.
                self._kill()
                return WorkerOutcome([], MALFORMED_REPLY, detail=str(exc))
            if reply is not None and reply.status == wire.NEEDS_WHEEL:
                # Polled afresh: the new worker's pipes are not the ones registered here. At most
                # once per decoder, since the wheel asked for is never asked for again.
                return self._start_with_wheel(reply.reason) or self._await_reply(abandon)
            if reply is not None:
                return _outcome(reply)
            left = self._head_since + seconds - time.monotonic()
            if left <= 0:
                self._kill()
                return WorkerOutcome([], f"timed out after {seconds:g} s")
            events = poller.poll(min(left, _WATCH_SECONDS) * 1000)
            ready = [fd for fd, _ in events]
            # POLLIN: a thread of the worker is stopped at a forbidden call (a hang-up: the worker is ending).
            if any(fd == self._forbidden.fd and mask & select.POLLIN for fd, mask in events):
                call = self._forbidden.call_tried()
                self._kill()
                return WorkerOutcome([], f"{FORBIDDEN_CALL} ({call})", detail=f"the seccomp filter stopped {call}")
            if self._stderr.fd in ready and not self._stderr.drain():
                poller.unregister(self._stderr.fd)  # the worker closed it: it is ending
            if self._replies not in ready:
                if abandon is not None and abandon():
                    self._kill()
                    return WorkerOutcome([], "abandoned", abandoned=True)
                assert self._process is not None
                if _resident_bytes(self._process.pid) > self._memory_ceiling:
                    self._kill()
                    return WorkerOutcome([], f"needed more than {human_bytes(self._memory_ceiling)} of memory")
                continue
            count = os.readv(self._replies, [self._chunk])
            if not count:
                return self._lost()
            self._inbox += memoryview(self._chunk)[:count]

    def _next_reply(self) -> wire.Reply | None:
        """The next whole reply received, parsed and taken out of the inbox; None before it is all there.

        Raises wire.MalformedMessage for a reply that is not of the layout or not an answer to the specs asked.
        """
        inbox = self._inbox
        if len(inbox) < wire.REPLY_HEAD_BYTES:
            return None
        end = wire.REPLY_HEAD_BYTES + wire.reply_length(inbox)
        if len(inbox) < end:
            return None
        # A copy (of a few thumbnails' bytes): no view of the inbox may outlive a malformed reply.
        body = bytes(inbox[wire.REPLY_HEAD_BYTES : end])
        del inbox[:end]
        return wire.decode_reply(body, self._waiting[0][2])

    def _start_with_wheel(self, decoder: str) -> WorkerOutcome | None:
        """The worker could not import `decoder`'s wheel: start one that imports it first; None once started.

        The files waiting (the one that needed it first) go to the new worker, which has the wheel
        or knows it is not installed: a file is sent again once. The worker keeps no way back to
        the account that could read the wheel; the parent, which never decodes, starts another.
        """
        self._kill()
        if decoder not in decoders.EVERY_DECODER or decoder in self._wheels:
            return WorkerOutcome(
                [], MALFORMED_REPLY, detail=f"asked for a wheel it had, or of no decoder: {decoder[:64]!r}"
            )
        self._wheels |= {decoder}
        log.debug("starting a resample worker that imports the wheel of %s", decoder)
        self._start()
        return None

    def _kill(self) -> int:
        """End the worker now and reap it; its exit status."""
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        return self._reap()

    def _lost(self) -> WorkerOutcome:
        """The worker ended while it had our file: report the file if a signal ended it, else stop the run."""
        note = f"; it ended {len(self._inbox)} bytes into its reply" if self._inbox else ""
        process = self._process
        status = self._reap()
        if isinstance(process, ForkedWorker) and process.server_lost:
            return WorkerOutcome([], SERVER_LOST, detail=f"signal {-status}{note}", transient=True)
        opened = self._opened[self._waiting[0][1]]
        if status == -signal.SIGBUS and opened is not None:
            # The mapped file shrank under it, or a page of it failed to read: not the content's fault.
            return WorkerOutcome([], opened.why_lost(), detail=f"signal {-status}{note}", transient=True)
        if status == -signal.SIGSYS and "seccomp" in self.confinement:
            # Killed by a filter that could not notify (a kernel before 5.0): the call is not known.
            return WorkerOutcome([], FORBIDDEN_CALL, detail=f"killed by the seccomp filter (signal {-status}){note}")
        if status < 0:
            return WorkerOutcome([], f"decoder crashed (signal {-status})", detail=f"signal {-status}{note}")
        raise WorkerBug(f"a resample worker exited with status {status} while decoding{note}")

    def _reap(self) -> int:
        """Wait for the ended worker; the files waiting behind its last go to the next one."""
        assert self._process is not None
        status = self._process.wait()
        assert self._requests is not None
        self._requests.close()
        os.close(self._replies)
        self._process = None
        self._inbox.clear()
        self._forbidden.close()
        return status

    def _with_what_it_said(self, outcome: WorkerOutcome) -> WorkerOutcome:
        """The outcome, with what the worker wrote on stderr meanwhile added to the detail of a failure or warning."""
        said = self._stderr.take()
        if not said or not (outcome.reason or outcome.warning):
            return outcome
        return outcome._replace(detail=f"{outcome.detail} [the decoder said: {said}]".strip())


def confinement_here() -> tuple[sandbox.Layer, ...]:
    """The sandbox layers a resample worker started now has in force on this machine (starts one, then ends it)."""
    worker = ResampleWorker(Limits(), strict=False, memory_ceiling=0)
    worker._open_slots()
    try:
        worker._start()
        return worker.confinement
    finally:
        worker.close()


def _outcome(reply: wire.Reply) -> WorkerOutcome:
    if reply.status == wire.MADE:
        return WorkerOutcome(list(reply.thumbnails), detail=reply.detail, warning=reply.warning)
    if reply.status == wire.FAILED:
        return WorkerOutcome([], reply.reason, reply.detail)
    if reply.status == wire.UNREADABLE:
        return WorkerOutcome([], reply.reason, reply.detail, transient=True)
    raise WorkerBug(f"a resample worker failed:\n{reply.detail}")
