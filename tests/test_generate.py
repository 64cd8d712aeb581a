"""`thumbcli generate` end to end: the real CLI as a subprocess on real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pyvips
from imagekit import (
    assert_clean_failure,
    cli_command,
    draw_photo,
    load,
    make_cmyk_jpeg,
    make_photo,
    make_png_bomb,
    make_rgba_png,
    mean_abs_difference,
    needs_nobody,
    output_files,
    run_cli,
)

from thumbcli.fsutil import ABANDONED_TEMP_SECONDS

# -- what comes out -------------------------------------------------------


def test_generate_makes_each_size_with_the_right_dimensions(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "photo.jpg")
    run = run_cli(
        "generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "256", "-s", "320x240", "-s", "200x", "-s", "x200"
    )
    assert run.rc == 0, run.stderr
    dims = {size: load(tmp_path / "out" / size / "photo.jpg.jpg") for size in ("256", "320x240", "200x", "x200")}
    assert {size: (im.width, im.height) for size, im in dims.items()} == {
        "256": (256, 171),
        "320x240": (320, 213),
        "200x": (200, 133),
        "x200": (300, 200),
    }
    assert all(mean_abs_difference(im, draw_photo()) < 12 for im in dims.values())


def test_generate_several_sizes_give_the_dimensions_of_single_size_runs(tmp_path: Path) -> None:
    # Odd proportions, where rounding from a shared base would differ by a pixel.
    make_photo(tmp_path / "src" / "wide.jpg", 1000, 333)
    make_photo(tmp_path / "src" / "odd.png", 777, 555)
    sizes = ("200", "128", "85", "50")
    together = run_cli("generate", tmp_path / "src", "-o", tmp_path / "all", *(arg for s in sizes for arg in ("-s", s)))
    assert together.rc == 0, together.stderr
    for size in sizes:
        alone = run_cli("generate", tmp_path / "src", "-o", tmp_path / size, "-s", size)
        assert alone.rc == 0, alone.stderr
        for name in ("wide.jpg.jpg", "odd.png.jpg"):
            a, b = load(tmp_path / "all" / size / name), load(tmp_path / size / size / name)
            assert (a.width, a.height) == (b.width, b.height), (size, name)


@pytest.mark.parametrize("fit", ["cover", "smart"])
def test_generate_fit_cover_and_smart_fill_the_whole_box(tmp_path: Path, fit: str) -> None:
    make_photo(tmp_path / "src" / "photo.jpg")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "200x150", "-s", "100", "--fit", fit)
    assert run.rc == 0, run.stderr
    assert (load(tmp_path / "out" / "200x150" / "photo.jpg.jpg").width, 150) == (200, 150)
    assert load(tmp_path / "out" / "200x150" / "photo.jpg.jpg").height == 150
    thumb = load(tmp_path / "out" / "100" / "photo.jpg.jpg")
    assert (thumb.width, thumb.height) == (100, 100)


def test_generate_never_enlarges_unless_upscale(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "small.jpg", 150, 100)
    plain = run_cli("generate", tmp_path / "src", "-o", tmp_path / "plain", "-s", "300")
    upscaled = run_cli("generate", tmp_path / "src", "-o", tmp_path / "up", "-s", "300", "--upscale")
    assert plain.rc == upscaled.rc == 0
    kept, enlarged = load(tmp_path / "plain/300/small.jpg.jpg"), load(tmp_path / "up/300/small.jpg.jpg")
    assert (kept.width, kept.height) == (150, 100)
    assert (enlarged.width, enlarged.height) == (300, 200)


@pytest.mark.parametrize(("fmt", "ext"), [("jpeg", "jpg"), ("webp", "webp"), ("avif", "avif"), ("png", "png")])
def test_generate_writes_every_format_so_that_it_loads_back(tmp_path: Path, fmt: str, ext: str) -> None:
    make_photo(tmp_path / "src" / "photo.jpg")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "128", "--format", fmt)
    assert run.rc == 0, run.stderr
    thumb = load(tmp_path / "out" / "128" / f"photo.jpg.{ext}")
    assert (thumb.width, thumb.height, thumb.bands) == (128, 85, 3)


def test_generate_flattens_transparency_on_white_for_jpeg(tmp_path: Path) -> None:
    make_rgba_png(tmp_path / "src" / "rgba.png")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "300")
    assert run.rc == 0, run.stderr
    thumb = load(tmp_path / "out" / "300" / "rgba.png.jpg")
    assert thumb.bands == 3
    assert min(thumb(10, 100)) > 245, thumb(10, 100)


def test_generate_strips_metadata_unless_keep_metadata(tmp_path: Path) -> None:
    source = make_photo(tmp_path / "src" / "photo.jpg")
    assert load(source).get_typeof("exif-data")
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "strip", "-s", "128").rc == 0
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "keep", "-s", "128", "--keep-metadata").rc == 0
    assert not load(tmp_path / "strip/128/photo.jpg.jpg").get_typeof("exif-data")
    assert load(tmp_path / "keep/128/photo.jpg.jpg").get_typeof("exif-data")


def test_generate_turns_a_cmyk_source_into_srgb(tmp_path: Path) -> None:
    make_cmyk_jpeg(tmp_path / "src" / "cmyk.jpg")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "200", "--format", "webp")
    assert run.rc == 0, run.stderr
    thumb = load(tmp_path / "out" / "200" / "cmyk.jpg.webp")
    assert (thumb.bands, thumb.interpretation) == (3, "srgb")
    assert mean_abs_difference(thumb, draw_photo()) < 20


# -- names ----------------------------------------------------------------


def test_generate_mirrors_the_source_tree_and_keeps_source_suffixes_apart(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg")
    make_photo(tmp_path / "src" / "a.png", seed=1)
    make_photo(tmp_path / "src" / "deep" / "er" / "b.webp")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", "--json")
    assert run.rc == 0, run.stderr
    assert [p.relative_to(tmp_path / "out").as_posix() for p in output_files(tmp_path / "out")] == [
        "64/a.jpg.jpg",
        "64/a.png.jpg",
        "64/deep/er/b.webp.jpg",
    ]
    assert run.summary["made"] == 3


def test_generate_names_outputs_from_the_name_template(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "sub" / "pic.jpg")
    run = run_cli(
        "generate",
        tmp_path / "src",
        "-o",
        tmp_path / "out",
        "-s",
        "64",
        "--format",
        "webp",
        "--name",
        "{reldir}/{stem}-{size}.{ext}",
    )
    assert run.rc == 0, run.stderr
    assert load(tmp_path / "out" / "sub" / "pic-64.webp").width == 64


def test_generate_reports_two_sources_that_a_template_without_root_maps_to_one_name(tmp_path: Path) -> None:
    # The default layout keeps sources apart (tests/test_sources.py); a template that drops {root} may not.
    make_photo(tmp_path / "one" / "same.jpg")
    make_photo(tmp_path / "two" / "same.jpg", seed=3)
    make_photo(tmp_path / "two" / "other.jpg")
    template = ("--name", "{size}/{name}.{ext}")
    run = run_cli("generate", tmp_path / "one", tmp_path / "two", "-o", tmp_path / "out", "-s", "64", *template)
    assert run.rc == 1
    line = assert_clean_failure(run, str(tmp_path / "two" / "same.jpg"))
    assert "same.jpg" in line.split(":", 2)[-1]
    assert (tmp_path / "out/64/other.jpg.jpg").exists()
    # The first claimant kept its thumbnail.
    assert mean_abs_difference(load(tmp_path / "out/64/same.jpg.jpg"), draw_photo()) < 12


def test_generate_reports_a_template_that_maps_two_sources_to_one_name(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "x" / "pic.jpg")
    make_photo(tmp_path / "src" / "y" / "pic.jpg")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", "--name", "{size}/{name}.{ext}")
    assert run.rc == 1
    assert_clean_failure(run, "y/pic.jpg")


# -- walking --------------------------------------------------------------


def test_generate_skips_hidden_files_unless_hidden(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / ".hid.jpg")
    make_photo(tmp_path / "src" / ".dir" / "in.jpg")
    make_photo(tmp_path / "src" / "shown.jpg")
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "a", "-s", "32").rc == 0
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "b", "-s", "32", "--hidden").rc == 0
    assert [p.name for p in output_files(tmp_path / "a")] == ["shown.jpg.jpg"]
    assert [p.name for p in output_files(tmp_path / "b")] == ["in.jpg.jpg", ".hid.jpg.jpg", "shown.jpg.jpg"]


def test_generate_applies_include_and_exclude_globs(tmp_path: Path) -> None:
    for name in ("keep/a.jpg", "keep/b.png", "skip/c.jpg", "d.jpg"):
        make_photo(tmp_path / "src" / name, 60, 40)
    run = run_cli(
        "generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "32", "--include", "*.jpg", "--exclude", "skip"
    )
    assert run.rc == 0, run.stderr
    assert [p.relative_to(tmp_path / "out").as_posix() for p in output_files(tmp_path / "out")] == [
        "32/d.jpg.jpg",
        "32/keep/a.jpg.jpg",
    ]


def test_generate_follows_symlinks_only_with_L_and_reports_a_loop(tmp_path: Path) -> None:
    make_photo(tmp_path / "elsewhere" / "linked.jpg")
    make_photo(tmp_path / "src" / "own.jpg")
    (tmp_path / "src" / "link.jpg").symlink_to(tmp_path / "elsewhere" / "linked.jpg")
    (tmp_path / "src" / "loop").symlink_to(tmp_path / "src", target_is_directory=True)
    plain = run_cli("generate", tmp_path / "src", "-o", tmp_path / "plain", "-s", "32")
    assert plain.rc == 0, plain.stderr
    assert [p.name for p in output_files(tmp_path / "plain")] == ["own.jpg.jpg"]
    followed = run_cli("generate", tmp_path / "src", "-o", tmp_path / "followed", "-s", "32", "-L", timeout=30)
    assert followed.rc == 1
    assert "loop" in assert_clean_failure(followed, "loop")
    assert [p.name for p in output_files(tmp_path / "followed")] == ["link.jpg.jpg", "own.jpg.jpg"]


def test_generate_takes_a_symlink_named_on_the_command_line(tmp_path: Path) -> None:
    make_photo(tmp_path / "real" / "photo.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real" / "photo.jpg")
    run = run_cli("generate", tmp_path / "link.jpg", "-o", tmp_path / "out", "-s", "32")
    assert run.rc == 0, run.stderr
    assert load(tmp_path / "out" / "32" / "link.jpg.jpg").width == 32


def test_generate_never_walks_its_own_output_inside_the_source(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "photo.jpg")
    for _ in range(2):
        run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "src" / "thumbs", "-s", "64", "--json", "--force")
        assert run.rc == 0, run.stderr
        assert run.summary["found"] == 1
    assert [p.relative_to(tmp_path / "src").as_posix() for p in output_files(tmp_path / "src" / "thumbs")] == [
        "thumbs/64/photo.jpg.jpg",
    ]


# -- hostile input ----------------------------------------------------------


def test_generate_survives_hostile_files_with_one_line_each_and_makes_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = make_photo(src / "good.jpg")
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("just some words, not a picture\n")
    (src / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    make_png_bomb(src / "bomb.png")
    os.mkfifo(src / "fifo.jpg")
    bytes_dir = os.fsencode(src)
    latin1 = os.path.join(bytes_dir, b"caf\xe9.jpg")
    with open(latin1, "wb") as file:
        file.write(good.read_bytes())
    make_photo(src / "photo[shrink=2].jpg")
    bracketed = make_photo(tmp_path / "loose" / "photo.jpg[shrink=2]")
    started = time.monotonic()
    run = run_cli("generate", src, bracketed, "-o", tmp_path / "out", "-s", "64", "--json", timeout=30)
    assert time.monotonic() - started < 25
    assert run.rc == 1, run.stderr
    assert "Traceback" not in run.stderr
    for name, reason in [
        ("empty.jpg", "empty"),
        ("text.jpg", "not an image"),
        ("bomb.png", "max-pixels"),
        ("fifo.jpg", "regular file"),
    ]:
        assert reason in assert_clean_failure(run, f"src/{name}")
    # The truncated JPEG decodes in part: a degraded thumbnail (--strict refuses it; see test_workers).
    assert not [line for line in run.failure_lines if "truncated.jpg" in line]
    assert run.summary["failed"] == 4 and run.summary["made"] == 5
    # Two sources, so each root's thumbnails are under its folder name.
    out = os.fsencode(tmp_path / "out" / "64")
    made_names = (
        b"src/good.jpg.jpg",
        b"src/truncated.jpg.jpg",
        b"src/caf\xe9.jpg.jpg",
        b"src/photo[shrink=2].jpg.jpg",
    )
    for made in (*made_names, b"loose/photo.jpg[shrink=2].jpg"):
        assert load(os.fsdecode(os.path.join(out, made))).width == 64, made


def test_generate_refuses_a_decompression_bomb_quickly(tmp_path: Path) -> None:
    make_png_bomb(tmp_path / "src" / "bomb.png")
    # Refused from its header: a decoder that tried would fail on the memory ceiling or the time limit instead.
    limits = ("--max-worker-memory", str(256 << 20), "--max-decode-time", "5")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", *limits, timeout=30)
    assert run.rc == 1
    assert "100000x100000" in assert_clean_failure(run, "bomb.png")


def test_generate_refuses_files_over_max_file_size(tmp_path: Path) -> None:
    big = make_photo(tmp_path / "src" / "big.jpg", Q=95)
    make_photo(tmp_path / "src" / "small.jpg", 60, 40)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--max-file-size", "10K")
    assert big.stat().st_size > 10 * 1024
    assert run.rc == 1
    assert "max-file-size" in assert_clean_failure(run, "big.jpg")
    assert [p.name for p in output_files(tmp_path / "out")] == ["small.jpg.jpg"]


@needs_nobody
def test_generate_exits_cannot_run_on_a_read_only_output_folder(shared_tmp: Path) -> None:
    make_photo(shared_tmp / "src" / "photo.jpg")
    (shared_tmp / "src").chmod(0o755)
    out = shared_tmp / "out"
    out.mkdir(mode=0o755)
    run = run_cli("generate", shared_tmp / "src", "-o", out, as_nobody=True)
    assert run.rc == 3, run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and str(out) in run.stderr
    assert list(out.iterdir()) == []


def test_generate_missing_source_is_a_usage_error_before_any_output_folder_is_made(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 80, 60)
    for sources in ([tmp_path / "Pictures"], [tmp_path / "src", tmp_path / "Pictures"]):
        run = run_cli("generate", *sources, "-o", tmp_path / "out")
        assert run.rc == 2, run.stderr
        assert f"source {tmp_path / 'Pictures'} does not exist (No such file or directory)" in run.stderr
        assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_generate_says_it_cannot_create_an_output_folder_that_cannot_be(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 80, 60)
    (tmp_path / "file").write_text("not a folder")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "file" / "thumbs")
    assert run.rc == 3, run.stderr
    assert f"thumbcli: error: cannot create output folder {tmp_path / 'file' / 'thumbs'}: Not a directory" in run.stderr


@needs_nobody
def test_generate_reports_an_unreadable_source_and_makes_the_rest(shared_tmp: Path) -> None:
    src = shared_tmp / "src"
    make_photo(src / "locked.jpg").chmod(0o000)
    make_photo(src / "open.jpg").chmod(0o644)
    src.chmod(0o755)
    run = run_cli("generate", src, "-o", shared_tmp / "out", "-s", "64", as_nobody=True)
    assert run.rc == 1, run.stderr
    assert "permission denied" in assert_clean_failure(run, "locked.jpg").lower()
    assert [p.name for p in output_files(shared_tmp / "out")] == ["open.jpg.jpg"]


# -- incremental runs ---------------------------------------------------------


def generate_json(src: Path, out: Path, *args: str) -> dict[str, object]:
    run = run_cli("generate", src, "-o", out, "-s", "64", "--json", *args)
    assert run.rc == 0, run.stderr
    return run.summary


def test_generate_skips_unchanged_sources_without_reading_them(tmp_path: Path) -> None:
    for i in range(3):
        make_photo(tmp_path / "src" / f"p{i}.jpg", 120, 80, seed=i)
    first = generate_json(tmp_path / "src", tmp_path / "out")
    assert (first["made"], first["skipped"]) == (3, 0)
    again = generate_json(tmp_path / "src", tmp_path / "out")
    assert (again["made"], again["skipped"], again["bytes_read"]) == (0, 3, 0)


def test_generate_remakes_a_source_whose_mtime_or_size_changed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    newer, older, resized = (make_photo(src / f"{n}.jpg", 120, 80) for n in ("newer", "older", "resized"))
    make_photo(src / "same.jpg", 120, 80)
    generate_json(src, tmp_path / "out")
    st = newer.stat()
    os.utime(newer, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    # Equality, not newer-than: an older mtime is a change too.
    os.utime(older, ns=(st.st_atime_ns, st.st_mtime_ns - 86_400_000_000_000))
    mtime = resized.stat().st_mtime_ns
    make_photo(resized, 100, 50)
    os.utime(resized, ns=(mtime, mtime))
    summary = generate_json(src, tmp_path / "out")
    assert (summary["made"], summary["skipped"]) == (3, 1)
    assert load(tmp_path / "out/64/resized.jpg.jpg").height == 32


def test_generate_force_remakes_everything(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "p.jpg", 120, 80)
    generate_json(tmp_path / "src", tmp_path / "out")
    assert generate_json(tmp_path / "src", tmp_path / "out", "--force")["made"] == 1


@pytest.mark.parametrize("change", [("-q", "50"), ("--fit", "cover"), ("--keep-metadata",)])
def test_generate_remakes_when_an_output_setting_changes(tmp_path: Path, change: tuple[str, ...]) -> None:
    make_photo(tmp_path / "src" / "p.jpg", 120, 80)
    generate_json(tmp_path / "src", tmp_path / "out")
    assert generate_json(tmp_path / "src", tmp_path / "out", *change)["made"] == 1
    assert generate_json(tmp_path / "src", tmp_path / "out", *change)["skipped"] == 1


def test_generate_remakes_a_deleted_thumbnail(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "p.jpg", 120, 80)
    make_photo(tmp_path / "src" / "q.jpg", 120, 80)
    generate_json(tmp_path / "src", tmp_path / "out")
    (tmp_path / "out/64/p.jpg.jpg").unlink()
    summary = generate_json(tmp_path / "src", tmp_path / "out")
    assert (summary["made"], summary["skipped"]) == (1, 1)
    assert load(tmp_path / "out/64/p.jpg.jpg").width == 64


# -- reporting and exit codes -----------------------------------------------------


def test_generate_json_summary_has_every_field(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "ok.jpg", 120, 80)
    (tmp_path / "src" / "bad.jpg").write_text("nope")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", "-s", "32", "--json")
    assert run.rc == 1
    summary = run.summary
    assert {
        "found",
        "made",
        "thumbnails",
        "skipped",
        "failed",
        "seconds",
        "images_per_second",
        "bytes_read",
        "stopped",
        "output",
        "failures",
    } <= summary.keys()
    assert (summary["found"], summary["made"], summary["thumbnails"], summary["failed"]) == (2, 1, 2, 1)
    assert summary["stopped"] is None and summary["bytes_read"] > 0
    assert summary["failures"] == [
        {"path": str(tmp_path / "src" / "bad.jpg"), "reason": summary["failures"][0]["reason"]}
    ]
    assert "not an image" in summary["failures"][0]["reason"]


def test_generate_appends_failures_to_the_fail_log(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.jpg").write_text("nope")
    (tmp_path / "src" / "worse.png").write_bytes(b"")
    log = tmp_path / "failures.log"
    log.write_text("earlier line\n")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--fail-log", log)
    assert run.rc == 1
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier line" and len(lines) == 3
    # Workers finish in any order, so the two new lines may come either way round.
    assert sorted(line.rsplit("/", 1)[1].split(":")[0] for line in lines[1:]) == ["bad.jpg", "worse.png"]


def test_generate_exits_ok_and_says_nothing_on_success(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "ok.jpg", 120, 80)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out")
    assert (run.rc, run.stdout, run.stderr) == (0, "", "")


@pytest.mark.parametrize(
    "args",
    [("--size", "abc"), ("--size", "0"), ("--fit", "stretch"), ("--fit", "cover", "-s", "200x"), ("-q", "101"), ()],
)
def test_generate_exits_usage_error_on_bad_options(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = ("-o", str(tmp_path / "out")) if args else ()
    run = run_cli("generate", tmp_path, *out, *args)
    assert run.rc == 2, run.stderr
    (line,) = run.stderr.splitlines()  # one line, not Click's usage block
    assert line.startswith("thumbcli generate: error: ") and line.endswith("; see thumbcli generate --help"), line


def test_a_misspelt_option_is_one_line_naming_the_closest_option_only(tmp_path: Path) -> None:
    run = run_cli("generate", tmp_path, "-o", tmp_path / "out", "--szie", "64")
    assert (run.rc, run.stderr) == (
        2,
        "thumbcli generate: error: no such option --szie (did you mean --size?); see thumbcli generate --help\n",
    )


def test_generate_with_no_source_says_that_no_source_was_given(tmp_path: Path) -> None:
    run = run_cli("generate", "-o", tmp_path / "out")
    assert run.rc == 2
    assert "error: no source given" in run.stderr and "-o" not in run.stderr.split("; see")[0]


def test_generate_quiet_prints_failures_but_no_summary(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "ok.jpg", 120, 80)
    (tmp_path / "src" / "bad.jpg").write_text("nope")
    loud = run_cli("generate", tmp_path / "src", "-o", tmp_path / "a")
    quiet = run_cli("generate", tmp_path / "src", "-o", tmp_path / "b", "--quiet")
    assert loud.rc == quiet.rc == 1
    assert any(line.startswith("thumbcli: made") for line in loud.stderr.splitlines())
    assert [line for line in quiet.stderr.splitlines() if line] == quiet.failure_lines
    assert len(quiet.failure_lines) == 1


# -- interruption ------------------------------------------------------------------


MANY = 24
#: Slow settings (AVIF at high quality), so that a run can be caught in the middle.
SLOW = ("-s", "400", "--format", "avif", "-q", "90", "--json")


@pytest.fixture(scope="module")
def many_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("many")
    for i in range(MANY):
        make_photo(src / f"img{i:02d}.jpg", seed=i, Q=90)
    return src


def start_slow_run(src: Path, out: Path) -> subprocess.Popen[bytes]:
    command = cli_command("generate", src, "-o", out, *SLOW, "-j", "1", "--loaders", "1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_outputs(out: Path, count: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len([p for p in output_files(out) if not p.name.startswith(".thumbcli-tmp-")]) >= count:
            return
        time.sleep(0.02)
    pytest.fail("the run finished or stalled before it could be interrupted")


def assert_whole_outputs(out: Path) -> list[Path]:
    outputs = output_files(out)
    for path in outputs:
        load(path)
    return outputs


def interrupt_slow_run(sources: Path, out: Path, after_outputs: int) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of a slow run sent SIGINT once it has written `after_outputs` thumbnails."""
    proc = start_slow_run(sources, out)
    with proc:
        wait_for_outputs(out, after_outputs, proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def test_generate_stops_cleanly_on_sigint_and_a_rerun_completes(many_sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    returncode, stdout, stderr = interrupt_slow_run(many_sources, out, 2)
    assert returncode == 130, stderr
    assert b"Traceback" not in stderr
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["stopped"] == "interrupted" and 2 <= summary["made"] < MANY
    outputs = assert_whole_outputs(out)
    assert not [p for p in outputs if p.name.startswith(".thumbcli-tmp-")]
    assert len(outputs) == summary["made"]
    rerun = run_cli("generate", many_sources, "-o", out, *SLOW, timeout=120)
    assert rerun.rc == 0, rerun.stderr
    assert (rerun.summary["made"], rerun.summary["skipped"]) == (MANY - summary["made"], summary["made"])
    assert len(assert_whole_outputs(out)) == MANY


def test_generate_prints_its_summary_line_when_interrupted(many_sources: Path, tmp_path: Path) -> None:
    returncode, _, stderr = interrupt_slow_run(many_sources, tmp_path / "out", 1)
    assert returncode == 130
    assert b"thumbcli: made " in stderr


def test_generate_killed_leaves_no_partial_file_and_a_rerun_completes(many_sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_slow_run(many_sources, out)
    with proc:
        wait_for_outputs(out, 3, proc)
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finals = [p for p in assert_whole_outputs(out) if not p.name.startswith(".thumbcli-tmp-")]
    assert 3 <= len(finals) < MANY
    # A temporary file the killed run left (made here for certain, and aged past the
    # threshold) is cleaned up by the next run that lists its folder.
    leftover = finals[0].parent / ".thumbcli-tmp-left-by-kill"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - 2 * ABANDONED_TEMP_SECONDS,) * 2)
    rerun = run_cli("generate", many_sources, "-o", out, *SLOW, timeout=120)
    assert rerun.rc == 0, rerun.stderr
    finals = [p for p in assert_whole_outputs(out) if not p.name.startswith(".thumbcli-tmp-")]
    assert len(finals) == MANY
    assert not leftover.exists()


def test_generate_makes_tiny_jpegs_and_one_with_a_stray_byte_after_its_start_as_libvips_does(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixel = pyvips.Image.black(1, 1).copy(interpretation="srgb").bandjoin([0, 0])
    pixel.jpegsave(str(src / "one.jpg"))
    turned = pixel.copy()
    turned.set_type(pyvips.GValue.gint_type, "orientation", 6)
    turned.jpegsave(str(src / "one-exif.jpg"))
    pyvips.Image.black(1, 40).jpegsave(str(src / "one-by-forty.jpg"))
    # A byte between SOI and the first marker, as in files recovered from damaged cards: libvips decodes it.
    whole = make_photo(tmp_path / "whole.jpg", 120, 80).read_bytes()
    (src / "stray.jpg").write_bytes(whole[:2] + b"\xfe" + whole[2:])
    run = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64", "--json")
    assert (run.rc, run.summary["made"], run.summary["failed"]) == (0, 4, 0), run.stderr
    assert (
        load(tmp_path / "out" / "64" / "one.jpg.jpg").width,
        load(tmp_path / "out" / "64" / "one.jpg.jpg").height,
    ) == (1, 1)
    assert load(tmp_path / "out" / "64" / "one-by-forty.jpg.jpg").height == 40
    assert load(tmp_path / "out" / "64" / "stray.jpg.jpg").width == 64
