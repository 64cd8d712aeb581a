"""The HTML the server answers with: the `/` page, gallery pages, and their stylesheet and script.

Every name shown is HTML-escaped and every name linked is percent-encoded from its bytes;
the pages load nothing but these two assets and thumbnails from this server, as the strict
Content-Security-Policy they are sent with demands.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from thumbcli.errors import SpecError
from thumbcli.serve.listing import SORTS
from thumbcli.spec import Format, SizeBox

ASSET_PREFIX = b"/_thumbcli/"
#: A page lists this many folders and thumbnails; the rest are on further pages.
PAGE_ITEMS = 120
CSP = (
    b"Content-Security-Policy: default-src 'none'; img-src 'self'; media-src 'self'; style-src 'self'; "
    b"script-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n"
    b"X-Content-Type-Options: nosniff\r\nReferrer-Policy: same-origin\r\n"
)
HTML_TYPE = b"text/html; charset=utf-8"
#: Pages change as thumbnails are made: caches keep them but ask again (the ETag makes that a 304).
PAGE_CACHE_CONTROL = b"no-cache"
#: Assets are linked with their digest in the query, so a changed asset is a new URL.
ASSET_CACHE_CONTROL = b"public, max-age=31536000, immutable"
#: Shown as escapes: controls (C0, DEL, C1), and the bidi controls (Unicode's Bidi_Control), which
#: would reorder what is shown around them: `gpj.exe` after U+202E reads as `exe.jpg`.
_ESCAPED = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, slots=True)
class Page:
    """A made page or asset: its bytes and what the response says of them."""

    body: bytes
    etag: bytes
    content_type: bytes
    cache_control: bytes

    @classmethod
    def of(cls, body: bytes, content_type: bytes, cache_control: bytes) -> Page:
        """A page whose strong ETag is a digest of its bytes."""
        digest = hashlib.blake2b(body, digest_size=12).hexdigest()
        return cls(body, b'"p-%s"' % digest.encode("ascii"), content_type, cache_control)


@dataclass(frozen=True, slots=True)
class PresetView:
    """What the pages say of one preset: name, box, formats, and whether it is made on a miss."""

    name: str
    size: str  # the box label ("256", "320x240"), "" when the manifest does not say
    formats: tuple[Format, ...]
    generated: bool = False
    fit: str = "inside"  # the manifest's fit: a `cover` or `smart` box is every tile's shape

    @property
    def area(self) -> int:
        """The box's area, for choosing a larger preset (0 when unknown)."""
        try:
            box = SizeBox.parse(self.size)
        except SpecError:
            return 0
        width = box.width or box.height or 0
        return width * (box.height or width)

    @property
    def tile_box(self) -> tuple[int, int] | None:
        """The box every tile takes the shape of (a `cover` or `smart` preset's), None to keep each image's shape."""
        if self.fit not in ("cover", "smart"):
            return None
        try:
            box = SizeBox.parse(self.size)
        except SpecError:
            return None
        return (box.width, box.height) if box.width and box.height else None


@dataclass(frozen=True, slots=True)
class GalleryItem:
    """One thumbnail on a gallery page."""

    name: bytes
    thumb_url: str
    full_url: str
    size: tuple[int, int] | None
    #: A video's thumbnail: shown with a play badge.
    video: bool = False
    #: Where the video itself plays (`serve --source`), None when only its thumbnails are served.
    video_url: bytes | None = None


@dataclass(frozen=True, slots=True)
class FolderTile:
    """One subfolder on a gallery page, with the thumbnail shown as its cover (None when it has none yet)."""

    name: bytes
    cover_url: str | None


def url_of(preset: str, segments: Sequence[bytes], *, folder: bool) -> str:
    """The percent-encoded URL path of a cache folder (trailing slash) or thumbnail."""
    path = "/" + quote(preset, safe="") + "/" + "".join(quote(segment, safe="") + "/" for segment in segments)
    return path if folder else path[:-1]


