"""`thumbcli serve --browse`: the `/` page and gallery pages, checked with raw HTTP and a real headless Chromium."""

from __future__ import annotations

import html
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pyvips
from servekit import ServerProcess, get, put_thumb, running_server, wait_until

from thumbcli import cache as cache_layout
from thumbcli.serve.gallery import MADE_PAGE_SECONDS, parse_folder_url
from thumbcli.serve.imagesize import size_of_header
from thumbcli.serve.pages import PAGE_ITEMS

SECRET = b"TOP-SECRET-browse-never-listed"
BIG_FOLDER_COUNT = 3000
#: Hostile names as bytes (one not UTF-8), each a source name whose thumbnail is `<name>.webp`.
HOSTILE = [
    b"<img src=x onerror=alert(1)>.jpg",
    b"quote\"and'apos.jpg",
    b"100%.jpg",
    b"hash#tag.jpg",
    b"what?.jpg",
    b"new\nline.jpg",
    b"bad\xff\xfebytes.jpg",
    b"&amp;lt;.jpg",
]
HOSTILE_FOLDER = b"<b onmouseover=alert(2)>folder \"'&%#?\n\xff"
#: Unicode's Bidi_Control characters: in a name, each would reorder the text shown around it.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
#: Source names that would read as `photo-exe.jpg` with U+202E: shown escaped, linked as they are.
BIDI_NAMES = [f"photo-{control}gpj.exe.jpg" for control in BIDI_CONTROLS]
BIDI_FOLDER = "right\u202eto-left"


