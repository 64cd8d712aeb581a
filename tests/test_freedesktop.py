"""The freedesktop.org thumbnail cache: names, text chunks, validity, fail markers, pruning."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import pyvips
from imagekit import make_photo, make_rgba_png, run_cli

import thumbcli
from thumbcli.discover import SourceFile
from thumbcli.errors import ExitCode, LockedError
from thumbcli.make.pipeline import Pipeline
from thumbcli.make.results import RunStats
from thumbcli.resample import Thumbnail
from thumbcli.spec import RunOptions, WalkOptions
from thumbcli.targets.freedesktop import (
    FLAVOURS,
    FreedesktopCache,
    default_thumbnail_root,
    file_uri,
    mimetype_for,
    prune_freedesktop,
    thumbnail_name,
    uri_to_path,
)
from thumbcli.targets.plan import Removal
from thumbcli.targets.pngtext import add_png_text, read_png_text


def run(sources: list[Path], cache: FreedesktopCache, *, excluded: tuple[str, ...] = ()) -> RunStats:
    try:
        return Pipeline(
            [str(s) for s in sources],
            cache,
            RunOptions(workers=1, loaders=1),
            WalkOptions(),
            excluded_dirs=excluded,
        ).run()
    finally:
        cache.close()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def black_png() -> bytes:
    return bytes(pyvips.Image.black(1, 1).pngsave_buffer())


def thumb_of(root: Path, flavour: str, source: Path | bytes) -> Path:
    return root / flavour / thumbnail_name(file_uri(source))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _glib() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("glib-2.0")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.g_filename_to_uri.restype = ctypes.c_void_p
    lib.g_filename_to_uri.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    lib.g_free.argtypes = [ctypes.c_void_p]
    return lib


GLIB = _glib()


# -- names -----------------------------------------------------------------


def test_thumbnail_name_matches_the_standards_own_example() -> None:
    assert file_uri("/home/jens/photos/me.png") == "file:///home/jens/photos/me.png"
    assert thumbnail_name("file:///home/jens/photos/me.png") == "c6ee772d9e49320e97ec29a7eb5b1697.png"


def test_file_uri_escapes_spaces_unicode_and_reserved_characters_like_glib() -> None:
    assert file_uri("/p/a b/ü.jpg") == "file:///p/a%20b/%C3%BC.jpg"
    assert file_uri('/p/#%?;[]"<>^`{|}\\.jpg') == "file:///p/%23%25%3F%3B%5B%5D%22%3C%3E%5E%60%7B%7C%7D%5C.jpg"
    assert file_uri("/p/!$&'()*+,=:@~_-.jpg") == "file:///p/!$&'()*+,=:@~_-.jpg"


def test_file_uri_escapes_undecodable_bytes_and_round_trips() -> None:
    raw = b"/p/caf\xe9 \xff.jpg"
    assert file_uri(raw) == "file:///p/caf%E9%20%FF.jpg"
    assert file_uri(os.fsdecode(raw)) == "file:///p/caf%E9%20%FF.jpg"
    assert uri_to_path(file_uri(raw)) == raw
    assert uri_to_path("file://otherhost/x.jpg") is None
    assert uri_to_path("https://example.com/x.jpg") is None


def test_file_uri_makes_relative_paths_absolute_and_canonical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert file_uri("sub/../a.jpg") == file_uri(str(tmp_path / "a.jpg")) == f"file://{tmp_path}/a.jpg"


@pytest.mark.skipif(GLIB is None, reason="libglib-2.0 not installed")
@pytest.mark.parametrize(
    "path",
    [b"/home/jens/photos/me.png", b"/p/a b;c#d%e?f.jpg", b"/p/\xc3\xbc\xff\x01.jpg", b"/" + bytes(range(32, 256))],
)
def test_file_uri_agrees_with_glib_g_filename_to_uri(path: bytes) -> None:
    assert GLIB is not None
    pointer = GLIB.g_filename_to_uri(path, None, None)
    assert pointer
    try:
        expected = ctypes.string_at(pointer).decode("ascii")
    finally:
        GLIB.g_free(pointer)
    assert file_uri(path) == expected


def test_default_root_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert default_thumbnail_root() == tmp_path / "c" / "thumbnails"
    for blank_or_relative in ("", "  ", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", blank_or_relative)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert default_thumbnail_root() == tmp_path / "home" / ".cache" / "thumbnails"


def test_mimetype_comes_from_the_sniffed_format_and_avif_from_its_suffix() -> None:
    def made_from(source_format: str) -> Thumbnail:
        return Thumbnail(b"", 1, 1, 1, 1, source_format)

    assert mimetype_for(made_from("jpeg"), "/p/a.JPG") == "image/jpeg"
    assert mimetype_for(made_from("heif"), "/p/a.heic") == "image/heic"
    assert mimetype_for(made_from("heif"), "/p/a.heif") == "image/heif"
    assert mimetype_for(made_from("heif"), "/p/a.AVIF") == "image/avif"
    assert mimetype_for(made_from("svg"), "/p/a.svg") == "image/svg+xml"
    assert mimetype_for(made_from("jxl"), "/p/a.jxl") == "image/jxl"


# -- PNG text --------------------------------------------------------------


def test_png_text_is_inserted_after_ihdr_and_read_back_without_reading_pixels() -> None:
    png = bytes(pyvips.Image.black(4, 4).pngsave_buffer())
    tagged = add_png_text(png, {"Thumb::URI": "file:///a%20b.jpg", "Comment": "naïve", "Title": "雪"})
    assert tagged[37:41] == b"tEXt"
    assert read_png_text(tagged) == {"Thumb::URI": "file:///a%20b.jpg", "Comment": "naïve", "Title": "雪"}
    image = pyvips.Image.new_from_buffer(tagged, "")
    assert image.get("png-comment-0-Thumb::URI") == "file:///a%20b.jpg"
    assert image.avg() == 0
    # A text chunk after IDAT is not read: the reader stops at the pixels.
    iend = tagged.rindex(b"IEND") - 4
    late = tagged[:iend] + chunk(b"tEXt", b"Late\0x") + tagged[iend:]
    assert pyvips.Image.new_from_buffer(late, "").avg() == 0
    assert "Late" not in read_png_text(late)


def test_read_png_text_returns_nothing_for_what_is_not_a_png(tmp_path: Path) -> None:
    assert read_png_text(b"") == {}
    assert read_png_text(b"GIF89a" + bytes(100)) == {}
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert read_png_text(tmp_path / "x.png") == {}


# -- generating ------------------------------------------------------------


def test_generate_writes_standard_thumbnails_with_text_chunks_and_private_modes(tmp_path: Path) -> None:
    src = tmp_path / "Pictures"
    jpeg = make_photo(src / "a photo ü.jpg", 600, 400)
    png = make_rgba_png(src / "alpha.png", 300, 200)
    root = tmp_path / "cache" / "thumbnails"
    stats = run([src], FreedesktopCache(root, ("normal", "large", "x-large")))
    assert (stats.made, stats.failed, stats.thumbnails) == (2, 0, 6)

    for flavour in ("normal", "large", "x-large"):
        assert mode(root / flavour) == 0o700
        for source, size in ((jpeg, (600, 400)), (png, (300, 200))):
            thumb = thumb_of(root, flavour, source)
            assert mode(thumb) == 0o600
            st = source.stat()
            text = read_png_text(thumb)
            assert text == {
                "Thumb::URI": file_uri(str(source)),
                "Thumb::MTime": str(int(st.st_mtime)),
                "Thumb::Size": str(st.st_size),
                "Thumb::Mimetype": "image/jpeg" if source == jpeg else "image/png",
                "Thumb::Image::Width": str(size[0]),
                "Thumb::Image::Height": str(size[1]),
                "Software": f"thumbcli {thumbcli.__version__}",
            }
            image = pyvips.Image.new_from_file(str(thumb))
            fields = {f.split("-", 3)[3]: image.get(f) for f in image.get_fields() if f.startswith("png-comment-")}
            assert fields == text
            box = FLAVOURS[flavour]
            assert (image.bands, image.format, image.interpretation) == (4, "uchar", "srgb")
            assert max(image.width, image.height) == min(box, max(size))
    assert mode(root) == 0o700
    assert not (root / "xx-large").exists()
    assert not list(root.rglob(".thumbcli-tmp-*"))
    assert (root.parent / "thumbcli" / "freedesktop.lock").is_file()


def gio_thumbnail(path: Path, cache_home: Path) -> dict[str, str]:
    """The thumbnail::* attributes GIO reports for `path`: what GTK file managers look up."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    proc = subprocess.run(
        ["gio", "info", "-a", "thumbnail::*", str(path)], capture_output=True, text=True, env=env, check=True
    )
    attributes = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(": ")
        if key.startswith("thumbnail::"):
            attributes[key] = value
    return attributes


