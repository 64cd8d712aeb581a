"""`thumbcli watch` as a real process: real inotify, real files, real signals; every wait has a deadline."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imagekit import cli_command, make_photo, output_files, run_cli

from thumbcli.errors import ExitCode
from thumbcli.targets.freedesktop import file_uri, thumbnail_name
from thumbcli.targets.pngtext import read_png_text

DEADLINE = 60.0  # the machine may be busy: a deadline, not a timing


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll `condition` until it is truthy; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


class Watcher:
    """A `thumbcli watch --json` process, its events read as they come."""

    def __init__(self, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._stderr = b""
        self.proc = subprocess.Popen(
            cli_command("watch", "--json", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {}), "LC_ALL": "C.UTF-8", "PYTHONFAULTHANDLER": "1"},
            cwd="/",
        )
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr += line

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "backslashreplace")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def caught_up(self) -> dict[str, Any]:
        return wait_for(lambda: self.of("caught-up"), "the catch-up")[0]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit code once it drained."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # faulthandler prints every thread's stack on SIGABRT: the failure shows where it hung.
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout)
            for reader in self._readers:
                reader.join(5)
            raise AssertionError(f"no exit within {timeout} s of SIGTERM:\n{self.stderr[-8000:]}") from None
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def watching(tmp_path: Path) -> Iterator[Callable[..., Watcher]]:
    started: list[Watcher] = []

    def start(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Watcher:
        watcher = Watcher(*args, env=env)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.kill()


def write_in_chunks(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """Write `data` into `path` in place, in `chunks` pieces with a pause between each."""
    step = -(-len(data) // chunks)
    with path.open("wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start : start + step])
            out.flush()
            time.sleep(pause)


def test_watch_makes_files_written_in_chunks_and_renamed_in_like_generate(
    tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    source, out, staging = tmp_path / "src", tmp_path / "out", tmp_path / "staging"
    source.mkdir()
    staging.mkdir()
    make_photo(source / "old.jpg")
    watcher = watching(source, "-o", out)
    assert watcher.caught_up()["made"] == 1
    data = make_photo(staging / "chunked.jpg", seed=1).read_bytes()
    write_in_chunks(source / "chunked.jpg", data, chunks=4, pause=0.3)
    make_photo(staging / "renamed.jpg", seed=2).rename(source / "renamed.jpg")
    made = wait_for(
        lambda: {Path(e["path"]).name for e in watcher.of("made")} >= {"chunked.jpg", "renamed.jpg"}, "both"
    )
    assert made
    assert watcher.stop() == ExitCode.OK
    assert watcher.of("failed") == [], watcher.stderr  # never a failure for a file still being written
    assert all(event.get("latency", 0) >= 0 for event in watcher.of("made"))
    # Byte for byte what generate makes of the same files.
    reference = tmp_path / "reference"
    assert run_cli("generate", source, "-o", reference, "--quiet").rc == 0
    for name in ("chunked.jpg", "renamed.jpg", "old.jpg"):
        assert (out / "256" / f"{name}.jpg").read_bytes() == (reference / "256" / f"{name}.jpg").read_bytes()


def test_watch_makes_a_file_changed_twice_in_one_burst_once(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, out, staging = tmp_path / "src", tmp_path / "out", tmp_path / "staging"
    source.mkdir()
    staging.mkdir()
    watcher = watching(source, "-o", out)
    watcher.caught_up()
    first = make_photo(staging / "first.jpg", seed=1).read_bytes()
    second = make_photo(staging / "second.jpg", seed=2).read_bytes()
    # Both writes land while the watch is stopped: their events are read in one burst.
    watcher.proc.send_signal(signal.SIGSTOP)
    try:
        (source / "twice.jpg").write_bytes(first)
        (source / "twice.jpg").write_bytes(second)
    finally:
        watcher.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: watcher.of("made"), "the file made")
    make_photo(source / "after.jpg", seed=3)  # a later event, so a second make of twice.jpg would be seen
    wait_for(lambda: len(watcher.of("made")) >= 2, "the next file made")
    assert watcher.stop() == ExitCode.OK
    assert [Path(e["path"]).name for e in watcher.of("made")] == ["twice.jpg", "after.jpg"]
    reference = tmp_path / "reference"
    assert run_cli("generate", source, "-o", reference, "--quiet").rc == 0
    made = (out / "256" / "twice.jpg.jpg").read_bytes()
    assert made == (reference / "256" / "twice.jpg.jpg").read_bytes()  # of the second content


def test_watch_makes_a_burst_of_hundreds_into_new_subfolders(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, out, staging = tmp_path / "src", tmp_path / "out", tmp_path / "staging"
    source.mkdir()
    staging.mkdir()
    for index in range(30):
        make_photo(staging / f"p{index:02}.jpg", 64, 48, seed=index)
    watcher = watching(source, "-o", out, "-s", "32")
    watcher.caught_up()
    wanted = set()
    for folder in range(10):
        target = source / f"day{folder}" / "raw"
        target.mkdir(parents=True)
        for photo in sorted(staging.iterdir()):
            shutil.copyfile(photo, target / photo.name)
            wanted.add(out / "32" / f"day{folder}" / "raw" / f"{photo.name}.jpg")
    wait_for(lambda: set(output_files(out)) == wanted, "300 thumbnails in new subfolders", timeout=120)
    assert watcher.stop() == ExitCode.OK
    assert watcher.of("failed") == []


def test_watch_removes_thumbnails_of_deleted_files_and_moves_a_renamed_folder(
    tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    (source / "trip").mkdir(parents=True)
    make_photo(source / "gone.jpg")
    make_photo(source / "trip" / "a.jpg", seed=1)
    make_photo(source / "trip" / "b.jpg", seed=2)
    watcher = watching(source, "-o", out)
    assert watcher.caught_up()["made"] == 3
    (source / "gone.jpg").unlink()
    wait_for(lambda: not (out / "256" / "gone.jpg.jpg").exists(), "the deleted file's thumbnail removed")
    (source / "trip").rename(source / "trip-2025")
    renamed = {out / "256" / "trip-2025" / "a.jpg.jpg", out / "256" / "trip-2025" / "b.jpg.jpg"}
    wait_for(lambda: set(output_files(out)) == renamed, "the folder's thumbnails under its new name only")
    assert not (out / "256" / "trip").exists()
    assert watcher.stop() == ExitCode.OK
    assert {Path(e["path"]).name for e in watcher.of("removed")} >= {"gone.jpg.jpg", "a.jpg.jpg", "b.jpg.jpg"}


def test_watch_names_a_garbage_file_once_and_goes_on(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    watcher = watching(source, "-o", out)
    watcher.caught_up()
    (source / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG at all" * 20)
    make_photo(source / "good.jpg")
    wait_for(lambda: (out / "256" / "good.jpg.jpg").exists(), "the good file made")
    wait_for(lambda: watcher.of("failed"), "the garbage file named")
    # Touched again unchanged, and a neighbour arriving: the known failure is not reported again.
    os.utime(source / "garbage.jpg", ns=(os.stat(source / "garbage.jpg").st_mtime_ns,) * 2)
    make_photo(source / "good2.jpg", seed=3)
    wait_for(lambda: (out / "256" / "good2.jpg.jpg").exists(), "the second good file made")
    assert watcher.stop() == ExitCode.OK
    failures = [line for line in watcher.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 1 and "garbage.jpg" in failures[0], watcher.stderr
    assert "Traceback" not in watcher.stderr


def test_watch_drains_on_sigterm_and_catches_up_on_restart(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    make_photo(source / "kept.jpg")
    make_photo(source / "deleted.jpg", seed=1)
    watcher = watching(source, "-o", out)
    watcher.caught_up()
    assert watcher.stop() == ExitCode.OK  # within stop()'s deadline: bench_watch.py times it
    (source / "deleted.jpg").unlink()
    make_photo(source / "added.jpg", seed=2)
    again = watching(source, "-o", out)
    caught_up = again.caught_up()
    assert caught_up["made"] == 1 and caught_up["skipped"] == 1
    wait_for(lambda: not (out / "256" / "deleted.jpg.jpg").exists(), "the file deleted while stopped tidied")
    assert {path.name for path in output_files(out)} == {"kept.jpg.jpg", "added.jpg.jpg"}
    assert again.stop() == ExitCode.OK


def test_watch_holds_the_lock_so_generate_beside_it_exits_locked(
    tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    make_photo(source / "a.jpg")
    watcher = watching(source, "-o", out)
    watcher.caught_up()
    beside = run_cli("generate", source, "-o", out, "--quiet")
    assert beside.rc == ExitCode.LOCKED, beside.stderr
    assert watcher.stop() == ExitCode.OK
    assert run_cli("generate", source, "-o", out, "--quiet").rc == ExitCode.OK


def test_watch_rescans_after_the_event_queue_overflows(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, out, staging = tmp_path / "src", tmp_path / "out", tmp_path / "staging"
    source.mkdir()
    staging.mkdir()
    metrics = tmp_path / "metrics.prom"
    for index in range(5):
        make_photo(source / f"before{index}.jpg", 64, 48, seed=index)
    watcher = watching(source, "-o", out, "-s", "32", "--metrics-file", metrics)
    assert watcher.caught_up()["made"] == 5
    photo = make_photo(staging / "p.jpg", 64, 48)
    # A stopped process reads nothing: the kernel's queue (16384 events by default) overflows.
    watcher.proc.send_signal(signal.SIGSTOP)
    try:
        # In a folder already watched (a new one's own files make no events until it is).
        for index in range(9000):
            (source / f"empty{index}.txt").touch()  # two events each, no images
        for index in range(20):
            shutil.copyfile(photo, source / f"p{index}.jpg")
    finally:
        watcher.proc.send_signal(signal.SIGCONT)
    wanted = {out / "32" / f"p{index}.jpg.jpg" for index in range(20)}
    wanted |= {out / "32" / f"before{index}.jpg.jpg" for index in range(5)}
    wait_for(lambda: set(output_files(out)) == wanted, "every file made after the overflow", timeout=60)
    wait_for(lambda: 'thumbcli_watch_events_total{kind="overflow"} 1' in metrics.read_text(), "overflow counted")
    assert watcher.stop() == ExitCode.OK
    assert "overflowed" in watcher.stderr
    # The rescan judged the folder's files one by one: those made before were not made again.
    assert sorted(Path(event["path"]).name for event in watcher.of("made"))[:5] == [f"before{i}.jpg" for i in range(5)]
    assert len(watcher.of("made")) == 25


def inotify_watches_of(uid: int) -> int:
    """The inotify watches the processes of `uid` hold now (from /proc/PID/fdinfo)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
                    total += sum(line.startswith("inotify wd:") for line in info)
        except OSError:
            continue
    return total


