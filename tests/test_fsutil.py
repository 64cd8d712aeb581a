"""Writes beneath a destination root: never through a symlink planted there; temporary files of dead writers removed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from imagekit import make_photo, output_files, run_cli

from thumbcli.errors import ExitCode
from thumbcli.fsutil import (
    ABANDONED_TEMP_SECONDS,
    TEMP_PREFIX,
    OutsideRootError,
    remove_orphaned_temporary_files,
    write_atomically,
)

# A writer that creates and locks a temporary file as write_atomically does, says so, then hangs mid-write.
HANGING_WRITER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, b"half a thumbn")
print("writing", flush=True)
time.sleep(60)
"""


def start_hanging_writer(path: Path) -> subprocess.Popen[str]:
    writer = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, path], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline() == "writing\n"
    return writer


def test_orphaned_temporary_file_of_a_killed_writer_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    orphan = tmp_path / f"{TEMP_PREFIX}orphan"
    live = tmp_path / f"{TEMP_PREFIX}live"
    killed = start_hanging_writer(orphan)
    alive = start_hanging_writer(live)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        write_atomically(tmp_path, "done.jpg", b"whole")
        assert remove_orphaned_temporary_files(str(tmp_path)) == 1
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["done.jpg", live.name])
        assert (tmp_path / "done.jpg").read_bytes() == b"whole"
    finally:
        alive.kill()
        alive.wait()
        killed.stdout.close()  # type: ignore[union-attr]
        alive.stdout.close()  # type: ignore[union-attr]
    # Its writer gone too, the other is an orphan now.
    assert remove_orphaned_temporary_files(str(tmp_path)) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["done.jpg"]


def test_an_empty_temporary_file_an_instant_old_is_left_to_the_writer_about_to_lock_it(tmp_path: Path) -> None:
    fresh = tmp_path / f"{TEMP_PREFIX}just-made"
    fresh.touch()
    assert remove_orphaned_temporary_files(str(tmp_path)) == 0
    assert fresh.exists()
    past = time.time() - 5
    os.utime(fresh, (past, past))
    assert remove_orphaned_temporary_files(str(tmp_path)) == 1
    assert not fresh.exists()


def test_orphaned_temporary_files_are_never_removed_through_a_symlinked_folder(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "256").mkdir(parents=True)
    (root / "256" / "album").symlink_to(elsewhere)
    stranger = elsewhere / f"{TEMP_PREFIX}someone-elses"
    stranger.write_bytes(b"theirs")
    past = time.time() - 5
    os.utime(stranger, (past, past))
    assert remove_orphaned_temporary_files(root, "256/album") == 0
    assert stranger.read_bytes() == b"theirs"


def test_write_atomically_refuses_a_symlinked_folder_and_a_dotdot_naming_them(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "256").mkdir(parents=True)
    (root / "256" / "x").symlink_to(elsewhere)
    with pytest.raises(OutsideRootError, match=f"^{re.escape(str(root))}/256/x is a symlink$"):
        write_atomically(root, "256/x/deeper/a.jpg.jpg", b"thumbnail")
    with pytest.raises(OutsideRootError, match=re.escape("'..' leaves")):
        write_atomically(root, "256/../../elsewhere/a.jpg.jpg", b"thumbnail")
    assert list(elsewhere.iterdir()) == []
    write_atomically(root, "256/y/a.jpg.jpg", b"thumbnail")
    assert (root / "256" / "y" / "a.jpg.jpg").read_bytes() == b"thumbnail"


def test_write_atomically_replaces_a_symlink_at_the_final_name_and_leaves_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.jpg.jpg").symlink_to(victim)
    write_atomically(tmp_path / "out", "a.jpg.jpg", b"thumbnail")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "out" / "a.jpg.jpg").is_symlink()
    assert (tmp_path / "out" / "a.jpg.jpg").read_bytes() == b"thumbnail"


def sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_photo(src / "x" / "a.jpg", 320, 240)
    make_photo(src / "b.jpg", 320, 240, seed=1)
    make_photo(src / "c.jpg", 320, 240, seed=2)
    return src


