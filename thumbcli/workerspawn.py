"""How a resample worker process comes to be: an interpreter of its own, or a fork of a server that loaded one.

A worker's interpreter and libraries (libvips, and numpy and Pillow behind the JPEG decoder)
take about a quarter of a second of CPU to load. A pool paid that once per worker, and again
for each worker a hostile file got killed. Its fork server pays it once: a process that loads
what a worker needs and forks each worker on request, in a few milliseconds. Each fork then
confines itself exactly as a spawned worker does, and the server itself never decodes a file.

The workers are the server's children. The parent watches each one through a pidfd (it exits
like any process), then asks the server, which reaps it, how it ended. The server is trusted
as the parent is: only the workers' replies are hostile.
"""

from __future__ import annotations

import contextlib
import gc
import marshal
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from thumbcli import sandbox

_SELF = "/proc/self/exe"
#: For an interpreter and libvips to load, on a machine under load.
START_SECONDS = 60.0
_PID = struct.Struct("<q")
_MESSAGE_BYTES = 4096
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: How a worker's or the server's interpreter starts: the collector off until its libraries are loaded.
_PRELUDE = f"import gc, sys; gc.disable(); sys.path.insert(0, {_PACKAGE_ROOT!r}); "


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What one worker process is started with, besides its descriptors (see `workerloop.serve`)."""

    cpu: int | None
    memory_ceiling: int
    layers: tuple[sandbox.Layer, ...]
    account: tuple[int, int] | None
    wheels: tuple[str, ...]


def spawn(fds: Sequence[int], settings: WorkerSettings) -> subprocess.Popen[bytes]:
    """A worker in an interpreter of its own. Raises OSError.

    `fds`: its requests socket, replies pipe, stderr and filter-listener socket, then its memory files.
    """
    requests, replies, stderr, watch, *slots = fds
    code = (
        f"{_PRELUDE}from thumbcli.workerloop import serve; "
        f"serve({requests}, {replies}, {os.getpid()}, {slots}, {settings.cpu}, {settings.memory_ceiling}, "
        f"{settings.layers!r}, {settings.account!r}, {watch}, {list(settings.wheels)!r})"
    )
    return _interpreter(code, settings.layers, pass_fds=(requests, replies, watch, *slots), stderr=stderr)


class ForkServer:
    """Forks resample workers from one process that loaded a worker's libraries; started at the first fork.

    Safe from any thread. Once it cannot start or has ended, `fork` says so (None) and the
    caller spawns its worker itself: a server lost costs speed, never a file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channel: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        #: It forks no more: it could not start, ended, or refused (see `serve_forks`).
        self._lost = False

    def fork(self, fds: Sequence[int], settings: WorkerSettings) -> ForkedWorker | None:
        """A worker forked with `fds` (see `spawn`) and `settings`, or None when no server can fork one."""
        fields = (settings.cpu, settings.memory_ceiling, settings.layers, settings.account, settings.wheels)
        with self._lock:
            if self._lost or (self._channel is None and not self._start(settings)):
                return None
            assert self._channel is not None
            try:
                socket.send_fds(self._channel, [b"F" + marshal.dumps(fields)], list(fds))
                answer = self._channel.recv(_MESSAGE_BYTES)
            except OSError:
                answer = b""
            if answer == b"N":  # it could not fork (see `serve_forks`), and still reaps the workers it has
                self._lost = True
                return None
            if answer[:1] != b"P" or len(answer) != 1 + _PID.size:
                self._end()
                return None
            (pid,) = _PID.unpack_from(answer, 1)
        try:
            # Opened before the server could reap it (it waits only when asked): no other process has this pid.
            return ForkedWorker(self, pid, os.pidfd_open(pid))
        except OSError:  # a kernel before 5.3: no pidfd, so no fork server either
            os.kill(pid, signal.SIGKILL)
            self.exit_status(pid)
            with self._lock:
                self._end()
            return None

    def exit_status(self, pid: int) -> int | None:
        """How worker `pid`, which has ended, ended (as Popen.wait says it), reaped; None once the server is gone."""
        with self._lock:
            if self._channel is None:
                return None
            try:
                self._channel.sendall(b"W" + _PID.pack(pid))
                answer = self._channel.recv(_MESSAGE_BYTES)
            except OSError:
                answer = b""
            if answer[:1] != b"S" or len(answer) != 1 + _PID.size:
                self._end()
                return None
            return int(_PID.unpack_from(answer, 1)[0])

    def close(self) -> None:
        """End the server: after its workers, whom its end kills (they die with their parent)."""
        with self._lock:
            self._end()

    def _start(self, settings: WorkerSettings) -> bool:
        parent_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (
            f"{_PRELUDE}from thumbcli.workerspawn import serve_forks; "
            f"serve_forks({server_end.fileno()}, {settings.account!r}, {list(settings.wheels)!r})"
        )
        try:
            # Its stderr goes nowhere: a server that fails to load ends, and a spawned worker says why.
            self._process = _interpreter(
                code, settings.layers, pass_fds=(server_end.fileno(),), stderr=subprocess.DEVNULL
            )
        except OSError:
            parent_end.close()
            self._lost = True
            return False
        finally:
            server_end.close()
        self._channel = parent_end
        if not readable(parent_end.fileno(), START_SECONDS) or parent_end.recv(1) != b"R":
            self._end()
            return False
        return True

    def _end(self) -> None:
        """Close the channel (the server leaves at its end) and reap the server; it forks no more."""
        self._lost = True
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class ForkedWorker:
    """A worker a ForkServer forked, used as a Popen is: its pid, `kill`, and `wait` (the server reaps it)."""

    def __init__(self, server: ForkServer, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: Ended by its server's end (a worker dies with its parent): no fault of the file it had.
        self.server_lost = False
        self._server = server
        self._pidfd = pidfd

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status once it has ended (negative: the signal that ended it); TimeoutExpired past `timeout`."""
        if self.returncode is None:
            if not readable(self._pidfd, timeout):
                raise subprocess.TimeoutExpired(f"resample worker {self.pid}", timeout or 0.0)
            status = self._server.exit_status(self.pid)
            self.server_lost = status is None
            self.returncode = -signal.SIGKILL if status is None else status
            os.close(self._pidfd)
        return self.returncode


def readable(fd: int, timeout: float | None) -> bool:
    """Whether `fd` is readable (or hung up) within `timeout` seconds (None: no limit).

    Through poll, not select: a server with thousands of connections open has descriptors past
    select's 1024, and a worker started then gets one.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def serve_forks(
    channel_fd: int, account: tuple[int, int] | None, wheels: list[str]
) -> NoReturn:  # pragma: no cover - runs in the server
    """The fork server: load what a worker needs, then fork a worker per request and reap it when asked."""
    from thumbcli import decoders, workerloop

    # Not a parent-death signal: that comes when the parent's thread that started this one ends,
    # and any of the pool's threads may have. The parent's end closes the channel instead.
    workerloop.ignore_stop_signals()
    workerloop.name_process(b"thumbcli-forks")
    preloaded = workerloop.load(account, wheels)
    sandbox.seccomp_library()  # loaded once here, not in every fork (it runs `ldconfig -p` twice)
    channel = socket.socket(fileno=channel_fd)
    gc.freeze()  # what the imports made stays put: a collection in a worker would copy its pages
    channel.sendall(b"R")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, _MESSAGE_BYTES, 64)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # the parent closed its end: every worker has ended
        if message[:1] == b"W":
            try:
                _, status = os.waitpid(_PID.unpack_from(message, 1)[0], 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = -signal.SIGKILL
            channel.sendall(b"S" + _PID.pack(code))
            continue
        cpu, memory_ceiling, layers, account, wanted = marshal.loads(message[1:])
        if preloaded is not None and not preloaded.issuperset(wanted):
            decoders.preload(wanted)
            preloaded = preloaded | frozenset(wanted)
        server = os.getpid()
        # A library that started a thread could hold a lock a fork inherits. Refusing (that, or out
        # of processes), the server goes on reaping the workers it has; the parent spawns instead.
        pid = _fork() if len(os.listdir("/proc/self/task")) == 1 else None
        if pid is None:
            for fd in fds:
                os.close(fd)
            channel.sendall(b"N")
            continue
        if pid == 0:
            try:
                channel.close()
                requests, replies, stderr, watch, *slots = fds
                os.dup2(stderr, 2)
                os.close(stderr)
                workerloop.stay_with(server)
                workerloop.run(requests, replies, slots, preloaded, cpu, memory_ceiling, layers, account, watch)
            except BaseException:
                traceback.print_exc()  # on its own stderr: the parent reports it with the start that failed
            finally:
                os._exit(70)  # never back into the server's loop
        for fd in fds:
            os.close(fd)
        channel.sendall(b"P" + _PID.pack(pid))


def _fork() -> int | None:  # pragma: no cover - runs in the server
    try:
        return os.fork()
    except OSError:  # out of processes or memory
        return None


def _interpreter(
    code: str, layers: tuple[sandbox.Layer, ...], *, pass_fds: Sequence[int], stderr: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        # Our own binary, not its path: a user dropped to `nobody` may run an
        # interpreter that lives under a folder they cannot search.
        executable=_SELF if os.path.exists(_SELF) else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # a decoder that prints must not reach ours
        stderr=stderr,  # what a decoder says goes with its file, to the fail log
        pass_fds=tuple(pass_fds),
        env=worker_environment(layers),
    )


def worker_environment(layers: tuple[sandbox.Layer, ...]) -> dict[str, str]:
    """The parent's environment (scrubbed by the sandbox), libvips on one thread, glibc's malloc tuning itself."""
    environment = dict(sandbox.worker_environment(os.environ, layers), VIPS_CONCURRENCY="1")
    # numpy (under rawpy) would start a BLAS thread per core at import, for no work of ours: a
    # worker that has threads before it confines itself can no longer take a network of its own.
    environment["OPENBLAS_NUM_THREADS"] = "1"
    # Dask's nanny sets this for its worker processes (and so for ours under --dask). Set at
    # all, it also pins glibc's mmap threshold, so every decode buffer of a camera JPEG is
    # mapped and unmapped afresh: 25% more wall time per image, measured on 200 4000x3000 JPEGs.
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    jemalloc = jemalloc_library()
    if jemalloc is not None and "LD_PRELOAD" not in environment:
        environment["LD_PRELOAD"] = jemalloc
    return environment


def jemalloc_library() -> str | None:
    """The system's jemalloc, which workers allocate with where it is installed (Debian: libjemalloc2); else None.

    libvips advises it on glibc: a worker's libvips allocates and frees a few buffers per image
    across its threads, and glibc's malloc spent a tenth of the CPU of a 320x240 thumbnail in it.
    """
    # The interpreter's own multiarch triplet: sysconfig would import a module a server dropped to
    # `nobody` may no longer be able to read.
    multiarch = getattr(sys.implementation, "_multiarch", "")
    folders = (f"/usr/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib")
    return next((path for folder in folders if os.path.exists(path := f"{folder}/libjemalloc.so.2")), None)
