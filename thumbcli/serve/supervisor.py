"""Processes and ports: bind once, run one worker in this process or fork several, forward signals, reap.

Workers share the port through SO_REUSEPORT; the parent holds the port numbers,
forwards SIGTERM/SIGINT, and replaces a worker that dies, as gunicorn's arbiter does.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from thumbcli import landlock, sandbox
from thumbcli.cache import load_manifest, presets_of, read_manifest
from thumbcli.errors import CannotRunError, ExitCode
from thumbcli.serve.account import become, check_account_can_serve
from thumbcli.serve.metrics import MetricsBoard
from thumbcli.serve.options import ServeOptions
from thumbcli.serve.signals import StopSignals
from thumbcli.serve.worker import Worker
from thumbcli.spec import by_preset

log = logging.getLogger(__name__)

Listeners = tuple[socket.socket, socket.socket | None]

#: What generate-on-miss imports on first use, loaded before a worker switches to --user: an
#: interpreter installed where the user cannot read (under /root) could not load it after.
_LOADED_BEFORE_SWITCHING = (
    "concurrent.futures.thread",
    "thumbcli.make.ondemand",
    "thumbcli.make.pool",
    "thumbcli.targets.served",
    "thumbcli.workers",
)


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotRunError(f"cannot resolve host {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CannotRunError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = _bind(host, port, reuse_port)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def _open_listeners(host: str, port: int, admin_port: int | None, reuse_port: bool) -> Listeners:
    """The main listening socket and, with an admin port, the admin one."""
    listener = _listen(host, port, reuse_port)
    try:
        admin = _listen(host, admin_port, reuse_port) if admin_port is not None else None
    except BaseException:
        listener.close()
        raise
    return listener, admin


def _worker_listeners(options: ServeOptions, port: int, admin_port: int | None, reuse_port: bool) -> Listeners:
    """A worker's listening sockets; then, with --user, the worker becomes that user for good.

    Bound first, as root: a port below 1024 needs root, and SO_REUSEPORT joins only sockets
    of the same user (the supervisor's holders are root's).
    """
    listeners = _open_listeners(options.host, port, admin_port, reuse_port)
    if options.user is not None:
        try:
            if options.on_demand_sources:
                for module in _LOADED_BEFORE_SWITCHING:
                    importlib.import_module(module)
            become(options.user)
        except BaseException:
            _close_all(*listeners)
            raise
    return listeners


def _confine_writes(options: ServeOptions) -> None:
    """From here on this worker may create, change or remove files only beneath the cache (Landlock).

    Called once its ports are bound, it is --user, and its access log is open: a flaw in the
    HTTP code can then overwrite nothing outside the cache, and generate-on-miss writes there
    through the cache writer. /dev/null stays writable (a resample worker's stdin and stdout).
    Part of the `landlock` layer of THUMBCLI_SANDBOX; a kernel without Landlock leaves it out.
    """
    if "landlock" not in sandbox.chosen_layers(os.environ.get(sandbox.SETTING)):
        return
    if not landlock.restrict_writes([str(options.cache_root)], [os.devnull]):
        log.warning("this kernel has no Landlock: serve's workers may write outside the cache")


def _close_all(*socks: socket.socket | None) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def describe(options: ServeOptions, port: int) -> list[str]:
    """What a started server serves, for its operator: the URL to open, presets, browsing, generate-on-miss."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(options.host, options.host)
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    entries = load_manifest(options.cache_root, strict=False)
    formats = presets_of(entries)
    made = by_preset(options.presets)
    presets = [f"{name} ({entries[name].get('size', '?')}, {', '.join(formats[name])})" for name in sorted(formats)]
    presets += [
        f"{name} ({specs[0].box.label}, {', '.join(spec.format for spec in specs)})"
        for name, specs in made.items()
        if name not in entries
    ]
    sources = options.on_demand_sources
    roots = ", ".join(f"{name}={root}" if name else str(root) for name, root in sources.items())
    return [
        f"open {url} in a browser",
        f"presets: {', '.join(presets) or 'none yet'}",
        "browsing folders: " + ("on" if options.browse else "off (--browse lists folders)"),
        "generate on a miss: "
        + (f"on, {', '.join(sorted(made))} from {roots}" if sources else "off (--source makes thumbnails)"),
    ]


def serve(options: ServeOptions, ready: Callable[[str, int], None] | None = None) -> int:
    """Serve the cache until SIGTERM/SIGINT; return the exit code (0 after a clean drain).

    `ready(host, port)` is called once the port accepts connections, with the real
    port when 0 was asked for.
    """
    if not options.cache_root.is_dir():
        raise CannotRunError(f"{options.cache_root}: not a directory")
    read_manifest(options.cache_root)  # a broken manifest stops us before we listen
    if options.on_demand_sources:
        for root in options.on_demand_sources.values():
            if isinstance(root, Path) and not root.is_dir():  # a bucket is asked at each miss
                raise CannotRunError(f"{root}: source is not a directory")
        if not os.access(options.cache_root, os.W_OK | os.X_OK):
            raise CannotRunError(f"{options.cache_root}: not writable, and --source makes thumbnails there")
    if options.user is not None:
        check_account_can_serve(
            options.user,
            options.cache_root,
            makes_thumbnails=bool(options.on_demand_sources),
            sources=[root for root in options.on_demand_sources.values() if isinstance(root, Path)],
            access_log=options.access_log,
        )
    if options.workers > 1:
        return Supervisor(options).run(ready)
    listeners = _worker_listeners(options, options.port, options.admin_port, reuse_port=False)
    if listeners[1] is not None:
        log.info("admin endpoints on %s:%d", options.host, listeners[1].getsockname()[1])
    try:
        # No supervisor to watch: started with nohup from a shell, the server outlives the shell.
        worker = Worker(options, MetricsBoard(1), 0, listeners, supervisor_pid=None)
        _confine_writes(options)
    except BaseException:
        _close_all(*listeners)
        raise
    if ready is not None:
        ready(options.host, listeners[0].getsockname()[1])
    signals = StopSignals()
    try:
        return worker.run(signals if signals.install() else None)
    finally:
        signals.close()


class Supervisor:
    """The parent of several workers: holds the ports, forwards signals, replaces dead workers.

    With --user it stays root, as nginx's master does: a replacement worker binds the port
    again (below 1024 only root may) before it drops to the user. It reads no request.
    """

    RESPAWN_LIMIT = 5  # deaths per minute before giving up
    READY_SECONDS = 30.0

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.board = MetricsBoard(options.workers)
        self.children: dict[int, int] = {}  # pid -> worker index
        self.deaths: list[float] = []
        self.pid = os.getpid()
        self.port = 0
        self.admin_port: int | None = None
        #: Sockets a forked worker must close: they are the parent's.
        self.inherited: list[socket.socket | None] = []

    def run(self, ready: Callable[[str, int], None] | None) -> int:
        """Start the workers, then supervise them until they have all exited; the exit code."""
        options = self.options
        # Bound but never listening, these hold the port numbers; only listening sockets get connections.
        port_holder = _bind(options.host, options.port, reuse_port=True)
        admin_holder = None
        signals = StopSignals()
        ready_reader, ready_writer = os.pipe()
        self.inherited = [port_holder]
        try:
            if options.admin_port is not None:
                admin_holder = _bind(options.host, options.admin_port, reuse_port=True)
                self.inherited.append(admin_holder)
                log.info("admin endpoints on %s:%d", options.host, admin_holder.getsockname()[1])
            self.port = port_holder.getsockname()[1]
            self.admin_port = admin_holder.getsockname()[1] if admin_holder is not None else None
            for index in range(options.workers):
                self._spawn(index, ready_writer, signals)
            self._wait_ready(ready_reader)
            signals.install()
            if ready is not None:
                ready(options.host, self.port)
            return self._supervise(signals, ready_writer)
        finally:
            for pid in list(self.children):
                _kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            signals.close()
            _close_all(port_holder, admin_holder)
            os.close(ready_reader)
            os.close(ready_writer)

    def _spawn(self, index: int, ready_writer: int, signals: StopSignals) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = index
            return
        code: int = ExitCode.CANNOT_RUN
        try:
            signals.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # A terminal's Ctrl-C reaches every process in the group; workers drain on the
            # SIGTERM their parent forwards instead, so one Ctrl-C is not counted twice.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _close_all(*self.inherited)
            options = self.options
            listeners = _worker_listeners(options, self.port, self.admin_port, reuse_port=True)
            worker = Worker(options, self.board, index, listeners, supervisor_pid=self.pid)
            _confine_writes(options)
            os.write(ready_writer, b"r")
            own_signals = StopSignals(ignore_sigint=True)
            code = worker.run(own_signals if own_signals.install() else None)
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _wait_ready(self, ready_reader: int) -> None:
        deadline = time.monotonic() + self.READY_SECONDS
        started = 0
        while started < self.options.workers:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([ready_reader], [], [], max(0.0, min(left, 0.2)))
            if readable:
                started += len(os.read(ready_reader, 64))
            elif left <= 0 or self._reap():
                raise CannotRunError("workers did not start")

    def _reap(self) -> list[tuple[int, int, int]]:
        """The workers that have exited since the last call: (index, pid, exit code) each."""
        exited = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            index = self.children.pop(pid)
            exited.append((index, pid, os.waitstatus_to_exitcode(status)))
        return exited

    def _supervise(self, signals: StopSignals, ready_writer: int) -> int:
        stopping = 0
        gave_up = False
        codes: list[int] = []
        while self.children:
            readable, _, _ = select.select([signals], [], [], 0.2)
            if readable:
                received = signals.count()
                stopping += received
                if received:
                    for pid in self.children:
                        _kill(pid, signal.SIGTERM)
            for index, pid, code in self._reap():
                if stopping or gave_up:
                    codes.append(code)
                    continue
                log.warning("worker %d (pid %d) exited with %d; starting another", index, pid, code)
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < 60] + [now]
                if len(self.deaths) > self.RESPAWN_LIMIT:
                    log.error("workers keep dying; stopping")
                    gave_up = True
                    for other in self.children:
                        _kill(other, signal.SIGTERM)
                    continue
                self._spawn(index, ready_writer, signals)
        if gave_up:
            return ExitCode.CANNOT_RUN
        if stopping >= 2 or ExitCode.INTERRUPTED in codes:
            return ExitCode.INTERRUPTED
        return ExitCode.OK if all(code == 0 for code in codes) else ExitCode.CUT_SHORT
