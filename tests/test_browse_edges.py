"""`serve --browse`, issue 25 #8: redirects, folder covers, long names, box-shaped tiles, videos, the viewer's steps.

Each behaviour is checked over raw HTTP where the HTML says it, and in a real headless Chromium
where only the layout or a click shows it (screenshots in THUMBCLI_SCREENSHOTS).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips
from imagekit import draw_photo, make_photo, run_cli
from servekit import ServerProcess, get, put_thumb, running_server
from test_browse import _assert_clean, _open, _wait_images, browser, needs_browser, screenshots

from thumbcli import cache as cache_layout

__all__ = ["browser", "screenshots"]  # the fixtures, shared with test_browse

LONG_NAME = "a-very-long-file-name-from-a-phone-camera-export-IMG_20240101_123456789_HDR_portrait_final.jpg"


def _webp(width: int, height: int, seed: int) -> bytes:
    base = pyvips.Image.xyz(width, height)
    image = (base[0] * 255 / width).bandjoin([base[1] * 255 / height, (base[0] * 3 + seed * 70) % 256])
    return bytes(image.cast("uchar").copy(interpretation="srgb").webpsave_buffer(Q=70))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small (inside 128) and boxed (cover 160x120): a folder of edge cases, nested folders for covers."""
    root = tmp_path_factory.mktemp("edges") / "cache"
    root.mkdir()
    cache_layout.write_manifest(
        root,
        {
            "small": {"format": "webp", "size": "128", "fit": "inside"},
            "boxed": {"format": "webp", "size": "160x120", "fit": "cover"},
        },
    )
    for preset in ("small", "boxed"):
        put_thumb(root, preset, "edges/a-full.jpg.webp", _webp(160, 120, 1) if preset == "boxed" else _webp(128, 96, 1))
        put_thumb(root, preset, "edges/b-small.jpg.webp", _webp(40, 30, 2))  # a source smaller than the box
        put_thumb(root, preset, "edges/c-narrow.jpg.webp", _webp(50, 100, 3))  # smaller, and another shape
        put_thumb(root, preset, "edges/clip.mp4.webp", _webp(128, 72, 4))
        put_thumb(root, preset, f"edges/{LONG_NAME}.webp", _webp(128, 96, 5))
    put_thumb(root, "small", "covers/named/b.jpg.webp", _webp(64, 48, 6))
    put_thumb(root, "small", "covers/named/a.jpg.webp", _webp(64, 48, 7))
    put_thumb(root, "small", "covers/nested/only/deeper/x.jpg.webp", _webp(64, 48, 8))
    (root / "v1" / "small" / "covers" / "empty").mkdir()
    now = time.time()
    os.utime(root / "v1" / "small" / "covers" / "named" / "b.jpg.webp", (now, now))
    os.utime(root / "v1" / "small" / "covers" / "named" / "a.jpg.webp", (now - 3600, now - 3600))
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "fallback"])
def browsing(request: pytest.FixtureRequest, cache: Path) -> Iterator[ServerProcess]:
    with running_server(cache, browse=True, use_sendfile=request.param) as server:
        yield server


def test_folder_url_without_its_slash_redirects_with_its_query(browsing: ServerProcess) -> None:
    for path, location in (
        ("/small/edges", "/small/edges/"),
        ("/small/edges?sort=date&page=2", "/small/edges/?sort=date&page=2"),
        ("/small", "/small/"),
        ("/small/covers/nested/only", "/small/covers/nested/only/"),
    ):
        response = get(browsing, path)
        assert (response.status, response.headers.get("location")) == (301, location), path
        assert get(browsing, location).status == 200
    assert get(browsing, "/small/edges", method="HEAD").status == 301
    assert get(browsing, "/small/edges/a-full.jpg").status == 200  # a thumbnail is still a thumbnail
    for path in (
        "/small/missing",
        "/small/edges/a-full.jpg.webp",
        "/nopreset/edges",
        "/small/.thumbcli",
        "/small/a%2f..",
    ):
        assert get(browsing, path).status in (400, 404), path


def test_folder_url_without_its_slash_is_404_without_browse(cache: Path) -> None:
    with running_server(cache) as server:
        assert get(server, "/small/edges").status == 404


