"""Several `thumbcli serve --source` processes over one shared cache (as behind a load balancer)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import pyvips
from imagekit import draw_photo
from servekit import ServerProcess, fetch, metrics, running_server

from thumbcli.cache import cache_path
from thumbcli.fsutil import TEMP_PREFIX

CONFIG = """
[presets.small]
size = "64"
format = "webp"
"""
IMAGES = 12
REQUESTS_PER_SERVER = 4


def fetch_when_all_ready(
    server: ServerProcess, path: str, start: threading.Barrier, answers: list[tuple[int, bytes]]
) -> None:
    """Wait for the other clients, then GET `path` and keep the answer."""
    start.wait()
    answers.append(fetch(server, path))


@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "fallback"])
def test_two_servers_making_one_missing_thumbnail_at_once_serve_whole_images_and_keep_one_file(
    tmp_path: Path, use_sendfile: bool
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    # Big enough that making one takes a while, so the two servers' generations overlap.
    image = draw_photo(1600, 1200)
    for index in range(IMAGES):
        image.pngsave(str(source / f"photo-{index}.png"), compression=1)
    (tmp_path / "thumbcli.toml").write_text(CONFIG)
    cache = tmp_path / "cache"
    options = {"config": tmp_path / "thumbcli.toml", "source_root": source, "use_sendfile": use_sendfile}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running_server(cache, **options)) for _ in range(2)]  # type: ignore[arg-type]
        for index in range(IMAGES):
            url = f"/small/photo-{index}.png"
            start = threading.Barrier(2 * REQUESTS_PER_SERVER)
            answers: list[tuple[int, bytes]] = []
            threads = [
                threading.Thread(target=fetch_when_all_ready, args=(server, url, start, answers))
                for server in servers
                for _ in range(REQUESTS_PER_SERVER)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            made = cache_path(cache, "small", f"photo-{index}.png", "webp")
            assert [status for status, _ in answers] == [200] * 2 * REQUESTS_PER_SERVER
            assert {body for _, body in answers} == {made.read_bytes()}
            thumbnail = pyvips.Image.new_from_buffer(made.read_bytes(), "", fail_on="truncated")
            thumbnail.avg()  # every pixel decodes
            assert (thumbnail.width, thumbnail.height) == (64, 48)
        started = [metrics(server)['thumbcli_generations_total{event="started"}'] for server in servers]
    # Both servers made thumbnails: the same ones, at the same time, under the same names.
    assert min(started) >= 1
    assert sum(started) > IMAGES
    folder = cache_path(cache, "small", "photo-0.png", "webp").parent
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"photo-{i}.png.webp" for i in range(IMAGES))
    assert not [path for path in cache.rglob("*") if path.name.startswith(TEMP_PREFIX)]
