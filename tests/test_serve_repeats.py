"""`thumbcli serve` answering a request head it answered before, byte for byte, without parsing it again."""

from __future__ import annotations

import email.utils
import os
import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from servekit import (
    RECHECKED_WITHIN,
    ServerProcess,
    listening_ports,
    metrics,
    put_thumb,
    read_response,
    running_server,
    wait_until,
    write_manifest,
)

from thumbcli.serve.files import MEMORY_BODY_BYTES

HEAD = b"GET /small/a.jpg HTTP/1.1\r\nHost: test\r\nUser-Agent: repeat-test\r\nAccept: image/*\r\n\r\n"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    write_manifest(root, {"small": "webp"})
    put_thumb(root, "small", "a.jpg.webp", random.Random(1).randbytes(20000))
    return root


def _thumb(cache: Path) -> Path:
    return cache / "v1" / "small" / "a.jpg.webp"


def _without_date(head: bytes) -> bytes:
    return re.sub(rb"(?m)^Date: [^\r]*\r\n", b"", head)


def _ask(sock: socket.socket, reader: object, head: bytes, method: str = "GET") -> tuple[int, bytes, bytes]:
    """Send one head on a kept-alive connection and read its answer: status, head less Date, body."""
    sock.sendall(head)
    response = read_response(reader, method)  # type: ignore[arg-type]
    return response.status, _without_date(response.head), response.body


def _repeated(server: ServerProcess) -> float:
    return metrics(server)["thumbcli_repeated_heads_total"]


def test_serve_answers_a_repeated_head_exactly_as_it_did_the_first_time(cache: Path) -> None:
    body = _thumb(cache).read_bytes()
    with running_server(cache) as server:
        with server.connect() as sock, sock.makefile("rb") as reader:
            answers = [_ask(sock, reader, HEAD) for _ in range(200)]
            etag = re.search(rb"ETag: ([^\r]+)", answers[0][1])
            assert etag is not None
            revalidate = HEAD.replace(b"\r\n\r\n", b"\r\nIf-None-Match: " + etag.group(1) + b"\r\n\r\n")
            not_modified = [_ask(sock, reader, revalidate) for _ in range(200)]
            heads = [_ask(sock, reader, HEAD.replace(b"GET", b"HEAD", 1), "HEAD") for _ in range(50)]
        values = metrics(server)
    assert answers[0][0] == 200 and answers[0][2] == body
    assert all(answer == answers[0] for answer in answers)
    assert not_modified[0][0] == 304 and not_modified[0][2] == b""
    assert all(answer == not_modified[0] for answer in not_modified)
    assert heads[0][0] == 200 and heads[0][2] == b"" and b"Content-Length: 20000\r\n" in heads[0][1]
    assert all(answer == heads[0] for answer in heads)
    # Each head parsed once, again only when its file's OPEN_FILE_SECONDS ran out between two requests.
    assert values["thumbcli_repeated_heads_total"] >= 400
    assert values['thumbcli_requests_total{code="200"}'] >= 250
    assert values['thumbcli_requests_total{code="304"}'] == 200
    # The first answers of each second go out from memory, the later ones from that second's arena.
    assert values['thumbcli_bodies_total{via="memory"}'] + values['thumbcli_bodies_total{via="sendfile"}'] == 200
    assert values['thumbcli_bodies_total{via="sendfile"}'] >= 1


def test_serve_sends_repeated_answers_with_the_date_of_their_second(cache: Path) -> None:
    body = _thumb(cache).read_bytes()
    dates = set()
    with running_server(cache) as server, server.connect() as sock, sock.makefile("rb") as reader:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            before = time.time()
            sock.sendall(HEAD)
            response = read_response(reader)
            after = time.time()
            assert response.status == 200 and response.body == body
            date = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
            assert int(before) <= date <= after
            dates.add(date)
            time.sleep(0.005)  # fewer than the 1,000 requests a connection may make
        values = metrics(server)
    assert len(dates) >= 2
    assert values['thumbcli_bodies_total{via="sendfile"}'] >= 1


@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "no-sendfile"])
def test_serve_sends_whole_repeated_answers_to_a_slow_reader(tmp_path: Path, use_sendfile: bool) -> None:
    """The largest body kept in memory, to a reader whose small buffer takes each answer in parts."""
    cache = tmp_path / "cache"
    write_manifest(cache, {"small": "webp"})
    body = random.Random(3).randbytes(MEMORY_BODY_BYTES)
    put_thumb(cache, "small", "a.jpg.webp", body)
    with running_server(cache, use_sendfile=use_sendfile) as server:
        with server.connect(rcvbuf=4096) as sock, sock.makefile("rb", buffering=1024) as reader:
            for _ in range(30):
                sock.sendall(HEAD)
                time.sleep(0.01)  # the server sends while the reader does not read
                response = read_response(reader)
                assert response.status == 200 and response.body == body
        values = metrics(server)
    assert values["thumbcli_repeated_heads_total"] >= 20
    assert (values['thumbcli_bodies_total{via="sendfile"}'] >= 1) is use_sendfile
    assert values['thumbcli_bodies_total{via="fallback"}'] == 0