@pytest.mark.skipif(shutil.which("gio") is None, reason="needs gio (Debian: libglib2.0-bin)")
def test_gio_finds_the_thumbnails_valid_until_the_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    source = make_photo(tmp_path / "Pictures" / "a photo é [1] #2.jpg", 600, 400)
    assert gio_thumbnail(source, cache_home) == {}
    assert run_cli("generate", source.parent, "--freedesktop", "normal", "--freedesktop", "large").rc == 0
    found = gio_thumbnail(source, cache_home)
    assert found["thumbnail::is-valid"] == "TRUE"
    assert found["thumbnail::path"] == str(thumb_of(cache_home / "thumbnails", "large", source))
    os.utime(source, (1_000_000_000, 1_000_000_000))
    assert gio_thumbnail(source, cache_home)["thumbnail::is-valid"] == "FALSE"
    assert run_cli("generate", source.parent, "--freedesktop", "large").rc == 0
    assert gio_thumbnail(source, cache_home)["thumbnail::is-valid"] == "TRUE"


def test_existing_thumbnail_folders_are_made_private(tmp_path: Path) -> None:
    root = tmp_path / "thumbnails"
    (root / "normal").mkdir(parents=True, mode=0o755)
    root.chmod(0o755)
    FreedesktopCache(root, ("normal",)).close()
    assert mode(root) == mode(root / "normal") == 0o700


