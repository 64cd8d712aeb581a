"""The state store: records read while another process holds the database's write lock, and kept when the disk fills."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from imagekit import make_photo, output_files, run_cli

from thumbcli.errors import ExitCode
from thumbcli.fsutil import open_folder
from thumbcli.targets.state import Origin, StateStore


def open_store(folder: Path, name: str = "state.sqlite") -> StateStore:
    """The state store `name` in `folder`, opened as a run opens it."""
    fd = open_folder(folder, "")
    try:
        return StateStore(fd, name, folder / name)
    finally:
        os.close(fd)


def test_fetch_answers_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    first = open_store(tmp_path)
    first.record("64/a.jpg.jpg", Origin(b"/src/a.jpg", 5, 10, "64", "d1"))
    first.close()
    store = open_store(tmp_path)
    # Recorded, not yet written: fetch must see it without flushing.
    store.record("64/b.jpg.jpg", Origin(b"/src/b.jpg", 6, 11, "64", "d1"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("DELETE FROM folders")  # uncommitted: readers still see the committed rows
    try:
        contender = sqlite3.connect(path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            contender.execute("BEGIN IMMEDIATE")
        contender.close()
        with ThreadPoolExecutor(1) as pool:
            fetched = pool.submit(lambda: [store.fetch(f"64/{name}.jpg.jpg") for name in ("a", "b", "c")])
            assert fetched.result(timeout=5) == [(5, 10, "64", "d1"), (6, 11, "64", "d1"), None]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.close()
    reopened = open_store(tmp_path)
    assert reopened.fetch("64/b.jpg.jpg") == (6, 11, "64", "d1")
    reopened.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (mounting needs root: skipped without it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_filling_up_fails_each_thumbnail_keeps_earlier_records_and_still_summarises(
    tmp_path: Path, small_disk: Path
) -> None:
    src, out = tmp_path / "src", small_disk / "out"
    for index in range(48):
        make_photo(src / f"p{index:02d}.jpg", 1200, 800, seed=index)
    full = run_cli("generate", src, "-o", out, "-s", "1500", "--json")
    assert "Traceback" not in full.stderr, full.stderr
    assert full.rc == ExitCode.SOME_FAILED, full.stderr
    summary = full.summary
    made = len(output_files(out))
    assert summary["made"] == made > 0
    assert summary["failed"] == len(full.failure_lines) == 48 - made > 0
    assert all(line.endswith(": cannot write thumbnail: no space left on device") for line in full.failure_lines)
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    # The records of what was written made it to the database: only what is missing is made.
    again = run_cli("generate", src, "-o", out, "-s", "1500", "--json")
    assert again.rc == ExitCode.OK, again.stderr
    assert (again.summary["made"], again.summary["skipped"]) == (48 - made, made)


def test_a_damaged_state_store_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 120, 80)
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64").rc == 0
    store = tmp_path / "out" / ".thumbcli" / "state.sqlite"
    for companion in ("-wal", "-shm"):
        Path(f"{store}{companion}").unlink(missing_ok=True)
    store.write_bytes(b"not a database, whatever was here before\n" * 100)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", "--json")
    assert run.rc == 0, run.stderr
    (warning,) = run.stderr.splitlines()
    assert "state.sqlite was damaged (file is not a database): set aside as" in warning
    assert run.summary["made"] == 1  # its freshness records were lost with it, nothing else
    (aside,) = store.parent.glob("state.sqlite.damaged-*")
    assert aside.read_bytes().startswith(b"not a database")
    again = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", "--json")
    assert (again.rc, again.stderr, again.summary["made"], again.summary["skipped"]) == (0, "", 0, 1)


def test_a_state_store_locked_by_another_program_is_named_in_one_line(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 120, 80)
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64").rc == 0
    holder = sqlite3.connect(tmp_path / "out" / ".thumbcli" / "state.sqlite", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", timeout=120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert run.rc == 3
    (line,) = run.stderr.splitlines()
    assert "state.sqlite is locked by another program (not a thumbcli run)" in line
