"""Test kit for `thumbcli serve`: caches on disk, a real server process, raw HTTP clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from thumbcli import cache
from thumbcli.serve.files import OPEN_FILE_SECONDS

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_LINE = re.compile(r"serving .* on http://(?P<host>[^/]+):(?P<port>\d+)/")
START_SECONDS = 20.0
STOP_SECONDS = 20.0
#: Long enough for any opened file to have expired and been checked again, on a loaded machine too.
RECHECKED_WITHIN = OPEN_FILE_SECONDS * 10

#: ServeOptions fields that `thumbcli serve` has a flag for, and the flag.
CLI_FLAGS = {
    "host": "--host",
    "port": "--port",
    "workers": "--workers",
    "admin_port": "--admin-port",
    "access_log": "--access-log",
    "cache_control": "--cache-control",
    "max_connections": "--max-connections",
    "header_timeout": "--header-timeout",
    "idle_timeout": "--idle-timeout",
    "send_timeout": "--send-timeout",
    "grace_period": "--grace-period",
    "source_root": "--source",
    "named_sources": "--named-sources",  # True: the flag alone
    "presets": "--preset",  # a list of preset names: the flag repeats
    "max_pending": "--max-pending",
    "generators": "--generators",
    "max_decode_time": "--max-decode-time",
    "strict": "--strict",  # a flag: given when true
    "browse": "--browse",  # a flag: given when true
    "user": "--user",
}


def write_manifest(cache_root: Path, presets: dict[str, str]) -> None:
    """Write the cache manifest of presets (name -> format) with the writer `thumbcli generate --cache` uses."""
    cache_root.mkdir(parents=True, exist_ok=True)
    cache.write_manifest(cache_root, {name: {"format": fmt} for name, fmt in presets.items()})


def put_thumb(cache_root: Path, preset: str, cache_relpath: str, data: bytes) -> Path:
    """Write one thumbnail file under `v1/<preset>/`, given its on-disk relative path."""
    path = cache_root / "v1" / preset / cache_relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@dataclass
class ServerProcess:
    """A running `thumbcli serve` subprocess."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    stderr_lines: list[str] = field(default_factory=list)

    def connect(self, timeout: float = 5.0, rcvbuf: int | None = None) -> socket.socket:
        """A raw client socket to the server."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the server and wait for its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@contextlib.contextmanager
def running_server(
    cache_root: Path,
    env: dict[str, str] | None = None,
    descriptors: int | None = None,
    file_bytes: int | None = None,
    **options: Any,
) -> Iterator[ServerProcess]:
    """Run a server on 127.0.0.1 (port 0 unless given) until the block ends.

    `descriptors`: the server's soft RLIMIT_NOFILE, set in the child alone (the test process may
    hold more descriptors than that: clients of other tests' servers, kept alive).
    `file_bytes`: its soft RLIMIT_FSIZE, the largest file it may write (memory files too).

    Uses `python -m thumbcli serve` when every option has a flag, else the library directly;
    `config` (a thumbcli.toml, where `--source` finds its presets) needs the command line.
    """
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    use_sendfile = options.pop("use_sendfile", True)
    config = options.pop("config", None)
    if config is not None or set(options) <= set(CLI_FLAGS):
        command = [sys.executable, "-m", "thumbcli"]
        if config is not None:
            command += ["--config", str(config)]
        command += ["serve", str(cache_root)]
        for name, value in options.items():
            if isinstance(value, bool):
                command += [CLI_FLAGS[name]] if value else []
                continue
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is True:
                    command.append(CLI_FLAGS[name])
                elif item is not None:
                    command += [CLI_FLAGS[name], str(item)]
        if not use_sendfile:
            command.append("--no-sendfile")
    else:
        library_options = dict(options, cache_root=str(cache_root), use_sendfile=use_sendfile)
        script = (
            "import json, sys\n"
            "from pathlib import Path\n"
            "from thumbcli.serve.options import ServeOptions\n"
            "from thumbcli.serve.supervisor import serve\n"
            "o = json.loads(sys.argv[1]); o['cache_root'] = Path(o['cache_root'])\n"
            "def ready(host, port):\n"
            "    print(f'serving {o[\"cache_root\"]} on http://{host}:{port}/', file=sys.stderr, flush=True)\n"
            "sys.exit(serve(ServeOptions(**o), ready=ready))\n"
        )
        command = [sys.executable, "-c", script, json.dumps(library_options)]
    child_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child_env.pop("THUMBCLI_NO_SENDFILE", None)
    child_env.update(env or {})

    def set_limits() -> None:
        for which, soft in ((resource.RLIMIT_NOFILE, descriptors), (resource.RLIMIT_FSIZE, file_bytes)):
            if soft is not None:
                resource.setrlimit(which, (soft, resource.getrlimit(which)[1]))

    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env,
        cwd=REPO_ROOT,
        preexec_fn=set_limits if descriptors is not None or file_bytes is not None else None,
    )
    assert process.stderr is not None
    lines: list[str] = []
    found = threading.Event()
    address: dict[str, str] = {}

    def drain(stream: BinaryIO) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            match = READY_LINE.search(line)
            if match and not found.is_set():
                address.update(match.groupdict())
                found.set()
        found.set()

    reader = threading.Thread(target=drain, args=(process.stderr,), daemon=True)
    reader.start()
    try:
        if not found.wait(START_SECONDS) or not address:
            raise RuntimeError("server did not start:\n" + "".join(lines))
        server = ServerProcess(process, address["host"], int(address["port"]), lines)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(5)
        process.stderr.close()


@dataclass
class RawResponse:
    """One HTTP response as read off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes
    head: bytes