def shown(name: bytes) -> str:
    """A file name as text that is safe in HTML: undecodable bytes, controls and bidi controls shown as escapes."""
    text = name.decode("utf-8", "backslashreplace")
    return html.escape(_ESCAPED.sub(_escape, text), quote=True)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _asset(name: str, body: str, content_type: bytes) -> tuple[bytes, Page, str]:
    page = Page.of(body.encode(), content_type, ASSET_CACHE_CONTROL)
    return ASSET_PREFIX + name.encode(), page, f"/_thumbcli/{name}?v={page.etag[3:11].decode()}"


_STYLE = """\
:root{color-scheme:light dark;--bg:#f7f7f5;--fg:#1d1d1f;--muted:#5f6368;--card:#fff;--line:#ddd;--accent:#0a58ca}
@media (prefers-color-scheme:dark){:root{--bg:#131314;--fg:#e8e8e6;--muted:#a0a4a8;--card:#232325;\
--line:#3a3a3c;--accent:#8ab4f8}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif}
header,main,footer{max-width:1400px;margin:0 auto;padding:.75rem 1rem}
h1{font-size:1.25rem;margin:.25rem 0}
a{color:var(--accent)}
.crumbs{font-size:1.05rem;overflow-wrap:anywhere}
.crumbs span{color:var(--muted);margin:0 .3rem}
.meta,.muted{color:var(--muted);font-size:.9rem}
.meta a[aria-current]{color:var(--fg);font-weight:600;text-decoration:none}
table{border-collapse:collapse}
th,td{text-align:left;padding:.3rem .9rem .3rem 0;border-bottom:1px solid var(--line)}
.folders{list-style:none;padding:0;margin:.5rem 0 1rem;display:grid;\
grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.75rem}
.folder{display:flex;flex-direction:column;gap:.3rem;height:100%;padding:.5rem;border:1px solid var(--line);\
border-radius:8px;background:var(--card);color:inherit;text-decoration:none}
.folder:focus{outline:3px solid var(--accent);outline-offset:1px}
.folder .cover{display:block;aspect-ratio:4/3;border-radius:5px;overflow:hidden;background:var(--line)}
.folder .cover img{display:block;width:100%;height:100%;object-fit:cover}
.folder .name{font-weight:600}
.folder .name::after{content:"/";color:var(--muted)}
.grid{list-style:none;padding:0;margin:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));\
gap:.75rem}
.thumb{display:flex;flex-direction:column;align-items:center;justify-content:space-between;gap:.3rem;height:100%;\
padding:.5rem;border-radius:8px;background:var(--card);border:1px solid var(--line);color:inherit;text-decoration:none}
.thumb:focus,.thumb.selected{outline:3px solid var(--accent);outline-offset:1px}
.pic{position:relative;display:block;max-width:100%;margin:auto 0}
.pic img{display:block;max-width:100%;height:auto}
.pic.boxed{width:100%}
.pic.boxed svg{display:block;width:100%;height:auto}
.pic.boxed img{position:absolute;inset:0;width:100%;height:100%;object-fit:scale-down}
.play{position:absolute;left:50%;top:50%;width:2.6rem;height:2.6rem;margin:-1.3rem 0 0 -1.3rem;border-radius:50%;\
background:rgba(0,0,0,.6);box-shadow:0 0 0 2px rgba(255,255,255,.85)}
.play::after{content:"";position:absolute;left:1rem;top:.7rem;border-style:solid;border-width:.6rem 0 .6rem 1rem;\
border-color:transparent transparent transparent #fff}
.name{display:block;max-width:100%;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.thumb .name{font-size:.8rem;color:var(--muted)}
.pages{margin:1rem 0;display:flex;flex-wrap:wrap;gap:.4rem}
.pages a,.pages b{padding:.2rem .55rem;border:1px solid var(--line);border-radius:5px}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.9);display:flex;flex-direction:column;align-items:center;\
justify-content:center;gap:.5rem;color:#eee;z-index:10;touch-action:pinch-zoom;overscroll-behavior:none}
#viewer[hidden]{display:none}
#viewer img,#viewer video{max-width:96vw;max-height:86vh;object-fit:contain}
#viewer [hidden]{display:none}
#viewer p{margin:0;font-size:.9rem;overflow-wrap:anywhere;max-width:90vw;text-align:center}
#viewer button{position:absolute;background:none;color:#eee;border:0;cursor:pointer}
#viewer .close{top:.6rem;right:.8rem;font-size:1.4rem}
#viewer .step{top:50%;transform:translateY(-50%);font-size:2.2rem;line-height:1;padding:.6rem .9rem;border-radius:8px;\
background:rgba(0,0,0,.45)}
#viewer .step:disabled{opacity:.2;cursor:default}
#viewer .prev{left:.6rem}
#viewer .next{right:.6rem}
#viewer .badge{font-size:.8rem;color:#bbb}
"""

