"""`thumbcli serve`: a real server process on 127.0.0.1, real clients, real signals."""

from __future__ import annotations

import contextlib
import ctypes
import email.utils
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvips
from imagekit import run_cli
from servekit import (
    READY_LINE,
    REPO_ROOT,
    ServerProcess,
    exchange,
    get,
    listening_ports,
    metrics,
    put_thumb,
    read_response,
    running_server,
    wait_until,
    write_manifest,
)

from thumbcli.errors import SpecError
from thumbcli.serve.http import entity_tag_matches, parse_single_range
from thumbcli.serve.options import ServeOptions

SECRET = b"TOP-SECRET-9f1c2e7a-never-served"
BIG_BYTES = 16 * 1024 * 1024  # larger than loopback socket buffers, so a response stays in flight


def _photo_webp() -> bytes:
    image = pyvips.Image.gaussnoise(64, 48, mean=128, sigma=40).cast("uchar").bandjoin([128, 64])
    return bytes(image.webpsave_buffer(Q=80))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    (base / "secret.txt").write_bytes(SECRET)
    outside = base / "outside"
    outside.mkdir()
    (outside / "x.jpg.webp").write_bytes(SECRET)
    root = base / "cache"
    write_manifest(root, {"small": "webp", "big": "jpeg"})
    put_thumb(root, "small", "a/photo.jpg.webp", _photo_webp())
    put_thumb(root, "small", "ü ber/straße.png.webp", b"unicode name" * 100)
    put_thumb(root, "small", "empty.jpg.webp", b"")
    block = random.Random(7).randbytes(1024 * 1024)
    put_thumb(root, "big", "huge.tif.jpg", block * (BIG_BYTES // len(block)))
    small = root / "v1" / "small"
    os.symlink(base / "secret.txt", small / "escape.jpg.webp")
    os.symlink(outside, small / "linkdir")
    os.symlink("a/photo.jpg.webp", small / "inside-link.jpg.webp")
    os.mkfifo(small / "fifo.jpg.webp")
    (small / "dir.jpg.webp").mkdir()
    (root / ".thumbcli").mkdir()
    (root / ".thumbcli" / "state.jpg.webp").write_bytes(SECRET)
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "fallback"])
def server(request: pytest.FixtureRequest, cache: Path) -> Iterator[ServerProcess]:
    """Every body test runs twice: bodies by sendfile and by the plain-send fallback."""
    with running_server(cache, use_sendfile=request.param) as running:
        running.use_sendfile = request.param  # type: ignore[attr-defined]
        yield running


@pytest.fixture(scope="module")
def header_server(cache: Path) -> Iterator[ServerProcess]:
    """A server for tests whose answers carry no body."""
    with running_server(cache) as running:
        yield running


def photo(cache: Path) -> bytes:
    return (cache / "v1/small/a/photo.jpg.webp").read_bytes()


def http_date(seconds: float) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


