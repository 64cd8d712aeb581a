"""No-change reruns: per-folder signatures, and the walk shared out to forked helper processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from imagekit import cli_command, make_photo, output_files, run_cli

from thumbcli.discover import DirBatch, SourceFile
from thumbcli.make.pipeline import Pipeline
from thumbcli.spec import RunOptions, SizeBox, ThumbSpec, WalkOptions
from thumbcli.targets.freedesktop import FreedesktopCache, file_uri, prune_freedesktop, state_path, thumbnail_name
from thumbcli.targets.plan import Plan
from thumbcli.targets.served import CacheDirectory

SPECS = (ThumbSpec(SizeBox.parse("64")),)
FOLDERS = ("a", "b", "b/c", "d")


class CountingCache(CacheDirectory):
    """A real cache that counts the folders it had to plan file by file."""

    planned_folders = 0

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        self.planned_folders += 1
        return super().plan_batch(batch, force)


def make_tree(src: Path) -> None:
    for n, folder in enumerate(FOLDERS):
        for i in range(2):
            make_photo(src / folder / f"p{i}.jpg", 90, 60, seed=n * 2 + i, Q=70)


def run(src: Path, cache: Path, specs: tuple[ThumbSpec, ...] = SPECS) -> tuple[int, int, int]:
    """(made, skipped, folders planned file by file) of one in-process run."""
    target = CountingCache(cache, specs, check_collisions=False)
    pipeline = Pipeline([str(src)], target, RunOptions(), WalkOptions(processes=1))
    try:
        stats = pipeline.run()
    finally:
        target.close()
    assert stats.failed == 0, stats.failures
    return stats.made, stats.skipped, target.planned_folders


def backdate(paths: Iterable[Path], seconds: float = 10) -> None:
    """Set the mtime of `paths` `seconds` back, as if they had been written then."""
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def age(cache: Path) -> None:
    """Backdate every folder of the cache, as if the thumbnails had been written a while ago."""
    backdate([cache, *(path for path in cache.rglob("*") if path.is_dir())])


def age_thumbnails(root: Path) -> None:
    """Backdate every PNG under a desktop thumbnail root (their own mtimes, not the Thumb::MTime in them)."""
    backdate(root.rglob("*.png"))


def recorded_tree(tmp_path: Path) -> tuple[Path, Path]:
    """(sources, cache) of `make_tree`, thumbnailed and rerun once the thumbnails had aged: all recorded."""
    src, cache = tmp_path / "src", tmp_path / "cache"
    make_tree(src)
    run(src, cache)
    age(cache)
    run(src, cache)
    return src, cache


def signatures(cache: Path) -> int:
    with sqlite3.connect(cache / ".thumbcli" / "state.sqlite") as db:
        count: int = db.execute("SELECT count(*) FROM walked").fetchone()[0]
    return count


def test_a_verified_folder_is_skipped_whole_until_something_in_it_changes(tmp_path: Path) -> None:
    src, cache = tmp_path / "src", tmp_path / "cache"
    make_tree(src)
    assert run(src, cache) == (8, 0, 4)
    # Just written: a change within the same timestamp tick could go unseen, so nothing is recorded yet.
    assert run(src, cache) == (0, 8, 4)
    assert signatures(cache) == 0
    age(cache)
    assert run(src, cache) == (0, 8, 4)
    assert signatures(cache) == 4
    # Now nothing is planned file by file, and no output folder is listed.
    assert run(src, cache) == (0, 8, 0)


@pytest.mark.parametrize(
    ("change", "made"),
    [
        ("delete a thumbnail", 1),
        ("touch a source", 1),
        ("rewrite a source", 1),
        ("add a source", 1),
        ("remove a source", 0),
    ],
)
def test_a_change_after_a_folder_was_recorded_is_seen(tmp_path: Path, change: str, made: int) -> None:
    src, cache = recorded_tree(tmp_path)
    assert signatures(cache) == 4
    source = src / "b" / "c" / "p1.jpg"
    if change == "delete a thumbnail":
        (cache / "v1" / "64" / "b" / "c" / "p1.jpg.jpg").unlink()
    elif change == "touch a source":
        stat = source.stat()
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    elif change == "rewrite a source":
        make_photo(source, 90, 61, seed=99, Q=70)
    elif change == "add a source":
        make_photo(src / "b" / "c" / "p2.jpg", 90, 60, seed=98, Q=70)
    else:
        source.unlink()
    made_now, _, planned = run(src, cache)
    assert (made_now, planned) == (made, 1)


def test_changed_settings_are_seen_by_a_recorded_folder(tmp_path: Path) -> None:
    src, cache = recorded_tree(tmp_path)
    changed = (ThumbSpec(SizeBox.parse("64"), quality=50),)
    assert run(src, cache, changed)[:2] == (8, 0)


def test_prune_forgets_the_signatures_of_folders_that_are_gone(tmp_path: Path) -> None:
    src, cache = recorded_tree(tmp_path)
    assert signatures(cache) == 4
    for name in ("p0.jpg", "p1.jpg"):
        (src / "d" / name).unlink()
    (src / "d").rmdir()
    target = CacheDirectory(cache, SPECS)
    try:
        assert len(target.prune(dry_run=False)) == 2
    finally:
        target.close()
    assert signatures(cache) == 3


class CountingDesktopCache(FreedesktopCache):
    """A real freedesktop cache that counts the folders it had to plan file by file."""

    planned_folders = 0

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        self.planned_folders += 1
        return super().plan_batch(batch, force)


def run_desktop(src: Path, root: Path, version: str = "1.0") -> tuple[int, int, int, int]:
    """(made, skipped, failed, folders planned file by file) of one in-process run into `root`."""
    target = CountingDesktopCache(root, ("normal", "large"), version=version)
    pipeline = Pipeline([str(src)], target, RunOptions(), WalkOptions(processes=1))
    try:
        stats = pipeline.run()
    finally:
        target.close()
    return stats.made, stats.skipped, stats.failed, target.planned_folders


@pytest.mark.parametrize(
    ("change", "made", "planned"),
    [
        ("nothing", 0, 0),
        ("touch a source", 1, 1),
        ("delete a thumbnail", 1, 1),
        ("another tool rewrites a thumbnail", 0, 1),
        ("another tool writes a stale thumbnail", 1, 1),
    ],
)
def test_desktop_cache_folders_are_skipped_whole_until_a_source_or_thumbnail_changes(
    tmp_path: Path, change: str, made: int, planned: int
) -> None:
    src, root = tmp_path / "src", tmp_path / "cache" / "thumbnails"
    odd = src / os.fsdecode(b"caf\xe9 #1 %20")
    for n, folder in enumerate((src / "a", odd)):
        for i in range(2):
            make_photo(folder / f"p{i} [%23].jpg", 90, 60, seed=n * 2 + i, Q=70)
    assert run_desktop(src, root) == (4, 0, 0, 2)
    age_thumbnails(root)
    assert run_desktop(src, root) == (0, 4, 0, 2)
    source = odd / "p1 [%23].jpg"
    thumbnail = root / "large" / thumbnail_name(file_uri(str(source)))
    data = thumbnail.read_bytes()
    if change == "touch a source":
        stat = source.stat()
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    elif change == "delete a thumbnail":
        thumbnail.unlink()
    elif change == "another tool rewrites a thumbnail":
        # The same bytes under a new inode, as an atomic write by a file manager leaves them.
        thumbnail.unlink()
        thumbnail.write_bytes(data)
    elif change == "another tool writes a stale thumbnail":
        thumbnail.unlink()
        thumbnail.write_bytes(data.replace(b"Thumb::MTime\x00", b"Thumb::MTime\x001"))
    assert run_desktop(src, root) == (made, 4 - made, 0, planned)


def test_desktop_cache_known_failure_is_not_retried_until_thumbcli_changes(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "cache" / "thumbnails"
    make_photo(src / "good.jpg", 90, 60, Q=70)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert run_desktop(src, root) == (1, 0, 1, 1)
    age_thumbnails(root)
    # Its folder is planned file by file, so that the summary counts (and lists) the known failure;
    # the failure itself is neither decoded nor reported again.
    assert run_desktop(src, root) == (0, 1, 0, 1)
    assert run_desktop(src, root) == (0, 1, 0, 1)
    # A new version may read what the old one could not: its markers live elsewhere.
    assert run_desktop(src, root, version="2.0") == (0, 1, 1, 1)


def test_desktop_prune_forgets_the_signatures_of_folders_that_are_gone(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "cache" / "thumbnails"
    for folder in ("a", "b"):
        make_photo(src / folder / "p.jpg", 90, 60, Q=70)
    run_desktop(src, root)
    age_thumbnails(root)
    run_desktop(src, root)
    database = state_path(root)
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM walked").fetchone()[0] == 2
    (src / "b" / "p.jpg").unlink()
    (src / "b").rmdir()
    assert len(prune_freedesktop(root, dry_run=False, version="1.0")) == 2  # its normal and large thumbnails
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM walked").fetchone()[0] == 1


def run_script(code: str, timeout: float = 60) -> Any:
    """Run `code` in a fresh interpreter (no threads yet, so the walk may fork) and decode its JSON output."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


