"""Format negotiation: a preset made in several formats, served by `thumbcli serve` and nginx to curl and Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips
from imagekit import run_cli
from servekit import NGINX, ServerProcess, get, readme_nginx, running_server, wait_until

from thumbcli.cache import load_manifest, read_manifest
from thumbcli.config import ConfigError, load_config
from thumbcli.serve.imagesize import size_of_header
from thumbcli.serve.negotiate import accepted_formats, candidates

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
CURL = shutil.which("curl")
BOTH = "image/avif,image/webp,*/*"
#: Accept field -> the variant the brief's clients must get.
CURL_CASES = {
    BOTH: "image/avif",
    "image/webp": "image/webp",
    "*/*": "image/jpeg",
    "image/jpeg;q=1, image/avif;q=0": "image/jpeg",
}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (b"image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", {"avif", "webp"}),
        (b"image/webp", {"webp"}),
        (b"*/*", set()),
        (b"image/*", set()),
        (b"image/jpeg;q=1, image/avif;q=0", {"jpeg"}),
        (b"IMAGE/AVIF ; q=0.000, image/webp; q=0.5", {"webp"}),
        (b"image/avif;q=0.001", {"avif"}),
        (b"image/avif;level=1;q=0", set()),
        (b"", set()),
        (b"text/html,,;;,image/png", {"png"}),
    ],
)
def test_accepted_formats_need_an_explicit_type_above_q0(accept: bytes, expected: set[str]) -> None:
    assert accepted_formats(accept) == expected


def test_candidates_follow_the_preset_order_and_end_in_the_fallback() -> None:
    formats = ("avif", "webp", "jpeg")
    assert candidates(formats, frozenset({"webp", "avif"})) == ("avif", "webp", "jpeg")
    assert candidates(formats, frozenset({"webp"})) == ("webp", "jpeg")
    assert candidates(formats, frozenset()) == ("jpeg",)
    assert candidates(("webp", "png"), frozenset({"png"})) == ("png",)


def test_config_takes_a_list_of_formats(tmp_path: Path) -> None:
    config = tmp_path / "thumbcli.toml"
    config.write_text('[presets.small]\nsize = "64"\nformat = ["avif", "webp", "jpeg"]\n[presets.big]\nsize = "256"\n')
    loaded = load_config(config)
    assert loaded.presets["small"].format == "jpeg"  # the fallback stands for the preset
    assert [(spec.name, spec.format) for spec in loaded.specs_to_make(())] == [
        ("small", "avif"),
        ("small", "webp"),
        ("small", "jpeg"),
        ("big", "jpeg"),
    ]
    assert [spec.name for spec in loaded.select_presets(())] == ["small", "big"]
    for bad in ('["avif", "gif"]', "[]", '["webp", "webp"]', "[1]"):
        config.write_text(f'[presets.small]\nsize = "64"\nformat = {bad}\n')
        with pytest.raises(ConfigError, match=r"thumbcli.toml:3: presets.small.format: expected an array of distinct"):
            load_config(config)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`generate` into a cache with small = avif, webp, jpeg and big = jpeg; one source lacks its webp."""
    base = tmp_path_factory.mktemp("negotiate")
    source = base / "photos"
    (source / "sub").mkdir(parents=True)
    image = pyvips.Image.gaussnoise(300, 200, seed=3).cast("uchar")
    image = image.bandjoin([image.flip("horizontal"), image.flip("vertical")]).copy(interpretation="srgb")
    for name in ("a.jpg", "sub/b.jpg", "c.jpg"):
        image.jpegsave(str(source / name))
    root = base / "cache"
    config = base / "thumbcli.toml"
    config.write_text(
        f'cache = "{root}"\n[presets.small]\nsize = "64"\nformat = ["avif", "webp", "jpeg"]\n'
        '[presets.big]\nsize = "256"\n'
    )
    first = run_cli("--config", config, "generate", source, "--json")
    assert first.rc == 0 and first.summary["thumbnails"] == 3 * 4, first.stderr
    again = run_cli("--config", config, "generate", source, "--json")
    assert again.rc == 0 and again.summary["made"] == 0, again.stderr
    pruned = run_cli("--config", config, "prune", "--dry-run", "--json")
    assert pruned.rc == 0 and json.loads(pruned.stdout)["files"] == 0, pruned.stdout
    (root / "v1" / "small" / "c.jpg.webp").unlink()
    return root


