"""A real Azure Blob Storage endpoint for the tests: Azurite (npm's `azurite`) as a process on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import http.client
import itertools
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3kit import end_process_group

#: Azurite's development account and key: published by Microsoft, the same in every Azurite.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/1\.[01]" (\d{3})')
_container_names = itertools.count()
_marks = itertools.count()
#: Every AZURE_* setting object_store reads that a test's environment must not inherit.
_AZURE_SETTINGS = (
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_ENDPOINT",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURITE_BLOB_STORAGE_URL",
)


class Azurite:
    """Azurite's blob service in its own process, in memory, on a port it chose; its log lists every request."""

    def __init__(self, log: Path) -> None:
        executable = shutil.which("azurite-blob")
        if executable is None:
            pytest.skip("Azurite is not installed (npm install -g azurite; sh dev test installs it as root)")
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                executable,
                *("--blobHost", "127.0.0.1", "--blobPort", "0"),
                *("--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=log.parent,
        )
        deadline = time.monotonic() + 30
        while (port := self._port()) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"azurite did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"

    def _port(self) -> int | None:
        found = re.search(r"listens on http://127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    def requests(self) -> list[tuple[str, str, int]]:
        """Every request answered so far: (method, path with its query, unquoted; status)."""
        text = self.log_path.read_text(errors="replace")
        return [(m[1], urllib.parse.unquote(m[2]), int(m[3])) for m in _REQUEST.finditer(text)]

    def mark(self) -> int:
        """The count of requests logged once all made so far are (Azurite writes its log late): a GET of
        a path of its own is sent, and the log is read until it shows it."""
        path = f"/{ACCOUNT}/mark-{next(_marks)}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            connection.getresponse().read()
        finally:
            connection.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            requests = self.requests()
            if any(logged == path for _, logged, _ in requests):
                return len(requests)
            time.sleep(0.02)
        raise RuntimeError(f"azurite did not log {path}")

    def create_container(self, name: str) -> None:
        """Create a container, by a request signed with the account's Shared Key (obstore has no call for it)."""
        date = datetime.datetime.now(datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
        headers = {"x-ms-date": date, "x-ms-version": "2021-08-06", "Content-Length": "0"}
        # The string to sign: the verb, 11 empty standard headers, the x-ms- headers, the resource.
        signed = "\n".join(["PUT", *[""] * 11, f"x-ms-date:{date}", "x-ms-version:2021-08-06", ""])
        signed += f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        digest = hmac.new(base64.b64decode(ACCOUNT_KEY), signed.encode(), hashlib.sha256).digest()
        headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(digest).decode()}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("PUT", f"/{ACCOUNT}/{name}?restype=container", headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 201:
            raise RuntimeError(f"creating container {name}: {response.status} {body[:300]!r}")

    def stop(self) -> None:
        """End the server (and the node processes it started)."""
        end_process_group(self.process)
        self._log.close()


@contextlib.contextmanager
def azurite_running(folder: Path) -> Iterator[Azurite]:
    """Azurite while the block runs (the test skips where azurite or obstore is missing)."""
    pytest.importorskip("obstore")
    server = Azurite(folder / "azurite.log")
    try:
        yield server
    finally:
        server.stop()


def emulator_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard Azure environment for the emulator at `endpoint`, for this process and the CLI runs it starts."""
    for name in _AZURE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", endpoint)


class Container:
    """One test's container on Azurite, looked into with obstore's own client (not thumbcli's)."""

    def __init__(self, server: Azurite, name: str) -> None:
        from obstore.store import AzureStore

        self.server = server
        self.name = name
        server.create_container(name)
        self.store = AzureStore(
            name,
            account_name=ACCOUNT,
            access_key=ACCOUNT_KEY,
            endpoint=f"{server.endpoint}/{ACCOUNT}",
            client_options={"allow_http": True},
        )

    def url(self, prefix: str = "") -> str:
        """`az://container/prefix`."""
        return f"az://{self.name}/{prefix}" if prefix else f"az://{self.name}"

    def put(self, key: str, data: bytes) -> None:
        """Store a blob."""
        import obstore

        obstore.put(self.store, key, data)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, sorted."""
        import obstore

        return sorted(meta["path"] for chunk in obstore.list(self.store, prefix=prefix or None) for meta in chunk)

    def get(self, key: str) -> bytes:
        """A blob's bytes."""
        import obstore

        return bytes(obstore.get(self.store, key).bytes())

    def attributes(self, key: str) -> dict[str, Any]:
        """A blob's headers as obstore names them (Content-Type, Cache-Control)."""
        import obstore

        return dict(obstore.get(self.store, key).attributes)

    def delete(self, key: str) -> None:
        """Remove a blob."""
        import obstore

        obstore.delete(self.store, key)

    def blob_gets(self, since: int = 0) -> list[str]:
        """The GETs of blobs (not listings) in this container among the server's requests from index `since`."""
        until = self.server.mark()
        return [
            path
            for method, path, _ in self.server.requests()[since:until]
            if method == "GET" and path.startswith(f"/{ACCOUNT}/{self.name}/") and "comp=list" not in path
        ]


def account_sas(permissions: str = "rwdlac") -> str:
    """An account SAS token (the query string) of the development account for blobs, valid until 2099."""
    fields = {"sv": "2019-02-02", "ss": "b", "srt": "sco", "sp": permissions, "se": "2099-01-01T00:00:00Z"}
    fields["spr"] = "https,http"
    signed = "\n".join([ACCOUNT, permissions, "b", "sco", "", fields["se"], "", fields["spr"], fields["sv"], ""])
    digest = hmac.new(base64.b64decode(ACCOUNT_KEY), signed.encode(), hashlib.sha256).digest()
    return urllib.parse.urlencode({**fields, "sig": base64.b64encode(digest).decode()})


def fresh_container(server: Azurite, monkeypatch: pytest.MonkeyPatch) -> Container:
    """A new container on `server`, with the Azure environment set to reach it through the emulator settings."""
    emulator_env(monkeypatch, server.endpoint)
    return Container(server, f"test-container-{os.getpid()}-{next(_container_names)}")