def test_serve_answers_a_repeated_head_with_the_thumbnail_as_it_is_now(cache: Path) -> None:
    thumb = _thumb(cache)
    rng = random.Random(2)
    with running_server(cache) as server, server.connect() as sock, sock.makefile("rb") as reader:
        first = _ask(sock, reader, HEAD)
        etag = re.search(rb"ETag: ([^\r]+)", first[1])
        assert etag is not None
        revalidate = HEAD.replace(b"\r\n\r\n", b"\r\nIf-None-Match: " + etag.group(1) + b"\r\n\r\n")
        assert _ask(sock, reader, revalidate)[0] == 304
        assert _ask(sock, reader, HEAD) == first
        assert _repeated(server) >= 1
        replacement = rng.randbytes(24000)
        temporary = thumb.with_name("a.tmp")
        temporary.write_bytes(replacement)
        os.replace(temporary, thumb)
        assert wait_until(lambda: _ask(sock, reader, HEAD)[2] == replacement, timeout=RECHECKED_WITHIN)
        # The same revalidation bytes: the entity tag they name is gone, so the new body comes.
        status, head, body = _ask(sock, reader, revalidate)
        assert (status, body) == (200, replacement)
        assert b"Content-Length: 24000\r\n" in head
        thumb.unlink()
        assert wait_until(lambda: _ask(sock, reader, HEAD)[0] == 404, timeout=RECHECKED_WITHIN)
        assert _ask(sock, reader, HEAD)[0] == 404


def test_serve_keeps_a_repeated_head_to_its_own_port_and_its_connection_limits(cache: Path) -> None:
    with running_server(cache, admin_port=0, max_requests_per_connection=3) as server:
        with server.connect() as sock, sock.makefile("rb") as reader:
            statuses = [_ask(sock, reader, HEAD) for _ in range(3)]
            assert reader.read() == b""  # closed after the third, as max_requests_per_connection says
        assert [status for status, _, _ in statuses] == [200, 200, 200]
        assert [head.count(b"Connection: close") for _, head, _ in statuses] == [0, 0, 1]
        with server.connect() as sock, sock.makefile("rb") as reader:
            assert _ask(sock, reader, HEAD)[0] == 200
            assert _ask(sock, reader, HEAD)[0] == 200
        admin_port = (listening_ports(server.process.pid) - {server.port}).pop()
        admin = ServerProcess(server.process, server.host, admin_port)
        assert _repeated(admin) >= 1
        with admin.connect() as sock, sock.makefile("rb") as reader:
            # The bytes answered with the thumbnail on the public port name nothing on the admin port.
            assert [_ask(sock, reader, HEAD)[0] for _ in range(3)] == [404, 404, 404]


def test_serve_logs_every_repeated_head_and_keeps_http10_connections_alive(cache: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    http10 = b"GET /small/a.jpg HTTP/1.0\r\nConnection: keep-alive\r\nUser-Agent: old\r\n\r\n"
    with running_server(cache, access_log=str(log_path)) as server:
        with server.connect() as sock, sock.makefile("rb") as reader:
            answers = [_ask(sock, reader, http10) for _ in range(20)]
        assert _repeated(server) >= 1
        assert wait_until(lambda: log_path.exists() and log_path.read_bytes().count(b"\n") >= 21)
    assert all(answer == answers[0] for answer in answers)
    assert answers[0][0] == 200 and b"Connection: keep-alive\r\n" in answers[0][1]
    lines = [line for line in log_path.read_text().splitlines() if "/metrics" not in line]
    assert len(lines) == 20
    assert all('"GET /small/a.jpg HTTP/1.0" 200 20000 "-" "old"' in line for line in lines)


def test_serve_parses_a_head_that_comes_in_pieces_or_with_others(cache: Path) -> None:
    body = _thumb(cache).read_bytes()
    with running_server(cache) as server, server.connect() as sock, sock.makefile("rb") as reader:
        assert _ask(sock, reader, HEAD)[0] == 200
        # The known head split over two reads, then followed by half of the next: each answered once.
        sock.sendall(HEAD[:20])
        time.sleep(0.2)
        sock.sendall(HEAD[20:] + HEAD[:30])
        time.sleep(0.2)
        sock.sendall(HEAD[30:])
        answers = [read_response(reader) for _ in range(2)]
        # Two of it in one read, and a head that begins with it but asks for another file.
        sock.sendall(HEAD + HEAD + HEAD.replace(b"a.jpg", b"b.jpg"))
        answers += [read_response(reader) for _ in range(3)]
    assert [answer.status for answer in answers] == [200, 200, 200, 200, 404]
    assert all(answer.body == body for answer in answers[:4])


def test_serve_closes_a_repeating_connection_when_told_to_drain(cache: Path) -> None:
    with running_server(cache) as server, server.connect() as sock, sock.makefile("rb") as reader:
        assert [_ask(sock, reader, HEAD)[0] for _ in range(5)] == [200] * 5
        server.process.send_signal(signal.SIGTERM)
        # An idle connection is closed at once: no repeated head is answered after the signal.
        sock.settimeout(10)
        assert reader.read() == b""
        assert server.process.wait(10) == 0


def test_serve_sends_repeated_answers_as_before_when_no_memory_file_can_hold_them(cache: Path) -> None:
    """A server that may write no file past 8 KiB: its memory file takes no 20 KB answer."""
    body = _thumb(cache).read_bytes()
    with running_server(cache, file_bytes=8192) as server:
        with server.connect() as sock, sock.makefile("rb") as reader:
            answers = [_ask(sock, reader, HEAD) for _ in range(50)]
        values = metrics(server)
    assert all(status == 200 and answer == body for status, _, answer in answers)
    assert values["thumbcli_repeated_heads_total"] >= 40
    assert values['thumbcli_bodies_total{via="memory"}'] == 50
    assert values['thumbcli_bodies_total{via="sendfile"}'] == 0
    assert any("cannot keep repeated answers in a memory file" in line for line in server.stderr_lines)
