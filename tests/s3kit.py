"""A real S3 endpoint for the tests: moto's server as a process on 127.0.0.1, and the requests it logged."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagekit import output_files, run_cli

#: The fake credentials every test's environment carries: moto accepts any.
#: Keys a person might give photos, each a test of the URL's quoting: spaces, non-ASCII, '+' and '%'.
AWKWARD_KEYS = (
    "lib/top.jpg",
    "lib/summer 2024/beach day.jpg",
    "lib/summer 2024/Ölberg + café/naïve 100%.jpg",
    "lib/a+b/c%20d.jpg",
    "lib/日本/写真.jpg",
)

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-never-printed",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never the instance metadata service (169.254.169.254): the tests reach 127.0.0.1 only.
    "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/1\.[01]')
_bucket_names = itertools.count()


class MotoServer:
    """moto's S3 server in its own process, on a port it chose; its log lists every request it answered."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        """`env`: settings of the server's own (INITIAL_NO_AUTH_ACTION_COUNT: check keys after that many requests)."""
        self.log_path = log
        self._log = log.open("wb")
        executable = shutil.which("moto_server", path=os.path.dirname(sys.executable))
        command = [executable] if executable else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 30
        while (port := self._port()) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"

    def _port(self) -> int | None:
        found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    def requests(self) -> list[tuple[str, str]]:
        """Every request answered so far: (method, path with its query, unquoted)."""
        text = self.log_path.read_text(errors="replace")
        return [(m.group(1), urllib.parse.unquote(m.group(2))) for m in _REQUEST.finditer(text)]

    def stop(self) -> None:
        """End the server (and the process group it may have started)."""
        end_process_group(self.process)
        self._log.close()


def client(endpoint: str) -> Any:
    """A boto3 client of the server: the tests' own way to look into buckets, apart from the tool's."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


class Bucket:
    """One test's bucket on the server."""

    def __init__(self, server: MotoServer, name: str) -> None:
        self.server = server
        self.name = name
        self.s3 = client(server.endpoint)
        self.s3.create_bucket(Bucket=name)

    def url(self, prefix: str = "") -> str:
        """`s3://bucket/prefix`."""
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def put(self, key: str, data: bytes, **extra: Any) -> None:
        """Store an object."""
        self.s3.put_object(Bucket=self.name, Key=key, Body=data, **extra)

    def upload_tree(self, root: Path, prefix: str) -> list[str]:
        """Every file under `root` as an object under `prefix`; their keys."""
        keys = []
        for path in sorted(root.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(root).as_posix()}"
                self.put(key, path.read_bytes())
                keys.append(key)
        return keys

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, paginated."""
        found = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    def get(self, key: str) -> bytes:
        """An object's bytes."""
        body: bytes = self.s3.get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def head(self, key: str) -> dict[str, Any]:
        """An object's headers."""
        headers: dict[str, Any] = self.s3.head_object(Bucket=self.name, Key=key)
        return headers

    def delete(self, key: str) -> None:
        """Remove an object."""
        self.s3.delete_object(Bucket=self.name, Key=key)

    def source_gets(self, since: int = 0) -> list[str]:
        """The GETs of objects (not listings) in this bucket among the server's requests from index `since`."""
        return [
            path
            for method, path in self.server.requests()[since:]
            if method == "GET" and path.startswith(f"/{self.name}/") and "list-type" not in path
        ]


@contextlib.contextmanager
def moto_running(folder: Path) -> Iterator[MotoServer]:
    """A moto S3 server while the block runs (the test skips where moto, boto3 or obstore is missing)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    pytest.importorskip("obstore")
    server = MotoServer(folder / "requests.log")
    try:
        yield server
    finally:
        server.stop()


def aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS environment pointing at `endpoint`, for this process and the CLI runs it starts."""
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)


def fresh_bucket(server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A new bucket on `server`, with the AWS environment set to reach it."""
    aws_env(monkeypatch, server.endpoint)
    return Bucket(server, f"test-bucket-{os.getpid()}-{next(_bucket_names)}")


class Relay:
    """A TCP relay in front of the server, on a port of its own: stopping it is the endpoint going away.

    `restart` listens again on the same port, as an endpoint that comes back at its address.
    `stall`: a request whose first bytes hold it is taken and never answered (the connection stays
    open, silent, until the client gives up), as a store that hangs on one object.
    `cut_after_puts`: the relay stops itself when a PUT comes after that many (`cut` is set then): the
    endpoint goes away mid-run at a known point, however fast the run is.
    """

    def __init__(
        self, upstream_port: int, port: int = 0, stall: bytes | None = None, cut_after_puts: int | None = None
    ) -> None:
        self._upstream = upstream_port
        self._stall = stall
        self._cut_after_puts = cut_after_puts
        self._puts = 0
        self.cut = threading.Event()
        #: How many requests were held unanswered.
        self.stalled = 0
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                if listener.fileno() < 0:  # stopped since it was accepted: not one byte more
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool = False) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and self._cut_here(data):
                    self.cut.set()
                    self.stop()
                    return
                if from_client and self._stall is not None and self._stall in data:
                    with self._lock:
                        self.stalled += 1
                    while source.recv(65536):  # hold it: read on, answer nothing, until the client hangs up
                        pass
                    break
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _cut_here(self, data: bytes) -> bool:
        """Whether `data` starts the PUT past `cut_after_puts` (once: a restarted relay passes everything)."""
        if self._cut_after_puts is None or self.cut.is_set() or not data.startswith(b"PUT "):
            return False
        with self._lock:
            self._puts += 1
            return self._puts > self._cut_after_puts

    def stop(self) -> None:
        """Refuse new connections and cut those open."""
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def restart(self) -> None:
        """Listen again on the same port."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()


def assert_secret_never_printed(source_url: str, out: Path, secret: str) -> None:
    """A run from `source_url` (one photo and one broken file) works with what the environment gives, and
    neither it (with --debug) nor `thumbcli config` prints `secret`."""
    run = run_cli("generate", source_url, "-o", out, "-s", "16", "--debug")
    assert run.rc == 1, run.stderr
    assert len(output_files(out)) == 1 and len(run.failure_lines) == 1
    assert secret not in run.stderr + run.stdout
    shown = run_cli("config")
    assert secret not in shown.stdout + shown.stderr


def end_process_group(process: subprocess.Popen[Any]) -> None:
    """End a test server started in a process group of its own (and what it started), and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