def _image(width: int, height: int, seed: int) -> pyvips.Image:
    base = pyvips.Image.xyz(width, height)
    image = (base[0] * 255 / width).bandjoin([base[1] * 255 / height, (base[0] + base[1] + seed * 40) % 256])
    return image.cast("uchar").copy(interpretation="srgb")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small (webp, 128) and big (jpeg, 512) presets: nested folders, a folder of thousands, hostile names."""
    base = tmp_path_factory.mktemp("browse")
    root = base / "cache"
    root.mkdir()
    cache_layout.write_manifest(
        root, {"small": {"format": "webp", "size": "128"}, "big": {"format": "jpeg", "size": "512"}}
    )
    small = bytes(_image(128, 96, 1).webpsave_buffer(Q=70))
    tall = bytes(_image(72, 128, 2).webpsave_buffer(Q=70))
    big = bytes(_image(512, 384, 1).jpegsave_buffer(Q=70))
    for relpath in ("top.jpg", "a/one.jpg", "a/b/deep.jpg", "a/b/c/deeper.jpg"):
        put_thumb(root, "small", relpath + ".webp", small)
        put_thumb(root, "big", relpath + ".jpg", big)
    put_thumb(root, "small", "a/tall.jpg.webp", tall)
    many = root / "v1" / "small" / "many"
    many.mkdir()
    for index in range(BIG_FOLDER_COUNT):
        (many / f"img{index:05d}.jpg.webp").write_bytes(small)
    hostile = os.fsencode(root / "v1" / "small" / "hostile")
    os.makedirs(os.path.join(hostile, HOSTILE_FOLDER))
    for name in HOSTILE:
        with open(os.path.join(hostile, name + b".webp"), "wb") as handle:
            handle.write(small)
        with open(os.path.join(hostile, HOSTILE_FOLDER, name + b".webp"), "wb") as handle:
            handle.write(tall)
    for name in BIDI_NAMES:
        put_thumb(root, "small", f"bidi/{name}.webp", small)
    put_thumb(root, "small", f"bidi/{BIDI_FOLDER}/inside\u2067.jpg.webp", tall)
    # The server refuses any URL with a backslash; beside them, one name it serves.
    put_thumb(root, "small", "slashes/back\\slash.jpg.webp", small)
    put_thumb(root, "small", "slashes/back\\dir/x.jpg.webp", small)
    put_thumb(root, "small", "slashes/plain.jpg.webp", small)
    (base / "secret.txt").write_bytes(SECRET)
    os.symlink(base, root / "v1" / "small" / "linkdir")
    os.symlink(base / "secret.txt", root / "v1" / "small" / "escape.jpg.webp")
    put_thumb(root, "small", ".hidden.jpg.webp", SECRET)
    put_thumb(root, "small", ".secret/x.jpg.webp", SECRET)
    put_thumb(root, "small", "a/.thumbcli-tmp-0123.webp", SECRET)
    (root / ".thumbcli").mkdir()
    (root / ".thumbcli" / "state.db").write_bytes(SECRET)
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "fallback"])
def browsing(request: pytest.FixtureRequest, cache: Path) -> Iterator[ServerProcess]:
    with running_server(cache, browse=True, use_sendfile=request.param) as server:
        yield server


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "fallback"])
def plain(request: pytest.FixtureRequest, cache: Path) -> Iterator[ServerProcess]:
    with running_server(cache, use_sendfile=request.param) as server:
        yield server


def _tile_images(body: bytes) -> list[str]:
    """The thumbnails a page shows in its grid (not its folders' covers)."""
    return [
        html.unescape(url)
        for url in re.findall(r'<span class="pic[^"]*">(?:<svg[^>]*></svg>)?<img src="([^"]*)"', body.decode())
    ]


def _links(body: bytes, attribute: str) -> list[str]:
    return [html.unescape(url) for url in re.findall(rf'{attribute}="([^"]*)"', body.decode())]


# -- without --browse


def test_home_page_lists_presets_only_without_browse(plain: ServerProcess) -> None:
    response = get(plain, "/")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    body = response.body.decode()
    assert re.search(r"<td>small</td><td>128</td><td>webp</td>", body)
    assert re.search(r"<td>big</td><td>512</td><td>jpeg</td>", body)
    assert 'href="/small/"' not in body and "Browsing: off" in body
    assert "cache" not in _links(response.body, "href")[0]  # only the stylesheet is linked
    assert str(plain.port) not in body and "/tmp" not in body and ".thumbcli" not in body


@pytest.mark.parametrize("path", ["/small/", "/small/a/", "/small/many/", "/big/a/b/", "/nope/"])
def test_folder_urls_are_404_without_browse(plain: ServerProcess, path: str) -> None:
    assert get(plain, path).status == 404


def test_thumbnails_still_serve_without_browse(plain: ServerProcess) -> None:
    response = get(plain, "/small/a/one.jpg")
    assert response.status == 200
    assert size_of_header(response.body) == (128, 96)


# -- with --browse: raw HTTP


def test_start_message_says_what_is_served(browsing: ServerProcess) -> None:
    assert wait_until(lambda: any("generate on a miss" in line for line in browsing.stderr_lines))
    said = "".join(browsing.stderr_lines)
    assert f"open http://127.0.0.1:{browsing.port}/ in a browser" in said
    assert "presets: big (512, jpeg), small (128, webp)" in said
    assert "browsing folders: on" in said
    assert "generate on a miss: off" in said


def test_home_page_links_presets_with_browse(browsing: ServerProcess) -> None:
    body = get(browsing, "/").body.decode()
    assert '<a href="/small/">small</a>' in body and '<a href="/big/">big</a>' in body
    assert "Browsing: on" in body


def test_gallery_page_headers_are_cacheable_and_strict(browsing: ServerProcess) -> None:
    response = get(browsing, "/small/a/")
    assert response.status == 200
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert response.headers["cache-control"] == "no-cache"
    etag = response.headers["etag"]
    again = get(browsing, "/small/a/", {"If-None-Match": etag})
    assert again.status == 304 and again.body == b"" and again.headers["etag"] == etag
    head = get(browsing, "/small/a/", method="HEAD")
    assert head.status == 200 and head.headers["content-length"] == str(len(response.body))


def test_gallery_assets_are_immutable_and_linked_by_digest(browsing: ServerProcess) -> None:
    body = get(browsing, "/small/a/").body
    assets = [url for url in _links(body, "href") + _links(body, "src") if url.startswith("/_thumbcli/")]
    assert len(assets) == 3
    for url in assets:
        response = get(browsing, url)
        assert response.status == 200 and len(response.body) < 8192
        assert "immutable" in response.headers["cache-control"]
    assert get(browsing, "/_thumbcli/nope.js").status == 404


def test_gallery_lists_folders_and_thumbnails_with_their_sizes(browsing: ServerProcess) -> None:
    body = get(browsing, "/small/a/").body.decode()
    assert '<a class="folder" href="/small/a/b/?sort=name" title="b">' in body
    assert '<span class="cover"><img src="/small/a/b/deep.jpg"' in body  # the folder's first thumbnail
    assert '<span class="name">b</span>' in body
    assert "2 images, 1 folder" in body
    one = re.search(
        r'<a class="thumb" href="([^"]+)"[^>]*><span class="pic"><img src="/small/a/one.jpg" ([^>]*)>', body
    )
    tall = re.search(r'<img src="/small/a/tall.jpg" ([^>]*)>', body)
    assert one is not None and tall is not None
    assert 'width="128" height="96"' in one.group(2) and 'loading="lazy"' in one.group(2)
    assert 'width="72" height="128"' in tall.group(1)
    assert one.group(1) == "/big/a/one.jpg"  # a larger preset holds it: the click opens that
    assert '<a class="thumb" href="/small/a/tall.jpg"' in body  # no larger one: the same thumbnail


def test_gallery_breadcrumbs_lead_back_up(browsing: ServerProcess) -> None:
    body = get(browsing, "/small/a/b/c/").body.decode()
    crumbs = re.search(r'<nav class="crumbs"[^>]*>(.*?)</nav>', body)
    assert crumbs is not None
    expected = ["/", "/small/", "/small/a/", "/small/a/b/", "/small/a/b/c/"]
    assert re.findall(r'href="([^"]+)"', crumbs.group(1)) == expected


def test_gallery_escapes_hostile_names_and_links_them_correctly(browsing: ServerProcess) -> None:
    response = get(browsing, "/small/hostile/")
    body = response.body.decode()
    assert "<img src=x" not in body and "<b onmouseover" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in body
    assert "bad\\xff\\xfebytes.jpg" in body and "new\\x0aline.jpg" in body
    assert f"{len(HOSTILE)} images, 1 folder" in body
    thumbs = _tile_images(response.body)
    assert len(thumbs) == len(HOSTILE)
    for url in thumbs:
        got = get(browsing, url)
        assert got.status == 200, url
        assert size_of_header(got.body) == (128, 96)
    folder = next(url for url in _links(response.body, "href") if url.startswith("/small/hostile/%3Cb%20onmouseover"))
    inner = get(browsing, folder)
    assert inner.status == 200
    inner_thumbs = _tile_images(inner.body)
    assert len(inner_thumbs) == len(HOSTILE)
    assert all(size_of_header(get(browsing, url).body) == (72, 128) for url in inner_thumbs)


def test_gallery_never_lists_a_name_whose_url_the_server_refuses(browsing: ServerProcess) -> None:
    response = get(browsing, "/small/slashes/")
    body = response.body.decode()
    assert "1 image, 0 folders" in body
    assert "back" not in body
    linked = [
        url.partition("?")[0]
        for url in _links(response.body, "href") + _links(response.body, "src")
        if not url.startswith("/_thumbcli/")
    ]
    assert "/small/slashes/plain.jpg" in linked
    assert [url for url in linked if get(browsing, url).status != 200] == []
    # What is left out is what the server refuses: listed, each would have been a dead link.
    assert get(browsing, "/small/slashes/back%5Cslash.jpg").status == 404
    assert get(browsing, "/small/slashes/back%5Cdir/").status == 404


def test_gallery_shows_bidi_controls_escaped_and_links_them_as_they_are(browsing: ServerProcess) -> None:
    response = get(browsing, "/small/bidi/")
    body = response.body.decode()
    assert [control for control in BIDI_CONTROLS if control in body] == []
    for control in BIDI_CONTROLS:
        assert body.count(f"photo-\\u{ord(control):04x}gpj.exe.jpg") == 4, control  # caption, data-name, title, alt
    assert f"{len(BIDI_NAMES)} images, 1 folder" in body
    thumbs = _tile_images(response.body)
    assert sorted(unquote(url) for url in thumbs) == sorted(f"/small/bidi/{name}" for name in BIDI_NAMES)
    assert [url for url in thumbs if get(browsing, url).status != 200] == []
    folder_url = next(url for url in _links(response.body, "href") if "to-left" in url)
    assert unquote(folder_url) == f"/small/bidi/{BIDI_FOLDER}/?sort=name"
    inner = get(browsing, folder_url).body.decode()
    assert "<title>small / bidi / right\\u202eto-left - thumbcli</title>" in inner
    assert 'aria-current="page">right\\u202eto-left</a>' in inner
    assert "inside\\u2067.jpg" in inner
    assert [control for control in BIDI_CONTROLS if control in inner] == []


def test_gallery_never_lists_hidden_state_or_outside(browsing: ServerProcess) -> None:
    body = get(browsing, "/small/").body
    assert SECRET not in body
    for hidden in (b".hidden", b".secret", b"linkdir", b"escape", b".thumbcli"):
        assert hidden not in body
    assert b"thumbcli-tmp" not in get(browsing, "/small/a/").body
    for path in ("/small/.secret/", "/small/linkdir/", "/small/%2e%2e/", "/small/a/../../", "/small/a%2f..%2f../"):
        assert get(browsing, path).status in (400, 404), path
    assert get(browsing, "/small/a/missing/").status == 404
    assert get(browsing, "/small/top.jpg/").status == 404


def test_gallery_paginates_a_large_folder(browsing: ServerProcess) -> None:
    first = get(browsing, "/small/many/")
    body = first.body.decode()
    pages = -(-BIG_FOLDER_COUNT // PAGE_ITEMS)
    assert f"{BIG_FOLDER_COUNT} images" in body and f"page 1 of {pages}" in body
    assert body.count('class="thumb"') == PAGE_ITEMS
    assert len(first.body) < 40_000
    assert '<a href="/small/many/?sort=name&amp;page=2" rel="next">' in body
    second = get(browsing, "/small/many/?sort=name&page=2").body.decode()
    assert f"/small/many/img{PAGE_ITEMS:05d}.jpg" in second and "/small/many/img00000.jpg" not in second
    last = get(browsing, f"/small/many/?page={pages + 50}").body.decode()
    assert f"page {pages} of {pages}" in last and f"img{BIG_FOLDER_COUNT - 1:05d}.jpg" in last


def test_gallery_sorts_by_date_newest_first(browsing: ServerProcess, cache: Path) -> None:
    folder = cache / "v1" / "small" / "a" / "b"
    now = time.time()
    os.utime(folder / "deep.jpg.webp", (now, now))
    put_thumb(cache, "small", "a/b/zz-older.jpg.webp", (folder / "deep.jpg.webp").read_bytes())
    os.utime(folder / "zz-older.jpg.webp", (now - 3600, now - 3600))
    by_name = get(browsing, "/small/a/b/?sort=name").body.decode()
    by_date = get(browsing, "/small/a/b/?sort=date").body.decode()
    assert by_name.index("zz-older") > by_name.index("deep.jpg")
    assert by_date.index("zz-older") > by_date.index("deep.jpg")
    os.utime(folder / "zz-older.jpg.webp", (now + 3600, now + 3600))
    os.utime(folder, None)  # the folder's listing is kept until the folder changes
    time.sleep(MADE_PAGE_SECONDS + 0.1)  # and a made page for a second
    by_date = get(browsing, "/small/a/b/?sort=date").body.decode()
    assert by_date.index("zz-older") < by_date.index("deep.jpg")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/small/", ("small", (), "name", 1)),
        (b"/small/a%20b/c/?sort=date&page=3", ("small", (b"a b", b"c"), "date", 3)),
        (b"/small/%ff/?page=x&sort=evil", ("small", (b"\xff",), "name", 1)),
        (b"/small/a", None),
        (b"/small//", None),
        (b"/small/../", None),
        (b"/small/%2e%2e/", None),
        (b"/small/.thumbcli/", None),
        (b"/small/a%2f..%2f/", None),
        (b"/small/a%00/", None),
        (b"/small/a%5c/", None),
        (b"//", None),
        (b"/", None),
    ],
)
def test_parse_folder_url(target: bytes, expected: tuple[Any, ...] | None) -> None:
    parsed = parse_folder_url(target)
    got = None if parsed is None else (parsed.preset, parsed.folder, parsed.sort, parsed.page)
    assert got == expected