_SCRIPT = """\
"use strict";
(() => {
  const links = Array.from(document.querySelectorAll(".grid a.thumb"));
  if (!links.length) return;
  let current = -1;
  const viewer = document.createElement("div");
  viewer.id = "viewer";
  viewer.hidden = true;
  viewer.setAttribute("role", "dialog");
  viewer.setAttribute("aria-modal", "true");
  const button = (name, text, label) => {
    const made = document.createElement("button");
    made.type = "button";
    made.className = name;
    made.textContent = text;
    made.setAttribute("aria-label", label);
    return made;
  };
  const close = button("close", "\u00d7", "Close");
  const previous = button("step prev", "\u2039", "Previous");
  const next = button("step next", "\u203a", "Next");
  const big = document.createElement("img");
  big.alt = "";
  const player = document.createElement("video");
  player.controls = true;
  player.playsInline = true;
  player.hidden = true;
  const caption = document.createElement("p");
  viewer.append(close, previous, next, big, player, caption);
  document.body.append(viewer);

  const select = (index) => {
    if (index < 0 || index >= links.length) return;
    if (current >= 0) links[current].classList.remove("selected");
    current = index;
    links[current].classList.add("selected");
    links[current].focus();
  };
  const show = (index) => {
    if (index < 0 || index >= links.length) return;
    select(index);
    const video = links[current].dataset.video;
    player.pause();
    if (video) {
      big.removeAttribute("src");
      player.src = video;
      player.play().catch(() => {});  // a browser may ask for a click first: the controls are there
    } else {
      player.removeAttribute("src");
      big.src = links[current].href;
    }
    big.hidden = Boolean(video);
    player.hidden = !video;
    caption.textContent = links[current].dataset.name;
    if (links[current].classList.contains("video")) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = " (video)";
      caption.append(badge);
    }
    previous.disabled = current === 0;
    next.disabled = current === links.length - 1;
    viewer.hidden = false;
  };
  const hide = () => {
    viewer.hidden = true;
    big.removeAttribute("src");
    player.pause();
    player.removeAttribute("src");
    if (current >= 0) links[current].focus();
  };
  const perRow = () => {
    const top = links[0].offsetTop;
    const row = links.findIndex((link) => link.offsetTop !== top);
    return row < 0 ? links.length : row;
  };
  links.forEach((link, index) => {
    link.addEventListener("click", (event) => {
      if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      show(index);
    });
    link.addEventListener("focus", () => select(index));
  });
  close.addEventListener("click", hide);
  previous.addEventListener("click", () => show(current - 1));
  next.addEventListener("click", () => show(current + 1));
  // A swipe: a touch that moves sideways further than it moves up or down, and far enough.
  let touch = null;
  viewer.addEventListener("touchstart", (event) => {
    touch = event.touches.length === 1 ? [event.touches[0].clientX, event.touches[0].clientY] : null;
  }, { passive: true });
  viewer.addEventListener("touchend", (event) => {
    if (touch === null || event.changedTouches.length !== 1) return;
    const dx = event.changedTouches[0].clientX - touch[0];
    const dy = event.changedTouches[0].clientY - touch[1];
    touch = null;
    if (Math.abs(dx) > 40 && Math.abs(dx) > 1.5 * Math.abs(dy)) show(current + (dx < 0 ? 1 : -1));
  });
  viewer.addEventListener("click", (event) => { if (event.target === viewer) hide(); });
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const open = !viewer.hidden;
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: open ? 1 : perRow(), ArrowUp: open ? -1 : -perRow() };
    if (event.key in step) {
      event.preventDefault();
      const next = Math.min(links.length - 1, Math.max(0, (current < 0 ? -1 : current) + step[event.key]));
      if (open) show(next); else select(current < 0 ? 0 : next);
    } else if (event.key === "Escape" && open) {
      hide();
    }
  });
})();
"""