SPLIT_WALK = """
    import json, os, signal, sys
    from thumbcli.discover import DirBatch, WalkProblem, is_image_name, walk_batches
    from thumbcli.spec import WalkOptions
    from thumbcli.splitwalk import SplitWalk

    tree, processes, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parent = os.getpid()

    def known_fresh(batch):
        if os.getpid() != parent and mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.getpid() != parent and mode == "crash":
            raise ValueError("a bug in the helper")
        return mode == "fresh-even" and len(batch.files) % 2 == 0

    def describe(item):
        if isinstance(item, DirBatch):
            return ["batch", item.reldir, item.directory, item.files]
        return ["problem", item.path, item.reason]

    options = WalkOptions(follow_symlinks=mode != "no-links")
    walk = SplitWalk([tree], options, is_image_name, [], known_fresh, processes)
    fresh, found = 0, []
    try:
        for item in walk:
            if isinstance(item, int):
                fresh += item
            else:
                found.append(describe(item))
    except RuntimeError as exc:
        found.append(["error", str(exc)])
    finally:
        walk.close()
    alone = [describe(item) for item in walk_batches([tree], options, is_image_name)]
    try:
        os.waitpid(-1, os.WNOHANG)
        children_left = True
    except ChildProcessError:
        children_left = False
    print(json.dumps({"processes": walk.processes, "fresh": fresh, "found": sorted(found), "alone": sorted(alone),
                      "children_left": children_left}))
"""