def test_generate_makes_every_format_and_one_manifest_entry(cache: Path) -> None:
    small = cache / "v1" / "small"
    assert sorted(path.name for path in small.glob("a.jpg.*")) == ["a.jpg.avif", "a.jpg.jpg", "a.jpg.webp"]
    entry = load_manifest(cache)["small"]
    assert entry["format"] == "jpeg" and entry["formats"] == ["avif", "webp", "jpeg"]
    assert len(set(entry["digests"])) == 3  # type: ignore[arg-type]
    assert read_manifest(cache) == {"small": "jpeg", "big": "jpeg"}  # older readers see the fallback


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "fallback"])
def server(request: pytest.FixtureRequest, cache: Path) -> Iterator[ServerProcess]:
    with running_server(cache, browse=True, use_sendfile=request.param) as running:
        yield running


def _curl(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    assert CURL is not None
    command = [CURL, "-s", "-D", "-", "--http1.1", f"http://127.0.0.1:{port}{path}"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(command, capture_output=True, check=True, timeout=10).stdout
    head, _, body = output.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def _check_variants(port: int, path: str, cache_file: Path) -> None:
    """The four curl clients get the right variant, Vary: Accept, distinct ETags, and 304s per variant."""
    etags = {}
    for accept, content_type in CURL_CASES.items():
        status, fields, body = _curl(port, path, f"Accept: {accept}")
        assert status == 200, accept
        assert fields["content-type"] == content_type, accept
        assert "accept" in fields["vary"].lower()
        suffix = {"image/avif": "avif", "image/webp": "webp", "image/jpeg": "jpg"}[content_type]
        assert body == cache_file.with_name(f"{cache_file.name}.{suffix}").read_bytes()
        etags.setdefault(content_type, fields["etag"])
        assert etags[content_type] == fields["etag"]
    assert len(set(etags.values())) == 3
    for content_type, etag in etags.items():
        accept = {"image/avif": BOTH, "image/webp": "image/webp", "image/jpeg": "*/*"}[content_type]
        status, fields, _ = _curl(port, path, f"Accept: {accept}", f"If-None-Match: {etag}")
        assert status == 304 and fields["etag"] == etag and "accept" in fields["vary"].lower()
        # Another variant's tag does not match this one.
        other = next(tag for kind, tag in etags.items() if kind != content_type)
        status, _, _ = _curl(port, path, f"Accept: {accept}", f"If-None-Match: {other}")
        assert status == 200


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_serve_negotiates_the_format_for_curl(server: ServerProcess, cache: Path) -> None:
    _check_variants(server.port, "/small/a.jpg", cache / "v1" / "small" / "a.jpg")
    _check_variants(server.port, "/small/sub/b.jpg", cache / "v1" / "small" / "sub" / "b.jpg")


def test_serve_ranges_apply_per_variant(server: ServerProcess, cache: Path) -> None:
    webp = (cache / "v1" / "small" / "a.jpg.webp").read_bytes()
    avif = (cache / "v1" / "small" / "a.jpg.avif").read_bytes()
    part = get(server, "/small/a.jpg", {"Accept": "image/webp", "Range": "bytes=0-9"})
    assert part.status == 206 and part.body == webp[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{len(webp)}" and part.headers["vary"] == "Accept"
    whole = get(
        server, "/small/a.jpg", {"Accept": "image/avif", "Range": "bytes=0-9", "If-Range": part.headers["etag"]}
    )
    assert whole.status == 200 and whole.body == avif  # If-Range named the WebP variant


def test_serve_falls_to_the_next_variant_when_one_is_missing(server: ServerProcess, cache: Path) -> None:
    response = get(server, "/small/c.jpg", {"Accept": "image/webp"})  # c.jpg has no WebP thumbnail
    assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.headers["vary"] == "Accept"
    assert get(server, "/small/c.jpg", {"Accept": BOTH}).headers["content-type"] == "image/avif"


def test_serve_sends_no_vary_for_a_single_format_preset(server: ServerProcess) -> None:
    response = get(server, "/big/a.jpg", {"Accept": BOTH})
    assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
    assert "vary" not in response.headers
    assert size_of_header(response.body) == (256, 171)


def test_home_and_gallery_show_every_format(server: ServerProcess) -> None:
    assert "<td>small</td><td>64</td><td>avif, webp, jpeg</td>" in get(server, "/").body.decode().replace(
        '<a href="/small/">small</a>', "small"
    )
    page = get(server, "/small/").body.decode()
    assert "2 images, 1 folder" in page and 'width="64" height="43"' in page


@pytest.mark.skipif(NGINX is None or CURL is None, reason="needs nginx and curl")
def test_nginx_with_the_readme_snippet_negotiates_the_same_way(cache: Path, tmp_path: Path) -> None:
    with readme_nginx(cache, tmp_path) as port:
        _check_variants(port, "/small/a.jpg", cache / "v1" / "small" / "a.jpg")
        status, fields, _ = _curl(port, "/small/c.jpg", "Accept: image/webp")
        assert status == 200 and fields["content-type"] == "image/jpeg"
        status, fields, _ = _curl(port, "/big/a.jpg", f"Accept: {BOTH}")
        assert status == 200 and fields["content-type"] == "image/jpeg"


@pytest.mark.skipif(CHROMIUM is None or not os.access(CHROMEDRIVER, os.X_OK), reason="needs chromium and chromedriver")
def test_chromium_receives_avif(server: ServerProcess) -> None:
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/small/")
        loaded = (
            "return Array.from(document.querySelectorAll('.grid img')).every(i => i.complete && i.naturalWidth > 0)"
        )
        WebDriverWait(driver, 20).until(lambda d: d.execute_script(loaded))
        types: dict[str, Any] = {}
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.responseReceived":
                response = message["params"]["response"]
                types[response["url"]] = response["mimeType"]
    finally:
        driver.quit()
    assert types[f"http://127.0.0.1:{server.port}/small/a.jpg"] == "image/avif"
    assert types[f"http://127.0.0.1:{server.port}/small/c.jpg"] == "image/avif"


def test_serve_source_makes_and_serves_every_format_and_leaves_the_manifest_as_generate_wrote_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "thumbcli.toml"
    config.write_text('[presets.small]\nsize = "64"\nformat = ["avif", "webp", "jpeg"]\n')
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    pyvips.Image.black(120, 80).draw_circle([200], 60, 40, 30, fill=True).jpegsave(str(src / "a.jpg"))
    assert run_cli("--config", config, "generate", src, "--cache", cache).rc == 0
    manifest = (cache / "thumbcli-cache.json").read_bytes()
    with running_server(cache, config=config, source_root=src) as server:
        assert wait_until(lambda: "generate on a miss" in "".join(server.stderr_lines))
        said = "".join(server.stderr_lines)
        made = get(server, "/small/a.jpg", {"Accept": BOTH})
        # A miss: a photo no run has seen yet is made in every format of the preset, from one decode.
        pyvips.Image.black(90, 60).jpegsave(str(src / "b.jpg"))
        missed = get(server, "/small/b.jpg", {"Accept": BOTH})
        plain_client = get(server, "/small/b.jpg", {"Accept": "*/*"})
    assert "small (64, avif, webp, jpeg)" in said, said
    assert (made.status, made.headers["content-type"]) == (200, "image/avif")
    assert (missed.status, missed.headers["content-type"]) == (200, "image/avif")
    assert (plain_client.status, plain_client.headers["content-type"]) == (200, "image/jpeg")
    assert sorted(p.name for p in (cache / "v1" / "small").iterdir()) == [
        *(f"{name}.jpg.{ext}" for name in "ab" for ext in ("avif", "jpg", "webp"))
    ]
    assert (cache / "thumbcli-cache.json").read_bytes() == manifest  # only generate changes the presets
    with running_server(cache) as plain:
        assert get(plain, "/small/b.jpg", {"Accept": BOTH}).headers["content-type"] == "image/avif"
