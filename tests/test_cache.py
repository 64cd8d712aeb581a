"""The served cache layout: URL <-> file mapping with hostile names, and a real generate --cache."""

from __future__ import annotations

import http.client
import os
import random
from pathlib import Path

import pytest
import pyvips
from imagekit import make_photo, run_cli
from servekit import NGINX, readme_nginx

from thumbcli.cache import (
    MANIFEST_NAME,
    cache_path,
    is_within,
    load_manifest,
    manifest_entry,
    read_manifest,
    resolve_url,
    split_url_path,
    url_path_for,
    write_manifest,
)
from thumbcli.errors import CannotRunError
from thumbcli.spec import SizeBox, ThumbSpec

HOSTILE_NAMES = [
    "plain.jpg",
    "with space.jpg",
    "ünïcødé-写真.jpg",
    "100%.jpg",
    "what?.jpg",
    "#hash.jpg",
    "brackets[shrink=2].jpg",
    "semi;colon&amp=.jpg",
    "plus+sign.jpg",
    os.fsdecode(b"caf\xe9-latin1.jpg"),
    "deep/er/path/x.jpg",
    ".hidden-dir/x.jpg",
]

TRAVERSALS = [
    "/small/../../etc/passwd",
    "/small/%2e%2e/%2e%2e/etc/passwd",
    "/small/..%2f..%2fetc%2fpasswd",
    "/small/a%2f..%2f..%2f..%2fetc%2fpasswd",
    "/small/..\\..\\etc\\passwd",
    "/small/a%5c..%5c..%5cetc",
    "/small/x%00.jpg",
    "/small//etc/passwd",
    "//etc/passwd",
    "/../small/x.jpg",
    "/%2e%2e/small/x.jpg",
    "/./small/x.jpg",
    "/.thumbcli/state.sqlite",
    "/small",
    "/",
    "",
    "small/x.jpg",
]