def test_folder_tiles_show_a_cover_first_by_name_or_newest(browsing: ServerProcess) -> None:
    by_name = get(browsing, "/small/covers/").body.decode()
    assert '<span class="cover"><img src="/small/covers/named/a.jpg"' in by_name
    assert '<span class="cover"><img src="/small/covers/nested/only/deeper/x.jpg"' in by_name  # looked for deeper
    assert (
        '<a class="folder" href="/small/covers/empty/?sort=name" title="empty"><span class="cover"></span>' in by_name
    )
    by_date = get(browsing, "/small/covers/?sort=date").body.decode()
    assert '<span class="cover"><img src="/small/covers/named/b.jpg"' in by_date


def test_video_tiles_are_marked_and_badged(browsing: ServerProcess) -> None:
    body = get(browsing, "/small/edges/").body.decode()
    assert '<a class="thumb video" href="/boxed/edges/clip.mp4"' in body  # the larger preset's, as for images
    assert body.count('<span class="play" aria-hidden="true"></span>') == 1
    assert '<a class="thumb" href="/boxed/edges/a-full.jpg"' in body


def test_cover_presets_give_every_tile_the_box_shape(browsing: ServerProcess) -> None:
    boxed = get(browsing, "/boxed/edges/").body.decode()
    assert boxed.count('<span class="pic boxed"><svg viewBox="0 0 160 120" aria-hidden="true"></svg>') == 5
    inside = get(browsing, "/small/edges/").body.decode()
    assert "<svg" not in inside and 'class="pic boxed"' not in inside


# -- in Chromium

TILE_BOXES = """
return Array.from(document.querySelectorAll('.grid .pic')).map(pic => {
  const box = pic.getBoundingClientRect();
  const img = pic.querySelector('img').getBoundingClientRect();
  return [box.width, box.height, img.width, img.height, pic.closest('li').getBoundingClientRect().height];
});
"""


