"""Atomic writes' temporary files: one whose writer died is an orphan anyone may remove; a live one is never taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from thumbcli.fsutil import TEMP_PREFIX, remove_orphaned_temporary_files, write_atomically

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
        write_atomically(str(tmp_path / "done.jpg"), b"whole")
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