def make_named_photo(path: Path, seed: int) -> None:
    """A photo at a path libvips could not be handed by name (non-UTF-8 bytes, brackets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = make_photo(path.parent / f"drawn-{seed}.jpg", 300, 200, seed=seed)
    os.rename(drawn, path)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_url_round_trips_hostile_source_names(name: str) -> None:
    url = url_path_for("small", name)
    assert url.isascii() and " " not in url and "?" not in url and "#" not in url
    assert split_url_path(url) == ("small", name)
    assert split_url_path(url.encode("ascii")) == ("small", name)


@pytest.mark.parametrize("url", TRAVERSALS)
def test_traversal_urls_map_to_nothing(url: str) -> None:
    assert resolve_url(Path("/srv/cache"), url, {"small": "jpeg"}) is None


def test_overlong_utf8_dot_stays_a_literal_name_inside_the_cache(tmp_path: Path) -> None:
    thumb = resolve_url(tmp_path, "/small/%c0%ae%c0%ae/x.jpg", {"small": "jpeg"})
    assert thumb is not None
    assert is_within(tmp_path, thumb.path)
    assert os.fsencode(thumb.source_relpath) == b"\xc0\xae\xc0\xae/x.jpg"


def test_random_request_paths_never_map_outside_the_cache(tmp_path: Path) -> None:
    rng = random.Random(1234)
    alphabet = ["/", ".", "..", "%2e", "%2f", "%5c", "\\", "%00", "a", "%c0%ae", "small", "%", "?", "#", "~"]
    mapped = 0
    for _ in range(5000):
        # Most start as a real preset's URL does, so that a good share of them map at all.
        start = "/small/" if rng.random() < 0.75 else "/"
        url = start + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        thumb = resolve_url(tmp_path, url, {"small": "webp"})
        if thumb is None:
            continue
        mapped += 1
        resolved = os.path.normpath(thumb.path)
        assert resolved.startswith(str(tmp_path / "v1" / "small") + "/"), url
    # Enough of the random paths must map for the containment check to have been tried.
    assert mapped >= 500


def test_symlink_inside_cache_pointing_out_is_not_within(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "v1" / "small").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    (cache / "v1" / "small" / "evil.jpg.jpg").symlink_to(secret)
    thumb = resolve_url(cache, "/small/evil.jpg", {"small": "jpeg"})
    assert thumb is not None
    assert not is_within(cache, thumb.path)


def test_generate_cache_writes_every_hostile_name_where_its_url_maps(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    for index, name in enumerate(HOSTILE_NAMES):
        make_named_photo(source / name, index)
    cache = tmp_path / "cache"
    run = run_cli("generate", source, "--cache", cache, "-s", "64", "--format", "webp", "--hidden", "--json")
    assert run.rc == 0, run.stderr
    assert run.summary["made"] == len(HOSTILE_NAMES)
    presets = read_manifest(cache)
    assert presets == {"64": "webp"}
    for name in HOSTILE_NAMES:
        thumb = resolve_url(cache, url_path_for("64", name), presets)
        assert thumb is not None and thumb.path == cache_path(cache, "64", name, "webp")
        assert thumb.content_type == "image/webp"
        assert pyvips.Image.new_from_buffer(thumb.path.read_bytes(), "").width == 64


def test_manifest_written_is_read_back_and_left_alone_when_unchanged(tmp_path: Path) -> None:
    spec = ThumbSpec(SizeBox(64, 64), format="webp", name="small")
    presets = {"small": manifest_entry(spec), "big": {"format": "jpeg"}}
    write_manifest(tmp_path, presets)
    assert read_manifest(tmp_path) == {"small": "webp", "big": "jpeg"}
    assert load_manifest(tmp_path) == presets
    assert load_manifest(tmp_path)["small"]["digest"] == spec.digest
    before = os.stat(tmp_path / MANIFEST_NAME)
    write_manifest(tmp_path, dict(reversed(presets.items())))
    after = os.stat(tmp_path / MANIFEST_NAME)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("content", [b"{not json", b'{"layout": 99, "presets": {}}', b'{"layout": 1, "presets": []}'])
def test_a_broken_manifest_stops_serve_but_not_generate(tmp_path: Path, content: bytes) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(CannotRunError):
        read_manifest(tmp_path)
    assert load_manifest(tmp_path, strict=False) == {}


def test_changing_one_preset_remakes_only_that_preset(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    for index in range(3):
        make_photo(source / f"p{index}.jpg", 300, 200, seed=index)
    config = tmp_path / "thumbcli.toml"
    cache = tmp_path / "cache"
    config.write_text(f'cache = "{cache}"\n[presets.a]\nsize = "64"\n[presets.b]\nsize = "32"\n')
    first = run_cli("--config", config, "generate", source, "--json")
    assert first.rc == 0 and first.summary["thumbnails"] == 6, first.stderr
    config.write_text(f'cache = "{cache}"\n[presets.a]\nsize = "64"\n[presets.b]\nsize = "32"\nquality = 50\n')
    second = run_cli("--config", config, "generate", source, "--json")
    assert second.rc == 0 and second.summary["thumbnails"] == 3 and second.summary["made"] == 3


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
@pytest.mark.parametrize("named", [False, True], ids=["one-source", "named-sources"])
def test_nginx_with_the_readme_snippet_serves_the_cache(tmp_path: Path, named: bool) -> None:
    source = tmp_path / "photos"
    names = [name for name in HOSTILE_NAMES if not name.startswith(".")]
    for index, name in enumerate(names):
        make_named_photo(source / name, index)
    cache = tmp_path / "cache"
    if named:
        # Named sources: /<preset>/<source name>/<path>, the same snippet.
        make_named_photo(tmp_path / "phone" / names[0], 99)
        config = tmp_path / "thumbcli.toml"
        config.write_text(f'[sources]\nphotos = "{source}"\nphone = "{tmp_path / "phone"}"\n')
        assert run_cli("--config", config, "generate", "--cache", cache, "-s", "64").rc == 0
    else:
        assert run_cli("generate", source, "--cache", cache, "-s", "64").rc == 0
    source_name = "photos" if named else ""
    with readme_nginx(cache, tmp_path) as port:
        for name in names:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", url_path_for("64", name, source_name=source_name))
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
            assert response.status == 200, name
            assert body == cache_path(cache, "64", name, "jpeg", source_name=source_name).read_bytes()
        if named:  # the same name under the other source is that source's picture
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", url_path_for("64", names[0], source_name="phone"))
                body = connection.getresponse().read()
            finally:
                connection.close()
            assert body == cache_path(cache, "64", names[0], "jpeg", source_name="phone").read_bytes()
            assert body != cache_path(cache, "64", names[0], "jpeg", source_name="photos").read_bytes()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/64/%2e%2e/%2e%2e/thumbcli-cache.json")
            assert connection.getresponse().status in (400, 404)
        finally:
            connection.close()
