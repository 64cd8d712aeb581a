"""Known failures: a source the decoder refused is not decoded or reported again until it changes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from imagekit import make_photo, run_cli

import thumbcli

BAD_BYTES = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8  # a JPEG start, then nothing libvips can decode


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A source folder with one good photo and two files the decoder refuses."""
    src = tmp_path / "src"
    make_photo(src / "good.jpg")
    (src / "bad.jpg").write_bytes(BAD_BYTES)
    (src / "worse.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    return src


def generate(src: Path, out: Path, *extra: str) -> tuple[int, str, dict[str, object]]:
    """One real `thumbcli generate --json` run: exit code, stderr, the JSON summary."""
    run = run_cli("generate", src, "-o", out, "--json", *extra)
    assert "Traceback" not in run.stderr, run.stderr
    return run.rc, run.stderr, run.summary


def failure_names(summary: dict[str, object], key: str) -> list[str]:
    entries = summary[key]
    assert isinstance(entries, list)
    return sorted(Path(entry["path"]).name for entry in entries)


def state_db(out: Path) -> sqlite3.Connection:
    return sqlite3.connect(out / ".thumbcli" / "state.sqlite", isolation_level=None)


def test_a_rerun_with_only_known_failures_is_silent_and_exits_0(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stderr, first = generate(sources, out)
    assert (rc, first["made"], first["failed"], first["known_failed"]) == (1, 1, 2, 0)
    assert stderr.count("failed: ") == 2
    assert failure_names(first, "failures") == ["bad.jpg", "worse.png"]

    rc, stderr, second = generate(sources, out)
    assert (rc, stderr) == (0, "")  # stderr is not a terminal: cron mails nothing
    assert (second["made"], second["skipped"], second["failed"], second["known_failed"]) == (0, 1, 0, 2)
    assert second["exit_code"] == 0
    assert second["failures"] == []
    assert failure_names(second, "known_failures") == ["bad.jpg", "worse.png"]
    reasons = {Path(str(entry["path"])).name: entry["reason"] for entry in second["known_failures"]}  # type: ignore[attr-defined]
    assert reasons == {Path(str(e["path"])).name: e["reason"] for e in first["failures"]}  # type: ignore[attr-defined]


def test_a_known_failure_is_not_decoded_again(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(sources, out)
    _, _, second = generate(sources, out)
    assert second["bytes_read"] == 0  # nothing was even read, let alone decoded
    assert second["known_failed"] == 2


def test_a_changed_source_is_tried_again(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(sources, out)
    bad = sources / "bad.jpg"
    os.utime(bad, ns=(bad.stat().st_mtime_ns + 10**9,) * 2)  # touched: same bytes, new mtime
    rc, stderr, touched = generate(sources, out)
    assert (rc, touched["failed"], touched["known_failed"]) == (1, 1, 1)
    assert failure_names(touched, "failures") == ["bad.jpg"]
    assert "bad.jpg" in stderr and "worse.png" not in stderr

    make_photo(bad, seed=2)  # mended: made, and no longer a failure
    rc, _, mended = generate(sources, out)
    assert (rc, mended["made"], mended["failed"], mended["known_failed"]) == (0, 1, 0, 1)
    assert (out / "256" / "bad.jpg.jpg").is_file()
    with state_db(out) as db:
        assert [Path(os.fsdecode(row[0])).name for row in db.execute("SELECT source FROM failures")] == ["worse.png"]


def test_retry_failed_tries_every_known_failure(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(sources, out)
    rc, stderr, retried = generate(sources, out, "--retry-failed")
    assert (rc, retried["failed"], retried["known_failed"], retried["skipped"]) == (1, 2, 0, 1)
    assert stderr.count("failed: ") == 2


def test_a_new_thumbcli_version_tries_known_failures_again(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(sources, out)
    with state_db(out) as db:
        versions = {row[0] for row in db.execute("SELECT version FROM failures")}
        assert versions == {thumbcli.__version__}
        # As if an older thumbcli had refused them.
        changed = db.execute(
            "UPDATE failures SET version = '0.0.1' WHERE source = ?", (os.fsencode(sources / "bad.jpg"),)
        ).rowcount
        assert changed == 1
    rc, _, rerun = generate(sources, out)
    assert (rc, rerun["failed"], rerun["known_failed"]) == (1, 1, 1)
    assert failure_names(rerun, "failures") == ["bad.jpg"]


def test_io_errors_are_not_remembered(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (sources / "bad.jpg").unlink()
    (sources / "worse.png").unlink()
    big = make_photo(sources / "big.jpg", 1200, 900)
    rc, _, first = generate(sources, out, "--max-file-size", "1000")  # refused before reading: not the decoder's
    assert (rc, first["failed"]) == (1, 2)
    rc, _, second = generate(sources, out, "--max-file-size", "1000")
    assert (rc, second["failed"], second["known_failed"]) == (1, 2, 0)
    with state_db(out) as db:
        assert db.execute("SELECT count(*) FROM failures").fetchone()[0] == 0
    assert big.is_file()


def test_metrics_of_a_rerun_with_known_failures_record_a_success(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prom = tmp_path / "thumbcli.prom"
    first = run_cli("generate", sources, "-o", out, "--quiet", "--metrics-file", prom)
    assert first.rc == 1
    assert "thumbcli_last_success_timestamp_seconds" not in prom.read_text()
    second = run_cli("generate", sources, "-o", out, "--quiet", "--metrics-file", prom)
    assert (second.rc, second.stderr) == (0, "")
    text = prom.read_text()
    assert "thumbcli_last_run_known_failures 2" in text
    assert 'thumbcli_last_run_files{outcome="failed"} 0' in text
    assert "thumbcli_last_success_timestamp_seconds " in text


def test_a_served_cache_remembers_failures_too(sources: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_cli("generate", sources, "--cache", cache, "-s", "64", "--json")
    assert (first.rc, first.summary["failed"]) == (1, 2)
    second = run_cli("generate", sources, "--cache", cache, "-s", "64", "--json")
    assert (second.rc, second.stderr, second.summary["known_failed"]) == (0, "", 2)


def test_prune_forgets_the_failures_of_sources_that_are_gone(sources: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_cli("generate", sources, "--cache", cache, "-s", "64")
    (sources / "bad.jpg").unlink()
    assert run_cli("prune", "--cache", cache).rc == 0
    with state_db(cache) as db:
        assert [Path(os.fsdecode(row[0])).name for row in db.execute("SELECT source FROM failures")] == ["worse.png"]
