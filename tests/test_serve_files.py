"""`thumbcli serve`'s open files: small thumbnails kept in memory, re-checked after OPEN_FILE_SECONDS."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from servekit import (
    RECHECKED_WITHIN,
    ServerProcess,
    get,
    metrics,
    put_thumb,
    read_response,
    running_server,
    wait_until,
    write_manifest,
)

from thumbcli.serve.files import MEMORY_BODY_BYTES, OPEN_FILE_SECONDS
from thumbcli.serve.protocol import SENDFILE_CHUNK_BYTES

SECRET = b"TOP-SECRET-5b0d-never-served"


@pytest.fixture(params=[True, False], ids=["sendfile", "fallback"])
def use_sendfile(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _bodies(server: ServerProcess) -> dict[str, float]:
    values = metrics(server)
    return {via: values[f'thumbcli_bodies_total{{via="{via}"}}'] for via in ("memory", "sendfile", "fallback")}


def _replace(path: Path, data: bytes) -> None:
    """Publish new bytes at `path` the way the cache writers do: a new file renamed over it."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _served_now(server: ServerProcess, path: Path, url: str) -> bool:
    """Whether `url` answers with exactly the bytes, length and entity tag `path` has now."""
    response = get(server, url)
    st = path.stat()
    return (
        response.status == 200
        and response.body == path.read_bytes()
        and response.headers["content-length"] == str(st.st_size)
        and response.headers["etag"] == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    )


def test_serve_sends_each_new_version_of_a_small_thumbnail(tmp_path: Path, use_sendfile: bool) -> None:
    rng = random.Random(3)
    write_manifest(tmp_path, {"small": "webp"})
    thumb = put_thumb(tmp_path, "small", "a.jpg.webp", rng.randbytes(20000))
    with running_server(tmp_path, use_sendfile=use_sendfile) as server:
        assert _served_now(server, thumb, "/small/a.jpg")
        # Replaced by a new file (a new inode).
        _replace(thumb, rng.randbytes(25000))
        assert wait_until(lambda: _served_now(server, thumb, "/small/a.jpg"), timeout=RECHECKED_WITHIN)
        # Rewritten in place: the same inode, the same size, other bytes and another mtime.
        time.sleep(0.01)
        with open(thumb, "r+b") as handle:
            handle.write(rng.randbytes(25000))
        assert wait_until(lambda: _served_now(server, thumb, "/small/a.jpg"), timeout=RECHECKED_WITHIN)
        # Unchanged past OPEN_FILE_SECONDS: still served, the same bytes.
        time.sleep(OPEN_FILE_SECONDS * 1.5)
        assert _served_now(server, thumb, "/small/a.jpg")
        thumb.unlink()
        assert wait_until(lambda: get(server, "/small/a.jpg").status == 404, timeout=RECHECKED_WITHIN)
        bodies = _bodies(server)
    assert bodies["memory"] >= 4
    assert bodies["sendfile"] == bodies["fallback"] == 0


def test_serve_never_follows_a_kept_thumbnail_replaced_by_a_symlink_out_of_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_manifest(cache, {"small": "webp"})
    (tmp_path / "secret.txt").write_bytes(SECRET)
    thumb = put_thumb(cache, "small", "a.jpg.webp", b"inside " * 100)
    with running_server(cache) as server:
        assert get(server, "/small/a.jpg").body == b"inside " * 100
        link = thumb.with_name("link.tmp")
        os.symlink(tmp_path / "secret.txt", link)
        os.replace(link, thumb)
        answers = []
        deadline = time.monotonic() + RECHECKED_WITHIN
        while time.monotonic() < deadline and (not answers or answers[-1] != (404, b"not found\n")):
            response = get(server, "/small/a.jpg")
            answers.append((response.status, response.body))
    assert answers[-1] == (404, b"not found\n")
    assert all(answer in ((200, b"inside " * 100), (404, b"not found\n")) for answer in answers)


