"""`thumbcli watch` over buckets: real watch processes against a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips
from imagekit import draw_photo, make_photo, output_files
from s3kit import Bucket, Relay
from test_watch import Watcher, wait_for

from thumbcli.errors import ExitCode


@pytest.fixture
def watching() -> Iterator[Callable[..., Watcher]]:
    """Start `thumbcli watch --json` processes, each killed at the end if it still runs."""
    started: list[Watcher] = []

    def start(*args: str | os.PathLike[str]) -> Watcher:
        started.append(Watcher(*args))
        return started[-1]

    yield start
    for watcher in started:
        watcher.kill()


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    data: bytes = draw_photo(width, height, seed=seed).jpegsave_buffer()
    return data


def thumbs(out: Path) -> set[str]:
    """The thumbnails of an output tree, relative to it."""
    return {path.relative_to(out).as_posix() for path in output_files(out)}


def listings(bucket: Bucket, since: int, prefix: str) -> int:
    """The listings of `prefix` in the bucket among the server's requests from index `since`."""
    return sum(
        1
        for method, path in bucket.server.requests()[since:]
        if method == "GET"
        and path.startswith(f"/{bucket.name}")
        and "list-type=2" in path
        and f"prefix={prefix}" in path
    )


def test_watch_makes_objects_added_and_replaced_and_removes_deleted_ones_at_each_rescan(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    out = tmp_path / "out"
    bucket.put("lib/kept.jpg", jpeg_bytes(seed=1))
    bucket.put("lib/replaced.jpg", jpeg_bytes(320, 240, seed=2))
    bucket.put("lib/deleted.jpg", jpeg_bytes(seed=3))
    watcher = watching(bucket.url("lib"), "-o", out, "-s", "64", "--rescan", "1s")
    assert watcher.caught_up()["made"] == 3
    bucket.put("lib/trip/added.jpg", jpeg_bytes(seed=4))
    bucket.put("lib/replaced.jpg", jpeg_bytes(240, 320, seed=5))  # now portrait: its thumbnail turns
    bucket.delete("lib/deleted.jpg")
    wanted = {"64/kept.jpg.jpg", "64/replaced.jpg.jpg", "64/trip/added.jpg.jpg"}
    wait_for(lambda: thumbs(out) == wanted, "the added object made and the deleted one's thumbnail removed")
    wait_for(lambda: pyvips.Image.new_from_file(str(out / "64" / "replaced.jpg.jpg")).height == 64, "the replacement")
    assert watcher.stop() == ExitCode.OK
    live = after_catch_up(watcher)
    made = [event["path"] for event in live if event["event"] == "made"]
    assert sorted(made) == [bucket.url("lib/replaced.jpg"), bucket.url("lib/trip/added.jpg")]
    assert [os.path.basename(event["path"]) for event in live if event["event"] == "removed"] == ["deleted.jpg.jpg"]
    assert "Traceback" not in watcher.stderr and watcher.of("failed") == []


def after_catch_up(watcher: Watcher) -> list[dict[str, Any]]:
    """The events after the catch-up's."""
    events = watcher.events
    return events[next(i for i, event in enumerate(events) if event["event"] == "caught-up") + 1 :]


def test_a_rescan_with_nothing_new_lists_once_and_gets_no_object(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    for seed in range(5):
        bucket.put(f"lib/sub {seed}/photo {seed}.jpg", jpeg_bytes(seed=seed))
    metrics = tmp_path / "watch.prom"
    since = len(bucket.server.requests())
    args = ("-o", tmp_path / "out", "-s", "64", "--rescan", "1s", "--metrics-file", metrics)
    watcher = watching(bucket.url("lib"), *args)
    assert watcher.caught_up()["made"] == 5
    gets_made = len(bucket.source_gets(since))
    assert gets_made == 5
    wait_for(lambda: rescans_in(metrics) >= 4, "four rescans")
    assert watcher.stop() == ExitCode.OK
    rescans = rescans_in(metrics)
    assert len(bucket.source_gets(since)) == gets_made  # none after the catch-up's
    # The catch-up's listing and its prune's, then one a rescan (its prune judges from it; the last may be cut short).
    listed = listings(bucket, since, "lib/")
    assert rescans + 2 <= listed <= rescans + 3, (rescans, listed)
    ours = [request for request in bucket.server.requests()[since:] if request[1].startswith(f"/{bucket.name}")]
    assert {method for method, _ in ours} == {"GET"} and len(ours) == gets_made + listed
    assert [event["event"] for event in after_catch_up(watcher)] == ["stopped"]


def rescans_in(metrics: Path) -> int:
    """The rescans a watch's metrics file counts (0 before it is written)."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return 0
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("thumbcli_watch_rescans_total "))


@pytest.mark.parametrize(("option", "layout"), [("-o", "thumbs/64/"), ("--cache", "thumbs/v1/64/")])
def test_watch_of_a_folder_into_a_bucket_deletes_the_thumbnails_of_a_deleted_or_renamed_file(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher], option: str, layout: str
) -> None:
    source = tmp_path / "src"
    (source / "trip").mkdir(parents=True)
    make_photo(source / "kept.jpg")
    make_photo(source / "trip" / "gone.jpg", seed=1)
    watcher = watching(source, option, bucket.url("thumbs"), "-s", "64")
    assert watcher.caught_up()["made"] == 2
    assert sorted(bucket.keys(layout)) == [f"{layout}kept.jpg.jpg", f"{layout}trip/gone.jpg.jpg"]
    make_photo(source / "trip" / "new.jpg", seed=2)
    wait_for(lambda: f"{layout}trip/new.jpg.jpg" in bucket.keys(layout), "the new file's thumbnail PUT")
    (source / "trip" / "gone.jpg").unlink()
    wait_for(
        lambda: sorted(bucket.keys(layout)) == [f"{layout}kept.jpg.jpg", f"{layout}trip/new.jpg.jpg"],
        "the deleted file's thumbnail deleted from the bucket",
    )
    (source / "trip").rename(source / "trip 2025")
    wait_for(
        lambda: sorted(bucket.keys(layout)) == [f"{layout}kept.jpg.jpg", f"{layout}trip 2025/new.jpg.jpg"],
        "the renamed folder's thumbnails under its new name only",
    )
    assert watcher.stop() == ExitCode.OK
    removed = [event["path"] for event in watcher.of("removed")]
    assert removed == [bucket.url(f"{layout}trip/gone.jpg.jpg"), bucket.url(f"{layout}trip/new.jpg.jpg")]


def test_watch_goes_on_through_an_endpoint_outage_and_loses_nothing(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = Relay(bucket.server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
    source, out = tmp_path / "src", bucket.url("thumbs")
    source.mkdir()
    bucket.put("lib/before.jpg", jpeg_bytes(seed=1))
    watcher = watching(bucket.url("lib"), source, "-o", out, "-s", "64", "--rescan", "1s")
    assert watcher.caught_up()["made"] == 1
    relay.stop()
    bucket.put("lib/during.jpg", jpeg_bytes(seed=2))  # straight to the server: the watch cannot see it yet
    make_photo(source / "local.jpg", seed=3)  # its PUT meets the outage
    wait_for(lambda: "not reachable" in watcher.stderr, "the outage said")
    assert watcher.proc.poll() is None, watcher.stderr
    before = watcher.stderr
    relay.restart()
    wanted = {"thumbs/64/lib/before.jpg.jpg", "thumbs/64/lib/during.jpg.jpg", "thumbs/64/src/local.jpg.jpg"}
    wait_for(lambda: set(bucket.keys("thumbs/")) == wanted, "everything made once the endpoint is back")
    wait_for(lambda: "answers again" in watcher.stderr, "the recovery said")
    assert watcher.stop() == ExitCode.OK
    said = [line for line in watcher.stderr.splitlines() if "not reachable" in line]
    assert len(said) == 1, watcher.stderr  # once for the whole outage, not at every try
    assert "Traceback" not in watcher.stderr and "not reachable" in before
    assert watcher.of("failed") == []


def test_a_garbage_object_is_named_once_across_rescans(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    metrics = tmp_path / "watch.prom"
    watcher = watching(
        bucket.url("lib"), "-o", tmp_path / "out", "-s", "64", "--rescan", "1s", "--metrics-file", metrics
    )
    watcher.caught_up()
    bucket.put("lib/garbage.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG at all" * 20)
    bucket.put("lib/good.jpg", jpeg_bytes(seed=1))
    wait_for(lambda: (tmp_path / "out" / "64" / "good.jpg.jpg").exists(), "the good object made")
    named_at = rescans_in(metrics)
    wait_for(lambda: rescans_in(metrics) >= named_at + 3, "three more rescans")
    assert watcher.stop() == ExitCode.OK
    failures = [line for line in watcher.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 1 and "garbage.jpg" in failures[0], watcher.stderr
    assert [event["path"] for event in watcher.of("failed")] == [bucket.url("lib/garbage.jpg")]


def test_watch_of_a_bucket_starts_again_on_sighup_and_follows_it(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    out = tmp_path / "out"
    bucket.put("lib/first.jpg", jpeg_bytes(seed=1))
    watcher = watching(bucket.url("lib"), "-o", out, "-s", "64", "--rescan", "1s")
    watcher.caught_up()
    watcher.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(watcher.of("caught-up")) == 2, "the second catch-up")
    bucket.put("lib/second.jpg", jpeg_bytes(seed=2))
    wait_for(lambda: thumbs(out) == {"64/first.jpg.jpg", "64/second.jpg.jpg"}, "the object put after the reload")
    assert watcher.stop() == ExitCode.OK
    assert [event["event"] for event in watcher.events].count("reloading") == 1
    assert "Traceback" not in watcher.stderr


def test_watch_of_a_bucket_that_does_not_answer_at_the_start_exits_3_in_one_line(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagekit import run_cli

    with socket.socket() as closed:  # bound and not listening: every connection to it is refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        refused = run_cli("watch", bucket.url("lib"), "-o", tmp_path / "out", "--rescan", "1s", timeout=120)
    assert refused.rc == ExitCode.CANNOT_RUN, refused.stderr
    assert "not reachable" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_watch_refuses_a_source_that_is_neither_a_folder_nor_a_bucket(tmp_path: Path) -> None:
    from imagekit import run_cli

    photo = make_photo(tmp_path / "a.jpg")
    refused = run_cli("watch", photo, "-o", tmp_path / "out")
    assert refused.rc == ExitCode.USAGE
    assert "watch follows folders and buckets" in refused.stderr


def test_a_key_the_client_cannot_name_is_named_once_and_the_watch_goes_on(
    bucket: Bucket, tmp_path: Path, watching: Callable[..., Watcher]
) -> None:
    out, metrics = tmp_path / "out", tmp_path / "watch.prom"
    bucket.put("lib/a.jpg", jpeg_bytes(seed=1))
    bucket.put("lib/d//bad.jpg", jpeg_bytes(seed=2))
    bucket.put("lib/e.jpg", jpeg_bytes(seed=3))
    watcher = watching(bucket.url("lib"), "-o", out, "-s", "64", "--rescan", "1s", "--metrics-file", metrics)
    assert watcher.caught_up()["made"] == 2
    bucket.put("lib/x/../later.jpg", jpeg_bytes(seed=4))
    bucket.put("lib/z.jpg", jpeg_bytes(seed=5))
    wait_for(lambda: thumbs(out) == {"64/a.jpg.jpg", "64/e.jpg.jpg", "64/z.jpg.jpg"}, "the object added later made")
    named_at = rescans_in(metrics)
    wait_for(lambda: rescans_in(metrics) >= named_at + 3, "three more rescans")
    assert watcher.stop() == ExitCode.OK
    assert sorted(event["path"] for event in watcher.of("failed")) == [
        bucket.url("lib/d//bad.jpg"),
        bucket.url("lib/x/../later.jpg"),
    ], watcher.stderr
    assert "Traceback" not in watcher.stderr
    assert thumbs(out) == {"64/a.jpg.jpg", "64/e.jpg.jpg", "64/z.jpg.jpg"}  # nothing pruned beside the bad keys