@needs_browser
def test_browser_tiles_of_a_cover_preset_share_the_box_shape(
    browsing: ServerProcess, browser: Any, screenshots: Path
) -> None:
    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/boxed/edges/")
    _wait_images(browser)
    browser.save_screenshot(str(screenshots / "boxed.png"))
    tiles = browser.execute_script(TILE_BOXES)
    assert len(tiles) == 5
    width, height = tiles[0][0], tiles[0][1]
    assert abs(height / width - 120 / 160) < 0.02
    assert all(abs(tile[0] - width) < 1 and abs(tile[1] - height) < 1 for tile in tiles)
    assert len({round(tile[4]) for tile in tiles}) == 1  # every tile as tall: the grid stays even
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('.grid .pic img')).map(i => [i.naturalWidth, i.naturalHeight,"
        " getComputedStyle(i).objectFit])"
    )
    assert images[0][:2] == [160, 120]
    assert [40, 30] in [image[:2] for image in images] and [50, 100] in [image[:2] for image in images]
    assert {image[2] for image in images} == {"scale-down"}  # a smaller image is never blown up
    _assert_clean(browser)


@needs_browser
def test_browser_cuts_long_names_with_an_ellipsis(browsing: ServerProcess, browser: Any, screenshots: Path) -> None:
    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/small/edges/")
    _wait_images(browser)
    browser.save_screenshot(str(screenshots / "edges.png"))
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('.grid .name')).map(n => [n.textContent, n.scrollWidth,"
        " n.clientWidth, n.getBoundingClientRect().height, getComputedStyle(n).textOverflow,"
        " n.closest('a').title])"
    )
    by_text = {name[0]: name for name in names}
    long_name, short = by_text[LONG_NAME], by_text["a-full.jpg"]
    assert long_name[1] > long_name[2]  # cut
    assert long_name[4] == "ellipsis"
    assert long_name[3] == short[3]  # on one line, not wrapped
    assert long_name[5] == LONG_NAME  # the whole name on hover
    _assert_clean(browser)


@needs_browser
def test_browser_shows_a_play_badge_on_videos(browsing: ServerProcess, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/small/edges/")
    _wait_images(browser)
    badges = browser.find_elements(By.CSS_SELECTOR, ".grid .play")
    assert len(badges) == 1 and badges[0].is_displayed()
    tile = browser.find_element(By.CSS_SELECTOR, ".thumb.video img").rect
    badge = badges[0].rect
    centre = (badge["x"] + badge["width"] / 2, badge["y"] + badge["height"] / 2)
    assert tile["x"] < centre[0] < tile["x"] + tile["width"] and tile["y"] < centre[1] < tile["y"] + tile["height"]
    browser.find_element(By.CSS_SELECTOR, ".thumb.video").click()
    assert browser.find_element(By.CSS_SELECTOR, "#viewer p").text == "clip.mp4 (video)"
    _assert_clean(browser)


def _swipe(browser: Any, start_x: int, end_x: int, y: int = 400) -> None:
    for kind, x in (("touchStart", start_x), ("touchMove", (start_x + end_x) // 2), ("touchMove", end_x)):
        browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
    browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


@needs_browser
def test_browser_viewer_steps_with_buttons_and_swipes(browsing: ServerProcess, browser: Any, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/small/edges/")
    _wait_images(browser)
    order = [link.get_attribute("href") for link in browser.find_elements(By.CSS_SELECTOR, ".grid a.thumb")]
    browser.find_element(By.CSS_SELECTOR, ".grid a.thumb").click()
    viewer = browser.find_element(By.ID, "viewer")
    big = viewer.find_element(By.TAG_NAME, "img")
    previous, following = viewer.find_element(By.CSS_SELECTOR, ".prev"), viewer.find_element(By.CSS_SELECTOR, ".next")
    assert viewer.is_displayed() and big.get_attribute("src") == order[0]
    assert not previous.is_enabled() and following.is_enabled()
    following.click()
    assert big.get_attribute("src") == order[1]
    WebDriverWait(browser, 10).until(lambda _: big.get_attribute("naturalWidth") not in (None, "0"))
    browser.save_screenshot(str(screenshots / "viewer-steps.png"))
    previous.click()
    assert big.get_attribute("src") == order[0]
    _swipe(browser, 900, 300)  # right to left: the next one
    assert big.get_attribute("src") == order[1]
    _swipe(browser, 300, 900)  # left to right: the previous one
    assert big.get_attribute("src") == order[0]
    _swipe(browser, 600, 620)  # a tap, not a swipe
    assert big.get_attribute("src") == order[0] and viewer.is_displayed()
    for _ in order[1:]:
        following.click()
    assert big.get_attribute("src") == order[-1] and not following.is_enabled()
    _assert_clean(browser)


# -- serve --source --browse on a fresh cache


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """src/ (images, a folder, a hidden folder, a text file), an empty cache, and a config with one preset."""
    base = tmp_path_factory.mktemp("fresh")
    source = base / "src"
    (source / "trip" / "deeper").mkdir(parents=True)
    (source / ".hidden").mkdir()
    make_photo(source / "a.jpg", 300, 200)
    make_photo(source / "trip" / "b.png", 200, 300, seed=1)
    make_photo(source / "trip" / "deeper" / "c.jpg", 300, 200, seed=2)
    make_photo(source / ".hidden" / "x.jpg", 300, 200, seed=3)
    (source / "notes.txt").write_text("not an image")
    preset = '[presets.small]\nsize = "128"\nformat = "webp"\n'
    (base / "thumbcli.toml").write_text(preset)
    (base / "named.toml").write_text(f'[sources]\nphone = "{source}"\n{preset}')
    return base


def test_source_browse_lists_source_folders_on_a_fresh_cache(source_tree: Path) -> None:
    cache = source_tree / "cache"
    cache.mkdir()
    config = source_tree / "thumbcli.toml"
    with running_server(cache, config=config, source_root=source_tree / "src", browse=True) as server:
        top = get(server, "/small/")
        assert top.status == 200
        body = top.body.decode()
        assert "1 image, 1 folder" in body
        folder = '<a class="folder" href="/small/trip/?sort=name" title="trip">'
        assert folder + '<span class="cover"><img src="/small/trip/b.png"' in body
        assert '<a class="thumb" href="/small/a.jpg"' in body
        assert "notes.txt" not in body and ".hidden" not in body
        assert get(server, "/small/trip").headers.get("location") == "/small/trip/"
        assert get(server, "/small/.hidden/").status == 404
        assert get(server, "/small/missing/").status == 404
        thumbnail = get(server, "/small/trip/b.png")
        assert thumbnail.status == 200 and thumbnail.headers["content-type"] == "image/webp"
        deeper = get(server, "/small/trip/").body.decode()
        assert '<span class="name">deeper</span>' in deeper and 'width="85" height="128"' in deeper  # b.png is made


def test_source_browse_lists_named_sources_as_folders(source_tree: Path) -> None:
    cache = source_tree / "named-cache"
    cache.mkdir()
    with running_server(cache, config=source_tree / "named.toml", named_sources=True, browse=True) as server:
        body = get(server, "/small/").body.decode()
        folder = '<a class="folder" href="/small/phone/?sort=name" title="phone">'
        assert folder + '<span class="cover"><img src="/small/phone/a.jpg"' in body
        inner = get(server, "/small/phone/").body.decode()
        assert '<a class="thumb" href="/small/phone/a.jpg"' in inner and "1 image, 1 folder" in inner
        assert get(server, "/small/phone/trip/deeper/c.jpg").status == 200
        assert get(server, "/small/other/").status == 404


@needs_browser
def test_browser_browses_a_fresh_cache_made_on_a_miss(source_tree: Path, browser: Any, screenshots: Path) -> None:
    cache = source_tree / "browser-cache"
    cache.mkdir()
    config = source_tree / "thumbcli.toml"
    with running_server(cache, config=config, source_root=source_tree / "src", browse=True) as server:
        _open(browser, f"http://127.0.0.1:{server.port}/small")
        assert browser.current_url == f"http://127.0.0.1:{server.port}/small/"
        shown, loaded = _wait_images(browser)
        assert shown == 2 and loaded == 2  # the folder's cover and a.jpg, each made as it was asked for
        browser.save_screenshot(str(screenshots / "fresh-source.png"))
        _assert_clean(browser)


# -- sort by capture date, recorded when the thumbnail is made


def _dated_photo(path: Path, when: str, seed: int) -> None:
    image = draw_photo(320, 240, seed=seed).copy()
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd2-DateTimeOriginal", when)
    path.write_bytes(image.jpegsave_buffer(keep="exif"))


@needs_browser
def test_browser_sorts_by_capture_date_recorded_at_make_time(tmp_path: Path, browser: Any, screenshots: Path) -> None:
    source, cache = tmp_path / "src", tmp_path / "cache"
    source.mkdir()
    # Captured in the order c, a, b (newest first); copied, so written and modified in another order.
    _dated_photo(source / "a.jpg", "2020:06:01 12:00:00", 1)
    _dated_photo(source / "b.jpg", "2010:01:01 08:00:00", 2)
    _dated_photo(source / "c.jpg", "2023:12:24 18:30:00", 3)
    make_photo(source / "undated.png", 200, 150, seed=4)
    now = time.time()
    for age, name in enumerate(("b.jpg", "a.jpg", "c.jpg", "undated.png")):
        os.utime(source / name, (now - 1000 * age, now - 1000 * age))
    assert run_cli("generate", source, "--cache", cache, "-s", "128", "--format", "webp").rc == 0
    folder = cache / "v1" / "128"
    for age, name in enumerate(("a.jpg.webp", "b.jpg.webp", "c.jpg.webp")):  # written newest first: a, b, c
        os.utime(folder / name, (now - 100 * age, now - 100 * age))
    os.utime(folder / "undated.png.webp", (now - 10, now - 10))  # no capture date: its mtime, in 2026 or so
    for source_file in source.iterdir():
        source_file.unlink()  # never read at page time
    from selenium.webdriver.common.by import By

    with running_server(cache, browse=True) as server:
        body = get(server, "/128/?sort=date").body.decode()
        order = [name for name in re.findall(r'data-name="([^"]+)"', body)]
        assert order == ["undated.png", "c.jpg", "a.jpg", "b.jpg"]
        _open(browser, f"http://127.0.0.1:{server.port}/128/?sort=date")
        _wait_images(browser)
        browser.save_screenshot(str(screenshots / "sorted-by-capture.png"))
        shown = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".thumb .name")]
        assert shown == ["undated.png", "c.jpg", "a.jpg", "b.jpg"]
        _assert_clean(browser)


# -- a video opens the video itself (serve --source --browse)


@pytest.fixture(scope="module")
def video_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """src/ with a video, a photo, a hidden video and a link out; a config with one preset."""
    from test_formats import make_video

    base = tmp_path_factory.mktemp("videos")
    source = base / "src"
    (source / "trip").mkdir(parents=True)
    make_video(source / "trip" / "clip.mp4", dark_frames=0, width=160, height=96)
    make_photo(source / "trip" / "photo.jpg", 300, 200)
    make_video(source / "trip" / ".hidden.mp4", dark_frames=0)
    (base / "outside.mp4").write_bytes((source / "trip" / "clip.mp4").read_bytes())
    os.symlink(base / "outside.mp4", source / "trip" / "link.mp4")
    (base / "thumbcli.toml").write_text('[presets.small]\nsize = "128"\nformat = "webp"\n')
    (base / "cache").mkdir()
    return base


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "fallback"])
def video_server(request: pytest.FixtureRequest, video_tree: Path) -> Iterator[ServerProcess]:
    config, source = video_tree / "thumbcli.toml", video_tree / "src"
    with running_server(
        video_tree / "cache", config=config, source_root=source, browse=True, use_sendfile=request.param
    ) as server:
        yield server


def test_a_video_tile_links_the_video_itself_served_with_ranges(video_server: ServerProcess, video_tree: Path) -> None:
    body = get(video_server, "/small/trip/").body.decode()
    assert (
        '<a class="thumb video" href="/_thumbcli/video/trip/clip.mp4" data-video="/_thumbcli/video/trip/clip.mp4"'
        in body
    )
    assert '<a class="thumb" href="/small/trip/photo.jpg"' in body
    whole = (video_tree / "src" / "trip" / "clip.mp4").read_bytes()
    video = get(video_server, "/_thumbcli/video/trip/clip.mp4")
    assert (video.status, video.headers["content-type"], video.body) == (200, "video/mp4", whole)
    assert video.headers["accept-ranges"] == "bytes"
    part = get(video_server, "/_thumbcli/video/trip/clip.mp4", {"Range": "bytes=10-109"})
    assert (part.status, part.body) == (206, whole[10:110])
    for refused in (
        "/_thumbcli/video/trip/photo.jpg",  # a photo is not played: its thumbnails are what is served
        "/_thumbcli/video/trip/.hidden.mp4",
        "/_thumbcli/video/trip/link.mp4",  # a symlink out of the source
        "/_thumbcli/video/trip/%2e%2e/%2e%2e/outside.mp4",
        "/_thumbcli/video/../outside.mp4",
        "/_thumbcli/video/trip/missing.mp4",
    ):
        assert get(video_server, refused).status in (400, 404), refused


def test_no_video_is_served_without_source(cache: Path) -> None:
    with running_server(cache, browse=True) as server:
        body = get(server, "/small/edges/").body.decode()
        assert "data-video" not in body and "/_thumbcli/video/" not in body
        assert get(server, "/_thumbcli/video/edges/clip.mp4").status == 404


@needs_browser
def test_browser_plays_a_video_in_the_viewer(video_server: ServerProcess, browser: Any, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"http://127.0.0.1:{video_server.port}"
    _open(browser, base + "/small/trip/")
    _wait_images(browser)
    browser.find_element(By.CSS_SELECTOR, ".thumb.video").click()
    player = browser.find_element(By.CSS_SELECTOR, "#viewer video")
    assert player.is_displayed() and not browser.find_element(By.CSS_SELECTOR, "#viewer img").is_displayed()
    assert player.get_attribute("src") == base + "/_thumbcli/video/trip/clip.mp4"
    # Loaded and decoded: its frame size known, as only a played video's is.
    WebDriverWait(browser, 20).until(lambda _: player.get_attribute("videoWidth") == "160")
    assert browser.execute_script("return arguments[0].error", player) is None
    browser.save_screenshot(str(screenshots / "viewer-video.png"))
    browser.find_element(By.CSS_SELECTOR, "#viewer .next").click()
    assert not player.is_displayed() and browser.find_element(By.CSS_SELECTOR, "#viewer img").is_displayed()
    assert player.get_attribute("src") in (None, "")
    _assert_clean(browser)