def test_serve_sends_whole_bodies_to_a_slow_pipelining_reader(tmp_path: Path, use_sendfile: bool) -> None:
    """Bodies kept in memory that the socket takes in parts, queued behind others, and ranges of them.

    Forty rounds of these make megabytes more than a loopback socket buffers: some answer is cut
    short by a full socket, and the ones after it wait in the connection's queue.
    """
    rng = random.Random(5)
    write_manifest(tmp_path, {"small": "webp"})
    kept = rng.randbytes(MEMORY_BODY_BYTES)  # the largest body kept in memory
    sent = rng.randbytes(MEMORY_BODY_BYTES + 1)  # the smallest sent from its file
    put_thumb(tmp_path, "small", "kept.jpg.webp", kept)
    put_thumb(tmp_path, "small", "sent.jpg.webp", sent)
    requests = [
        ("GET", "/small/kept.jpg", "", 200, kept),
        ("GET", "/small/sent.jpg", "", 200, sent),
        ("GET", "/small/kept.jpg", "Range: bytes=1000-50999\r\n", 206, kept[1000:51000]),
        ("HEAD", "/small/kept.jpg", "", 200, b""),
        ("GET", "/small/kept.jpg", "Range: bytes=-7\r\n", 206, kept[-7:]),
        ("GET", "/small/sent.jpg", "Range: bytes=5-9\r\n", 206, sent[5:10]),
    ] * 40
    wire = b"".join(f"{m} {p} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode() for m, p, extra, _, _ in requests)
    with running_server(tmp_path, use_sendfile=use_sendfile) as server:
        before = _bodies(server)
        with server.connect(timeout=10, rcvbuf=4096) as sock, sock.makefile("rb") as reader:
            sock.sendall(wire)
            time.sleep(0.5)  # let the server fill the socket and queue the rest
            answers = [read_response(reader, method) for method, _, _, _, _ in requests]
        after = _bodies(server)
    assert [(a.status, a.body) for a in answers] == [(status, body) for _, _, _, status, body in requests]
    grew = {via: after[via] - before[via] for via in after}
    via = "sendfile" if use_sendfile else "fallback"
    assert grew == {"memory": 120, via: 80, ({"sendfile", "fallback"} - {via}).pop(): 0}


def test_serve_sends_files_larger_than_a_sendfile_turn_whole_to_readers_side_by_side(tmp_path: Path) -> None:
    """A file of several sendfile turns (SENDFILE_CHUNK_BYTES), pipelined with small answers, to two readers at once.

    Each turn ends with the loop going to the other connection and coming back when epoll says
    this one is writable: every byte arrives, in order, and the small answers behind it too.
    """
    rng = random.Random(11)
    write_manifest(tmp_path, {"small": "webp"})
    big = rng.randbytes(2 * SENDFILE_CHUNK_BYTES + 3 * MEMORY_BODY_BYTES + 7)
    kept = rng.randbytes(MEMORY_BODY_BYTES)
    put_thumb(tmp_path, "small", "big.jpg.webp", big)
    put_thumb(tmp_path, "small", "kept.jpg.webp", kept)
    edge = SENDFILE_CHUNK_BYTES
    requests = [
        ("GET", "/small/big.jpg", "", 200, big),
        ("GET", "/small/kept.jpg", "", 200, kept),
        ("GET", "/small/big.jpg", f"Range: bytes={edge - 5}-{2 * edge + 4}\r\n", 206, big[edge - 5 : 2 * edge + 5]),
        ("HEAD", "/small/big.jpg", "", 200, b""),
        ("GET", "/small/big.jpg", "", 200, big),
    ]
    wire = b"".join(f"{m} {p} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode() for m, p, extra, _, _ in requests)
    expected = [(status, body) for _, _, _, status, body in requests]
    answers: dict[int, list[tuple[int, bytes]]] = {}

    def read_all(server: ServerProcess, index: int) -> None:
        with server.connect(timeout=20, rcvbuf=65536 if index else 4096) as sock, sock.makefile("rb") as reader:
            sock.sendall(wire)
            answers[index] = [
                (answer.status, answer.body) for answer in (read_response(reader, m) for m, *_ in requests)
            ]

    with running_server(tmp_path) as server:
        before = _bodies(server)
        readers = [threading.Thread(target=read_all, args=(server, index)) for index in range(2)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
        after = _bodies(server)
    assert answers == {0: expected, 1: expected}
    assert after["sendfile"] - before["sendfile"] == 6  # three bodies of the big file on each connection