MAX_USER_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


@pytest.mark.skipif(not os.access(MAX_USER_WATCHES, os.W_OK), reason="needs root to lower max_user_watches")
def test_watch_past_max_user_watches_says_the_limit_and_loses_no_file(
    tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    for index in range(12):
        (source / f"f{index:02}").mkdir(parents=True)
    original = MAX_USER_WATCHES.read_text()
    # Room for five of the thirteen folders, only while the watch starts (the limit is shared).
    MAX_USER_WATCHES.write_text(str(inotify_watches_of(os.geteuid()) + 5))
    try:
        watcher = watching(source, "-o", out, "-s", "32", "--rescan", "1s")
        watcher.caught_up()
    finally:
        MAX_USER_WATCHES.write_text(original)
    wait_for(lambda: "max_user_watches" in watcher.stderr, "the limit named")
    for index in range(12):
        make_photo(source / f"f{index:02}" / "late.jpg", 64, 48, seed=index)
    wanted = {out / "32" / f"f{index:02}" / "late.jpg.jpg" for index in range(12)}
    wait_for(lambda: set(output_files(out)) == wanted, "the files in folders not watched made by the rescans")
    assert watcher.stop() == ExitCode.OK
    said = [line for line in watcher.stderr.splitlines() if "max_user_watches" in line]
    assert len(said) == 1, watcher.stderr
    assert "sysctl fs.inotify.max_user_watches=" in said[0]


def test_watch_writes_desktop_thumbnails_valid_for_gio(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, cache_home = tmp_path / "src", tmp_path / "cache"
    source.mkdir()
    env = {"XDG_CACHE_HOME": str(cache_home)}
    watcher = watching(source, "--freedesktop", "normal", env=env)
    watcher.caught_up()
    photo = make_photo(tmp_path / "p.jpg")
    photo.rename(source / "p.jpg")
    thumbnail = cache_home / "thumbnails" / "normal" / thumbnail_name(file_uri(str(source / "p.jpg")))
    wait_for(thumbnail.exists, "the desktop thumbnail")
    text = read_png_text(thumbnail)
    assert text["Thumb::URI"] == file_uri(str(source / "p.jpg"))
    assert int(text["Thumb::MTime"]) == int(os.stat(source / "p.jpg").st_mtime)
    if shutil.which("gio"):
        seen = subprocess.run(
            ["gio", "info", "-a", "thumbnail::path,thumbnail::is-valid", str(source / "p.jpg")],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stdout
        assert "thumbnail::is-valid: TRUE" in seen, seen
        assert str(thumbnail) in seen
    (source / "p.jpg").unlink()
    wait_for(lambda: not thumbnail.exists(), "the desktop thumbnail removed with its source")
    assert watcher.stop() == ExitCode.OK


def test_watch_rereads_the_config_on_sighup(tmp_path: Path, watching: Callable[..., Watcher]) -> None:
    source, cache = tmp_path / "src", tmp_path / "cache"
    source.mkdir()
    make_photo(source / "a.jpg")
    config = tmp_path / "thumbcli.toml"
    config.write_text('[presets.small]\nsize = "64"\n')
    watcher = watching(source, "--cache", cache, env={"THUMBCLI_CONFIG": str(config)})
    watcher.caught_up()

    def presets_made() -> set[str]:
        return {path.relative_to(cache).parts[1] for path in output_files(cache) if path.suffix == ".jpg"}

    assert presets_made() == {"small"}
    config.write_text('[presets.small]\nsize = "64"\n[presets.big]\nsize = "200"\n')
    watcher.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(watcher.of("caught-up")) == 2, "a second catch-up, with the new preset")
    assert presets_made() == {"small", "big"}
    make_photo(source / "b.jpg", seed=1)
    wait_for(lambda: [e for e in watcher.of("made") if e["path"].endswith("b.jpg")], "the new file made")
    assert len([path for path in output_files(cache) if path.name.startswith("b.jpg")]) == 2
    assert watcher.stop() == ExitCode.OK


README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
DOCUMENTED_PREFIX = "/opt/thumbcli"


def watch_unit() -> configparser.ConfigParser:
    """The README's systemd unit for watch."""
    block = README.split("<!-- systemd-watch -->", 1)[1].split("```", 2)[1].split("\n", 1)[1]
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(block)
    return unit


def test_the_readme_watch_unit_runs_tells_systemd_ready_and_stops_with_0(tmp_path: Path) -> None:
    service = watch_unit()["Service"]
    assert service["Type"] == "notify"
    source, cache, state = tmp_path / "photos", tmp_path / "cache", tmp_path / "state"
    source.mkdir()
    state.mkdir()
    make_photo(source / "a.jpg")
    config = tmp_path / "thumbcli.toml"
    config.write_text(f'sources = ["{source}"]\ncache = "{cache}"\n[presets.small]\nsize = "64"\n')
    key, _, value = service["Environment"].partition("=")
    # The service manager's end of sd_notify: a datagram socket named in $NOTIFY_SOCKET.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(DEADLINE)
        environment = {
            key: value.replace("/etc/thumbcli.toml", str(config)),
            "PATH": "/usr/bin:/bin",
            "NOTIFY_SOCKET": str(tmp_path / "notify"),
            # The checkout under test, when it is not the one installed at sys.prefix.
            **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ},
        }
        argv = shlex.split(service["ExecStart"].replace(DOCUMENTED_PREFIX, sys.prefix))
        proc = subprocess.Popen(argv, env=environment, cwd=state, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert manager.recv(256) == b"READY=1"
            make_photo(source / "b.jpg", seed=1)
            wait_for(lambda: len(list(cache.rglob("b.jpg.*"))) == 1, "the new photo's thumbnail in the cache")
            proc.send_signal(signal.SIGTERM)  # what systemd sends on stop
            assert manager.recv(256) == b"STOPPING=1"
            _, stderr = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == ExitCode.OK, stderr
    assert "thumbcli_watch_latency_seconds_count 1" in (state / "thumbcli-watch.prom").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_readme_watch_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = README.split("<!-- systemd-watch -->", 1)[1].split("```", 2)[1].split("\n", 1)[1]
    (tmp_path / "thumbcli-watch.service").write_text(text.replace(DOCUMENTED_PREFIX, sys.prefix))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "thumbcli-watch.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--max-time", "10m"), "--max-files and --max-time budget a run"),
        (("--dry-run",), "No such option"),
        (("--shard", "0/2"), "no --shard, --dask or --dry-run"),
    ],
)
def test_watch_refuses_what_only_a_run_that_ends_can_do(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    (tmp_path / "src").mkdir()
    refused = run_cli("watch", tmp_path / "src", "-o", tmp_path / "out", *args)
    assert refused.rc == ExitCode.USAGE
    assert said.lower() in refused.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_watch_refuses_a_source_that_is_not_a_folder(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "a.jpg")
    refused = run_cli("watch", photo, "-o", tmp_path / "out")
    assert refused.rc == ExitCode.USAGE
    assert "watch follows folders" in refused.stderr
