"""`thumbcli generate --dask`: a real Dask scheduler and real workers, compared file for file with a local run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daskkit import DASK, DaskCluster, dask_cluster
from imagekit import cli_command, draw_photo, load, make_photo, output_files, run_cli
from test_workers import worker_processes

from thumbcli.cluster.task import FolderTask, SealedTask, SourceUnreachable, TaskDestination, make_folders
from thumbcli.discover import DirBatch
from thumbcli.fsutil import TEMP_PREFIX
from thumbcli.spec import Limits, SizeBox, ThumbSpec

pytestmark = pytest.mark.skipif(not DASK.exists(), reason="needs Dask's distributed: pip install '.[dask]'")


def make_tree(root: Path, folders: int, per_folder: int, width: int, height: int) -> int:
    """Small JPEGs in many nested folders (each a little different); returns their total size."""
    image = draw_photo(width, height)
    total = 0
    for folder in range(folders):
        for index in range(per_folder):
            path = root / f"year-{folder % 4}" / f"album-{folder:02d}" / f"photo-{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            (image.rot90() if (folder + index) % 2 else image).jpegsave(str(path), Q=70 + (folder + index) % 25)
            total += path.stat().st_size
    return total


def same_outputs(a: Path, b: Path) -> None:
    """The two output trees hold the same thumbnails, name for name and byte for byte."""
    names_a = [path.relative_to(a) for path in output_files(a)]
    names_b = [path.relative_to(b) for path in output_files(b)]
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A scheduler and two single-threaded workers, shared by the tests that leave them running."""
    with dask_cluster(tmp_path_factory.mktemp("dask")) as running:
        yield running


SIZES = ("-s", "64", "-s", "100x80")


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, Path]:
    """240 small JPEGs in 40 folders, their total size, and a local run's thumbnails of them."""
    root = tmp_path_factory.mktemp("photos")
    total = make_tree(root / "src", folders=40, per_folder=6, width=160, height=120)
    assert run_cli("generate", root / "src", "-o", root / "local", *SIZES).rc == 0
    return root / "src", total, root / "local"


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """240 JPEGs big enough that a run lasts a while, and a local run's thumbnails of them."""
    root = tmp_path_factory.mktemp("photos")
    make_tree(root / "src", folders=40, per_folder=6, width=800, height=600)
    assert run_cli("generate", root / "src", "-o", root / "local").rc == 0
    return root / "src", root / "local"