def test_second_run_skips_everything_and_a_touched_source_is_remade(tmp_path: Path) -> None:
    src = tmp_path / "src"
    a = make_photo(src / "a.jpg")
    make_photo(src / "b.jpg", seed=1)
    root = tmp_path / "thumbnails"
    assert run([src], FreedesktopCache(root, ("normal",))).made == 2
    before = thumb_of(root, "normal", a).stat().st_mtime_ns

    again = run([src], FreedesktopCache(root, ("normal",)))
    assert (again.made, again.skipped) == (0, 2)
    assert thumb_of(root, "normal", a).stat().st_mtime_ns == before

    # Validity is equality: an older mtime invalidates a thumbnail as surely as a newer one.
    os.utime(a, (1_000_000_000, 1_000_000_000))
    third = run([src], FreedesktopCache(root, ("normal",)))
    assert (third.made, third.skipped) == (1, 1)
    assert read_png_text(thumb_of(root, "normal", a))["Thumb::MTime"] == "1000000000"


def test_adding_a_flavour_makes_only_the_missing_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    a = make_photo(src / "a.jpg")
    root = tmp_path / "thumbnails"
    run([src], FreedesktopCache(root, ("normal",)))
    cache = FreedesktopCache(root, ("normal", "large"))
    plan = cache.plan(SourceFile(str(a), str(src), "a.jpg", a.stat().st_size, a.stat().st_mtime_ns), False)
    assert (plan.freshness, [s.name for s in plan.specs]) == ("missing", ["large"])
    forced = cache.plan(SourceFile(str(a), str(src), "a.jpg", a.stat().st_size, a.stat().st_mtime_ns), True)
    assert [s.name for s in forced.specs] == ["normal", "large"]
    cache.close()


def test_a_thumbnail_for_another_uri_under_the_same_name_is_stale(tmp_path: Path) -> None:
    src = tmp_path / "src"
    a = make_photo(src / "a.jpg")
    root = tmp_path / "thumbnails"
    run([src], FreedesktopCache(root, ("normal",)))
    thumb = thumb_of(root, "normal", a)
    mtime = read_png_text(thumb)["Thumb::MTime"]
    thumb.write_bytes(add_png_text(black_png(), {"Thumb::URI": "file:///elsewhere.jpg", "Thumb::MTime": mtime}))
    assert run([src], FreedesktopCache(root, ("normal",))).made == 1
    assert read_png_text(thumb)["Thumb::URI"] == file_uri(str(a))


# -- failures --------------------------------------------------------------