# -- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or not os.access(CHROMEDRIVER, os.X_OK) or not HAVE_SELENIUM,
    reason="needs chromium, /usr/bin/chromedriver and selenium",
)
#: Collects Content-Security-Policy violations before any page script runs.
CSP_WATCH = (
    "window.__csp = [];"
    "document.addEventListener('securitypolicyviolation',"
    " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)


def _browser(javascript: bool = True) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    options.add_argument("--no-proxy-server")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    # The system driver, given by path: Selenium Manager never downloads one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests save screenshots of the main pages (THUMBCLI_SCREENSHOTS, to look at them)."""
    chosen = os.environ.get("THUMBCLI_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


VISIBLE_IMAGES_LOADED = """
const shown = Array.from(document.images).filter(img => {
  const box = img.getBoundingClientRect();
  return box.bottom > 0 && box.top < window.innerHeight;
});
return [shown.length, shown.filter(img => img.complete && img.naturalWidth > 0).length];
"""


def _open(driver: Any, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _wait_images(driver: Any) -> tuple[int, int]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: (lambda c: c[0] == c[1])(d.execute_script(VISIBLE_IMAGES_LOADED)))
    shown, loaded = driver.execute_script(VISIBLE_IMAGES_LOADED)
    return int(shown), int(loaded)


def _assert_clean(driver: Any) -> None:
    """No console errors, no CSP violations, no dialog opened by a hostile name."""
    from selenium.common.exceptions import NoAlertPresentException

    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    assert driver.execute_script("return window.__csp") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


@needs_browser
def test_browser_shows_hostile_names_safely(browsing: ServerProcess, browser: Any, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/small/hostile/")
    shown, loaded = _wait_images(browser)
    assert shown == len(HOSTILE) + 1 and loaded == shown  # and the hostile folder's cover
    captions = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".thumb .name")]
    assert "<img src=x onerror=alert(1)>.jpg" in captions and "quote\"and'apos.jpg" in captions
    assert browser.execute_script("return document.querySelectorAll('.grid img[onerror]').length") == 0
    browser.save_screenshot(str(screenshots / "hostile.png"))
    _assert_clean(browser)
    browser.find_element(By.CSS_SELECTOR, ".folders a").click()
    hostile_folder = "/small/hostile/%3Cb%20onmouseover%3Dalert%282%29%3Efolder%20%22%27%26%25%23%3F%0A%FF/"
    assert hostile_folder in browser.current_url
    shown, loaded = _wait_images(browser)
    assert shown == len(HOSTILE) and loaded == shown
    _assert_clean(browser)


@needs_browser
def test_browser_shows_bidi_controls_escaped(browsing: ServerProcess, browser: Any, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/small/bidi/")
    shown, loaded = _wait_images(browser)
    assert shown == len(BIDI_NAMES) + 1 and loaded == shown  # every thumbnail linked as it is named, and a cover
    captions = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".thumb .name")]
    assert sorted(captions) == sorted(f"photo-\\u{ord(control):04x}gpj.exe.jpg" for control in BIDI_CONTROLS)
    browser.save_screenshot(str(screenshots / "bidi.png"))
    _assert_clean(browser)
    browser.find_element(By.CSS_SELECTOR, ".folders a").click()
    assert "/small/bidi/right%E2%80%AEto-left/" in browser.current_url
    assert browser.title == "small / bidi / right\\u202eto-left - thumbcli"
    assert browser.find_element(By.CSS_SELECTOR, ".thumb .name").text == "inside\\u2067.jpg"
    shown, loaded = _wait_images(browser)
    assert shown == 1 and loaded == 1
    _assert_clean(browser)