def make_walk_tree(root: Path) -> None:
    for n in range(24):
        folder = root / f"f{n % 4}" / f"g{n:02d}"
        folder.mkdir(parents=True)
        for i in range(n % 3 + 1):
            (folder / f"x{i}.jpg").write_bytes(b"not decoded by the walk")
    odd = root / "f3" / os.fsdecode(b"caf\xe9 [8] #?")  # a helper's folder, whether 2 or 3 processes walk
    odd.mkdir()
    (odd / os.fsdecode(b"\xff%20.jpg")).write_bytes(b"not UTF-8, and sent between processes")
    os.mkfifo(root / "f1" / "pipe.jpg")
    (root / "f2" / "loop").symlink_to(root / "f2", target_is_directory=True)


def split_walk(root: Path, processes: int, mode: str) -> Any:
    code = SPLIT_WALK.replace("sys.argv[1], int(sys.argv[2]), sys.argv[3]", f"{str(root)!r}, {processes}, {mode!r}")
    return run_script(code)


@pytest.mark.parametrize(("mode", "problems"), [("plain", 2), ("no-links", 1)])
def test_the_split_walk_finds_exactly_what_one_process_finds(tmp_path: Path, mode: str, problems: int) -> None:
    # Without -L, a process skips listing the folders without subfolders that are not its own.
    make_walk_tree(tmp_path)
    result = split_walk(tmp_path, 3, mode)
    assert result["processes"] == 3 and not result["children_left"]
    assert result["found"] == result["alone"] and result["fresh"] == 0
    kinds = [item[0] for item in result["found"]]
    assert kinds.count("batch") == 25 and kinds.count("problem") == problems