def start_and_wait_for_thumbnails(output: Path, *args: str | Path, count: int = 20) -> subprocess.Popen[bytes]:
    """Start `thumbcli generate ... -o output` and return once `count` thumbnails are there."""
    run = subprocess.Popen(
        cli_command("generate", *args, "-o", output, "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while len(list(output.glob("256/*/*/*.jpg"))) < count and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.02)
    return run


def test_cluster_output_equals_a_local_run_and_a_rerun_makes_nothing(
    cluster: DaskCluster, small_tree: tuple[Path, int, Path], tmp_path: Path
) -> None:
    source, source_bytes, local = small_tree
    read_before = cluster.read_bytes()
    first = run_cli("generate", source, "-o", tmp_path / "dask", *SIZES, "--json", "--dask", cluster.address)
    assert first.rc == 0, first.stderr
    assert first.stderr == ""
    assert {k: first.summary[k] for k in ("found", "made", "thumbnails", "skipped", "failed")} == {
        "found": 240,
        "made": 240,
        "thumbnails": 480,
        "skipped": 0,
        "failed": 0,
    }
    # The workers, not the client, read the sources.
    assert cluster.read_bytes() - read_before >= source_bytes
    same_outputs(local, tmp_path / "dask")
    rerun = run_cli("generate", source, "-o", tmp_path / "dask", *SIZES, "--json", "--dask", cluster.address)
    assert rerun.rc == 0, rerun.stderr
    assert (rerun.summary["found"], rerun.summary["made"], rerun.summary["skipped"]) == (240, 0, 240)
    # The state has one writer, the client: the workers left no database of their own.
    assert sorted(p.name for p in (tmp_path / "dask" / ".thumbcli").iterdir() if p.suffix == ".sqlite") == [
        "state.sqlite"
    ]


def cluster_run(cluster: DaskCluster, source: Path, output: Path, task_files: int) -> tuple[int, int, int]:
    """A cluster run in this process with tasks of `task_files` files: (made, skipped, tasks sent)."""
    from thumbcli.cluster.client import ClusterRun
    from thumbcli.config import Config
    from thumbcli.run import GenerateRequest, open_target

    job = GenerateRequest(sources=(str(source),), output=output, sizes=("64",), dask=cluster.address).job(Config())
    target = open_target(job)
    try:
        run = ClusterRun(job, target, task_files=task_files)
        stats = run.run()
    finally:
        target.close()
    assert stats.failed == 0
    return stats.made, stats.skipped, run.tasks


def test_cluster_sends_a_big_folder_in_parts_and_remembers_it_fresh_once_every_part_was(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    image = draw_photo(96, 64)
    (tmp_path / "src").mkdir()
    for index in range(25):
        image.jpegsave(str(tmp_path / "src" / f"p{index:02d}.jpg"), Q=60 + index)
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "local", "-s", "64").rc == 0
    # 25 files in tasks of 4: seven parts of one folder, on both workers.
    assert cluster_run(cluster, tmp_path / "src", tmp_path / "dask", 4) == (25, 0, 7)
    same_outputs(tmp_path / "local", tmp_path / "dask")
    # Thumbnails written within the racy window are not settled (targets/state.py): age them past it.
    aged = time.time() - 10
    for folder, _, names in os.walk(tmp_path / "dask"):
        for name in [*names, ""]:
            os.utime(os.path.join(folder, name), (aged, aged))
    # Every part finds its files fresh: the folder is remembered as fresh as a whole ...
    assert cluster_run(cluster, tmp_path / "src", tmp_path / "dask", 4) == (0, 25, 7)
    # ... so the next run skips it on the client, sending nothing.
    assert cluster_run(cluster, tmp_path / "src", tmp_path / "dask", 4) == (0, 25, 0)
    # A changed file is found again: the folder goes out in parts, one thumbnail is made.
    (tmp_path / "src" / "p07.jpg").write_bytes((tmp_path / "src" / "p08.jpg").read_bytes())
    assert cluster_run(cluster, tmp_path / "src", tmp_path / "dask", 4) == (1, 24, 7)


def test_a_dask_worker_with_two_threads_decodes_in_two_resample_workers(
    small_tree: tuple[Path, int, Path], tmp_path: Path
) -> None:
    source, _, local = small_tree
    with dask_cluster(tmp_path / "dask-cluster", workers=1, threads=2) as cluster:
        run = run_cli("generate", source, "-o", tmp_path / "dask", *SIZES, "--dask", cluster.address)
        assert run.rc == 0, run.stderr
        # Kept between tasks: one per thread that ran a task at once.
        assert len(worker_processes(cluster.workers[0].pid)) == 2
    same_outputs(local, tmp_path / "dask")


def test_cluster_reports_failed_files_as_a_local_run_does(cluster: DaskCluster, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_tree(source, folders=3, per_folder=2, width=80, height=60)
    (source / "year-0" / "album-00" / "broken.jpg").write_bytes(b"not a picture at all\n" * 10)
    local = run_cli("generate", source, "-o", tmp_path / "local", "--json")
    dask = run_cli("generate", source, "-o", tmp_path / "dask", "--json", "--dask", cluster.address)
    assert (local.rc, dask.rc) == (1, 1)
    assert dask.failure_lines == local.failure_lines
    assert len(dask.failure_lines) == 1
    assert str(source / "year-0" / "album-00" / "broken.jpg") in dask.failure_lines[0]
    assert {k: dask.summary[k] for k in ("found", "made", "failed")} == {"found": 7, "made": 6, "failed": 1}
    same_outputs(tmp_path / "local", tmp_path / "dask")
    # The client recorded the failure: a rerun through the cluster is silent about it and succeeds.
    again = run_cli("generate", source, "-o", tmp_path / "dask", "--json", "--dask", cluster.address)
    assert (again.rc, again.stderr, again.summary["failed"], again.summary["known_failed"]) == (0, "", 0, 1)
    retried = run_cli(
        "generate", source, "-o", tmp_path / "dask", "--json", "--retry-failed", "--dask", cluster.address
    )
    assert (retried.rc, retried.summary["failed"]) == (1, 1)


def test_cluster_max_files_makes_that_many_and_says_it_was_cut_short(
    cluster: DaskCluster, small_tree: tuple[Path, int, Path], tmp_path: Path
) -> None:
    source, _, _ = small_tree
    run = run_cli("generate", source, "-o", tmp_path / "out", "--max-files", "50", "--json", "--dask", cluster.address)
    assert run.rc == 4, run.stderr
    assert (run.summary["made"], run.summary["stopped"]) == (50, "max-files")
    assert len(output_files(tmp_path / "out")) == 50


def test_cluster_run_survives_a_worker_killed_mid_run(big_tree: tuple[Path, Path], tmp_path: Path) -> None:
    source, local = big_tree
    output = tmp_path / "dask"
    with dask_cluster(tmp_path / "dask-cluster") as cluster:
        run = start_and_wait_for_thumbnails(output, source, "--dask", cluster.address)
        victim = cluster.workers[0]
        made_when_killed = len(list(output.glob("256/*/*/*.jpg")))
        assert victim.poll() is None and run.poll() is None
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=120)
        assert victim.wait(5) == -signal.SIGKILL
    assert 20 <= made_when_killed < 240  # the kill came mid-run
    assert run.returncode == 0, stderr.decode()
    summary = json.loads(stdout.decode().splitlines()[-1])
    assert {k: summary[k] for k in ("found", "made", "skipped", "failed")} == {
        "found": 240,
        "made": 240,
        "skipped": 0,
        "failed": 0,
    }
    assert not [path for path in output.rglob("*") if path.name.startswith(TEMP_PREFIX)]
    for path in output_files(output):
        load(path)  # every pixel decodes: no torn thumbnail
    same_outputs(local, output)


def test_cluster_lost_scheduler_ends_the_run_with_cannot_run_and_a_rerun_resumes(
    big_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    source, local = big_tree
    output = tmp_path / "out"
    with dask_cluster(tmp_path / "dask-cluster") as cluster:
        run = start_and_wait_for_thumbnails(output, source, "--dask", cluster.address)
        assert run.poll() is None
        cluster.scheduler.send_signal(signal.SIGKILL)
        _, stderr = run.communicate(timeout=60)
    lines = stderr.decode().splitlines()
    assert run.returncode == 3, stderr.decode()
    assert len(lines) == 1
    assert lines[0].startswith("thumbcli: error: lost the Dask scheduler at tcp://127.0.0.1:")
    rerun = run_cli("generate", source, "-o", output, "--json")
    assert rerun.rc == 0, rerun.stderr
    assert (rerun.summary["made"] + rerun.summary["skipped"], rerun.summary["failed"]) == (240, 0)
    same_outputs(local, output)


def test_dask_local_runs_its_own_workers_without_a_scheduler(
    small_tree: tuple[Path, int, Path], tmp_path: Path
) -> None:
    source, _, local = small_tree
    dask = run_cli("generate", source, "-o", tmp_path / "dask", *SIZES, "--json", "--dask", "local:2")
    assert dask.rc == 0, dask.stderr
    assert dask.stderr == ""
    assert (dask.summary["found"], dask.summary["made"]) == (240, 240)
    same_outputs(local, tmp_path / "dask")


@pytest.mark.parametrize("address", ["local:0", "nowhere", "local:x"])
def test_dask_rejects_an_address_that_is_not_one(address: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--dask", address)
    assert run.rc == 2, run.stderr
    assert "--dask" in run.stderr
    assert not (tmp_path / "out").exists()


def test_dask_refuses_the_desktop_cache(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    run = run_cli("generate", tmp_path / "src", "--freedesktop", "normal", "--dask", "local:1")
    assert run.rc == 2
    assert "not the desktop thumbnail cache" in run.stderr


def test_task_on_a_host_that_cannot_see_the_source_fails_in_one_line(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    unseen = str(tmp_path / "mounted-elsewhere" / "album")
    task = FolderTask(
        TaskDestination(str(output), (ThumbSpec(SizeBox.parse("64")),), "{size}/{relpath}.{ext}", False, (), ()),
        (DirBatch(str(tmp_path / "mounted-elsewhere"), "album", unseen, [("a.jpg", 1, 1)]),),
        ("photos/album",),
        {"64/album": {}},
        {},
        Limits(),
        strict=False,
        follow_symlinks=False,
        force=False,
        retry_failed=False,
        dry_run=False,
        budget=None,
        interrupted="unused",
        decoders_by_host={},
    )
    with pytest.raises(SourceUnreachable) as raised:
        make_folders(SealedTask(task))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("worker host ")
    assert "cannot see the source photos/album: No such file or directory" in message
    assert not (output / "64").exists()


HEAP_PROBE = """
import os, resource, sys
from thumbcli.cluster.task import _heap_kept
from thumbcli.discover import SourceFile
from thumbcli.make.engine import read_source
from thumbcli.spec import Limits

paths = sys.argv[1:]
sources = [SourceFile(p, "/", p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]

def page_faults(read):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for source in sources:
        read(source)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def opened(source):  # a local file: opened, its bytes copied into a worker's memory by the kernel
    read_source(source, Limits(), False)

def read_whole(source):  # an object from a bucket arrives as bytes of this size
    with open(source.path, "rb") as file:
        return file.read()

local = page_faults(opened)
plain = page_faults(read_whole)
with _heap_kept:
    page_faults(read_whole)
    kept = page_faults(read_whole)
print(local, plain, kept)
"""


def test_a_task_reads_its_files_into_kept_memory_where_dasks_nanny_pins_malloc(tmp_path: Path) -> None:
    # The nanny's environment, in a real process (glibc reads it at start): every 3 MB read
    # faults in fresh pages unless the task keeps freed memory for the next file. A local
    # file's bytes never enter the task's memory at all.
    paths = []
    for index in range(12):
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(bytes([index]) * (3 << 20))
        paths.append(str(path))
    probe = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, *paths],
        env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        check=True,
    )
    local, plain, kept = map(int, probe.stdout.split())
    assert local < 12 * (3 << 20) // 4096 // 10, probe.stdout
    assert plain > 12 * (3 << 20) // 4096, probe.stdout  # at least a fault per page read
    assert kept < plain / 10, probe.stdout


def test_cluster_puts_each_source_roots_thumbnails_under_its_folder_as_a_local_run_does(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    # Two cards, the same file name on each: a local run keeps them apart under each root's folder.
    for card, seed in (("card1", 1), ("card2", 2)):
        make_photo(tmp_path / card / "DCIM" / "IMG_0001.JPG", 96, 64, seed=seed)
    sources = (tmp_path / "card1" / "DCIM", tmp_path / "card2" / "DCIM")
    assert run_cli("generate", *sources, "-o", tmp_path / "local", "-s", "64").rc == 0
    run = run_cli("generate", *sources, "-o", tmp_path / "dask", "-s", "64", "--dask", cluster.address)
    assert run.rc == 0, run.stderr
    same_outputs(tmp_path / "local", tmp_path / "dask")
    assert len(output_files(tmp_path / "dask")) == 2
    rerun = run_cli("generate", *sources, "-o", tmp_path / "dask", "-s", "64", "--json", "--dask", cluster.address)
    assert (rerun.rc, rerun.summary["made"], rerun.summary["skipped"]) == (0, 0, 2)


def test_an_unreachable_scheduler_fails_at_once_and_before_any_folder_is_made(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with socket.socket() as closed:  # a port nothing listens on once this is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    # The test's own timeout is far below Dask's connect timeout: only the early check ends the run in time.
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--dask", address, timeout=8)
    assert run.rc == 3
    assert run.stderr.splitlines() == [
        f"thumbcli: error: cannot reach the Dask scheduler at {address}: Connection refused"
    ]
    assert not (tmp_path / "out").exists()