def test_corrupt_file_gets_a_fail_marker_and_is_retried_only_by_a_new_version_or_mtime(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_photo(src / "good.jpg")
    bad = src / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    root = tmp_path / "thumbnails"

    first = run([src], FreedesktopCache(root, ("normal",)))
    assert (first.made, first.failed) == (1, 1)
    marker = root / "fail" / f"thumbcli-{thumbcli.__version__}" / thumbnail_name(file_uri(str(bad)))
    assert read_png_text(marker) == {
        "Thumb::URI": file_uri(str(bad)),
        "Thumb::MTime": str(int(bad.stat().st_mtime)),
        "Software": f"thumbcli {thumbcli.__version__}",
    }
    assert pyvips.Image.new_from_file(str(marker)).get("png-comment-0-Thumb::URI") == file_uri(str(bad))
    assert mode(marker) == 0o600
    assert mode(root / "fail") == mode(marker.parent) == 0o700
    assert not thumb_of(root, "normal", bad).exists()

    second = run([src], FreedesktopCache(root, ("normal",)))
    assert (second.made, second.skipped, second.failed, second.known_failures) == (0, 1, 0, 1)

    newer = run([src], FreedesktopCache(root, ("normal",), version="99.0"))
    assert (newer.skipped, newer.failed) == (1, 1)
    assert (root / "fail" / "thumbcli-99.0" / marker.name).is_file()

    os.utime(bad, (1_000_000_000, 1_000_000_000))
    changed = run([src], FreedesktopCache(root, ("normal",)))
    assert (changed.skipped, changed.failed) == (1, 1)
    assert read_png_text(marker)["Thumb::MTime"] == "1000000000"


def test_default_version_is_thumbcli_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thumbcli, "__version__", "7.7.7")
    cache = FreedesktopCache(tmp_path / "thumbnails", ("normal",))
    cache.close()
    assert cache.fail_dir == tmp_path / "thumbnails" / "fail" / "thumbcli-7.7.7"


def test_a_fixed_file_loses_its_fail_marker(tmp_path: Path) -> None:
    src = tmp_path / "src"
    bad = src / "photo.jpg"
    src.mkdir()
    bad.write_bytes(b"not an image at all")
    root = tmp_path / "thumbnails"
    assert run([src], FreedesktopCache(root, ("normal",))).failed == 1
    marker = root / "fail" / f"thumbcli-{thumbcli.__version__}" / thumbnail_name(file_uri(str(bad)))
    assert marker.is_file()
    make_photo(bad)
    os.utime(bad, (2_000_000_000, 2_000_000_000))
    assert run([src], FreedesktopCache(root, ("normal",))).made == 1
    assert not marker.exists()


# -- the cache never thumbnails itself, and is locked ----------------------


def test_thumbnail_root_inside_the_source_tree_is_never_walked(tmp_path: Path) -> None:
    src = tmp_path / "Pictures"
    make_photo(src / "a.jpg")
    root = src / "thumbnails"
    first = run([src], FreedesktopCache(root, ("normal",)), excluded=(str(root),))
    assert (first.found, first.made) == (1, 1)
    second = run([src], FreedesktopCache(root, ("normal",)), excluded=(str(root),))
    assert (second.found, second.skipped, second.made) == (1, 1, 0)
    # Named directly, a thumbnail is still not thumbnailed.
    inside = next((root / "normal").iterdir())
    third = run([inside], FreedesktopCache(root, ("normal",)))
    assert (third.found, third.made, third.skipped) == (1, 0, 1)
    assert len(list((root / "normal").iterdir())) == 1


def test_a_second_cache_on_the_same_root_is_locked_out(tmp_path: Path) -> None:
    cache = FreedesktopCache(tmp_path / "thumbnails", ("normal",))
    try:
        with pytest.raises(LockedError):
            FreedesktopCache(tmp_path / "thumbnails", ("large",))
    finally:
        cache.close()


# -- symlinks planted in the cache are never followed ------------------------


def test_a_symlinked_flavour_folder_is_refused_and_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_home, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    (cache_home / "thumbnails").mkdir(parents=True)
    (cache_home / "thumbnails" / "normal").symlink_to(elsewhere)
    source = make_photo(tmp_path / "Pictures" / "a.jpg")
    run = run_cli("generate", source.parent, "--freedesktop", "normal")
    assert run.rc == ExitCode.CANNOT_RUN, run.stderr
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {cache_home}/thumbnails: refusing the thumbnail folder: "
        f"{cache_home}/thumbnails/normal is a symlink"
    ]
    assert list(elsewhere.iterdir()) == []
    assert mode(elsewhere) == 0o755