def test_generate_writes_nothing_through_a_symlinked_output_folder_and_makes_the_rest(tmp_path: Path) -> None:
    src, out, elsewhere = sources(tmp_path), tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Named like an abandoned temporary file, which a run removes from its own folders.
    lookalike = elsewhere / f"{TEMP_PREFIX}not-ours"
    lookalike.write_bytes(b"precious")
    os.utime(lookalike, (time.time() - 2 * ABANDONED_TEMP_SECONDS,) * 2)
    (out / "256").mkdir(parents=True)
    (out / "256" / "x").symlink_to(elsewhere)
    run = run_cli("generate", src, "-o", out, "-s", "256", "--json")
    assert run.rc == ExitCode.SOME_FAILED, run.stderr
    assert list(elsewhere.iterdir()) == [lookalike]
    assert run.failure_lines == [f"failed: {src}/x/a.jpg: cannot write thumbnail: {out}/256/x is a symlink"]
    assert (run.summary["made"], run.summary["failed"]) == (2, 1)
    assert [path.relative_to(out).as_posix() for path in output_files(out)] == ["256/b.jpg.jpg", "256/c.jpg.jpg"]


def test_a_name_template_climbing_out_of_the_output_fails_each_file_and_writes_nothing_outside(
    tmp_path: Path,
) -> None:
    src, out = sources(tmp_path), tmp_path / "out"
    run = run_cli("generate", src, "-o", out, "-s", "256", "--name", "../escaped/{relpath}.{ext}", "--json")
    assert run.rc == ExitCode.SOME_FAILED, run.stderr
    assert not (tmp_path / "escaped").exists()
    assert run.summary["failed"] == 3
    assert all("'..' leaves" in line for line in run.failure_lines), run.stderr


@pytest.mark.parametrize("planted", [".thumbcli/lock", ".thumbcli/state.sqlite", ".thumbcli/state.sqlite-wal"])
def test_a_private_file_planted_as_a_symlink_is_left_untouched_and_the_run_refused(
    tmp_path: Path, planted: str
) -> None:
    src, out = sources(tmp_path), tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (out / ".thumbcli").mkdir(parents=True)
    (out / planted).symlink_to(victim)
    run = run_cli("generate", src, "-o", out, "-s", "256")
    assert run.rc == ExitCode.CANNOT_RUN, run.stderr
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {out}: refusing the output folder: {out}/{planted} is a symlink"
    ]
    assert victim.read_bytes() == b"precious\n"
    assert output_files(out) == []


def test_a_symlinked_private_folder_is_refused_and_nothing_lands_where_it_points(tmp_path: Path) -> None:
    src, out, elsewhere = sources(tmp_path), tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / ".thumbcli").symlink_to(elsewhere)
    run = run_cli("generate", src, "-o", out, "-s", "256")
    assert run.rc == ExitCode.CANNOT_RUN, run.stderr
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {out}: refusing the output folder: {out}/.thumbcli is a symlink"
    ]
    assert list(elsewhere.iterdir()) == []


def test_fail_log_and_metrics_file_planted_as_symlinks_do_not_write_their_targets(tmp_path: Path) -> None:
    src, out = sources(tmp_path), tmp_path / "out"
    (src / "broken.jpg").write_bytes(b"not a JPEG")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / "metrics.prom").symlink_to(victim)
    metrics = run_cli("generate", src, "-o", out, "-s", "256", "--metrics-file", tmp_path / "metrics.prom")
    assert metrics.rc == ExitCode.SOME_FAILED, metrics.stderr
    # The metrics file's name is replaced, not written through.
    assert "thumbcli_last_run_exit_code 1" in (tmp_path / "metrics.prom").read_text()
    assert not (tmp_path / "metrics.prom").is_symlink()
    (tmp_path / "fail.log").symlink_to(victim)
    fail_log = run_cli("generate", src, "-o", out, "-s", "256", "--retry-failed", "--fail-log", tmp_path / "fail.log")
    assert fail_log.rc == ExitCode.CANNOT_RUN, fail_log.stderr
    assert f"{tmp_path}/fail.log is a symlink" in fail_log.stderr
    assert victim.read_bytes() == b"precious\n"


def test_prune_removes_nothing_through_a_symlinked_cache_folder(tmp_path: Path) -> None:
    src, cache, elsewhere = sources(tmp_path), tmp_path / "cache", tmp_path / "elsewhere"
    assert run_cli("generate", src, "--cache", cache, "-s", "64").rc == 0
    (src / "x" / "a.jpg").unlink()
    # The folder of a thumbnail whose source is gone, swapped for a symlink to a file of the same name.
    shutil.rmtree(cache / "v1" / "64" / "x")
    elsewhere.mkdir()
    (elsewhere / "a.jpg.jpg").write_bytes(b"precious")
    (cache / "v1" / "64" / "x").symlink_to(elsewhere)
    run = run_cli("prune", "--cache", cache, "--json")
    assert run.rc == 0, run.stderr
    assert [item["reason"] for item in run.summary["removed"]] == ["source is gone"]
    assert (elsewhere / "a.jpg.jpg").read_bytes() == b"precious"
    assert f"{cache}/v1/64/x is a symlink" in run.stderr
