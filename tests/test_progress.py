"""The progress bar as a person sees it: run under a pseudo-terminal, read back frame by frame."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from imagekit import make_photo

FRAME = re.compile(r"(\d+)%\|.*?\| (\d+)/(\d+) ")


def run_on_a_terminal(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    """Run `thumbcli ARGS` with stderr on a pseudo-terminal; its exit code and the frames the bar drew."""
    controller, terminal = pty.openpty()
    # A terminal of 40 rows and 160 columns, as a person's would have (a new pty has 0 columns).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    with subprocess.Popen(
        [sys.executable, "-m", "thumbcli", *args], stderr=terminal, stdout=subprocess.DEVNULL, cwd=cwd, env=env
    ) as child:
        os.close(terminal)
        output = bytearray()
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        code = child.wait(60)
    os.close(controller)
    frames = re.split(r"[\r\n]", output.decode("utf-8", "replace"))
    return code, [frame for frame in frames if frame.strip()]


def test_progress_total_never_grows_and_percentages_never_go_back(tmp_path: Path) -> None:
    for folder in range(40):
        for index in range(7):
            make_photo(tmp_path / "src" / f"f{folder:02}" / f"p{index}.jpg", 64, 48, seed=index)
    code, frames = run_on_a_terminal(["generate", "src", "-o", "out", "-s", "32", "--walkers", "1"], tmp_path)
    assert code == 0, frames
    drawn = [match for frame in frames if (match := FRAME.search(frame))]
    assert drawn, f"no bar with a total was drawn: {frames}"
    assert {int(match.group(3)) for match in drawn} == {280}
    percents = [int(match.group(1)) for match in drawn]
    assert percents == sorted(percents)
    assert (percents[-1], drawn[-1].group(2)) == (100, "280")
    before_total = frames[: frames.index(drawn[0].string)]
    assert all("%" not in frame for frame in before_total)


def test_progress_bar_shows_no_total_or_eta_until_the_walk_is_over(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 64, 48)
    code, frames = run_on_a_terminal(["generate", "src", "-o", "out", "-s", "32"], tmp_path)
    assert code == 0
    assert frames[0].startswith("0img [") and "%" not in frames[0] and "<" not in frames[0], frames
    assert FRAME.search(frames[-2]) and "1/1 [" in frames[-2], frames


def test_progress_of_a_dask_run_shows_the_total_once_the_walk_is_over(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    for index in range(12):
        make_photo(tmp_path / "src" / f"f{index % 3}" / f"p{index}.jpg", 64, 48, seed=index)
    code, frames = run_on_a_terminal(["generate", "src", "-o", "out", "-s", "32", "--dask", "local:2"], tmp_path)
    assert code == 0, frames
    drawn = [match for frame in frames if (match := FRAME.search(frame))]
    assert drawn, f"no bar with a total was drawn: {frames}"
    assert {int(match.group(3)) for match in drawn} == {12}
    assert (int(drawn[-1].group(1)), drawn[-1].group(2)) == (100, "12")


def test_progress_shows_the_total_while_most_files_are_still_to_be_made(tmp_path: Path) -> None:
    # The walk of 120 files takes milliseconds and their making seconds: the total is known early,
    # not once the last files are queued behind the bounded queues.
    for index in range(120):
        make_photo(tmp_path / "src" / f"p{index:03}.jpg", 400, 300, seed=index)
    code, frames = run_on_a_terminal(["generate", "src", "-o", "out", "-s", "64", "-j", "1"], tmp_path)
    assert code == 0, frames
    drawn = [match for frame in frames if (match := FRAME.search(frame))]
    assert drawn, f"no bar with a total was drawn: {frames}"
    assert int(drawn[0].group(2)) <= 60, drawn[0].string  # files done when the total first shows