@needs_browser
def test_browser_pages_breadcrumbs_and_pagination(browsing: ServerProcess, browser: Any, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/")
    browser.save_screenshot(str(screenshots / "home.png"))
    browser.find_element(By.LINK_TEXT, "small").click()
    assert browser.current_url == base + "/small/"
    browser.find_element(By.LINK_TEXT, "a").click()
    browser.find_element(By.LINK_TEXT, "b").click()
    browser.find_element(By.LINK_TEXT, "c").click()
    assert browser.current_url.startswith(base + "/small/a/b/c/")
    _wait_images(browser)
    browser.find_element(By.CSS_SELECTOR, ".crumbs").find_element(By.LINK_TEXT, "a").click()
    assert browser.current_url == base + "/small/a/"
    shown, loaded = _wait_images(browser)
    assert shown == 3 and loaded == 3  # two thumbnails and the cover of folder b
    browser.save_screenshot(str(screenshots / "folder.png"))
    _assert_clean(browser)

    _open(browser, base + "/small/many/")
    shown, loaded = _wait_images(browser)
    assert shown > 0 and loaded == shown
    browser.save_screenshot(str(screenshots / "many.png"))
    first = browser.find_element(By.CSS_SELECTOR, ".grid img").get_attribute("src")
    browser.find_element(By.CSS_SELECTOR, 'a[rel="next"]').click()
    assert browser.current_url.endswith("/small/many/?sort=name&page=2")
    assert browser.find_element(By.CSS_SELECTOR, ".grid img").get_attribute("src") != first
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    shown, loaded = _wait_images(browser)
    assert shown > 0 and loaded == shown
    _assert_clean(browser)


@needs_browser
def test_browser_keyboard_moves_selection_and_opens_viewer(
    browsing: ServerProcess, browser: Any, screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"http://127.0.0.1:{browsing.port}"
    _open(browser, base + "/small/many/")
    _wait_images(browser)
    body = browser.find_element(By.TAG_NAME, "body")
    active = "return document.activeElement.querySelector('img') && document.activeElement.querySelector('img').src"
    body.send_keys(Keys.ARROW_RIGHT)
    assert browser.execute_script(active).endswith("/small/many/img00000.jpg")
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert browser.execute_script(active).endswith("/small/many/img00001.jpg")
    per_row = browser.execute_script(
        "const l = Array.from(document.querySelectorAll('.grid a'));"
        " return l.filter(a => a.offsetTop === l[0].offsetTop).length"
    )
    assert per_row > 1
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    assert browser.execute_script(active).endswith(f"/small/many/img{1 + per_row:05d}.jpg")
    browser.switch_to.active_element.send_keys(Keys.ARROW_LEFT)
    assert browser.execute_script(active).endswith(f"/small/many/img{per_row:05d}.jpg")

    _open(browser, base + "/small/a/")
    _wait_images(browser)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    viewer = browser.find_element(By.ID, "viewer")
    assert viewer.is_displayed()
    big = viewer.find_element(By.TAG_NAME, "img")
    WebDriverWait(browser, 10).until(lambda _: big.get_attribute("naturalWidth") == "512")
    assert big.get_attribute("src") == base + "/big/a/one.jpg"
    browser.save_screenshot(str(screenshots / "viewer.png"))
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    WebDriverWait(browser, 10).until(lambda _: big.get_attribute("src") == base + "/small/a/tall.jpg")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert not viewer.is_displayed()
    _assert_clean(browser)


@needs_browser
def test_browser_follows_a_dark_colour_scheme(browsing: ServerProcess, browser: Any, screenshots: Path) -> None:
    background = "return getComputedStyle(document.body).backgroundColor"

    def scheme(value: str) -> None:
        features = [{"name": "prefers-color-scheme", "value": value}] if value else []
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": features})

    base = f"http://127.0.0.1:{browsing.port}"
    scheme("light")
    _open(browser, base + "/small/a/")
    light = browser.execute_script(background)
    scheme("dark")
    _open(browser, base + "/small/a/")
    _wait_images(browser)
    dark = browser.execute_script(background)
    browser.save_screenshot(str(screenshots / "folder-dark.png"))
    scheme("")
    assert light != dark
    _assert_clean(browser)


@needs_browser
def test_browser_without_javascript_still_links_and_shows_the_grid(browsing: ServerProcess) -> None:
    from selenium.webdriver.common.by import By

    driver = _browser(javascript=False)
    try:
        base = f"http://127.0.0.1:{browsing.port}"
        _open(driver, base + "/small/a/")
        shown, loaded = _wait_images(driver)
        assert shown == 3 and loaded == 3  # two thumbnails and the cover of folder b
        assert driver.find_elements(By.ID, "viewer") == []  # no script ran
        driver.find_element(By.CSS_SELECTOR, ".grid a").click()
        assert driver.current_url == base + "/big/a/one.jpg"
    finally:
        driver.quit()
