"""`thumbcli serve` under floods of connections: a real server process, thousands of real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import random
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from servekit import RawResponse, get, metrics, put_thumb, read_response, running_server, write_manifest

from thumbcli.serve.options import ServeOptions

#: More than the default connection limit, as many as the issue's flood.
FLOOD = 1100
HALF_HEAD = b"GET /small/photo.jpg HTTP/1.1\r\nHost: test\r\n"
#: Far longer than any client here waits: a request served in time was not let in by a timeout.
LONG_TIMEOUT = 120
BIG_BYTES = 16 * 1024 * 1024  # larger than loopback socket buffers, so a response stays in flight


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("floods") / "cache"
    write_manifest(root, {"small": "webp", "big": "jpeg"})
    put_thumb(root, "small", "photo.jpg.webp", b"a small thumbnail" * 64)
    block = random.Random(3).randbytes(1024 * 1024)
    put_thumb(root, "big", "huge.tif.jpg", block * (BIG_BYTES // len(block)))
    return root


@contextlib.contextmanager
def open_files(count: int) -> Iterator[None]:
    """Let this process (and the servers it starts) hold `count` descriptors, as root may; restore after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (count, max(hard, count)))
        except (ValueError, OSError):
            pytest.skip(f"needs {count} open files, and the limit is {soft} (hard {hard})")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock`, waiting for that at most the socket's own timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True  # closed before its half head was read
    except TimeoutError:
        return False


def still_open(sock: socket.socket) -> bool:
    """Whether `sock` is open at the server now: nothing to read, and no end of stream."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def keep_alive_get(sock: socket.socket) -> RawResponse:
    sock.sendall(b"GET /small/photo.jpg HTTP/1.1\r\nHost: test\r\n\r\n")
    with sock.makefile("rb") as reader:
        return read_response(reader)


def test_serve_answers_a_request_while_a_thousand_half_heads_are_held(cache: Path) -> None:
    limit = ServeOptions(cache).max_connections
    assert limit < FLOOD
    with open_files(2 * FLOOD + 512), running_server(cache, header_timeout=LONG_TIMEOUT) as running:
        flood: list[socket.socket] = []
        try:
            for _ in range(FLOOD):
                sock = running.connect()
                sock.sendall(HALF_HEAD)
                flood.append(sock)
            # A complete request on a new connection is answered within the client's own 5 s,
            # long before any header timeout could have made room for it.
            answer = get(running, "/small/photo.jpg")
            assert (answer.status, answer.body) == (200, b"a small thumbnail" * 64)
            # Room was made by closing the oldest half heads, exactly as many as were over the limit;
            # every later one is still held.
            shed = FLOOD + 1 - limit
            assert all(closed_by_server(sock) for sock in flood[:shed])
            assert [index for index, sock in enumerate(flood) if still_open(sock)] == list(range(shed, FLOOD))
            assert metrics(running)["thumbcli_connections_shed_total"] >= shed
        finally:
            for sock in flood:
                sock.close()


def test_serve_sheds_half_heads_when_out_of_descriptors_below_the_limit(cache: Path) -> None:
    with contextlib.ExitStack() as stack:
        # Started with 128 descriptors, the server runs out of them long before its 1024 connections.
        running = stack.enter_context(running_server(cache, descriptors=128, header_timeout=LONG_TIMEOUT))
        flood = [stack.enter_context(running.connect()) for _ in range(200)]
        for sock in flood:
            sock.sendall(HALF_HEAD)
        answer = get(running, "/small/photo.jpg")
        assert (answer.status, answer.body) == (200, b"a small thumbnail" * 64)
        # Room was made by closing the oldest half heads; the rest are held.
        held = [index for index, sock in enumerate(flood) if still_open(sock)]
        assert held[0] > 0 and held == list(range(held[0], len(flood)))
        assert all(closed_by_server(sock) for sock in flood[: held[0]])


def test_serve_sheds_the_longest_idle_keep_alive_for_a_new_connection(cache: Path) -> None:
    with running_server(cache, max_connections=3, idle_timeout=LONG_TIMEOUT) as running:
        idle = [running.connect() for _ in range(3)]
        try:
            for sock in idle:
                assert keep_alive_get(sock).status == 200
            # All three kept alive, at the limit: a fourth connection is let in at once.
            assert get(running, "/small/photo.jpg").status == 200
            assert closed_by_server(idle[0])  # the one idle longest made room
            for sock in idle[1:]:  # the others still answer
                assert keep_alive_get(sock).status == 200
        finally:
            for sock in idle:
                sock.close()


def test_serve_caps_open_connections_when_none_waits_on_its_client(cache: Path) -> None:
    with running_server(cache, max_connections=2) as running:
        busy = [running.connect(timeout=10, rcvbuf=16384) for _ in range(2)]
        try:
            for sock in busy:
                # 16 MiB that the client does not read: the response stays in flight, never shed.
                sock.sendall(b"GET /big/huge.tif HTTP/1.1\r\nHost: test\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            with running.connect(timeout=0.5) as waiting:
                waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                with pytest.raises(TimeoutError):
                    waiting.recv(4096)  # queued in the backlog, not accepted
                busy.pop().close()
                waiting.settimeout(5)
                assert waiting.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            for sock in busy:
                sock.close()