def read_response(reader: BinaryIO, method: str = "GET") -> RawResponse:
    """Read one response from a buffered socket file; EOFError if the server closed first."""
    status_line = reader.readline(65536)
    if not status_line:
        raise EOFError("connection closed before a response")
    head = [status_line]
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(65536)
        if not line:
            raise EOFError("connection closed inside a response head")
        head.append(line)
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    length = 0 if method == "HEAD" or status == 304 else int(headers.get("content-length", "0"))
    body = reader.read(length) if length else b""
    return RawResponse(status, headers, body, b"".join(head))


def exchange(server: ServerProcess, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, half-close, and return everything the server sends until it closes."""
    with server.connect(timeout) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def get(server: ServerProcess, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> RawResponse:
    """One request on a fresh connection."""
    with server.connect() as sock, sock.makefile("rb") as reader:
        lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return read_response(reader, method)


def fetch(server: ServerProcess, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """One GET with http.client (generate-on-miss may take a while): status and body."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def metrics(server: ServerProcess, port: int | None = None) -> dict[str, float]:
    """The server's Prometheus metrics as {series: value}."""
    with socket.create_connection((server.host, port or server.port), timeout=5) as sock, sock.makefile("rb") as rd:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        response = read_response(rd)
    assert response.status == 200, response
    values = {}
    for line in response.body.decode().splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on, from /proc: how a test learns a port the server picked."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; return its last truth."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _readme_nginx_conf(cache: Path, workdir: Path, port: int) -> Path:
    """An nginx.conf around the README's snippet, serving `cache` on 127.0.0.1:`port`."""
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = readme.split("```nginx\n", 1)[1].split("```", 1)[0]
    server = snippet.replace("127.0.0.1:8081", f"127.0.0.1:{port}").replace("/var/cache/thumbcli", str(cache))
    # As root, nginx's workers would drop to `nobody`, who cannot enter pytest's tmp folders.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"{user}daemon off; pid {workdir}/nginx.pid; error_log {workdir}/error.log;\n"
        f"events {{}}\nhttp {{ include /etc/nginx/mime.types; access_log off;\n"
        f"client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};\n"
        f"uwsgi_temp_path {workdir}; scgi_temp_path {workdir};\n{server}\n}}\n"
    )
    return conf


@contextlib.contextmanager
def readme_nginx(cache: Path, workdir: Path) -> Iterator[int]:
    """nginx running the README's snippet over `cache` until the block ends; yields its port.

    nginx cannot take port 0, so a port another process took meanwhile is retried.
    """
    assert NGINX is not None
    for _attempt in range(5):
        port = _free_port()
        pid_file = workdir / "nginx.pid"
        pid_file.unlink(missing_ok=True)
        conf = _readme_nginx_conf(cache, workdir, port)
        nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(workdir)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        # nginx writes its pid file only once it has bound its listening sockets.
        while nginx.poll() is None and not pid_file.exists():
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        if nginx.poll() is None:
            break
        assert nginx.stderr is not None
        errors = nginx.stderr.read().decode(errors="replace")
        nginx.stderr.close()
        assert "Address already in use" in errors, errors
    else:
        raise AssertionError("nginx found no free port in 5 tries")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        yield port
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        assert nginx.stderr is not None
        nginx.stderr.close()
