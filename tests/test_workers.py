"""Resample worker processes: real processes, real signals, real broken files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips
from imagekit import assert_clean_failure, cli_command, load, make_photo, output_files, run_cli
from servekit import fetch, running_server, wait_until

from thumbcli.discover import is_image_name
from thumbcli.make.pipeline import Pipeline, worker_cores
from thumbcli.make.results import FileResult, RunStats
from thumbcli.resample import resample
from thumbcli.spec import Limits, RunOptions, SizeBox, ThumbSpec, WalkOptions
from thumbcli.targets.tree import OutputTree
from thumbcli.workerloop import PROCESS_NAME, SHRANK
from thumbcli.workers import OpenedFile, ResampleWorker
from thumbcli.workerspawn import jemalloc_library

SPECS = (ThumbSpec(SizeBox.parse("64")),)
SLOW_EDGE = 9999  # a 100-megapixel PNG, just under the default --max-pixels, that takes about a second


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pipeline(src: Path, out: Path, run: RunOptions) -> tuple[RunStats, dict[str, FileResult]]:
    results: list[FileResult] = []
    target = OutputTree(out, SPECS)
    try:
        stats = Pipeline([str(src)], target, run, WalkOptions(processes=1), on_result=results.append).run()
    finally:
        target.close()
    return stats, {Path(result.path).name: result for result in results}


@pytest.fixture(scope="module")
def slow_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PNG that decodes slowly (paeth filter, 100 megapixels) yet is only a few MB."""
    xy = pyvips.Image.xyz(SLOW_EDGE, SLOW_EDGE)
    a = ((xy[0] * xy[1]) & 255).cast("uchar")
    b = ((xy[0] * 3 + xy[1] * 5) & 255).cast("uchar")
    path = tmp_path_factory.mktemp("slow") / "slow.png"
    a.bandjoin([b, a ^ b]).copy(interpretation="srgb").pngsave(str(path), compression=6, filter="paeth")
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small JPEG whose frame header claims `width` x `height`."""
    data = bytearray(make_photo(path, 64, 48).read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(data)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header chunk claims `width` x `height`."""
    data = bytearray(pyvips.Image.black(8, 8).pngsave_buffer())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(data)
    return path


def heif_garbage(path: Path, size: int) -> Path:
    """A file that announces HEIF and is not: libvips' text names seeks relative to its size."""
    path.write_bytes(b"\0\0\0\x18ftypheic" + bytes((i * 7) % 251 for i in range(size - 12)))
    return path


