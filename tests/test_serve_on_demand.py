"""`thumbcli serve --source`: thumbnails made on a miss, by a real server process, for real clients."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest
import pyvips
from imagekit import draw_photo, load, make_oriented_jpeg, make_photo, run_cli, save
from servekit import ServerProcess, get, metrics, put_thumb, read_response, running_server, wait_until, write_manifest
from test_workers import decoding, worker_processes

from thumbcli.cache import cache_path
from thumbcli.errors import SpecError
from thumbcli.serve.files import OPEN_FILE_SECONDS
from thumbcli.serve.options import ServeOptions
from thumbcli.spec import SizeBox, ThumbSpec

SECRET_MARK = "secret"
CONFIG = """
[presets.small]
size = "64"
format = "webp"

[presets.wide]
size = "200x"
format = "png"
"""


@pytest.fixture(scope="module")
def big_png(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 3200x2400 PNG: no shrink-on-load, so each thumbnail of it takes a while to make."""
    image = draw_photo(800, 600).resize(4, kernel="nearest")
    return bytes(image.write_to_buffer(".png", compression=1))


@pytest.fixture(scope="module")
def huge_png(big_png: bytes) -> bytes:
    """A 4800x3600 PNG: long enough to make that a test can watch a request wait for it."""
    image = pyvips.Image.new_from_buffer(big_png, "").resize(1.5, kernel="nearest")
    return bytes(image.write_to_buffer(".png", compression=1))


@pytest.fixture(scope="module")
def slow_png(huge_png: bytes) -> bytes:
    """9600x7200 and interlaced: libvips decodes it whole before shrinking (~1 s in a worker; a photo takes ~5 ms)."""
    image = pyvips.Image.new_from_buffer(huge_png, "").resize(2, kernel="nearest")
    return bytes(image.write_to_buffer(".png", compression=1, interlace=True))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A source folder, an empty cache beside it, a config with two presets, and a secret outside both."""
    (tmp_path / "thumbcli.toml").write_text(CONFIG)
    source = tmp_path / "src"
    make_photo(source / "a" / "photo.jpg")
    make_photo(source / "ü ber" / "straße.png", 300, 200)
    make_photo(source / ".hidden.jpg")
    (source / "notes.txt").write_text("not an image")
    (source / "garbage.jpg").write_bytes(b"this is not a JPEG at all\n" * 100)
    whole = (source / "a" / "photo.jpg").read_bytes()
    (source / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (source / "folder.jpg").mkdir()
    os.mkfifo(source / "fifo.jpg")
    make_photo(tmp_path / f"{SECRET_MARK}.jpg", seed=3)
    (tmp_path / "outside").mkdir()
    make_photo(tmp_path / "outside" / f"{SECRET_MARK}.jpg", seed=4)
    os.symlink(tmp_path / f"{SECRET_MARK}.jpg", source / f"{SECRET_MARK}-link.jpg")
    os.symlink(tmp_path / "outside", source / "linkdir")
    (tmp_path / "cache").mkdir()
    return tmp_path


@pytest.fixture(params=[True, False], ids=["sendfile", "fallback"])
def use_sendfile(request: pytest.FixtureRequest) -> bool:
    """Every test that receives a body runs twice: bodies by sendfile and by the plain-send fallback."""
    return bool(request.param)


def on_demand_server(tree: Path, **options: object) -> contextlib.AbstractContextManager[ServerProcess]:
    """A `thumbcli --config tree/thumbcli.toml serve tree/cache --source tree/src` process."""
    return running_server(tree / "cache", config=tree / "thumbcli.toml", source_root=tree / "src", **options)


Answer = tuple[int, dict[str, str], bytes]


def fetch(server: ServerProcess, path: str, method: str = "GET", timeout: float = 30) -> Answer:
    """One request with http.client: status, headers (lower-case names), body."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, body
    finally:
        connection.close()


def generations(server: ServerProcess) -> dict[str, float]:
    """The on-demand counters from /metrics, by event."""
    values = metrics(server)
    counts = {
        event: values[f'thumbcli_generations_total{{event="{event}"}}']
        for event in ("started", "joined", "refused", "failed", "timed_out")
    }
    counts["waiting"] = values["thumbcli_generation_waiting"]
    return counts