def test_the_split_walk_counts_what_known_fresh_vouches_for_instead_of_yielding_it(tmp_path: Path) -> None:
    make_walk_tree(tmp_path)
    result = split_walk(tmp_path, 2, "fresh-even")
    odd = [item for item in result["alone"] if item[0] == "problem" or len(item[3]) % 2]
    even = [item for item in result["alone"] if item[0] == "batch" and len(item[3]) % 2 == 0]
    assert result["found"] == odd
    assert result["fresh"] == sum(len(item[3]) for item in even) > 0


def test_a_helper_that_dies_is_reported_against_the_tree_it_left_unwalked(tmp_path: Path) -> None:
    make_walk_tree(tmp_path)
    result = split_walk(tmp_path, 2, "die")
    died = [item for item in result["found"] if item[0] == "problem" and "not walked" in item[2]]
    assert len(died) == 1 and died[0][1] == str(tmp_path) and "signal 9" in died[0][2]
    assert not result["children_left"]


def test_a_helper_that_crashes_is_a_crash_of_the_walk(tmp_path: Path) -> None:
    make_walk_tree(tmp_path)
    result = split_walk(tmp_path, 2, "crash")
    errors = [item for item in result["found"] if item[0] == "error"]
    assert len(errors) == 1 and "ValueError: a bug in the helper" in errors[0][1]
    assert not result["children_left"]