@pytest.mark.parametrize("workers", [2, 4])
def test_each_broken_file_is_reported_with_its_own_reason_across_workers(tmp_path: Path, workers: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    claims: dict[str, str] = {}
    for i in range(20):
        jpeg_claiming(src / f"jpeg{i:02d}.jpg", 20000 + i, 6000)
        claims[f"jpeg{i:02d}.jpg"] = f"{20000 + i}x6000"
        png_claiming(src / f"png{i:02d}.png", 30000, 4000 + i)
        claims[f"png{i:02d}.png"] = f"30000x{4000 + i}"
    sizes = {f"heif{i:02d}.heic": 3001 + 7 * i for i in range(20)}
    for name, size in sizes.items():
        heif_garbage(src / name, size)
    good = make_photo(tmp_path / "good.jpg").read_bytes()
    cuts = {f"cut{i:02d}.jpg": len(good) // 3 + 97 * i for i in range(10)}
    for name, cut in cuts.items():
        (src / name).write_bytes(good[:cut])
    for i in range(4):
        make_photo(src / f"fine{i}.jpg", 120, 80, seed=i)

    stats, results = run_pipeline(src, tmp_path / "out", RunOptions(workers=workers, strict=True))

    assert (stats.made, stats.failed) == (4, 70)
    for name, dimensions in claims.items():
        assert f"image is {dimensions} " in results[name].reason, results[name]
    for name, size in sizes.items():
        result = results[name]
        seeks = [int(n) for n in re.findall(r"bad seek to (\d+)", result.detail)]
        # libvips seeks past the end of this file, and of no smaller one.
        assert seeks and min(seeks) == size + 1, (name, result.detail)
        assert result.reason == "truncated" and "\n" not in result.detail
    for name in cuts:
        assert (results[name].reason, "premature end" in results[name].detail) == ("truncated", True)


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.gif"])
def test_truncated_images_get_degraded_thumbnails_unless_strict(tmp_path: Path, name: str) -> None:
    photo = make_photo(tmp_path / name)
    data = photo.read_bytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / name).write_bytes(data[: len(data) * 2 // 3])

    stats, results = run_pipeline(tmp_path / "src", tmp_path / "out", RunOptions(workers=1))
    assert (stats.made, stats.degraded, stats.failed) == (1, 1, 0)
    assert results[name].warning == "truncated" and stats.warnings == [results[name]]
    (thumb,) = output_files(tmp_path / "out")
    assert load(thumb).width == 64

    stats, results = run_pipeline(tmp_path / "src", tmp_path / "strict", RunOptions(workers=1, strict=True))
    assert (stats.made, stats.degraded, stats.failed) == (0, 0, 1)
    assert results[name].reason == "truncated"
    assert output_files(tmp_path / "strict") == []


def test_a_decode_over_max_decode_time_is_reported_timed_out_and_the_rest_made(tmp_path: Path, slow_png: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.link(slow_png, src / "a-slow.png")
    for i in range(3):
        make_photo(src / f"b-fine{i}.jpg", 120, 80, seed=i)

    run = RunOptions(workers=1, limits=Limits(max_decode_seconds=0.3))
    started = time.monotonic()
    stats, results = run_pipeline(src, tmp_path / "out", run)

    assert results["a-slow.png"].reason == "timed out after 0.3 s"
    assert (stats.made, stats.failed) == (3, 1)
    assert time.monotonic() - started < 30


def test_a_worker_over_its_memory_ceiling_is_killed_and_the_file_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # An interlaced PNG is decoded whole into memory (about 300 MB here) before it can be shrunk.
    xy = pyvips.Image.xyz(SLOW_EDGE, SLOW_EDGE)
    image = ((xy[0] ^ xy[1]) & 255).cast("uchar")
    image.bandjoin([image, image]).copy(interpretation="srgb").pngsave(
        str(src / "a-big.png"), compression=1, interlace=True
    )
    make_photo(src / "b-fine.jpg", 120, 80)

    ceiling = 200 << 20
    stats, results = run_pipeline(
        src, tmp_path / "out", RunOptions(workers=1, limits=Limits(max_worker_memory=ceiling))
    )

    assert results["a-big.png"].reason == "needed more than 200 MiB of memory"
    assert (stats.made, stats.failed) == (1, 1)


@contextlib.contextmanager
def running(command: list[Any], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """`command` started with its output piped, killed on the way out if it is still running."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


WORKER_NAME = PROCESS_NAME.decode()


def worker_processes(root: int) -> dict[int, float]:
    """Resample workers below `root` (forked by its fork server, or spawned): pid -> CPU seconds (all its threads)."""
    return {pid: cpu for pid, (_, cpu) in processes_below(root, WORKER_NAME).items()}


def processes_below(root: int, name: str) -> dict[int, tuple[int, float]]:
    """Descendants of `root` whose process name (comm) is `name`: pid -> (their parent's pid, CPU seconds)."""
    parents: dict[int, int] = {}
    named: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        if stat[stat.index("(") + 1 : stat.rindex(")")] == name:
            named[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return {pid: found for pid, found in named.items() if descends(pid)}


def decoding(pid: int, at_least: int = 1) -> bool:
    """Whether worker `pid` has a source of `at_least` bytes mapped: it maps each file it decodes, and only then.

    A source is a local image file (handed over open) or a memory file (bytes from a bucket).
    Its CPU time says less: a worker of a run started as root loads every decoder before it starts.
    """
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return False
    for line in maps:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if "thumbcli-source" in path or is_image_name(os.path.basename(path)):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if end - start >= at_least:
                return True
    return False


def test_workers_killed_by_signals_mid_decode_lose_only_their_own_file(tmp_path: Path, slow_png: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # Each worker's first file is slow: the walk sorts names.
    for name in ("a-slow1.png", "a-slow2.png"):
        os.link(slow_png, src / name)
    for i in range(12):
        make_photo(src / f"b-fine{i:02d}.jpg", 120, 80, seed=i)
    command = cli_command("generate", src, "-o", tmp_path / "out", "-s", "64", "--workers", "2", "--json", "--quiet")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    seen: set[int] = set()
    cpu_before: dict[int, float] = {}
    victims: dict[int, signal.Signals] = {}
    signals = [signal.SIGKILL, signal.SIGSEGV]
    slow_size = slow_png.stat().st_size
    deadline = time.monotonic() + 60
    with running(command, env=env) as process:
        while signals and process.poll() is None and time.monotonic() < deadline:
            workers = worker_processes(process.pid)
            seen |= set(workers)
            for pid, cpu in workers.items():
                # Decoding its slow PNG and using CPU for it
                # (in a libvips thread: the main thread's state says nothing).
                if signals and pid not in victims and decoding(pid, slow_size) and cpu > cpu_before.get(pid, cpu):
                    victims[pid] = signals.pop()
                    os.kill(pid, victims[pid])
            cpu_before = workers
            time.sleep(0.02)
        while process.poll() is None and time.monotonic() < deadline:
            seen |= set(worker_processes(process.pid))
            time.sleep(0.05)
        stdout, stderr = process.communicate(timeout=max(1, deadline - time.monotonic()))
    assert sorted(victims.values()) == [signal.SIGKILL, signal.SIGSEGV], (victims, seen)
    summary = json.loads(stdout)
    assert process.returncode == 1, stderr
    assert (summary["made"], summary["failed"]) == (12, 2), summary
    assert {Path(f["path"]).name: f["reason"] for f in summary["failures"]}.keys() == {"a-slow1.png", "a-slow2.png"}
    assert sorted(f["reason"] for f in summary["failures"]) == [
        "decoder crashed (signal 11)",
        "decoder crashed (signal 9)",
    ]
    assert len(output_files(tmp_path / "out")) == 12
    assert "Traceback" not in stderr
    # Replacements took over, and every worker is gone with the run.
    assert len(seen) > 2
    assert [pid for pid in seen if Path(f"/proc/{pid}").exists()] == []


def test_a_run_with_nothing_to_make_starts_no_worker_and_a_run_starts_one_per_slot(tmp_path: Path) -> None:
    for i in range(6):
        make_photo(tmp_path / "src" / f"photo{i}.jpg", 120, 80, seed=i)
    first, _ = run_pipeline(tmp_path / "src", tmp_path / "out", RunOptions(workers=2))
    again, _ = run_pipeline(tmp_path / "src", tmp_path / "out", RunOptions(workers=2))
    assert (first.made, first.workers_started) == (6, 2)
    assert (again.skipped, again.workers_started) == (6, 0)


def test_generate_warns_of_a_degraded_thumbnail_and_strict_refuses_it_with_the_raw_text_in_the_fail_log(
    tmp_path: Path,
) -> None:
    data = make_photo(tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cut.jpg").write_bytes(data[: len(data) // 2])

    lenient = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64")
    assert lenient.rc == 0, lenient.stderr
    assert "warning: " in lenient.stderr and "cut.jpg: truncated" in lenient.stderr
    assert [load(path).width for path in output_files(tmp_path / "out")] == [64]

    fail_log = tmp_path / "failures.log"
    strict = run_cli("generate", tmp_path / "src", "-o", tmp_path / "strict", "--strict", "--fail-log", fail_log)
    assert strict.rc == 1
    assert assert_clean_failure(strict, "cut.jpg").endswith("cut.jpg: truncated")
    (logged,) = fail_log.read_text().splitlines()
    assert logged.endswith("cut.jpg: truncated [VipsJpeg: premature end of JPEG image]")


def test_generate_max_decode_time_reports_the_slow_file_timed_out(tmp_path: Path, slow_png: Path) -> None:
    (tmp_path / "src").mkdir()
    os.link(slow_png, tmp_path / "src" / "slow.png")
    make_photo(tmp_path / "src" / "fine.jpg", 120, 80)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--max-decode-time", "0.3", "--json")
    assert run.rc == 1
    assert assert_clean_failure(run, "slow.png").endswith("slow.png: timed out after 0.3 s")
    assert run.summary["made"] == 1


def test_generate_refuses_a_max_decode_time_of_zero(tmp_path: Path) -> None:
    run = run_cli("generate", tmp_path, "-o", tmp_path / "out", "--max-decode-time", "0")
    assert run.rc == 2 and "--max-decode-time: must be positive" in run.stderr


def test_a_pipelined_worker_that_dies_loses_only_its_file_and_the_queued_ones_are_made(
    tmp_path: Path, slow_png: Path
) -> None:

    specs = SPECS
    fine = [make_photo(tmp_path / f"fine{i}.jpg", 120, 80, seed=i).read_bytes() for i in range(3)]
    worker = ResampleWorker(Limits(), strict=False, memory_ceiling=1 << 34)
    try:
        worker.send(fine[0], specs)
        worker.send(slow_png.read_bytes(), specs)
        worker.send(fine[1], specs)
        worker.send(fine[2], specs)
        assert worker.waiting == 4
        first = worker.receive()
        assert first.thumbnails and not first.reason
        victim = worker.pid
        assert victim is not None
        # Into the slow decode, with two files queued behind it: the fine files take milliseconds of CPU.
        began = cpu_seconds(victim)
        assert wait_until(lambda: cpu_seconds(victim) > began + 0.1, timeout=30)
        os.kill(victim, signal.SIGSEGV)
        assert worker.receive().reason == "decoder crashed (signal 11)"
        for _ in range(2):
            outcome = worker.receive()
            assert outcome.thumbnails and not outcome.reason
        assert worker.waiting == 0
        assert worker.started == 2 and worker.pid != victim
    finally:
        worker.close()


def memory_files_bytes() -> int:
    """The size of this process's memory files that carry sources to resample workers."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "thumbcli-source" in os.readlink(f"/proc/self/fd/{fd}"):
                total += os.stat(f"/proc/self/fd/{fd}").st_size
    return total


def opened(path: Path) -> OpenedFile:
    """`path` opened and measured, as the loader hands a local file to a worker."""
    fd = os.open(path, os.O_RDONLY)
    return OpenedFile(fd, os.fstat(fd).st_size)


def test_a_local_file_reaches_its_worker_open_and_one_shrunk_since_it_was_opened_fails_only_this_once(
    tmp_path: Path,
) -> None:
    good = make_photo(tmp_path / "good.jpg", 640, 480)
    shrunk = make_photo(tmp_path / "shrunk.jpg", 640, 480)
    worker = ResampleWorker(Limits(), strict=False, memory_ceiling=1 << 34)
    try:
        made = worker.resample(opened(good), SPECS)
        assert made.thumbnails and not made.reason
        assert made.thumbnails[0].data == worker.resample(good.read_bytes(), SPECS).thumbnails[0].data
        source = opened(shrunk)
        os.truncate(shrunk, 0)  # after it was opened and measured, before the worker maps it
        lost = worker.resample(source, SPECS)
        assert (lost.reason, lost.transient, lost.thumbnails) == (SHRANK, True, [])
        assert source.fd == -1  # closed once its outcome is known
        assert worker.resample(opened(good), SPECS).thumbnails and worker.started == 1
    finally:
        worker.close()


def test_a_local_file_that_shrinks_while_its_worker_decodes_it_fails_only_this_once(tmp_path: Path) -> None:
    # A big noisy JPEG: its decode reads the mapped file for a good part of a second.
    big = tmp_path / "big.jpg"
    pyvips.Image.gaussnoise(6000, 4000, sigma=60).bandjoin([128, 128]).cast("uchar").copy(
        interpretation="srgb"
    ).jpegsave(str(big), Q=95)
    good = make_photo(tmp_path / "good.jpg", 640, 480)
    worker = ResampleWorker(Limits(), strict=False, memory_ceiling=1 << 34)
    try:
        worker.start()
        worker.send(opened(big), SPECS)
        assert wait_until(lambda: worker.pid is not None and decoding(worker.pid, big.stat().st_size), 30, 0.002)
        os.truncate(big, 0)  # the pages it has not read yet are gone: SIGBUS in the worker
        lost = worker.receive()
        assert (lost.reason, lost.transient, lost.thumbnails) == (SHRANK, True, [])
        assert "signal 7" in lost.detail
        assert worker.resample(opened(good), SPECS).thumbnails and worker.started == 2
    finally:
        worker.close()


def test_a_worker_keeps_memory_for_usual_sources_not_for_the_biggest_one_seen(tmp_path: Path) -> None:
    from thumbcli.workers import SLOTS

    photo = make_photo(tmp_path / "photo.jpg", 120, 80).read_bytes()
    worker = ResampleWorker(Limits(), strict=False, memory_ceiling=1 << 34)
    try:
        assert worker.resample(b"\0" * (100 << 20), SPECS).reason.startswith("content is not a supported image")
        assert memory_files_bytes() >= 100 << 20
        for _ in range(SLOTS):  # every memory file used again, the big one's included
            assert worker.resample(photo, SPECS).thumbnails
        assert memory_files_bytes() == SLOTS * len(photo)
        with pytest.raises(ValueError, match=f"at most {SLOTS} files"):
            for _ in range(SLOTS + 1):
                worker.send(photo, SPECS)
    finally:
        worker.close()
    assert memory_files_bytes() == 0


def allowed_cores(pid: int) -> str:
    """The cores process `pid` may run on, as /proc says them ("0-1", "1")."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.parametrize("pin", [True, False])
def test_each_resample_worker_is_kept_on_a_core_of_its_own_unless_told_not_to(
    tmp_path: Path, slow_png: Path, pin: bool
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("slow1.png", "slow2.png"):
        os.link(slow_png, src / name)
    flag = "--pin-workers" if pin else "--no-pin-workers"
    command = cli_command("generate", src, "-o", tmp_path / "out", "-s", "64", flag, "--quiet")
    first_two = sorted(os.sched_getaffinity(0))[:2]
    cores: dict[int, str] = {}
    deadline = time.monotonic() + 60
    # On two cores, thumbcli starts a worker per core by default.
    with running(command, preexec_fn=lambda: os.sched_setaffinity(0, first_two)) as process:
        thumbcli_cores = allowed_cores(process.pid)
        while len(cores) < 2 and process.poll() is None and time.monotonic() < deadline:
            for pid in worker_processes(process.pid):
                if decoding(pid):
                    with contextlib.suppress(OSError):
                        cores[pid] = allowed_cores(pid)
            time.sleep(0.02)
        _, stderr = process.communicate(timeout=max(1, deadline - time.monotonic()))
    assert process.returncode == 0, stderr
    if pin:
        assert sorted(cores.values()) == [str(core) for core in first_two]
    else:
        assert list(cores.values()) == [thumbcli_cores] * 2


def test_workers_are_pinned_only_with_one_worker_per_core() -> None:
    cores = sorted(os.sched_getaffinity(0))
    assert worker_cores(RunOptions()) == cores  # the default: one worker per core
    assert worker_cores(RunOptions(workers=len(cores) + 1)) == [None] * (len(cores) + 1)
    assert worker_cores(RunOptions(pin_workers=False)) == [None] * len(cores)
    # Shards side by side with -j 1 would all get the first core; on one core, one worker is one per core.
    assert worker_cores(RunOptions(workers=1)) == ([None] if len(cores) > 1 else cores)


def decoders_data_limits(root: int) -> dict[int, int]:
    """The resample workers among `root`'s descendants, each with its private memory limit (RLIMIT_DATA)."""
    found = {}
    for pid in worker_processes(root):
        with contextlib.suppress(OSError):
            limit = re.search(r"Max data size\s+(\d+)", Path(f"/proc/{pid}/limits").read_text())
            if limit is not None:  # else still starting, before it limits itself
                found[pid] = int(limit[1])
    return found


def limits_while_decoding(process: subprocess.Popen[Any]) -> set[int]:
    """The data limits of `process`'s resample workers, read while one is alive."""
    seen: dict[int, int] = {}
    assert wait_until(lambda: bool(seen.update(decoders_data_limits(process.pid)) or seen), timeout=120)
    return set(seen.values())


def within_libraries_of(share: int, limits: set[int]) -> bool:
    """Whether each of `limits` is `share` and what a worker's libraries take (under 256 MiB)."""
    return bool(limits) and all(share <= limit < share + (256 << 20) for limit in limits)


def test_every_driver_gives_each_decoder_the_same_share_of_memory(tmp_path: Path, slow_png: Path) -> None:
    # Two resample workers on this host in each driver: each may use a quarter of the RAM
    # (Limits.worker_memory), and the kernel refuses it private memory past twice that, beyond
    # what its libraries took when it started (tens of MiB, a little more or less in each).
    share = 2 * Limits().worker_memory(2)
    src = tmp_path / "src"
    src.mkdir()
    for index in range(4):
        os.link(slow_png, src / f"slow{index}.png")
    local = cli_command("generate", src, "-o", tmp_path / "local", "-s", "64", "--workers", "2", "--quiet")
    with running(local) as process:
        assert within_libraries_of(share, limits_while_decoding(process))
    dask = cli_command("generate", src, "-o", tmp_path / "dask", "-s", "64", "--dask", "local:2", "--quiet")
    with running(dask) as process:
        assert within_libraries_of(share, limits_while_decoding(process))
    (tmp_path / "thumbcli.toml").write_text('[presets.small]\nsize = "64"\n')
    with running_server(tmp_path / "cache", config=tmp_path / "thumbcli.toml", source_root=src) as server:
        miss = threading.Thread(target=fetch, args=(server, "/small/slow0.png"), daemon=True)
        miss.start()
        assert within_libraries_of(share, limits_while_decoding(server.process))
        miss.join(120)


def test_max_time_gives_up_a_stuck_decode_rather_than_wait_for_the_decode_limit(tmp_path: Path, slow_png: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for index in range(3):
        os.link(slow_png, src / f"slow{index}.png")
    # A decode limit the test's own timeout would never reach: only giving up ends this run in time.
    command = cli_command(
        "generate", src, "-o", tmp_path / "out", "-s", "64", "--workers", "1", "--max-time", "1",
        "--max-decode-time", "600", "--json", "--quiet",
    )  # fmt: skip
    stopped: list[int] = []
    with running(command) as process:
        # A decoder that hangs: its worker stopped with SIGSTOP once it is decoding.
        def stop_a_decoding_worker() -> bool:
            for pid in worker_processes(process.pid):
                if decoding(pid):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            return bool(stopped)

        assert wait_until(stop_a_decoding_worker, timeout=30)
        stdout, stderr = process.communicate(timeout=60)
    summary = json.loads(stdout)
    assert process.returncode == 4, stderr  # cut short, nothing failed
    assert (summary["stopped"], summary["failed"], summary["made"]) == ("max-time", 0, 0)
    for pid in stopped:
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left stopped
    rerun = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64", "--json")
    assert (rerun.rc, rerun.summary["made"]) == (0, 3)


def test_a_source_whose_thumbnail_name_is_too_long_fails_once_and_is_then_known(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_photo(src / "ok.jpg", 120, 80)
    # 252 bytes is a legal source name; with ".jpg" added for the thumbnail it is past NAME_MAX (255).
    make_photo(src / ("n" * 248 + ".jpg"), 120, 80)
    first = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64", "--json")
    assert first.rc == 1
    ((reason,),) = [[f["reason"]] for f in first.summary["failures"]]
    assert reason == "cannot write thumbnail: file name too long"
    again = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64", "--json")
    assert (again.rc, again.summary["failed"], again.summary["known_failed"]) == (0, 0, 1), again.stderr


def test_workers_allocate_with_the_systems_jemalloc_and_make_the_same_thumbnails(tmp_path: Path) -> None:
    jemalloc = jemalloc_library()
    if jemalloc is None:
        pytest.skip("no libjemalloc.so.2 here (Debian: apt-get install libjemalloc2; `dev test` installs it)")
    photo = make_photo(tmp_path / "photo.jpg", 640, 480)
    worker = ResampleWorker(Limits(), strict=True, memory_ceiling=1 << 34)
    try:
        made = worker.resample(photo.read_bytes(), SPECS)
        assert worker.pid is not None
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
    finally:
        worker.close()
    assert os.path.realpath(jemalloc) in maps
    assert [thumb.data for thumb in made.thumbnails] == [
        thumb.data for thumb in resample(photo.read_bytes(), SPECS, Limits(), strict=True).thumbnails
    ]
