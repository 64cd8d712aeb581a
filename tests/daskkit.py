"""Test kit for `thumbcli generate --dask`: a real `dask scheduler` and real `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The `dask` command the distributed package installs beside this interpreter.
DASK = Path(sys.executable).parent / "dask"
START_SECONDS = 60.0
#: Listen on loopback only, and put the HTTP endpoints a dashboard would use on a port of their own choosing.
LOCAL_ONLY = ("--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0")


@dataclass
class DaskCluster:
    """A running scheduler and its single-threaded workers (no nanny: a killed worker stays dead)."""

    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def read_bytes(self) -> int:
        """Bytes the workers have read so far (their /proc rchar): proof that they, not the client, read sources."""
        total = 0
        for worker in self.workers:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{worker.pid}/io").read_text().splitlines():
                    if line.startswith("rchar:"):
                        total += int(line.split()[1])
        return total


def _wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def _address_in(scheduler_file: Path, scheduler: subprocess.Popen[bytes]) -> str:
    """The scheduler's address from its file, which it writes after logging that it is up."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(json.loads(scheduler_file.read_text())["address"])
        if scheduler.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dask scheduler wrote no {scheduler_file.name}")
        time.sleep(0.1)


@contextlib.contextmanager
def dask_cluster(folder: Path, workers: int = 2, threads: int = 1) -> Iterator[DaskCluster]:
    """Start `dask scheduler` on a port it picks and `workers` `dask worker` processes; stop them all after."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    scheduler_log = folder / "scheduler.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with scheduler_log.open("wb") as log:
            scheduler = subprocess.Popen(
                [DASK, "scheduler", *LOCAL_ONLY, "--port", "0", "--scheduler-file", scheduler_file],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
            )
        processes.append(scheduler)
        _wait_for_line(scheduler_log, "Scheduler at:", scheduler, "dask scheduler")
        address = _address_in(scheduler_file, scheduler)
        assert address.startswith("tcp://127.0.0.1:")
        cluster = DaskCluster(address, scheduler)
        for index in range(workers):
            worker_log = folder / f"worker-{index}.log"
            with worker_log.open("wb") as log:
                worker = subprocess.Popen(
                    [DASK, "worker", address, *LOCAL_ONLY, "--nthreads", str(threads), "--no-nanny"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=folder,
                )
            processes.append(worker)
            cluster.workers.append(worker)
        for index, worker in enumerate(cluster.workers):
            _wait_for_line(folder / f"worker-{index}.log", "Registered to:", worker, "dask worker")
        yield cluster
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
