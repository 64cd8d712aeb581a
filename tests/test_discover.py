"""Walking source trees into jobs, without decoding anything."""

from __future__ import annotations

import os
from pathlib import Path

from imagekit import make_photo, output_files, run_cli

from thumbcli.discover import SourceFile, WalkProblem, display_path, is_image_name, walk_sources
from thumbcli.spec import WalkOptions

IS_IMAGE = is_image_name


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def walk(
    root: Path, options: WalkOptions | None = None, excluded: tuple[str, ...] = ()
) -> list[SourceFile | WalkProblem]:
    return list(walk_sources([str(root)], options or WalkOptions(), IS_IMAGE, excluded))


def relpaths(items: list[SourceFile | WalkProblem]) -> list[str]:
    return [item.relpath for item in items if isinstance(item, SourceFile)]


def test_walk_yields_images_sorted_with_paths_relative_to_the_root(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt", "noext", ".jpg"):
        touch(tmp_path / name)
    items = walk(tmp_path)
    assert relpaths(items) == ["a.PNG", "b.jpg", "sub/c.webp"]
    first = items[0]
    assert isinstance(first, SourceFile)
    assert first.root == str(tmp_path) and first.size == 1 and first.mtime_ns == os.stat(first.path).st_mtime_ns


def test_walk_skips_hidden_files_and_folders_unless_asked(tmp_path: Path) -> None:
    touch(tmp_path / ".secret.jpg")
    touch(tmp_path / ".cache" / "x.jpg")
    touch(tmp_path / "shown.jpg")
    assert relpaths(walk(tmp_path)) == ["shown.jpg"]
    # Each folder's files in name order, then its subfolders.
    assert relpaths(walk(tmp_path, WalkOptions(hidden=True))) == [".secret.jpg", "shown.jpg", ".cache/x.jpg"]


def test_walk_applies_include_and_exclude_globs_to_names_and_relative_paths(tmp_path: Path) -> None:
    for name in ("keep/a.jpg", "keep/b.png", "drop/c.jpg", "d.jpg"):
        touch(tmp_path / name)
    assert relpaths(walk(tmp_path, WalkOptions(include=("*.jpg",)))) == ["d.jpg", "drop/c.jpg", "keep/a.jpg"]
    assert relpaths(walk(tmp_path, WalkOptions(exclude=("drop",)))) == ["d.jpg", "keep/a.jpg", "keep/b.png"]
    assert relpaths(walk(tmp_path, WalkOptions(include=("keep/*",), exclude=("*.png",)))) == ["keep/a.jpg"]


def test_walk_does_not_follow_symlinks_unless_asked(tmp_path: Path) -> None:
    real = touch(tmp_path / "elsewhere" / "real.jpg")
    src = tmp_path / "src"
    touch(src / "own.jpg")
    (src / "link.jpg").symlink_to(real)
    (src / "linkdir").symlink_to(real.parent, target_is_directory=True)
    assert relpaths(walk(src)) == ["own.jpg"]
    assert relpaths(walk(src, WalkOptions(follow_symlinks=True))) == ["link.jpg", "own.jpg", "linkdir/real.jpg"]


def test_walk_reports_a_symlink_loop_once_and_goes_on(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    items = walk(tmp_path, WalkOptions(follow_symlinks=True))
    problems = [item for item in items if isinstance(item, WalkProblem)]
    assert relpaths(items) == ["a/x.jpg"]
    assert len(problems) == 1 and "loop" in problems[0].reason and problems[0].path.endswith("loop")


def test_walk_reports_a_fifo_with_an_image_name_instead_of_yielding_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    items = walk(tmp_path)
    assert len(items) == 1 and isinstance(items[0], WalkProblem) and items[0].path.endswith("x.jpg")


def test_walk_never_enters_excluded_folders(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "thumbs" / "256" / "a.jpg.jpg")
    assert relpaths(walk(tmp_path, excluded=(str(tmp_path / "thumbs"),))) == ["a.jpg"]


def test_walk_with_L_never_enters_a_folder_of_an_output_through_a_symlink(tmp_path: Path) -> None:
    touch(tmp_path / "src" / "a.jpg")
    touch(tmp_path / "out" / "256" / "sub" / "a.jpg.jpg")
    (tmp_path / "src" / "to-sub").symlink_to(tmp_path / "out" / "256" / "sub")
    (tmp_path / "src" / "to-output").symlink_to(tmp_path / "out")
    touch(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "src" / "to-elsewhere").symlink_to(tmp_path / "elsewhere")
    excluded = (str(tmp_path / "out"),)
    assert relpaths(walk(tmp_path / "src", WalkOptions(follow_symlinks=True), excluded=excluded)) == [
        "a.jpg",
        "to-elsewhere/b.jpg",
    ]


def test_generate_with_L_and_a_symlink_into_the_output_makes_no_thumbnails_of_thumbnails(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_photo(src / "a.jpg", 320, 240)
    (out / "256").mkdir(parents=True)
    (src / "thumbs").symlink_to(out / "256")
    first = run_cli("generate", src, "-o", out, "-s", "256", "-L", "--json")
    second = run_cli("generate", src, "-o", out, "-s", "256", "-L", "--json")
    assert (first.rc, second.rc) == (0, 0), first.stderr + second.stderr
    assert (second.summary["found"], second.summary["made"]) == (1, 0)
    assert [path.relative_to(out).as_posix() for path in output_files(out)] == ["256/a.jpg.jpg"]


def test_walk_takes_a_file_named_on_the_command_line_whatever_its_suffix(tmp_path: Path) -> None:
    path = touch(tmp_path / "photo.jpg[shrink=2]")
    items = list(walk_sources([str(path)], WalkOptions(), IS_IMAGE))
    assert [(item.path, item.relpath) for item in items if isinstance(item, SourceFile)] == [
        (str(path), "photo.jpg[shrink=2]")
    ]


def test_walk_yields_undecodable_names_and_display_path_escapes_them(tmp_path: Path) -> None:
    touch(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"))))
    (item,) = walk(tmp_path)
    assert isinstance(item, SourceFile) and os.fsencode(item.relpath) == b"caf\xe9.jpg"
    assert display_path(item.path).endswith("caf\\xe9.jpg")
    assert display_path("a\nb.jpg") == "a\\nb.jpg"


def test_walk_follows_a_symlink_named_on_the_command_line_to_a_loadable_path(tmp_path: Path) -> None:
    real = touch(tmp_path / "real" / "photo.jpg")
    (tmp_path / "link.jpg").symlink_to(real)
    (item,) = walk_sources([str(tmp_path / "link.jpg")], WalkOptions(), IS_IMAGE)
    assert isinstance(item, SourceFile)
    assert item.relpath == "link.jpg" and not os.path.islink(item.path) and os.path.samefile(item.path, real)
