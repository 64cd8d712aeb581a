"""Cron safety: the run lock, budgets that converge, silence, metrics, dry runs, prune, the documented jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from imagekit import make_photo, output_files, run_cli

from thumbcli.errors import ExitCode
from thumbcli.fsutil import RunLock, open_folder
from thumbcli.metrics import write_run_metrics
from thumbcli.run import GenerateSummary

README = Path(__file__).parents[1] / "README.md"


def photos(folder: Path, count: int, *, start: int = 0) -> list[Path]:
    return [make_photo(folder / f"p{index:03d}.jpg", 320, 240, seed=index) for index in range(start, start + count)]


def lock_cache(cache: Path) -> RunLock:
    """The run lock of a cache, taken as a run takes it."""
    folder = open_folder(cache, ".thumbcli")
    try:
        return RunLock(folder, "lock", cache / ".thumbcli" / "lock", wait=False)
    finally:
        os.close(folder)


def test_second_run_on_a_locked_cache_names_the_holder_and_exits_locked(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    cache = tmp_path / "cache"
    lock = lock_cache(cache)
    try:
        run = run_cli("generate", tmp_path / "src", "--cache", cache)
        quiet = run_cli("generate", tmp_path / "src", "--cache", cache, "--quiet")
    finally:
        lock.release()
    assert run.rc == ExitCode.LOCKED
    assert f"locked by another thumbcli run (pid {os.getpid()})" in run.stderr
    # From cron (--quiet), two runs meeting is no news: the exit code says it, nothing is printed.
    assert (quiet.rc, quiet.stdout, quiet.stderr) == (ExitCode.LOCKED, "", "")
    assert run_cli("generate", tmp_path / "src", "--cache", cache).rc == 0


def test_wait_queues_behind_the_lock_holder(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    cache = tmp_path / "cache"
    lock = lock_cache(cache)
    threading.Timer(1.0, lock.release).start()
    started = time.monotonic()
    run = run_cli("generate", tmp_path / "src", "--cache", cache, "--wait", "--json")
    assert run.rc == 0 and run.summary["made"] == 2
    assert time.monotonic() - started >= 0.9


def flock_waiters(path: Path) -> int:
    """How many processes are blocked in flock() on `path`, from /proc/locks."""
    inode = os.stat(path).st_ino
    blocked = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and any(f.endswith(f":{inode}") for f in fields):
            blocked += 1
    return blocked


def test_two_concurrent_runs_on_one_cache_never_both_work(tmp_path: Path) -> None:
    photos(tmp_path / "src", 12)
    cache = tmp_path / "cache"
    lock_file = cache / ".thumbcli" / "lock"
    argv = [sys.executable, "-m", "thumbcli", "generate", str(tmp_path / "src"), "--cache", str(cache), "-j", "1"]
    # Held here until both runs are blocked on it, so that both are let go at the same
    # moment with all twelve thumbnails missing: only the lock keeps them from both working.
    lock = lock_cache(cache)
    try:
        waiting = [
            subprocess.Popen([*argv, "--wait", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 60
        while flock_waiters(lock_file) < 2:
            assert all(proc.poll() is None for proc in waiting), "a run did not wait for the lock"
            assert time.monotonic() < deadline, "the runs never queued on the lock"
            time.sleep(0.05)
    finally:
        lock.release()
    made = []
    for proc in waiting:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        made.append(json.loads(out)["made"])
    # One run made all twelve; the other, let in only after it, found nothing left to do.
    assert sorted(made) == [0, 12]
    assert len(output_files(cache / "v1")) == 12


def test_budgeted_runs_converge_and_make_missing_before_stale(tmp_path: Path) -> None:
    sources = photos(tmp_path / "src", 6)
    out = tmp_path / "out"
    for _ in range(2):
        run = run_cli("generate", tmp_path / "src", "-o", out, "--max-files", "2", "--json", "-j", "1")
        assert run.rc == ExitCode.CUT_SHORT, run.stderr
        assert run.summary["stopped"] == "max-files" and run.summary["made"] == 2
    last = run_cli("generate", tmp_path / "src", "-o", out, "--max-files", "2", "--json", "-j", "1")
    assert last.rc == 0 and last.summary["made"] == 2 and last.summary["stopped"] is None
    final = run_cli("generate", tmp_path / "src", "-o", out, "--max-files", "2", "--json")
    assert final.rc == 0 and final.summary["skipped"] == 6

    # Two stale sources and two missing ones: a budget of two makes the missing ones.
    for source in sources[:2]:
        os.utime(source, ns=(1, 1))
    photos(tmp_path / "src", 2, start=50)
    run = run_cli("generate", tmp_path / "src", "-o", out, "--max-files", "2", "--json", "-j", "1")
    assert run.summary["made"] == 2
    assert (out / "256" / "p050.jpg.jpg").exists() and (out / "256" / "p051.jpg.jpg").exists()
    rest = run_cli("generate", tmp_path / "src", "-o", out, "--json")
    assert rest.rc == 0 and rest.summary["made"] == 2


def test_max_time_ends_the_run_gracefully_and_the_next_run_finishes(tmp_path: Path) -> None:
    photos(tmp_path / "src", 16)
    out = tmp_path / "out"
    run = run_cli(
        "generate", tmp_path / "src", "-o", out, "--max-time", "0.01", "-j", "1", "--format", "avif", "--json"
    )
    assert run.rc == ExitCode.CUT_SHORT, run.stderr
    assert run.summary["stopped"] == "max-time" and run.summary["made"] < 16
    assert not [p for p in out.rglob("*") if p.name.startswith(".thumbcli-tmp-")]
    rest = run_cli("generate", tmp_path / "src", "-o", out, "--format", "avif", "--json")
    assert rest.rc == 0 and rest.summary["made"] + run.summary["made"] == 16


def test_success_off_a_terminal_prints_nothing_and_failure_prints_lines(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out")
    assert (run.rc, run.stdout, run.stderr) == (0, "", "")
    (tmp_path / "src" / "bad.jpg").write_text("not a jpeg")
    failed = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out")
    assert failed.rc == ExitCode.SOME_FAILED
    assert failed.stdout == ""
    assert failed.failure_lines == [
        f"failed: {tmp_path / 'src' / 'bad.jpg'}: content is not an image (starts with text 'not a jpeg')"
    ]


def test_metrics_file_is_a_prometheus_textfile_that_keeps_the_last_success(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    metrics = tmp_path / "thumbcli.prom"
    assert run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--metrics-file", metrics).rc == 0
    text = metrics.read_text()
    assert 'thumbcli_last_run_files{outcome="made"} 2' in text
    assert "# TYPE thumbcli_last_run_seconds gauge" in text
    success = re.search(r"^thumbcli_last_success_timestamp_seconds (\S+)$", text, re.MULTILINE)
    assert success and abs(float(success.group(1)) - time.time()) < 60
    summary = GenerateSummary(
        found=3,
        made=0,
        thumbnails=0,
        skipped=2,
        failed=1,
        degraded=0,
        seconds=0.1,
        images_per_second=0.0,
        bytes_read=0,
        stopped=None,
        exit_code=ExitCode.SOME_FAILED,
        output=tmp_path / "out",
    )
    write_run_metrics(metrics, summary, now=success and float(success.group(1)) + 100)
    later = metrics.read_text()
    assert f"thumbcli_last_success_timestamp_seconds {success.group(1)}" in later
    assert "thumbcli_last_run_exit_code 1" in later
    for line in later.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{outcome="[a-z]+"\})? -?[0-9.]+', line), line


def test_dry_run_counts_and_estimates_without_writing(tmp_path: Path) -> None:
    photos(tmp_path / "src", 3)
    out = tmp_path / "out"
    run = run_cli("generate", tmp_path / "src", "-o", out, "-s", "64", "-s", "128", "--dry-run", "--json")
    assert run.rc == 0
    assert run.summary["planned"] == 3 and run.summary["planned_thumbnails"] == {"64": 3, "128": 3}
    assert run.summary["estimated_bytes"] > 0
    assert output_files(out) == []
    text = run_cli("generate", tmp_path / "src", "-o", out, "--dry-run")
    assert text.stdout.startswith("would make 3 thumbnails of 3 files (about ")


def test_prune_removes_gone_sources_removed_presets_and_changed_settings(tmp_path: Path) -> None:
    sources = photos(tmp_path / "src" / "sub", 3)
    cache = tmp_path / "cache"
    config = tmp_path / "thumbcli.toml"
    config.write_text(f'cache = "{cache}"\n[presets.a]\nsize = "64"\n[presets.b]\nsize = "32"\n')
    assert run_cli("--config", config, "generate", tmp_path / "src").rc == 0
    assert len(output_files(cache / "v1")) == 6

    sources[0].unlink()
    config.write_text(f'cache = "{cache}"\n[presets.a]\nsize = "64"\nquality = 40\n')
    listed = run_cli("--config", config, "prune", "--dry-run")
    assert listed.rc == 0
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    reasons = sorted(row[2] for row in rows)
    assert reasons == ["preset a settings changed"] * 3 + ["preset b is no longer configured"] * 3
    assert all(int(row[1]) > 0 for row in rows)
    assert len(output_files(cache / "v1")) == 6

    config.write_text(f'cache = "{cache}"\n[presets.a]\nsize = "64"\n')
    run = run_cli("--config", config, "prune", "--json")
    assert run.rc == 0
    assert sorted(item["reason"] for item in run.summary["removed"]) == ["preset b is no longer configured"] * 3 + [
        "source is gone"
    ]
    assert not (cache / "v1" / "b").exists()
    assert sorted(p.name for p in output_files(cache / "v1")) == ["p001.jpg.jpg", "p002.jpg.jpg"]
    assert '"b"' not in (cache / "thumbcli-cache.json").read_text()
    again = run_cli("--config", config, "generate", tmp_path / "src", "--json")
    assert again.summary["made"] == 0 and again.summary["skipped"] == 2


@pytest.mark.parametrize("budget", ["--max-files", "--max-time"])
def test_budget_flags_are_refused_when_malformed(tmp_path: Path, budget: str) -> None:
    run = run_cli("generate", tmp_path, "-o", tmp_path / "out", budget, "soon")
    assert run.rc == ExitCode.USAGE
