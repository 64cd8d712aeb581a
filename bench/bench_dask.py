"""`thumbcli generate --dask` against a local run, on a running cluster of (by default) single-threaded workers.

    python bench/bench_dask.py [--images 200] [--size 2000x1500] [--workers 2] [--threads 1] [--repeat 3]
                               [--workdir DIR]

Starts `dask scheduler` and WORKERS `dask worker --nthreads THREADS` processes on 127.0.0.1 (with the
settings the README exports: no profiler, Dask's housekeeping at a slower pace), then times,
rows taking turns, each run once untimed first, with the median of REPEAT runs:

* make: IMAGES photo-like JPEGs (bench/photos.py) to one 256 thumbnail each, locally with
  `-j WORKERS*THREADS` and through the cluster (target: cluster throughput >= 0.9x local);
* rerun: the no-change rerun of the same, locally and through the cluster (target: <= 2x local);
* scale: tasks per second the client submits and records, one tiny folder per task, made in-process
  (so the table shows the client's and scheduler's cost per task, not interpreter start-up).

Wall times on a shared machine are noisy: only the ratios are printed as results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyvips

sys.path.insert(0, str(Path(__file__).parent))
from photos import make_photo

from thumbcli.cluster.client import CLUSTER_SETTINGS

DASK = Path(sys.executable).parent / "dask"
LOCAL_ONLY = ("--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0")


@contextlib.contextmanager
def cluster(folder: Path, workers: int, threads: int = 1) -> Iterator[str]:
    """A scheduler and `workers` workers of `threads` threads; yields the scheduler's address."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    log = (folder / "cluster.log").open("wb")
    # As the README starts them: with the settings it exports.
    environment = dict(os.environ, **CLUSTER_SETTINGS)
    processes = [
        subprocess.Popen(
            [DASK, "scheduler", *LOCAL_ONLY, "--port", "0", "--scheduler-file", scheduler_file],
            stderr=log,
            stdout=log,
            env=environment,
        )
    ]
    try:
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        processes += [
            subprocess.Popen(
                [DASK, "worker", address, *LOCAL_ONLY, "--nthreads", str(threads)],
                stderr=log,
                stdout=log,
                env=environment,
            )
            for _ in range(workers)
        ]
        deadline = time.monotonic() + 60
        while (folder / "cluster.log").read_text(errors="replace").count("Registered to:") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            time.sleep(0.1)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait()
        log.close()


def corpus(workdir: Path, images: int, size: str) -> Path:
    width, height = (int(edge) for edge in size.split("x"))
    root = workdir / f"corpus-{images}-{size}"
    if not (root / ".built").exists():
        for index in range(images):
            path = root / f"album-{index // 10:02d}" / f"photo-{index:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            make_photo(width, height, index).write_to_file(str(path), Q=90)
        (root / ".built").touch()
    return root


def timed(argv: list[str | Path]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds


def thumbcli(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "thumbcli", "generate", *args]


def compare(rows: dict[str, list[str | Path]], repeat: int, before: dict[str, Path] | None = None) -> dict[str, float]:
    """Median seconds of each row; rows take turns; `before` names an output folder to empty before each run."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for name, argv in rows.items():  # untimed: the workers load libvips, the page cache holds the sources
        if before and name in before:
            shutil.rmtree(before[name], ignore_errors=True)
        timed(argv)
    for _ in range(repeat):
        for name, argv in rows.items():
            if before and name in before:
                shutil.rmtree(before[name], ignore_errors=True)
            times[name].append(timed(argv))
    return {name: statistics.median(values) for name, values in times.items()}


def scale_table(workdir: Path, address: str, folder_counts: list[int]) -> None:
    """Tasks per second the client submits and records: one tiny image per folder, one folder per task."""
    from thumbcli.cluster.client import ClusterRun
    from thumbcli.config import Config
    from thumbcli.run import GenerateRequest, open_target

    tiny = pyvips.Image.black(48, 32).draw_circle([200], 20, 16, 10, fill=True).jpegsave_buffer(Q=70)
    print("| folders (= tasks) | seconds | tasks/s |")
    print("| ---: | ---: | ---: |")
    for count in folder_counts:
        source = workdir / f"tiny-{count}"
        if not source.exists():
            for index in range(count):
                folder = source / f"d{index // 100:03d}" / f"e{index:05d}"
                folder.mkdir(parents=True)
                (folder / "a.jpg").write_bytes(tiny)
        output = workdir / f"tiny-{count}-out"
        shutil.rmtree(output, ignore_errors=True)
        job = GenerateRequest(sources=(str(source),), output=output, sizes=("32",), dask=address).job(Config())
        target = open_target(job)
        try:
            run = ClusterRun(job, target, task_files=1)
            started = time.perf_counter()
            stats = run.run()
            seconds = time.perf_counter() - started
        finally:
            target.close()
        assert stats.made == count and run.tasks == count, (stats, run.tasks)
        print(f"| {count} | {seconds:.2f} | {count / seconds:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="2000x1500")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (each decodes in its own process)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", default="200,1000,4000", help="folder counts for the scale table")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thumbcli-bench")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", file=sys.stderr)
    source = corpus(args.workdir, args.images, args.size)
    out = args.workdir / "dask-out"
    with cluster(args.workdir / "dask-cluster", args.workers, args.threads) as address:
        local_out, dask_out = out / "local", out / "dask"
        make = compare(
            {
                "local": thumbcli(source, "-o", local_out, "-j", str(args.workers * args.threads)),
                "dask": thumbcli(source, "-o", dask_out, "--dask", address),
            },
            args.repeat,
            before={"local": local_out, "dask": dask_out},
        )
        time.sleep(2.5)  # past the racy window, so the reruns record and use folder signatures
        for argv in (thumbcli(source, "-o", local_out), thumbcli(source, "-o", dask_out, "--dask", address)):
            timed(argv)
        rerun = compare(
            {
                "local": thumbcli(source, "-o", local_out),
                "dask": thumbcli(source, "-o", dask_out, "--dask", address),
            },
            args.repeat,
        )
        print(f"make {args.images} JPEGs {args.size}, {args.workers} workers of {args.threads} threads:")
        print(f"  local {make['local']:.2f} s, dask {make['dask']:.2f} s")
        print(f"  dask throughput / local throughput = {make['local'] / make['dask']:.2f}  (target >= 0.9)")
        print("no-change rerun:")
        print(f"  local {rerun['local']:.2f} s, dask {rerun['dask']:.2f} s")
        print(f"  dask time / local time = {rerun['dask'] / rerun['local']:.2f}  (target <= 2)")
        print("scale: one task per tiny folder, made through the cluster, client in-process")
        scale_table(args.workdir, address, [int(count) for count in args.scale.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