def thumb_file(tree: Path, preset: str, relpath: str) -> Path:
    return cache_path(tree / "cache", preset, relpath, "png" if preset == "wide" else "webp")


def libvips_loaded(pid: int) -> bool:
    return "libvips" in Path(f"/proc/{pid}/maps").read_text()


def resample_workers(server_pid: int) -> list[int]:
    """The resample worker processes the server started (forked by its fork server)."""
    return list(worker_processes(server_pid))


def pipelined(server: ServerProcess, paths: list[str], timeout: float = 30) -> list[Answer]:
    """Send every request in one write on one connection, then read the answers in order."""
    with server.connect(timeout) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"".join(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode() for path in paths))
        answers = []
        for _ in paths:
            response = read_response(reader)
            answers.append((response.status, response.headers, response.body))
        return answers


# --- options -----------------------------------------------------------------------


SMALL = ThumbSpec(SizeBox.parse("64"), name="small", format="webp")


@pytest.mark.parametrize(
    "bad",
    [
        {"presets": (SMALL,)},
        {"source_root": Path("/")},
        {"source_root": Path("/"), "presets": (SMALL, SMALL)},
        {"source_root": Path("/"), "presets": (SMALL,), "max_pending": 0},
        {"source_root": Path("/"), "presets": (SMALL,), "generators": 0},
        {"source_root": Path("/"), "presets": (SMALL,), "generators": 65},
    ],
)
def test_serve_options_reject_bad_on_demand_values(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        ServeOptions(cache_root=tmp_path, **bad)  # type: ignore[arg-type]


# --- making thumbnails ------------------------------------------------------------------


def test_serve_makes_missing_thumbnail_on_first_get(tree: Path, use_sendfile: bool) -> None:
    with on_demand_server(tree, use_sendfile=use_sendfile) as server:
        status, headers, body = fetch(server, "/small/a/photo.jpg")
        assert status == 200
        assert headers["content-type"] == "image/webp"
        made = thumb_file(tree, "small", "a/photo.jpg")
        assert body == made.read_bytes()
        image = pyvips.Image.new_from_buffer(body, "")
        assert (image.width, image.height) == (64, 43)
        # Another preset, another format, a name that needs escaping.
        status, headers, body = fetch(server, "/wide/%C3%BC%20ber/stra%C3%9Fe.png")
        assert (status, headers["content-type"]) == (200, "image/png")
        assert load(thumb_file(tree, "wide", "ü ber/straße.png")).width == 200
        # Made once: the next requests are served from the cache.
        etag = headers["etag"]
        assert fetch(server, "/wide/%C3%BC%20ber/stra%C3%9Fe.png")[2] == body
        assert get(server, "/wide/%C3%BC%20ber/stra%C3%9Fe.png", {"If-None-Match": etag}).status == 304
        assert generations(server)["started"] == 2
        # Thumbnails this small are kept in memory once opened, whichever way larger files are sent.
        assert metrics(server)['thumbcli_bodies_total{via="memory"}'] >= 3


def test_serve_makes_missing_thumbnail_for_head(tree: Path) -> None:
    with on_demand_server(tree) as server:
        status, headers, body = fetch(server, "/small/a/photo.jpg", method="HEAD")
        made = thumb_file(tree, "small", "a/photo.jpg")
        assert (status, body, headers["content-length"]) == (200, b"", str(made.stat().st_size))


def test_serve_remakes_stale_thumbnail(tree: Path, use_sendfile: bool) -> None:
    with on_demand_server(tree, use_sendfile=use_sendfile) as server:
        first = fetch(server, "/small/a/photo.jpg")
        made = thumb_file(tree, "small", "a/photo.jpg")
        before = made.stat()
        source = tree / "src" / "a" / "photo.jpg"
        make_photo(source, 400, 600, seed=1)  # a new picture, portrait now
        later = source.stat().st_mtime_ns + 5_000_000_000
        os.utime(source, ns=(later, later))
        # An open thumbnail is rechecked against its source once it is OPEN_FILE_SECONDS old.
        second = fetch_until_new(server, "/small/a/photo.jpg", first)
        after = made.stat()
        assert second[0] == 200
        assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
        assert second[2] == made.read_bytes()
        image = pyvips.Image.new_from_buffer(second[2], "")
        assert (image.width, image.height) == (43, 64)
        # Touching alone makes it stale too.
        os.utime(source, ns=(later + 10**9, later + 10**9))
        assert fetch_until_new(server, "/small/a/photo.jpg", second)[0] == 200
        assert made.stat().st_ino != after.st_ino
        assert generations(server)["started"] == 3


def fetch_until_new(server: ServerProcess, path: str, old: Answer) -> Answer:
    """GET `path` until its ETag differs from `old`'s; meanwhile only the old thumbnail may be served."""
    deadline = time.monotonic() + OPEN_FILE_SECONDS + 10
    while time.monotonic() < deadline:
        answer = fetch(server, path)
        if answer[1].get("etag") != old[1]["etag"]:
            return answer
        assert answer[:1] + answer[2:] == old[:1] + old[2:]
        time.sleep(0.05)
    raise AssertionError(f"{path} was not made again")


def test_serve_burst_of_identical_requests_makes_one_thumbnail(tree: Path, big_png: bytes, use_sendfile: bool) -> None:
    (tree / "src" / "big.png").write_bytes(big_png)
    with on_demand_server(tree, use_sendfile=use_sendfile) as server:
        start = threading.Barrier(20)
        answers: list[Answer] = []

        def client() -> None:
            start.wait()
            answers.append(fetch(server, "/small/big.png"))

        threads = [threading.Thread(target=client) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        made = thumb_file(tree, "small", "big.png")
        assert [status for status, _, _ in answers] == [200] * 20
        assert {body for _, _, body in answers} == {made.read_bytes()}
        counts = generations(server)
        assert counts["started"] == 1
        assert counts["waiting"] == 0
        inode = made.stat().st_ino
        assert fetch(server, "/small/big.png")[0] == 200
        assert made.stat().st_ino == inode
        assert generations(server)["started"] == 1


def test_serve_pipelined_identical_requests_share_one_generation_in_order(tree: Path, use_sendfile: bool) -> None:
    make_photo(tree / "src" / "other.jpg", seed=2)
    paths = ["/small/a/photo.jpg"] * 4 + ["/small/missing.jpg", "/small/other.jpg", "/small/a/photo.jpg"]
    with on_demand_server(tree, use_sendfile=use_sendfile) as server:
        answers = pipelined(server, paths)
        assert [status for status, _, _ in answers] == [200, 200, 200, 200, 404, 200, 200]
        photo = thumb_file(tree, "small", "a/photo.jpg").read_bytes()
        other = thumb_file(tree, "small", "other.jpg").read_bytes()
        assert [body for _, _, body in answers] == [photo] * 4 + [b"not found\n", other, photo]
        counts = generations(server)
        # One recv holds them all: the repeats join the generation the first started (the last
        # may find it finished already, as libvips was loaded by then).
        assert counts["started"] == 2
        assert counts["joined"] >= 3


def test_serve_refuses_generations_past_the_bound_with_503(tree: Path, big_png: bytes, use_sendfile: bool) -> None:
    for number in range(10):
        (tree / "src" / f"big{number}.png").write_bytes(big_png)
    with on_demand_server(tree, use_sendfile=use_sendfile, max_pending=1, generators=1) as server:
        # Ten on one connection, read in one go: the first is made, the other nine refused at once.
        started = time.monotonic()
        answers = pipelined(server, [f"/small/big{number}.png" for number in range(10)])
        assert [status for status, _, _ in answers] == [200] + [503] * 9
        for _, headers, body in answers[1:]:
            assert (headers["retry-after"], headers["content-length"], body) == ("1", "0", b"")
        # The connection stayed usable, and the refused thumbnails were never made.
        assert not thumb_file(tree, "small", "big1.png").exists()
        assert generations(server)["refused"] == 9
        # A flood from ten clients at once: every request is answered quickly, made or refused.
        start = threading.Barrier(10)
        answers = []

        def client(number: int) -> None:
            start.wait()
            answers.append(fetch(server, f"/small/big{number}.png", timeout=30))

        threads = [threading.Thread(target=client, args=(number,)) for number in range(1, 10)]
        threads.append(threading.Thread(target=client, args=(1,)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        statuses = sorted(status for status, _, _ in answers)
        assert len(statuses) == 10
        assert set(statuses) <= {200, 503}
        assert statuses.count(503) >= 1
        assert all(headers["retry-after"] == "1" for status, headers, _ in answers if status == 503)
        for status, _, body in answers:
            if status == 200:
                assert pyvips.Image.new_from_buffer(body, "").width == 64
        counts = generations(server)
        assert counts["refused"] == 9 + statuses.count(503)
        assert counts["waiting"] == 0
        assert time.monotonic() - started < 30  # generous: no pile-up


def test_serve_answers_cached_thumbnails_and_unknown_names_while_the_generation_queue_is_full(
    tmp_path: Path, slow_png: bytes
) -> None:
    config = tmp_path / "thumbcli.toml"
    config.write_text(CONFIG)
    source, cache = tmp_path / "src", tmp_path / "cache"
    for number in range(8):
        make_photo(source / "cached" / f"{number}.jpg", seed=number)
    batch = run_cli("--config", config, "generate", source, "--cache", cache)
    assert batch.rc == 0, batch.stderr
    cached = {number: cache_path(cache, "small", f"cached/{number}.jpg", "webp").read_bytes() for number in range(8)}
    (source / "slow.png").write_bytes(slow_png)
    with running_server(cache, config=config, source_root=source, max_pending=1, generators=1) as server:
        slow: list[Answer] = []
        making = threading.Thread(target=lambda: slow.append(fetch(server, "/small/slow.png", timeout=120)))
        making.start()
        # The one place in the generation queue is taken: the slow source is being decoded.
        assert wait_until(lambda: any(decoding(pid) for pid in resample_workers(server.process.pid)), timeout=30)
        # Hundreds of misses of names with no source, and among them requests for thumbnails a
        # batch run made (the server never opened them: each is checked against its source).
        paths = [
            f"/small/cached/{number % 8}.jpg" if number % 8 == 0 else f"/small/nope{number}.jpg"
            for number in range(360)
        ]
        clients = []
        try:
            for path in paths:
                sock = server.connect(timeout=10)
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
                clients.append(sock)
            answers = []
            for sock in clients:
                with sock.makefile("rb") as reader:
                    answers.append(read_response(reader))
        finally:
            for sock in clients:
                sock.close()
        for path, answer in zip(paths, answers, strict=True):
            if path.startswith("/small/cached/"):
                assert (answer.status, answer.body) == (200, cached[int(path[-5])]), path
            else:
                assert answer.status == 404, path
        making.join(120)
        assert [status for status, _, _ in slow] == [200]
        counts = generations(server)
        assert (counts["started"], counts["refused"], counts["waiting"]) == (1, 0, 0)


def test_serve_bounds_the_wait_for_a_slow_generation(tree: Path, huge_png: bytes) -> None:
    (tree / "src" / "huge.png").write_bytes(huge_png)
    with on_demand_server(tree, send_timeout=0.05) as server:
        status, headers, body = fetch(server, "/small/huge.png")
        assert (status, headers["retry-after"], body) == (503, "1", b"")
        assert generations(server)["timed_out"] == 1
        # The generation went on: a retry finds the thumbnail (or joins it once more).
        made = thumb_file(tree, "small", "huge.png")
        assert wait_until(made.exists, timeout=30)
        assert wait_until(lambda: fetch(server, "/small/huge.png")[0] == 200, timeout=30)


def test_serve_forgets_a_client_that_leaves_while_waiting(tree: Path, huge_png: bytes) -> None:
    (tree / "src" / "huge.png").write_bytes(huge_png)
    with on_demand_server(tree) as server:
        sock = server.connect(10)
        sock.sendall(b"GET /small/huge.png HTTP/1.1\r\nHost: test\r\n\r\n")
        assert wait_until(lambda: generations(server)["waiting"] == 1, timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: the server notices at once, even while the request is parked
        assert wait_until(lambda: generations(server)["waiting"] == 0, timeout=10)
        # The generation goes on for the next client.
        assert wait_until(thumb_file(tree, "small", "huge.png").exists, timeout=30)
        assert fetch(server, "/small/huge.png")[0] == 200
        assert generations(server)["started"] == 1
        assert metrics(server)["thumbcli_open_connections"] == 1  # the metrics request's own


def test_serve_stays_responsive_while_a_batch_run_holds_the_state_lock(tree: Path, use_sendfile: bool) -> None:
    cache = tree / "cache"
    write_manifest(cache, {"big": "jpeg"})
    put_thumb(cache, "big", "a/photo.jpg.jpg", b"made by a batch run")
    make_photo(tree / "src" / "other.jpg", seed=2)
    make_photo(tree / "src" / "third.jpg", seed=3)
    with on_demand_server(tree, use_sendfile=use_sendfile, presets=["small"]) as server:
        assert fetch(server, "/small/a/photo.jpg")[0] == 200  # the state store now has a record to write
        # A concurrent `generate --cache` holds the state store's write lock.
        batch = sqlite3.connect(cache / ".thumbcli" / "state.sqlite", isolation_level=None)
        batch.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                sqlite3.connect(cache / ".thumbcli" / "state.sqlite", timeout=0).execute("BEGIN IMMEDIATE")
            # Thumbnails that must be checked against the state store wait for it, on the generator threads...
            waiting = [server.connect(60), server.connect(60)]
            waiting[0].sendall(b"GET /small/other.jpg HTTP/1.1\r\nHost: test\r\n\r\n")
            wait_until(thumb_file(tree, "small", "other.jpg").exists, timeout=3)
            waiting[1].sendall(b"GET /small/third.jpg HTTP/1.1\r\nHost: test\r\n\r\n")
            assert wait_until(lambda: generations(server)["started"] == 3, timeout=10)
            # ...while the loop goes on serving everything else at once.
            for path, expected in (("/healthz", b"ok\n"), ("/big/a/photo.jpg", b"made by a batch run")):
                answer = get(server, path)
                assert (answer.status, answer.body) == (200, expected)
        finally:
            batch.execute("ROLLBACK")
            batch.close()
        for sock, name in zip(waiting, ("other.jpg", "third.jpg"), strict=True):
            with sock, sock.makefile("rb") as reader:
                response = read_response(reader)
            assert (response.status, response.body) == (200, thumb_file(tree, "small", name).read_bytes())
        assert generations(server)["started"] == 3


# --- what is never made ---------------------------------------------------------------------


def test_serve_missing_source_is_404_without_loading_libvips(tree: Path) -> None:
    with on_demand_server(tree) as server:
        for path in (
            "/small/nope.jpg",
            "/small/a/nope.jpg",
            "/small/notes.txt",
            "/small/a/photo.jpg/x.jpg",
            "/small/.hidden.jpg",
            "/small/folder.jpg",
        ):
            started = time.monotonic()
            assert get(server, path).status == 404, path
            assert time.monotonic() - started < 2
        assert get(server, "/small/fifo.jpg").status == 404  # never opened: a FIFO would block the reader
        assert not libvips_loaded(server.process.pid)
        assert generations(server)["started"] == 0
        assert not (tree / "cache" / "v1").exists()
        assert get(server, "/small/a/photo.jpg").status == 200
        # Made in a resample worker process: the server itself still never loads libvips.
        assert not libvips_loaded(server.process.pid)
        workers = resample_workers(server.process.pid)
        assert len(workers) == 1
        assert libvips_loaded(workers[0])  # the probe does see it where it is loaded


@pytest.mark.parametrize(("name", "strict"), [("garbage.jpg", False), ("truncated.jpg", True)])
def test_serve_corrupt_source_is_404_and_server_stays_up(tree: Path, name: str, strict: bool) -> None:
    with on_demand_server(tree, strict=strict) as server:
        status, _, body = fetch(server, f"/small/{name}")
        assert (status, body) == (404, b"not found\n")
        assert str(tree) not in body.decode()
        assert generations(server)["failed"] == 1
        # Asked again, the unchanged source is not decoded again: a plain 404 at once.
        assert fetch(server, f"/small/{name}")[0] == 404
        assert generations(server)["failed"] == 1
        assert fetch(server, "/small/a/photo.jpg")[0] == 200
        assert server.process.poll() is None
        assert not thumb_file(tree, "small", name).exists()
        # Once the source is mended, it is tried again.
        source = tree / "src" / name
        source.write_bytes((tree / "src" / "a" / "photo.jpg").read_bytes())
        os.utime(source, ns=(source.stat().st_mtime_ns + 10**9,) * 2)
        assert fetch(server, f"/small/{name}")[0] == 200
    assert not any("Traceback" in line for line in server.stderr_lines), "".join(server.stderr_lines)


def test_serve_truncated_source_gets_a_thumbnail_of_what_decodes_as_generate_makes_it(tree: Path) -> None:
    with on_demand_server(tree) as server:
        status, _, body = fetch(server, "/small/truncated.jpg")
        assert status == 200
        assert pyvips.Image.new_from_buffer(body, "").width == 64
        assert generations(server)["failed"] == 0
    assert any("of what decodes" in line and "truncated.jpg" in line for line in server.stderr_lines)


def test_serve_survives_a_decoder_killed_mid_decode(tree: Path, slow_png: bytes) -> None:
    (tree / "src" / "huge.png").write_bytes(slow_png)
    with on_demand_server(tree, generators=1) as server:
        answers: list[Answer] = []
        asking = threading.Thread(target=lambda: answers.append(fetch(server, "/small/huge.png")))
        asking.start()
        # The decode of the huge PNG takes a while: kill its worker while it works on it.
        assert wait_until(lambda: generations(server)["waiting"] == 1, timeout=10)
        assert wait_until(lambda: len(resample_workers(server.process.pid)) == 1, timeout=10)
        (killed,) = resample_workers(server.process.pid)
        # Started, and has the source: it is decoding it now.
        assert wait_until(lambda: decoding(killed), timeout=30)
        os.kill(killed, signal.SIGKILL)
        asking.join(30)
        assert [status for status, _, _ in answers] == [404]
        assert server.process.poll() is None
        assert generations(server)["failed"] == 1
        # The next request gets a new worker, and its thumbnail.
        status, _, body = fetch(server, "/small/a/photo.jpg")
        assert (status, pyvips.Image.new_from_buffer(body, "").width) == (200, 64)
        assert resample_workers(server.process.pid) not in ([], [killed])
        # The source is a known failure now: not decoded again until it changes.
        assert fetch(server, "/small/huge.png")[0] == 404
        assert generations(server)["failed"] == 1
    assert any("decoder crashed (signal 9)" in line for line in server.stderr_lines), "".join(server.stderr_lines)
    assert not any("Traceback" in line for line in server.stderr_lines), "".join(server.stderr_lines)


def test_serve_survives_a_decode_past_the_time_limit(tree: Path, slow_png: bytes) -> None:
    (tree / "src" / "huge.png").write_bytes(slow_png)
    with on_demand_server(tree, generators=1, max_decode_time=0.2) as server:
        started = time.monotonic()
        assert fetch(server, "/small/huge.png")[0] == 404, "".join(server.stderr_lines)
        assert time.monotonic() - started < 20
        assert server.process.poll() is None
        assert generations(server)["failed"] == 1
        status, _, body = fetch(server, "/small/a/photo.jpg")
        assert (status, pyvips.Image.new_from_buffer(body, "").width) == (200, 64)
    assert any("timed out after 0.2 s" in line for line in server.stderr_lines), "".join(server.stderr_lines)


def test_serve_cache_write_failure_is_500_not_404(tree: Path) -> None:
    # A file where the thumbnail's folder must go: the source is fine, writing the thumbnail fails.
    blocker = thumb_file(tree, "small", "a/photo.jpg").parent
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"in the way")
    with on_demand_server(tree) as server:
        status, _, body = fetch(server, "/small/a/photo.jpg")
        assert (status, body) == (500, b"internal server error\n")
        assert generations(server)["failed"] == 1
        blocker.unlink()
        assert fetch(server, "/small/a/photo.jpg")[0] == 200
    assert not any("Traceback" in line for line in server.stderr_lines), "".join(server.stderr_lines)


ESCAPES = [
    f"/small/../{SECRET_MARK}.jpg",
    f"/small/..%2f{SECRET_MARK}.jpg",
    f"/small/..%2f..%2f{SECRET_MARK}.jpg",
    f"/small/%2e%2e/{SECRET_MARK}.jpg",
    f"/small/%2e%2e%2f{SECRET_MARK}.jpg",
    f"/small/..%5c{SECRET_MARK}.jpg",
    f"/small/%c0%ae%c0%ae/{SECRET_MARK}.jpg",
    f"/small/%2f{SECRET_MARK}.jpg",
    f"/small//{SECRET_MARK}.jpg",
    f"/small/{SECRET_MARK}-link.jpg",
    f"/small/linkdir/{SECRET_MARK}.jpg",
    f"/small/a/../../{SECRET_MARK}.jpg",
    f"/small/a%00/../../{SECRET_MARK}.jpg",
    f"http://evil/small/../{SECRET_MARK}.jpg",
]


def test_serve_on_demand_never_reads_outside_the_source(tree: Path) -> None:
    with on_demand_server(tree) as server:
        for path in ESCAPES:
            with server.connect(10) as sock, sock.makefile("rb") as reader:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode("latin-1"))
                assert read_response(reader).status in (400, 404), path
        assert generations(server)["started"] == 0
        assert not libvips_loaded(server.process.pid)
    assert not [path for path in (tree / "cache").rglob("*") if SECRET_MARK in path.name]


def test_serve_manifest_only_presets_are_served_as_before(tree: Path) -> None:
    cache = tree / "cache"
    write_manifest(cache, {"big": "jpeg"})
    put_thumb(cache, "big", "a/photo.jpg.jpg", b"made by a batch run")
    with on_demand_server(tree, presets=["small"]) as server:
        assert fetch(server, "/big/a/photo.jpg")[2] == b"made by a batch run"
        assert get(server, "/big/other.jpg").status == 404
        assert get(server, "/wide/a/photo.jpg").status == 404  # configured, but not asked to be made
        assert fetch(server, "/small/a/photo.jpg")[0] == 200
        assert generations(server)["started"] == 1


# --- workers and signals ------------------------------------------------------------------


def test_serve_drains_parked_requests_on_sigterm(tree: Path, huge_png: bytes, use_sendfile: bool) -> None:
    (tree / "src" / "big.png").write_bytes(huge_png)
    with on_demand_server(tree, use_sendfile=use_sendfile, grace_period=30) as server:
        with server.connect(30) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /small/big.png HTTP/1.1\r\nHost: test\r\n\r\n")
            # Parked: the loop goes on answering others meanwhile.
            assert wait_until(lambda: generations(server)["waiting"] == 1, timeout=10)
            assert get(server, "/healthz").status == 200
            server.process.send_signal(signal.SIGTERM)
            response = read_response(reader)
        assert response.status == 200
        assert response.body == thumb_file(tree, "small", "big.png").read_bytes()
        assert server.process.wait(30) == 0


def test_serve_makes_thumbnails_in_each_worker(tree: Path, use_sendfile: bool) -> None:
    for number in range(6):
        shutil.copy(tree / "src" / "a" / "photo.jpg", tree / "src" / f"p{number}.jpg")
    with on_demand_server(tree, use_sendfile=use_sendfile, workers=2) as server:
        for number in range(6):
            status, _, body = fetch(server, f"/small/p{number}.jpg")
            assert (status, body) == (200, thumb_file(tree, "small", f"p{number}.jpg").read_bytes())
        assert generations(server)["started"] == 6
        assert server.stop() == 0


def test_serve_source_must_be_a_directory(tree: Path) -> None:
    source = tree / "src" / "notes.txt"
    server = running_server(tree / "cache", config=tree / "thumbcli.toml", source_root=source)
    with pytest.raises(RuntimeError, match="did not start"), server:
        pass


# --- one code path: serve --source makes what generate --cache makes ------------------------------------


SAME_SIZES = ("64", "150", "400x300")


def test_serve_makes_the_same_bytes_as_generate_for_every_fit_and_format(tmp_path: Path) -> None:
    # Several sizes, whose shrink-on-load factors alone would differ: generate makes them from one
    # decode, serve --source one at a time, generate --preset some of them; the bytes are the same.
    presets = [
        (f"{fit}-{fmt}-{n}", size, fit, fmt)
        for fit in ("inside", "cover", "smart")
        for fmt in ("jpeg", "webp", "avif", "png")
        for n, size in enumerate(SAME_SIZES)
    ]
    config = tmp_path / "thumbcli.toml"
    config.write_text(
        "".join(
            f'[presets."{name}"]\nsize = "{size}"\nfit = "{fit}"\nformat = "{fmt}"\n\n'
            for name, size, fit, fmt in presets
        )
    )
    src = tmp_path / "src"
    make_photo(src / "camera.jpg", 1600, 1200, seed=5)  # JPEG: decodes at 1/8, 1/4 and 1/2
    make_photo(src / "drawing.png", 900, 700, seed=6)
    # A phone's: turned by EXIF, in Display P3 (decoded by libjpeg-turbo, converted to sRGB).
    phone = make_oriented_jpeg(tmp_path / "upright.jpg", 6, 1600, 1200)
    in_p3 = pyvips.Image.new_from_file(str(phone)).icc_transform("p3", input_profile="srgb")
    save(in_p3, src / "phone.jpg", Q=90, keep="icc,exif")
    sources = ("camera.jpg", "drawing.png", "phone.jpg")
    batch = run_cli("--config", config, "generate", src, "--cache", tmp_path / "made", "--json")
    assert (batch.rc, batch.summary["made"], batch.summary["thumbnails"]) == (0, 3, 3 * len(presets)), batch.stderr
    some = ("inside-jpeg-0", "cover-webp-1")  # not the largest size: decoded for it all the same
    partial = run_cli(
        "--config", config, "generate", src, "--cache", tmp_path / "some", *(f"--preset={name}" for name in some)
    )
    assert partial.rc == 0, partial.stderr
    for name in some:
        fmt = name.split("-")[1]
        for relpath in sources:
            made = cache_path(tmp_path / "made", name, relpath, fmt).read_bytes()
            assert cache_path(tmp_path / "some", name, relpath, fmt).read_bytes() == made, (name, relpath)
    compared = 0
    with running_server(tmp_path / "served", config=config, source_root=src, generators=2) as server:
        for name, _size, _fit, fmt in presets:
            for relpath in sources:
                status, _, body = fetch(server, f"/{name}/{relpath}")
                assert status == 200, (name, relpath)
                made = cache_path(tmp_path / "made", name, relpath, fmt).read_bytes()
                assert body == made, (name, relpath)
                compared += 1
    assert compared == 3 * len(presets)


def test_serve_answers_a_cached_dot_file_the_same_with_and_without_source(tree: Path) -> None:
    # `generate --hidden` made the thumbnail of src/.hidden.jpg; both servers of that cache must serve it.
    made = run_cli("--config", tree / "thumbcli.toml", "generate", tree / "src", "--cache", tree / "cache", "--hidden")
    assert made.rc == 1, made.stderr  # the corrupt and unreadable files of the tree fail
    cached = thumb_file(tree, "small", ".hidden.jpg")
    assert cached.is_file()
    with running_server(tree / "cache") as plain:
        status, _, body = fetch(plain, "/small/.hidden.jpg")
    assert (status, body) == (200, cached.read_bytes())
    with on_demand_server(tree) as on_demand:
        status, _, body = fetch(on_demand, "/small/.hidden.jpg")
        assert (status, body) == (200, cached.read_bytes())
        # A hidden source with no thumbnail is still not made on a miss: generate skips it unless --hidden.
        make_photo(tree / "src" / ".other.jpg")
        assert fetch(on_demand, "/small/.other.jpg")[0] == 404
        assert not thumb_file(tree, "small", ".other.jpg").exists()


def test_serve_writes_nothing_through_a_symlinked_cache_folder(tree: Path) -> None:
    elsewhere = tree / "elsewhere"
    elsewhere.mkdir()
    make_photo(tree / "src" / "evil" / "a.jpg")
    (tree / "cache" / "v1" / "small").mkdir(parents=True)
    (tree / "cache" / "v1" / "small" / "evil").symlink_to(elsewhere)
    with on_demand_server(tree) as server:
        status, _, body = fetch(server, "/small/evil/a.jpg")
        assert status in (404, 500)
        assert str(tree) not in body.decode()
        # The request did reach the source and was refused at the write.
        assert fetch(server, "/small/a/photo.jpg")[0] == 200
    assert list(elsewhere.iterdir()) == []
    assert any(f"{tree}/cache/v1/small/evil is a symlink" in line for line in server.stderr_lines), "".join(
        server.stderr_lines
    )
    assert not any("Traceback" in line for line in server.stderr_lines), "".join(server.stderr_lines)