def test_a_symlinked_fail_folder_gets_no_marker_and_the_run_goes_on(tmp_path: Path) -> None:
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    make_photo(src / "a.jpg")
    (src / "broken.jpg").write_bytes(b"not a JPEG at all")
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    root = tmp_path / "thumbnails"
    root.mkdir()
    (root / "fail").symlink_to(elsewhere)
    stats = run([src], FreedesktopCache(root, ("normal",)))
    assert (stats.made, stats.failed) == (1, 1)
    assert list(elsewhere.iterdir()) == []
    assert mode(elsewhere) == 0o755
    assert thumb_of(root, "normal", src / "a.jpg").is_file()


def test_prune_does_not_look_into_a_symlinked_flavour_folder(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stale = elsewhere / thumbnail_name(file_uri(tmp_path / "gone.jpg"))
    stale.write_bytes(add_png_text(black_png(), {"Thumb::URI": file_uri(tmp_path / "gone.jpg"), "Thumb::MTime": "1"}))
    root = tmp_path / "thumbnails"
    (root / "normal").mkdir(parents=True)
    (root / "normal" / stale.name).write_bytes(stale.read_bytes())
    (root / "large").symlink_to(elsewhere)
    removed = prune_freedesktop(root, dry_run=False)
    assert [removal.path for removal in removed] == [root / "normal" / stale.name]
    assert stale.is_file()


# -- pruning ---------------------------------------------------------------


def test_prune_removes_thumbnails_of_deleted_and_changed_sources_and_old_fail_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    keep = make_photo(src / "keep.jpg")
    gone = make_photo(src / "gone.jpg", seed=1)
    changed = make_photo(src / "changed.jpg", seed=2)
    bad = src / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 broken")
    root = tmp_path / "thumbnails"
    run([src], FreedesktopCache(root, ("normal", "large")))
    run([src], FreedesktopCache(root, ("normal",), version="0.0.1"))
    assert (root / "fail" / "thumbcli-0.0.1").is_dir()
    other_tool = root / "fail" / "gnome-thumbnail-factory"
    other_tool.mkdir(parents=True)
    (other_tool / "x.png").write_bytes(b"whatever")
    foreign = root / "normal" / ("0" * 32 + ".png")
    foreign.write_bytes(add_png_text(black_png(), {"Thumb::URI": "trash:///x"}))
    unplugged = root / "normal" / ("1" * 32 + ".png")
    unplugged.write_bytes(
        add_png_text(
            black_png(),
            {"Thumb::URI": "file:///media/thumbcli-absent-drive/a.jpg", "Thumb::MTime": "1"},
        )
    )

    gone.unlink()
    os.utime(changed, (1_000_000_000, 1_000_000_000))
    leftover = root / "large" / ".thumbcli-tmp-0123456789abcdef"
    leftover.write_bytes(b"half a png")
    reasons = {thumb_of(root, f, gone): "source is gone" for f in ("normal", "large")}
    reasons |= {thumb_of(root, f, changed): "source changed" for f in ("normal", "large")}
    reasons[root / "fail" / "thumbcli-0.0.1"] = "made by another thumbcli version"
    reasons[leftover] = "temporary file"
    expected = sorted(reasons)

    listed = prune_freedesktop(root, dry_run=True)
    assert [removal.path for removal in listed] == expected
    assert {removal.path: removal.reason for removal in listed} == reasons
    assert all(removal.bytes > 0 for removal in listed)
    assert all(path.exists() for path in expected)

    removed = prune_freedesktop(root, dry_run=False)
    assert removed == listed
    assert not any(path.exists() for path in expected)
    for survivor in (thumb_of(root, "normal", keep), thumb_of(root, "large", keep), foreign, unplugged):
        assert survivor.is_file()
    assert (other_tool / "x.png").is_file()
    assert (root / "fail" / f"thumbcli-{thumbcli.__version__}").is_dir()
    assert prune_freedesktop(root, dry_run=False) == []


def test_prune_removes_fail_markers_of_deleted_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    bad = src / "bad.png"
    bad.write_bytes(b"plain text")
    root = tmp_path / "thumbnails"
    run([src], FreedesktopCache(root, ("normal",)))
    marker = root / "fail" / f"thumbcli-{thumbcli.__version__}" / thumbnail_name(file_uri(str(bad)))
    assert prune_freedesktop(root, dry_run=False) == []
    bad.unlink()
    size = marker.stat().st_size
    assert prune_freedesktop(root, dry_run=False) == [Removal(marker, size, "source is gone")]
    assert not marker.exists()


def test_prune_of_a_missing_root_finds_nothing(tmp_path: Path) -> None:
    assert prune_freedesktop(tmp_path / "nope", dry_run=False) == []