_STYLE_PATH, _STYLE_PAGE, STYLE_URL = _asset("gallery.css", _STYLE, b"text/css; charset=utf-8")
_SCRIPT_PATH, _SCRIPT_PAGE, SCRIPT_URL = _asset("gallery.js", _SCRIPT, b"text/javascript; charset=utf-8")
_ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><g fill="#0a58ca">'
    '<rect width="7" height="7" rx="1"/><rect x="9" width="7" height="7" rx="1"/>'
    '<rect y="9" width="7" height="7" rx="1"/><rect x="9" y="9" width="7" height="7" rx="1"/></g></svg>'
)
_ICON_PATH, _ICON_PAGE, ICON_URL = _asset("icon.svg", _ICON, b"image/svg+xml")
ASSETS: dict[bytes, Page] = {_STYLE_PATH: _STYLE_PAGE, _SCRIPT_PATH: _SCRIPT_PAGE, _ICON_PATH: _ICON_PAGE}


def _document(title: str, body: str, *, script: bool) -> bytes:
    scripts = f'<script src="{SCRIPT_URL}" defer></script>\n' if script else ""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        f"<title>{title}</title>\n"
        f'<link rel="icon" href="{ICON_URL}" type="image/svg+xml">\n'
        f'<link rel="stylesheet" href="{STYLE_URL}">\n{scripts}</head>\n<body>\n{body}</body>\n</html>\n'
    ).encode()


def home_page(presets: Sequence[PresetView], *, browse: bool, generate_on_miss: bool) -> Page:
    """The `/` page: the presets (name, size, formats), whether browsing and generate-on-miss are on."""
    rows = []
    for preset in sorted(presets, key=lambda view: view.name):
        name = shown(preset.name.encode())
        link = f'<a href="{url_of(preset.name, (), folder=True)}">{name}</a>' if browse else name
        formats = ", ".join(preset.formats)
        made = "yes" if preset.generated else "no"
        size = html.escape(preset.size or "?")
        rows.append(f"<tr><td>{link}</td><td>{size}</td><td>{formats}</td><td>{made}</td></tr>")
    table = (
        "<table>\n<thead><tr><th>Preset</th><th>Size</th><th>Formats</th><th>Made on a miss</th></tr></thead>\n"
        f"<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>\n"
        if rows
        else "<p>No presets yet: run <code>thumbcli generate --cache</code> into this cache.</p>\n"
    )
    browsing = (
        "on: open a preset to see its folders"
        if browse
        else "off (start the server with <code>--browse</code> to list folders)"
    )
    body = (
        "<header><h1>thumbcli thumbnail server</h1></header>\n<main>\n"
        "<p>Each thumbnail is at <code>/&lt;preset&gt;/&lt;source path&gt;</code>.</p>\n"
        f"{table}"
        f'<p class="muted">Browsing: {browsing}. Generate on a miss: {"on" if generate_on_miss else "off"}.</p>\n'
        "</main>\n"
    )
    return Page.of(_document("thumbcli", body, script=False), HTML_TYPE, PAGE_CACHE_CONTROL)


