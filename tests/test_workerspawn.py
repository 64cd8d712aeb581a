"""Issue 22: a run's resample workers are forks of one fork server, which loaded a worker's libraries once.

Real runs of `thumbcli generate`, real processes found in /proc, real signals: a worker killed
mid-decode is reported as before and replaced by another fork; a server killed mid-run costs
the files its workers had for this run only, and the run goes on with spawned workers.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagekit import cli_command, make_photo, output_files, run_cli
from test_workers import WORKER_NAME, decoding, processes_below, running, slow_png, worker_processes

from thumbcli.make.pool import DecoderPool, DecoderSettings
from thumbcli.spec import Limits, SizeBox, ThumbSpec
from thumbcli.workers import SERVER_LOST

SERVER_NAME = "thumbcli-forks"
SPECS = (ThumbSpec(SizeBox.parse("64")),)
__all__ = ["slow_png"]  # a fixture


def slow_then_fine(src: Path, slow: Path, fine: int = 10) -> None:
    """Two slow PNGs first (the walk sorts names: each worker's first file), then `fine` small JPEGs."""
    src.mkdir()
    for name in ("a-slow1.png", "a-slow2.png"):
        os.link(slow, src / name)
    for i in range(fine):
        make_photo(src / f"b-fine{i:02d}.jpg", 120, 80, seed=i)


def watch_run(
    command: list[object], act: Callable[[int], bool], deadline: float
) -> tuple[int, dict[str, Any], set[int], str]:
    """Run `command`, calling `act(pid)` every 20 ms while it runs; exit code, summary, workers seen, stderr.

    `act` says whether it has done what it is there for; the run must not end before it has.
    """
    seen: set[int] = set()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = False
    with running(command, env=env) as process:
        while process.poll() is None and time.monotonic() < deadline:
            seen |= set(worker_processes(process.pid))
            done = act(process.pid) or done
            time.sleep(0.02)
        stdout, stderr = process.communicate(timeout=max(1, deadline - time.monotonic()))
    assert done, stderr
    return process.returncode, json.loads(stdout), seen, stderr


def test_a_runs_workers_are_forks_of_one_server_and_a_killed_worker_is_reported_and_forked_again(
    tmp_path: Path, slow_png: Path
) -> None:
    slow_then_fine(tmp_path / "src", slow_png)
    command = cli_command(
        "generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64", "--workers", "2", "--json", "--quiet"
    )
    slow_size = slow_png.stat().st_size
    servers: set[int] = set()
    parents: dict[int, int] = {}

    killed: list[int] = []

    def kill_one_decoding_worker(thumbcli: int) -> bool:
        servers.update(processes_below(thumbcli, SERVER_NAME))
        for pid, (parent, _) in processes_below(thumbcli, WORKER_NAME).items():
            parents.setdefault(pid, parent)
        decoders = [pid for pid in parents if decoding(pid, slow_size)]
        if not killed and decoders:
            os.kill(decoders[0], signal.SIGKILL)
            killed.append(decoders[0])
        return bool(killed)

    code, summary, seen, stderr = watch_run(command, kill_one_decoding_worker, time.monotonic() + 60)
    assert code == 1, stderr
    assert (summary["made"], summary["failed"]) == (11, 1), summary
    assert [failure["reason"] for failure in summary["failures"]] == ["decoder crashed (signal 9)"]
    assert len(output_files(tmp_path / "out")) == 11
    # One server, and every worker its child: the replacement too.
    assert len(servers) == 1 and len(parents) == 3, (servers, parents)
    (server,) = servers
    assert set(parents.values()) == {server}
    assert [pid for pid in (*seen, server) if Path(f"/proc/{pid}").exists()] == []


def test_a_server_killed_mid_run_costs_its_workers_files_this_run_only_and_the_rest_is_made_by_spawned_workers(
    tmp_path: Path, slow_png: Path
) -> None:
    slow_then_fine(tmp_path / "src", slow_png)
    out = tmp_path / "out"
    command = cli_command("generate", tmp_path / "src", "-o", out, "-s", "64", "--workers", "2", "--json", "--quiet")
    slow_size = slow_png.stat().st_size
    killed: list[int] = []
    parents: dict[int, int] = {}
    runs: set[int] = set()

    def kill_the_server_once_a_worker_decodes(thumbcli: int) -> bool:
        runs.add(thumbcli)
        for pid, (parent, _) in processes_below(thumbcli, WORKER_NAME).items():
            parents.setdefault(pid, parent)
        servers = list(processes_below(thumbcli, SERVER_NAME))
        if not killed and len(servers) == 1 and any(decoding(pid, slow_size) for pid in parents):
            os.kill(servers[0], signal.SIGKILL)
            killed.append(servers[0])
        return bool(killed)

    code, summary, _, stderr = watch_run(command, kill_the_server_once_a_worker_decodes, time.monotonic() + 60)
    assert code == 1, stderr
    failed = {Path(f["path"]).name for f in summary["failures"]}
    assert failed and {f["reason"] for f in summary["failures"]} == {SERVER_LOST}, summary
    assert "a-slow1.png" in failed or "a-slow2.png" in failed
    assert summary["made"] + summary["failed"] == 12
    assert "Traceback" not in stderr
    # The workers after it were spawned, children of thumbcli itself (no other server was started).
    (server,) = killed
    assert set(parents.values()) == {server, *runs}, parents
    # Not the files' fault: the next run makes them rather than skip them as known failures.
    again = run_cli("generate", tmp_path / "src", "-o", out, "-s", "64", "--json", "--quiet")
    assert again.rc == 0, again.stderr
    assert (json.loads(again.stdout)["made"], len(output_files(out))) == (len(failed), 12)


def test_workers_start_and_are_replaced_while_the_process_holds_descriptors_past_select_s_1024(tmp_path: Path) -> None:
    """A server with thousands of connections open starts a worker for a missing thumbnail: its descriptors are high."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    pool = DecoderPool(DecoderSettings(Limits()), sharing=1)
    try:
        data = make_photo(tmp_path / "photo.jpg", 120, 80).read_bytes()
        with pool.lend() as worker:
            assert worker.resample(data, SPECS).thumbnails
            forked = processes_below(os.getpid(), WORKER_NAME)
            assert worker.pid in forked and forked[worker.pid][0] != os.getpid()  # forked by its server
            os.kill(worker.pid, signal.SIGKILL)
            assert worker.resample(data, SPECS).reason == "decoder crashed (signal 9)"
            assert worker.resample(data, SPECS).thumbnails  # its replacement
            assert worker.started == 2
    finally:
        pool.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