# --- options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 70000},
        {"workers": 0},
        {"admin_port": 8080},
        {"access_log": ""},
        {"cache_control": "public\r\nX-Evil: 1"},
        {"max_connections": 0},
        {"header_timeout": 0},
        {"idle_timeout": float("nan")},
        {"send_timeout": -1},
        {"grace_period": -1},
        {"max_header_bytes": 10},
        {"max_uri_bytes": 1},
        {"max_requests_per_connection": 0},
    ],
)
def test_serve_options_reject_bad_values(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        ServeOptions(cache_root=tmp_path, **bad)  # type: ignore[arg-type]


def test_range_and_entity_tag_rules() -> None:
    assert parse_single_range(b"bytes=0-9", 100) == (0, 9)
    assert parse_single_range(b"bytes=-10", 100) == (90, 99)
    assert parse_single_range(b"bytes=90-", 100) == (90, 99)
    assert parse_single_range(b"bytes=90-1000", 100) == (90, 99)
    assert parse_single_range(b"bytes=0-1,5-6", 100) is None
    assert parse_single_range(b"bytes=9-1", 100) is None
    assert parse_single_range(b"items=0-1", 100) is None
    assert parse_single_range(b"bytes=100-", 100) == (-1, -1)
    assert parse_single_range(b"bytes=-0", 100) == (-1, -1)
    assert parse_single_range(b"bytes=0-" + b"9" * 5000, 100) == (0, 99)
    assert entity_tag_matches(b'"a", W/"b"', b'"b"', weak=True)
    assert not entity_tag_matches(b'W/"b"', b'"b"', weak=False)
    assert entity_tag_matches(b"*", b'"b"', weak=False)


# --- answers and header rules ----------------------------------------------------------


def test_serve_answers_thumbnail_with_headers(server: ServerProcess, cache: Path) -> None:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        connection.request("GET", "/small/a/photo.jpg")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    st = (cache / "v1/small/a/photo.jpg.webp").stat()
    assert response.status == 200
    assert body == photo(cache)
    assert response.getheader("Content-Type") == "image/webp"
    assert response.getheader("Content-Length") == str(st.st_size)
    assert response.getheader("ETag") == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    assert response.getheader("Last-Modified") == http_date(int(st.st_mtime))
    assert response.getheader("Cache-Control") == "public, max-age=86400"
    assert response.getheader("Accept-Ranges") == "bytes"
    assert email.utils.parsedate_to_datetime(response.getheader("Date", ""))


def test_serve_without_source_never_loads_libvips(server: ServerProcess, cache: Path) -> None:
    assert get(server, "/small/a/photo.jpg").body == photo(cache)
    # (test_serve_on_demand checks that this probe does see libvips once it is loaded.)
    assert "libvips" not in Path(f"/proc/{server.process.pid}/maps").read_text()


def test_serve_sends_bodies_the_configured_way(server: ServerProcess) -> None:
    """A small thumbnail is kept in memory and sent with its head; a large file the configured way."""
    before = metrics(server)
    assert get(server, "/small/a/photo.jpg").status == 200
    assert get(server, "/big/huge.tif", {"Range": "bytes=0-99999"}).status == 206
    after = metrics(server)
    via = "sendfile" if server.use_sendfile else "fallback"  # type: ignore[attr-defined]
    grew = {
        kind: after[f'thumbcli_bodies_total{{via="{kind}"}}'] - before[f'thumbcli_bodies_total{{via="{kind}"}}']
        for kind in ("memory", "sendfile", "fallback")
    }
    assert grew == {"memory": 1, via: 1, ({"sendfile", "fallback"} - {via}).pop(): 0}


def test_serve_falls_back_when_env_forbids_sendfile(cache: Path) -> None:
    with running_server(cache, env={"THUMBCLI_NO_SENDFILE": "1"}) as running:
        assert (
            get(running, "/big/huge.tif", {"Range": "bytes=0-99"}).body
            == (cache / "v1/big/huge.tif.jpg").read_bytes()[:100]
        )
        counts = metrics(running)
    assert counts['thumbcli_bodies_total{via="fallback"}'] >= 1
    assert counts['thumbcli_bodies_total{via="sendfile"}'] == 0


def test_serve_serves_unicode_names_empty_files_and_inside_symlinks(server: ServerProcess, cache: Path) -> None:
    assert get(server, "/small/%C3%BC%20ber/stra%C3%9Fe.png").body == b"unicode name" * 100
    empty = get(server, "/small/empty.jpg")
    assert (empty.status, empty.body, empty.headers["content-length"]) == (200, b"", "0")
    assert get(server, "/small/inside-link.jpg").body == photo(cache)


def test_serve_head_has_headers_without_body(header_server: ServerProcess, cache: Path) -> None:
    response = get(header_server, "/small/a/photo.jpg", method="HEAD")
    assert response.status == 200
    assert response.headers["content-length"] == str(len(photo(cache)))
    assert response.body == b""


def test_serve_answers_304_for_matching_etag(header_server: ServerProcess) -> None:
    etag = get(header_server, "/small/a/photo.jpg", method="HEAD").headers["etag"]
    for value in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        response = get(header_server, "/small/a/photo.jpg", {"If-None-Match": value})
        assert response.status == 304, value
        assert response.headers["etag"] == etag
        assert response.headers["cache-control"] == "public, max-age=86400"
        assert "date" in response.headers
    assert get(header_server, "/small/a/photo.jpg", {"If-None-Match": '"nope"'}).status == 200


def test_serve_answers_304_for_if_modified_since(header_server: ServerProcess, cache: Path) -> None:
    mtime = (cache / "v1/small/a/photo.jpg.webp").stat().st_mtime
    assert get(header_server, "/small/a/photo.jpg", {"If-Modified-Since": http_date(mtime)}).status == 304
    assert get(header_server, "/small/a/photo.jpg", {"If-Modified-Since": http_date(mtime + 60)}).status == 304
    assert get(header_server, "/small/a/photo.jpg", {"If-Modified-Since": http_date(mtime - 60)}).status == 200
    assert get(header_server, "/small/a/photo.jpg", {"If-Modified-Since": "not a date"}).status == 200


def test_serve_if_none_match_overrides_if_modified_since(header_server: ServerProcess, cache: Path) -> None:
    mtime = (cache / "v1/small/a/photo.jpg.webp").stat().st_mtime
    headers = {"If-None-Match": '"other"', "If-Modified-Since": http_date(mtime + 60)}
    assert get(header_server, "/small/a/photo.jpg", headers).status == 200


def test_serve_answers_412_for_failed_preconditions(header_server: ServerProcess, cache: Path) -> None:
    etag = get(header_server, "/small/a/photo.jpg", method="HEAD").headers["etag"]
    mtime = (cache / "v1/small/a/photo.jpg.webp").stat().st_mtime
    assert get(header_server, "/small/a/photo.jpg", {"If-Match": '"other"'}).status == 412
    assert get(header_server, "/small/a/photo.jpg", {"If-Match": f"W/{etag}"}).status == 412
    assert get(header_server, "/small/a/photo.jpg", {"If-Match": etag}, method="HEAD").status == 200
    assert get(header_server, "/small/a/photo.jpg", {"If-Match": "*"}, method="HEAD").status == 200
    assert get(header_server, "/small/a/photo.jpg", {"If-Unmodified-Since": http_date(mtime - 60)}).status == 412
    since_later = {"If-Unmodified-Since": http_date(mtime + 60)}
    assert get(header_server, "/small/a/photo.jpg", since_later, method="HEAD").status == 200


def test_serve_answers_single_range_with_206(server: ServerProcess, cache: Path) -> None:
    data = photo(cache)
    size = len(data)
    for spec, first, last in (("10-19", 10, 19), ("-5", size - 5, size - 1), ("100-", 100, size - 1)):
        response = get(server, "/small/a/photo.jpg", {"Range": f"bytes={spec}"})
        assert response.status == 206, spec
        assert response.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert response.body == data[first : last + 1]
    big = get(server, "/big/huge.tif", {"Range": "bytes=5000000-5000099"})
    assert big.body == (cache / "v1/big/huge.tif.jpg").read_bytes()[5000000:5000100]


def test_serve_answers_416_for_unsatisfiable_range(header_server: ServerProcess, cache: Path) -> None:
    size = len(photo(cache))
    response = get(header_server, "/small/a/photo.jpg", {"Range": f"bytes={size}-"})
    assert response.status == 416
    assert response.headers["content-range"] == f"bytes */{size}"


def test_serve_honours_if_range(server: ServerProcess, cache: Path) -> None:
    head = get(server, "/small/a/photo.jpg", method="HEAD").headers
    stale = get(server, "/small/a/photo.jpg", {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (stale.status, stale.body) == (200, photo(cache))
    assert get(server, "/small/a/photo.jpg", {"Range": "bytes=0-9", "If-Range": head["etag"]}).status == 206
    assert get(server, "/small/a/photo.jpg", {"Range": "bytes=0-9", "If-Range": head["last-modified"]}).status == 206


def test_serve_sends_whole_file_for_multiple_ranges(server: ServerProcess, cache: Path) -> None:
    response = get(server, "/small/a/photo.jpg", {"Range": "bytes=0-1,5-6"})
    assert (response.status, response.body) == (200, photo(cache))


def test_serve_ignores_range_on_head(header_server: ServerProcess) -> None:
    assert get(header_server, "/small/a/photo.jpg", {"Range": "bytes=0-1"}, method="HEAD").status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_serve_rejects_other_methods_with_405(header_server: ServerProcess, method: str) -> None:
    response = get(header_server, "/small/a/photo.jpg", method=method)
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


def test_serve_returns_404_for_unknown_preset_or_file(header_server: ServerProcess) -> None:
    assert get(header_server, "/nope/a/photo.jpg").status == 404
    assert get(header_server, "/small/a/missing.jpg").status == 404


TRAVERSALS = [
    "/small/../../secret.txt",
    "/small/../../../secret.txt",
    "/small/%2e%2e/%2e%2e/secret.txt",
    "/small/%2E%2E/%2E%2E/%2E%2E/secret.txt",
    "/small/..%2f..%2f..%2fsecret.txt",
    "/small/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    "/small/..%5c..%5c..%5csecret.txt",
    "/small/..\\..\\..\\secret.txt",
    "/small/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
    "/small/%c0%af..%c0%af..%c0%afsecret.txt",
    "/small/a%00/../../secret.txt",
    "/small/escape.jpg",
    "/small/linkdir/x.jpg",
    "/small/fifo.jpg",
    "/small/dir.jpg",
    "//etc/passwd",
    "/small//etc/passwd",
    "/small/%2fetc%2fpasswd",
    "/.thumbcli/state.jpg",
    "/small/.thumbcli/state.jpg",
    "/thumbcli-cache.json",
    "/v1/small/a/photo.jpg.webp",
    "http://evil/small/../../secret.txt",
    "/small/./a/photo.jpg",
    "/small/a/./../../../secret.txt",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_serve_rejects_traversal(header_server: ServerProcess, path: str) -> None:
    raw = exchange(header_server, f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode("latin-1"))
    assert SECRET not in raw
    assert raw.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 400 ")), raw[:80]


def test_serve_rejects_traversal_with_curl(header_server: ServerProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    base = f"http://{header_server.host}:{header_server.port}"
    for path in TRAVERSALS[:12]:
        result = subprocess.run(
            [curl, "-s", "--path-as-is", "-o", "-", "-w", "\n%{http_code}", base + path],
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert SECRET not in result.stdout
        assert result.stdout.endswith((b"404", b"400")), (path, result.stdout[-40:])


def test_serve_header_rules_with_curl(server: ServerProcess, cache: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = f"http://{server.host}:{server.port}/small/a/photo.jpg"

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([curl, "-s", *args, url], capture_output=True, timeout=10, check=True)

    assert run("-o", "-").stdout == photo(cache)
    assert run("-r", "0-9", "-o", "-").stdout == photo(cache)[:10]
    head = run("-I").stdout.decode()
    etag = re.search(r"(?im)^etag: (.*?)\r?$", head)
    assert etag is not None
    assert run("-o", "/dev/null", "-w", "%{http_code}", "-H", f"If-None-Match: {etag.group(1)}").stdout == b"304"
    assert run("-o", "/dev/null", "-w", "%{http_code}", "-H", 'If-Match: "x"').stdout == b"412"
    assert run("-o", "/dev/null", "-w", "%{http_code}", "-r", "999999-").stdout == b"416"


# --- connections -----------------------------------------------------------------------


def test_serve_keeps_http11_connection_alive(server: ServerProcess, cache: Path) -> None:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        connection.request("GET", "/small/a/photo.jpg")
        first = connection.getresponse()
        assert first.read() == photo(cache)
        sock = connection.sock
        connection.request("GET", "/small/a/photo.jpg")
        second = connection.getresponse()
        assert second.read() == photo(cache)
        assert connection.sock is sock
        assert second.getheader("Connection") is None
    finally:
        connection.close()


def test_serve_closes_http10_unless_keep_alive_asked(server: ServerProcess, cache: Path) -> None:
    raw = exchange(server, b"GET /small/a/photo.jpg HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in raw and raw.endswith(photo(cache))
    with server.connect() as sock, sock.makefile("rb") as reader:
        request = b"GET /small/a/photo.jpg HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        sock.sendall(request)
        first = read_response(reader)
        assert first.headers["connection"] == "keep-alive"
        sock.sendall(request)
        assert read_response(reader).body == photo(cache)


def test_serve_answers_pipelined_requests_in_order(server: ServerProcess, cache: Path) -> None:
    requests = [
        ("GET", "/small/a/photo.jpg", 200),
        ("HEAD", "/small/a/photo.jpg", 200),
        ("GET", "/small/missing.jpg", 404),
        ("GET", "/small/%C3%BC%20ber/stra%C3%9Fe.png", 200),
        ("GET", "/big/huge.tif", 200),
        ("GET", "/small/a/photo.jpg", 200),
    ]
    wire = b"".join(f"{m} {p} HTTP/1.1\r\nHost: test\r\n\r\n".encode() for m, p, _ in requests)
    with server.connect(timeout=10) as sock, sock.makefile("rb") as reader:
        sock.sendall(wire)
        answers = [read_response(reader, method) for method, _, _ in requests]
    assert [a.status for a in answers] == [status for _, _, status in requests]
    assert answers[0].body == answers[5].body == photo(cache)
    assert answers[3].body == b"unicode name" * 100
    assert len(answers[4].body) == BIG_BYTES


def test_serve_closes_after_max_requests_per_connection(cache: Path) -> None:
    with running_server(cache, max_requests_per_connection=3) as running:
        wire = b"GET /small/a/photo.jpg HTTP/1.1\r\nHost: test\r\n\r\n" * 5
        raw = exchange(running, wire)
    assert raw.count(b"HTTP/1.1 200 ") == 3
    assert raw.count(b"Connection: close") == 1


def test_serve_closes_idle_keep_alive_connection(cache: Path) -> None:
    with running_server(cache, idle_timeout=0.5) as running, running.connect() as sock:
        sock.sendall(b"GET /small/a/photo.jpg HTTP/1.1\r\nHost: test\r\n\r\n")
        with sock.makefile("rb") as reader:
            assert read_response(reader).status == 200
            assert reader.read() == b""  # the server closed the idle connection
        assert metrics(running)['thumbcli_timeouts_total{kind="idle"}'] >= 1


# --- hostile clients -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /small/a/photo.jpg HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /small/a/photo.jpg HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /small/a/photo.jpg HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /small/a/photo.jpg HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
        (b"GET /small/a/photo.jpg HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", 413),
        (
            b"GET /small/a/photo.jpg HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            413,
        ),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Many: header\r\n" * 2000 + b"\r\n", 431),
    ],
)
def test_serve_rejects_bad_requests_and_closes(header_server: ServerProcess, wire: bytes, status: int) -> None:
    raw = exchange(header_server, wire)
    assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:80]
    assert b"Connection: close" in raw


def test_serve_bounds_a_dribbled_giant_header(header_server: ServerProcess) -> None:
    with header_server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        chunk = b"c" * 4096
        raw = b""
        for _ in range(64):  # up to 256 KB, far past the 16 KB limit
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.02)
            try:
                raw += sock.recv(4096)
            except TimeoutError:
                continue
            if raw:
                break
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            raw += sock.recv(4096)
    assert raw.startswith(b"HTTP/1.1 431 ")


def _fuzz_requests(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    seeds = [
        b'GET /small/a/photo.jpg HTTP/1.1\r\nHost: a\r\nRange: bytes=0-5\r\nIf-None-Match: "x"\r\n\r\n',
        b"HEAD /small/../secret.txt HTTP/1.0\r\n\r\n",
        b"GET http://h/small/a/photo.jpg HTTP/1.1\r\nHost: h\r\nIf-Range: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
    ]
    tokens = [
        b"..",
        b"%2e",
        b"%2f",
        b"%00",
        b"\\",
        b"\x00",
        b"/",
        b"%c0%ae",
        b"\r\n",
        b":",
        b" ",
        b"\xff",
        b"secret.txt",
    ]
    for _ in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(data))
            action = rng.random()
            if action < 0.4:
                data[position : position + 1] = rng.choice(tokens)
            elif action < 0.7:
                data[position] = rng.randrange(256)
            elif action < 0.85:
                del data[position : position + rng.randint(1, 8)]
            else:
                data[position:position] = rng.randbytes(rng.randint(1, 16))
        yield bytes(data)


def test_serve_survives_fuzz_and_never_leaks(header_server: ServerProcess, cache: Path) -> None:
    answered = 0
    for wire in _fuzz_requests(seed=20240601, count=300):
        raw = exchange(header_server, wire, timeout=3)
        assert SECRET not in raw, wire
        assert raw == b"" or raw.startswith(b"HTTP/1.1 "), (wire, raw[:60])  # closed, or answered in HTTP
        answered += bool(raw)
    assert answered > 100  # most mutants are still requests the server answers
    assert get(header_server, "/small/a/photo.jpg").body == photo(cache)
    assert header_server.process.poll() is None


def test_serve_outlasts_slowloris(cache: Path) -> None:
    with running_server(cache, header_timeout=2) as running:
        attackers = []
        try:
            for _ in range(200):
                sock = running.connect()
                sock.sendall(b"GET /small/a/photo.jpg HTTP/1.1\r\n")
                attackers.append(sock)
            for round_number in range(3):
                for sock in attackers:
                    sock.sendall(b"X-Dribble-%d: 1\r\n" % round_number)
                # Not starved: answered within the client's own timeout, with 200 heads held open.
                assert get(running, "/small/a/photo.jpg").body == photo(cache)
            # The attackers never finish their heads, so the header deadline drops them all.
            for sock in attackers:
                sock.settimeout(10)
                assert sock.recv(4096) == b""
            assert metrics(running)['thumbcli_timeouts_total{kind="header"}'] >= 200
        finally:
            for sock in attackers:
                sock.close()


@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "fallback"])
def test_serve_drops_slow_reader_after_send_timeout(cache: Path, use_sendfile: bool) -> None:
    with running_server(cache, send_timeout=1, use_sendfile=use_sendfile) as running:
        with running.connect(timeout=10, rcvbuf=16384) as slow:
            slow.sendall(b"GET /big/huge.tif HTTP/1.1\r\nHost: test\r\n\r\n")
            assert get(running, "/small/a/photo.jpg").body == photo(cache)  # others are served meanwhile
            assert wait_until(lambda: metrics(running)['thumbcli_timeouts_total{kind="send"}'] >= 1, timeout=10)
            received = 0
            try:
                while chunk := slow.recv(1 << 20):
                    received += len(chunk)
            except ConnectionResetError:
                pass
        assert received < BIG_BYTES


# --- metrics, health, logs, manifest ---------------------------------------------------------


def test_serve_reports_metrics_and_health(header_server: ServerProcess) -> None:
    health = get(header_server, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    get(header_server, "/small/missing.jpg")
    response = get(header_server, "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = metrics(header_server)
    assert values['thumbcli_requests_total{code="404"}'] >= 1
    assert values["thumbcli_open_connections"] >= 1
    assert values["thumbcli_sent_bytes_total"] > 0
    assert 'thumbcli_bodies_total{via="sendfile"}' in values
    assert 'thumbcli_bodies_total{via="memory"}' in values


def test_serve_moves_admin_endpoints_to_admin_port(cache: Path) -> None:
    with running_server(cache, admin_port=0) as running:
        # The server picked both ports; the admin one is the listening port that is not the main one.
        admin_ports = listening_ports(running.process.pid) - {running.port}
        assert len(admin_ports) == 1
        admin_port = admin_ports.pop()
        assert get(running, "/healthz").status == 404
        assert get(running, "/metrics").status == 404
        assert get(running, "/small/a/photo.jpg").status == 200
        admin = ServerProcess(running.process, running.host, admin_port)
        assert get(admin, "/healthz").status == 200
        assert get(admin, "/small/a/photo.jpg").status == 404
        assert metrics(running, port=admin_port)['thumbcli_requests_total{code="200"}'] >= 1


def test_serve_writes_combined_access_log(cache: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    with running_server(cache, access_log=str(log_path)) as running:
        get(running, "/small/a/photo.jpg", {"Referer": "http://ref/", "User-Agent": 'tester "1"'})
        get(running, "/small/missing.jpg")
        assert wait_until(lambda: log_path.exists() and log_path.read_bytes().count(b"\n") >= 2)
    lines = log_path.read_text().splitlines()
    size = len(photo(cache))
    combined = (
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /small/a/photo\.jpg HTTP/1\.1" 200 '
    )
    assert re.fullmatch(combined + rf'{size} "http://ref/" "tester \\x221\\x22"', lines[0])
    assert '"GET /small/missing.jpg HTTP/1.1" 404 10 "-" "-"' in lines[1]


def test_serve_never_appends_to_an_access_log_planted_as_a_symlink(cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "not-a-log"
    target.write_text("precious\n")
    (tmp_path / "access.log").symlink_to(target)
    run = run_cli("serve", cache, "--port", "0", "--access-log", tmp_path / "access.log", timeout=30)
    assert run.rc == 3
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {tmp_path / 'access.log'}: cannot open access log: {tmp_path / 'access.log'} is a symlink"
    ]
    assert target.read_text() == "precious\n"


def test_serve_notices_manifest_change(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write_manifest(root, {"small": "webp"})
    put_thumb(root, "large", "a.jpg.png", b"large thumb")
    with running_server(root) as running:
        assert get(running, "/large/a.jpg").status == 404
        write_manifest(root, {"small": "webp", "large": "png"})
        assert wait_until(lambda: get(running, "/large/a.jpg").status == 200, timeout=5)
        response = get(running, "/large/a.jpg")
        assert (response.headers["content-type"], response.body) == ("image/png", b"large thumb")


# --- signals and workers ------------------------------------------------------------------


@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "fallback"])
def test_serve_drains_in_flight_response_on_sigterm(cache: Path, use_sendfile: bool) -> None:
    with running_server(cache, use_sendfile=use_sendfile, grace_period=15) as running:
        sock = running.connect(timeout=10, rcvbuf=16384)
        with sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /big/huge.tif HTTP/1.1\r\nHost: test\r\n\r\n")
            first = reader.read(4096)
            running.process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    with socket.create_connection((running.host, running.port), timeout=1):
                        return False
                except ConnectionRefusedError:
                    return True

            assert wait_until(refused, timeout=5)  # stopped accepting while the download goes on
            rest = reader.read()
        head, _, body = (first + rest).partition(b"\r\n\r\n")
        assert body == (cache / "v1/big/huge.tif.jpg").read_bytes()
        assert b"Connection: close" not in head  # it was answered before the signal
        assert running.process.wait(20) == 0


def test_serve_exits_at_once_on_second_signal(cache: Path) -> None:
    with running_server(cache, grace_period=30) as running:
        sock = running.connect(timeout=10, rcvbuf=16384)
        with sock:
            sock.sendall(b"GET /big/huge.tif HTTP/1.1\r\nHost: test\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            running.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(5) == 130


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process the subreaper of its descendants, so that it can wait for an orphaned server."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_child_subreaper = 36
    assert prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`, found in /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if parent_of(int(entry.name)) == pid:
                    children.append(int(entry.name))
    return children


def test_serve_started_with_nohup_outlives_its_shell(cache: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    # The shell lives until the server is up, as an interactive one would, then exits.
    script = (
        'nohup "$0" -m thumbcli serve "$1" --port 0 > "$2" 2>&1 & echo $!;'
        ' until grep -q serving "$2"; do sleep 0.1; done'
    )
    with adopting_orphans():
        shell = subprocess.Popen(
            ["sh", "-c", script, sys.executable, str(cache), str(log_path)],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=REPO_ROOT,
        )
        output, _ = shell.communicate(timeout=30)
        assert shell.returncode == 0
        pid = int(output)
        try:
            assert wait_until(lambda: READY_LINE.search(log_path.read_text()) is not None, timeout=20)
            found = READY_LINE.search(log_path.read_text())
            assert found is not None
            server = ServerProcess(shell, found["host"], int(found["port"]))
            assert parent_of(pid) != shell.pid  # the shell that started it is gone
            # Over more than one sweep of the loop, where a worker looks for its supervisor, it goes on serving.
            until = time.monotonic() + 2.5
            while time.monotonic() < until:
                assert get(server, "/small/a/photo.jpg").body == photo(cache)
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
    assert os.waitstatus_to_exitcode(status) == 0
    assert "gone" not in log_path.read_text()


def test_serve_with_two_workers_answers_and_drains(cache: Path) -> None:
    with running_server(cache, workers=2) as running:
        assert len(children_of(running.process.pid)) == 2
        for _ in range(20):
            assert get(running, "/small/a/photo.jpg").body == photo(cache)
        assert wait_until(lambda: metrics(running)['thumbcli_requests_total{code="200"}'] >= 20)
        assert metrics(running)["thumbcli_workers"] == 2
        assert running.stop() == 0