def gallery_page(
    preset: PresetView,
    folder: Sequence[bytes],
    subfolders: Sequence[FolderTile],
    items: Sequence[GalleryItem],
    *,
    folder_count: int,
    image_count: int,
    sort: str,
    page: int,
    pages: int,
) -> Page:
    """One page of a folder: breadcrumbs, counts, sorting, its subfolders and thumbnails, page links."""
    crumbs = ['<a href="/">thumbcli</a>']
    trail = [(preset.name.encode("ascii"), url_of(preset.name, (), folder=True))]
    trail += [(segment, url_of(preset.name, folder[: depth + 1], folder=True)) for depth, segment in enumerate(folder)]
    for depth, (label, url) in enumerate(trail):
        if depth == len(trail) - 1:
            crumbs.append(f'<a href="{url}" aria-current="page">{shown(label)}</a>')
        else:
            crumbs.append(f'<a href="{url}">{shown(label)}</a>')
    here = trail[-1][1]
    sorts = " ".join(
        f'<a href="{here}?sort={key}"{" aria-current=true" if key == sort else ""}>{key}</a>' for key in SORTS
    )
    images = f"{image_count} image{'s' if image_count != 1 else ''}"
    header = (
        f'<header>\n<nav class="crumbs" aria-label="Breadcrumbs">{"<span>/</span>".join(crumbs)}</nav>\n'
        f'<p class="meta">{images}, {folder_count} folder{"s" if folder_count != 1 else ""}'
        f" &middot; {html.escape(preset.size or '?')} {', '.join(preset.formats)}"
        f" &middot; sort by {sorts}" + (f" &middot; page {page} of {pages}" if pages > 1 else "") + "</p>\n</header>\n"
    )
    parts = [header, "<main>\n"]
    if subfolders:
        parts.append('<ul class="folders">\n')
        for tile in subfolders:
            url = url_of(preset.name, (*folder, tile.name), folder=True)
            name = shown(tile.name)
            cover = f'<img src="{tile.cover_url}" loading="lazy" decoding="async" alt="">' if tile.cover_url else ""
            parts.append(
                f'<li><a class="folder" href="{url}?sort={sort}" title="{name}">'
                f'<span class="cover">{cover}</span><span class="name">{name}</span></a></li>\n'
            )
        parts.append("</ul>\n")
    if items:
        box = preset.tile_box
        parts.append('<ul class="grid">\n')
        for item in items:
            parts.append(_thumb_tile(item, box))
        parts.append("</ul>\n")
    elif not subfolders:
        parts.append('<p class="muted">This folder is empty.</p>\n')
    if pages > 1:
        parts.append(_page_links(here, sort, page, pages))
    parts.append("</main>\n")
    title = " / ".join(shown(label) for label, _ in trail) + " - thumbcli"
    return Page.of(_document(title, "".join(parts), script=bool(items)), HTML_TYPE, PAGE_CACHE_CONTROL)


def _thumb_tile(item: GalleryItem, box: tuple[int, int] | None) -> str:
    """One thumbnail's tile: in the preset's box shape when it has one, so smaller images keep the grid even."""
    caption = shown(item.name)
    dims = f' width="{item.size[0]}" height="{item.size[1]}"' if item.size else ""
    image = f'<img src="{item.thumb_url}"{dims} loading="lazy" decoding="async" alt="{caption}">'
    # An inline SVG's viewBox gives the tile its shape: no inline style, which the CSP forbids.
    shape = f'<svg viewBox="0 0 {box[0]} {box[1]}" aria-hidden="true"></svg>' if box else ""
    badge = '<span class="play" aria-hidden="true"></span>' if item.video else ""
    kind = "thumb video" if item.video else "thumb"
    # A video opens the video itself where it is served (a player, also without the script).
    href = item.video_url.decode("ascii") if item.video_url else item.full_url
    played = f' data-video="{href}"' if item.video_url else ""
    return (
        f'<li><a class="{kind}" href="{href}"{played} data-name="{caption}" title="{caption}">'
        f'<span class="pic{" boxed" if box else ""}">{shape}{image}{badge}</span>'
        f'<span class="name">{caption}</span></a></li>\n'
    )


def _page_links(here: str, sort: str, page: int, pages: int) -> str:
    shown_pages = sorted({1, pages, *range(max(1, page - 2), min(pages, page + 2) + 1)})
    links = []
    if page > 1:
        links.append(f'<a href="{here}?sort={sort}&amp;page={page - 1}" rel="prev">&laquo; previous</a>')
    previous = 0
    for number in shown_pages:
        if number > previous + 1:
            links.append("<span>&hellip;</span>")
        if number == page:
            links.append(f'<b aria-current="page">{number}</b>')
        else:
            links.append(f'<a href="{here}?sort={sort}&amp;page={number}">{number}</a>')
        previous = number
    if page < pages:
        links.append(f'<a href="{here}?sort={sort}&amp;page={page + 1}" rel="next">next &raquo;</a>')
    return f'<nav class="pages" aria-label="Pages">{" ".join(links)}</nav>\n'