def test_generate_with_several_walkers_matches_one_and_reruns_skip_everything(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    results = {}
    for walkers in ("1", "3"):
        cache = tmp_path / f"cache{walkers}"
        first = run_cli("generate", src, "--cache", cache, "-s", "64", "--json", "--walkers", walkers)
        assert first.rc == 1 and first.summary["made"] == 8 and first.summary["failed"] == 1
        age(cache)
        for _ in range(2):  # the first verifies and records the folders, the second uses the records
            again = run_cli("generate", src, "--cache", cache, "-s", "64", "--json", "--walkers", walkers)
            summary = again.summary
            assert (summary["made"], summary["skipped"], summary["failed"], summary["known_failed"]) == (0, 8, 0, 1)
            assert (again.rc, again.stderr, summary["bytes_read"]) == (0, "", 0)  # the known failure is not read
        results[walkers] = sorted(path.relative_to(cache) for path in output_files(cache) if path.suffix == ".jpg")
    assert results["1"] == results["3"] and len(results["1"]) == 8


def test_folders_recorded_by_one_process_are_recognised_by_the_others(tmp_path: Path) -> None:
    src, cache = tmp_path / "src", tmp_path / "cache"
    for n in range(12):
        make_photo(src / f"f{n:02d}" / "p.jpg", 40, 30, seed=n, Q=70)
    code = f"""
        import json
        from pathlib import Path
        from thumbcli.make.pipeline import Pipeline
        from thumbcli.spec import RunOptions, SizeBox, ThumbSpec, WalkOptions
        from thumbcli.targets.served import CacheDirectory

        class CountingCache(CacheDirectory):
            planned_folders = 0

            def plan_batch(self, batch, force):
                self.planned_folders += 1
                return super().plan_batch(batch, force)

        target = CountingCache(Path({str(cache)!r}), (ThumbSpec(SizeBox.parse("64")),), check_collisions=False)
        pipeline = Pipeline([{str(src)!r}], target, RunOptions(), WalkOptions(processes=2))
        stats = pipeline.run()
        target.close()
        print(json.dumps([stats.made, stats.skipped, target.planned_folders]))
    """
    assert run_script(code) == [12, 0, 12]
    age(cache)
    assert run_script(code) == [0, 12, 12]  # all folders verified and recorded, half of them sent by the helper
    assert run_script(code) == [0, 12, 0]


@pytest.mark.parametrize("signals", [1, 2])
def test_an_interrupted_run_leaves_no_walk_helper_behind(tmp_path: Path, signals: int) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    data = make_photo(tmp_path / "tiny.jpg", 48, 32, Q=70).read_bytes()
    for n in range(4000):
        folder = src / f"f{n // 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"p{n:04d}.jpg").write_bytes(data)
    argv = cli_command("generate", src, "-o", out, "-s", "32", "--walkers", "2", "-j", "1")
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with proc:
        deadline = time.monotonic() + 60
        while not any(out.rglob("*.jpg")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and b"not walked" not in stderr
    # The run had its own session: once the group is empty, no helper outlived it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("a walk helper process outlived the run")


#: What a run that makes nothing never uses: the worker side (its processes, sockets, the sandbox's
#: ctypes, libvips), object storage, the serve and watch commands. Each is imported where it is first needed.
NOT_FOR_A_NO_CHANGE_RUN = frozenset(
    {
        "pyvips",
        "subprocess",
        "socket",
        "ctypes",
        "mmap",
        "configparser",
        "thumbcli.workers",
        "thumbcli.sandbox",
        "thumbcli.wire",
        "thumbcli.resample",
        "thumbcli.decoders",
        "thumbcli.bucket",
        "thumbcli.targets.objects",
        "thumbcli.cli.serve",
        "thumbcli.serve.options",
        "thumbcli.serve.supervisor",
        "thumbcli.cli.watch",
        "thumbcli.watch.service",
    }
)


def imported_modules(stderr: str) -> set[str]:
    """The modules a process imported, read from the `-X importtime` lines on its stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.rpartition("|")[2].strip() for line in lines[1:]}  # the first line is the header


@pytest.mark.parametrize("destination", ["--cache", "--output"])
def test_a_no_change_rerun_imports_nothing_only_making_or_buckets_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, destination: str
) -> None:
    make_tree(tmp_path / "src")
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    args = ("generate", tmp_path / "src", destination, tmp_path / "out", "-s", "64", "--json")
    first = run_cli(*args)
    assert first.rc == 0 and first.summary["made"] == 8, first.stderr[-3000:]
    # The run that made thumbnails loaded the worker side when it needed it, and the lines show it.
    assert {"thumbcli.workers", "subprocess", "socket"} <= imported_modules(first.stderr)
    rerun = run_cli(*args)
    assert rerun.rc == 0 and (rerun.summary["made"], rerun.summary["skipped"]) == (0, 8), rerun.stderr[-3000:]
    loaded = imported_modules(rerun.stderr)
    assert {"click", "thumbcli.run", "thumbcli.targets.state", "sqlite3"} <= loaded
    assert sorted(loaded & NOT_FOR_A_NO_CHANGE_RUN) == []


def test_generate_help_imports_no_part_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    shown = run_cli("generate", "--help")
    assert shown.rc == 0 and "--cache" in shown.stdout
    loaded = imported_modules(shown.stderr)
    assert {"click", "thumbcli.cli.generate", "thumbcli.spec"} <= loaded
    assert sorted(loaded & {"thumbcli.run", "thumbcli.make.pipeline", "thumbcli.targets.state", "sqlite3"}) == []
    assert sorted(loaded & NOT_FOR_A_NO_CHANGE_RUN) == []
