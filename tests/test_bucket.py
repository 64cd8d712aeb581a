"""Object storage as a source: `generate s3://bucket/prefix`, against a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pyvips
from imagekit import cli_command, draw_photo, load, make_photo, output_files, run_cli, save
from s3kit import AWKWARD_KEYS, Bucket, MotoServer, Relay, assert_secret_never_printed, fresh_bucket

from thumbcli import bucket as bucket_module
from thumbcli.cache import read_manifest, resolve_url, url_path_for
from thumbcli.formats import header_size
from thumbcli.fsutil import TEMP_PREFIX


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0, **options: object) -> bytes:
    """A real JPEG photo's bytes."""
    data: bytes = draw_photo(width, height, seed=seed).jpegsave_buffer(**options)
    return data


def fill(target: Bucket, keys: tuple[str, ...] | list[str]) -> None:
    for seed, key in enumerate(keys):
        target.put(key, jpeg_bytes(seed=seed))


def test_generate_reads_awkward_keys_from_a_bucket_into_a_local_tree(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, AWKWARD_KEYS)
    run = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "64")
    assert run.rc == 0, run.stderr
    made = {path.relative_to(tmp_path / "out").as_posix() for path in output_files(tmp_path / "out")}
    assert made == {f"64/{key.removeprefix('lib/')}.jpg" for key in AWKWARD_KEYS}
    thumb = load(tmp_path / "out" / "64" / "summer 2024" / "Ölberg + café" / "naïve 100%.jpg.jpg")
    assert max(thumb.width, thumb.height) == 64


def test_a_no_change_rerun_lists_the_bucket_and_gets_no_object(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, AWKWARD_KEYS)
    before = len(bucket.server.requests())
    assert run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "64").rc == 0
    assert len(bucket.source_gets(before)) == len(AWKWARD_KEYS)
    again = len(bucket.server.requests())
    rerun = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "64", "--json")
    assert rerun.rc == 0, rerun.stderr
    assert rerun.summary["made"] == 0 and rerun.summary["skipped"] == len(AWKWARD_KEYS)
    assert rerun.summary["output"] == str(tmp_path / "out")
    requests = bucket.server.requests()[again:]
    assert bucket.source_gets(again) == []
    assert [method for method, path in requests if f"/{bucket.name}" in path] == ["GET"]  # the one listing
    assert "list-type=2" in requests[-1][1]


def test_garbage_objects_fail_one_line_each_and_the_photos_are_made(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, ["lib/good 1.jpg", "lib/sub/good 2.jpg"])
    bucket.put("lib/sub/empty.jpg", b"")
    bucket.put("lib/text + notes.png", b"just some text, not a PNG at all\n")
    bucket.put("lib/truncated.jpg", jpeg_bytes()[:300])
    run = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "64")
    assert run.rc == 1, run.stderr
    assert "Traceback" not in run.stderr
    failed = sorted(run.failure_lines)
    assert len(failed) == 3, run.stderr
    for line, key in zip(failed, ["lib/sub/empty.jpg", "lib/text + notes.png", "lib/truncated.jpg"], strict=True):
        assert line.startswith(f"failed: s3://{bucket.name}/{key}: "), line
    assert len(output_files(tmp_path / "out")) == 2


def test_more_than_a_thousand_objects_are_listed_across_pages(bucket: Bucket, tmp_path: Path) -> None:
    tiny = jpeg_bytes(16, 16)
    keys = [f"many/d{i % 7}/img {i:04d}.jpg" for i in range(1_050)]
    for key in keys:
        bucket.put(key, tiny)
    before = len(bucket.server.requests())
    run = run_cli("generate", bucket.url("many"), "-o", tmp_path / "out", "-s", "8", "--dry-run", "--json")
    assert run.rc == 0, run.stderr
    assert run.summary["found"] == 1_050
    listings = [path for _, path in bucket.server.requests()[before:] if "list-type=2" in path]
    assert len(listings) == 2  # 1,000 keys a page
    assert bucket.source_gets(before) == []


def test_a_replaced_object_is_remade_and_a_deleted_ones_thumbnail_is_pruned(bucket: Bucket, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bucket.put("lib/kept.jpg", jpeg_bytes(seed=1))
    bucket.put("lib/replaced.jpg", jpeg_bytes(seed=2))
    bucket.put("lib/old/deleted.jpg", jpeg_bytes(seed=3))
    assert run_cli("generate", bucket.url("lib"), "-o", out, "-s", "64").rc == 0
    first = (out / "64" / "replaced.jpg.jpg").read_bytes()
    # The same size and, very likely, the same second: only the ETag tells the objects apart.
    bucket.put("lib/replaced.jpg", jpeg_bytes(seed=9))
    assert len(bucket.get("lib/replaced.jpg")) != 0
    rerun = run_cli("generate", bucket.url("lib"), "-o", out, "-s", "64", "--json")
    assert rerun.rc == 0, rerun.stderr
    assert rerun.summary["made"] == 1
    assert (out / "64" / "replaced.jpg.jpg").read_bytes() != first
    bucket.delete("lib/old/deleted.jpg")
    pruned = run_cli("prune", "-o", out)
    assert pruned.rc == 0, pruned.stderr
    assert not (out / "64" / "old").exists()
    assert sorted(p.name for p in output_files(out)) == ["kept.jpg.jpg", "replaced.jpg.jpg"]


def test_max_file_size_is_judged_from_the_listing_before_any_byte_is_read(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("lib/big.jpg", jpeg_bytes(800, 600, Q=95))
    bucket.put("lib/small.jpg", jpeg_bytes(32, 32))
    before = len(bucket.server.requests())
    run = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "16", "--max-file-size", "10000")
    assert run.rc == 1
    assert len(run.failure_lines) == 1 and "big.jpg" in run.failure_lines[0] and "max-file-size" in run.stderr
    assert [path.rsplit("/", 1)[1] for path in bucket.source_gets(before)] == ["small.jpg"]


def test_max_pixels_is_judged_from_a_ranged_read_of_the_header(bucket: Bucket, tmp_path: Path) -> None:
    big = jpeg_bytes(1600, 1200, Q=98)
    assert len(big) > bucket_module.HEADER_BYTES and header_size(big) == ("JPEG", 1600, 1200)
    bucket.put("lib/huge.jpg", big)
    before = len(bucket.server.requests())
    run = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "16", "--max-pixels", "1")
    assert run.rc == 1
    assert len(run.failure_lines) == 1 and "1600x1200" in run.stderr and "max-pixels" in run.stderr
    assert len(bucket.source_gets(before)) == 1  # the header only, never the rest


def test_a_missing_key_is_named_in_one_line(bucket: Bucket) -> None:
    with pytest.raises(bucket_module.ObjectError) as raised:
        bucket_module.read_object(f"{bucket.url()}/no such photo.jpg", 100, 1_000_000)
    assert raised.value.strerror == "no such key"


def test_a_missing_bucket_is_one_failure_line(bucket: Bucket, tmp_path: Path) -> None:
    run = run_cli("generate", f"s3://{bucket.name}-absent/lib", "-o", tmp_path / "out")
    assert run.rc == 1
    assert "Traceback" not in run.stderr
    assert run.failure_lines == [f"failed: s3://{bucket.name}-absent/lib: cannot list: no such bucket"]


def test_header_size_reads_common_formats(tmp_path: Path) -> None:
    image = draw_photo(123, 45)
    for suffix in (".jpg", ".png", ".gif", ".webp"):
        data = save(image, tmp_path / f"x{suffix}").read_bytes()
        found = header_size(data)
        assert found is not None and found[1:] == (123, 45), suffix
    assert header_size(io.BytesIO(b"not an image").getvalue()) is None
    assert make_photo(tmp_path / "y.jpg").exists()


def test_local_photos_go_to_a_bucket_tree_with_content_type_and_cache_control(bucket: Bucket, tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a b" / "ü+%.jpg")
    make_photo(tmp_path / "src" / "top.jpg", seed=1)
    run = run_cli("generate", tmp_path / "src", "-o", bucket.url("thumbs/"), "-s", "64", "-s", "32", "--format", "webp")
    assert run.rc == 0, run.stderr
    assert sorted(bucket.keys()) == [
        "thumbs/32/a b/ü+%.jpg.webp",
        "thumbs/32/top.jpg.webp",
        "thumbs/64/a b/ü+%.jpg.webp",
        "thumbs/64/top.jpg.webp",
    ]
    head = bucket.head("thumbs/64/top.jpg.webp")
    assert head["ContentType"] == "image/webp" and head["CacheControl"] == "public, max-age=86400"
    assert not Path("/s3:").exists() and not (tmp_path / "s3:").exists()
    # The records stay with the client, under the state folder: a rerun PUTs nothing.
    assert list((tmp_path / "state" / "thumbcli" / "buckets" / bucket.name).glob("*/.thumbcli/state.sqlite"))
    before = len(bucket.server.requests())
    sizes = ("-s", "64", "-s", "32", "--format", "webp")
    rerun = run_cli("generate", tmp_path / "src", "-o", bucket.url("thumbs"), *sizes, "--json")
    assert rerun.rc == 0, rerun.stderr
    assert bucket.server.requests()[before:] == []
    assert rerun.summary["output"] == bucket.url("thumbs")


def test_a_bucket_cache_holds_what_a_local_cache_would_byte_for_byte(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, AWKWARD_KEYS)
    local = run_cli("generate", bucket.url("lib"), "--cache", tmp_path / "cache", "-s", "64")
    remote = run_cli(
        "generate", bucket.url("lib"), "--cache", bucket.url("cache"), "-s", "64", "--cache-control", "no-cache"
    )
    assert local.rc == 0 and remote.rc == 0, local.stderr + remote.stderr
    on_disk = {
        path.relative_to(tmp_path / "cache").as_posix(): path.read_bytes()
        for path in (tmp_path / "cache").rglob("*")
        if path.is_file() and ".thumbcli" not in path.parts
    }
    in_bucket = {key.removeprefix("cache/"): bucket.get(key) for key in bucket.keys("cache/")}
    assert len(in_bucket) == len(AWKWARD_KEYS) + 1  # and the manifest
    assert in_bucket == on_disk
    assert bucket.head("cache/v1/64/top.jpg.jpg")["CacheControl"] == "no-cache"
    assert bucket.head("cache/thumbcli-cache.json")["ContentType"] == "application/json"


def test_prune_of_a_bucket_cache_deletes_the_thumbnails_of_deleted_sources(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, ["lib/keep.jpg", "lib/gone/away.jpg"])
    assert run_cli("generate", bucket.url("lib"), "--cache", bucket.url("cache"), "-s", "64").rc == 0
    bucket.delete("lib/gone/away.jpg")
    dry = run_cli("prune", "--cache", bucket.url("cache"), "--dry-run")
    assert dry.rc == 0 and len(bucket.keys("cache/v1/")) == 2
    assert dry.stdout.split("\t")[0] == bucket.url("cache/v1/64/gone/away.jpg.jpg")
    pruned = run_cli("prune", "--cache", bucket.url("cache"))
    assert pruned.rc == 0, pruned.stderr
    assert bucket.keys("cache/v1/") == ["cache/v1/64/keep.jpg.jpg"]


def test_a_dask_run_from_bucket_to_bucket_is_byte_identical_to_a_local_one(bucket: Bucket, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    keys = [*AWKWARD_KEYS, "lib/more/one.jpg", "lib/more/two.jpg", "lib/more/deeper/three.jpg"]
    fill(bucket, keys)
    bucket.put("lib/more/broken.jpg", b"\xff\xd8\xff garbage")
    local = run_cli("generate", bucket.url("lib"), "-o", bucket.url("local"), "-s", "64", "-s", "32")
    cluster = run_cli(
        "generate",
        bucket.url("lib"),
        "-o",
        bucket.url("dask"),
        "-s",
        "64",
        "-s",
        "32",
        "--dask",
        "local:2",
        timeout=180,
    )
    assert local.rc == 1 and cluster.rc == 1, local.stderr + cluster.stderr
    assert len(cluster.failure_lines) == 1 and "lib/more/broken.jpg" in cluster.failure_lines[0]
    made_locally = {key.removeprefix("local/"): bucket.get(key) for key in bucket.keys("local/")}
    made_by_dask = {key.removeprefix("dask/"): bucket.get(key) for key in bucket.keys("dask/")}
    assert len(made_by_dask) == 2 * len(keys)
    assert made_by_dask == made_locally
    # The client kept the records its tasks returned: a rerun makes nothing and GETs no source.
    before = len(bucket.server.requests())
    again = run_cli(
        "generate", bucket.url("lib"), "-o", bucket.url("dask"), "-s", "64", "-s", "32", "--dask", "local:2", "--json"
    )
    assert again.summary["made"] == 0, again.stderr
    assert bucket.source_gets(before) == []


def test_shards_of_a_bucket_share_its_folders_out_and_together_make_all(bucket: Bucket, tmp_path: Path) -> None:
    keys = [f"lib/folder {i}/photo.jpg" for i in range(6)]
    fill(bucket, keys)
    made = []
    for shard in ("0/2", "1/2"):
        run = run_cli("generate", bucket.url("lib"), "-o", bucket.url("out"), "-s", "16", "--shard", shard, "--json")
        assert run.rc == 0, run.stderr
        made.append(run.summary["made"])
    assert sum(made) == len(keys) and all(made)
    assert len(bucket.keys("out/")) == len(keys)


@pytest.mark.parametrize("destination", ["folder", "bucket"])
def test_the_endpoint_stopping_mid_run_exits_3_and_a_rerun_resumes(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, destination: str
) -> None:
    keys = [f"lib/photo {i:03d}.jpg" for i in range(60)]
    for seed, key in enumerate(keys):
        bucket.put(key, jpeg_bytes(1200, 900, seed=seed))
    relay = Relay(bucket.server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
    out = tmp_path / "out" if destination == "folder" else bucket.url("out")

    def made() -> list[str]:
        if destination == "folder":
            return [path.name for path in (tmp_path / "out").rglob("*.jpg") if ".thumbcli" not in path.parts]
        return bucket.keys("out/")

    args = ("generate", bucket.url("lib"), "-o", out, "-s", "64", "-j", "1", "--json")
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while len(made()) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    relay.stop()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr.decode()
    assert b"Traceback" not in stderr and b"object store not reachable" in stderr
    first = made()
    assert 3 <= len(first) < len(keys)
    if destination == "folder":
        assert not [path for path in (tmp_path / "out").rglob(f"{TEMP_PREFIX}*")]
    else:
        assert all(load_bytes(bucket.get(key)).width == 64 for key in first)  # each PUT whole or not at all
    relay.restart()
    rerun = run_cli(*args)
    assert rerun.rc == 0, rerun.stderr
    # A PUT the server took as the connection was cut never reached the records: made again, no harm.
    assert len(keys) - len(first) <= rerun.summary["made"] <= len(keys) - 3
    assert len(made()) == len(keys)


def load_bytes(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


def test_serve_makes_thumbnails_of_a_bucket_on_a_miss_into_a_local_cache(bucket: Bucket, tmp_path: Path) -> None:
    from servekit import running_server
    from test_serve_on_demand import CONFIG, fetch, fetch_until_new

    (tmp_path / "thumbcli.toml").write_text(CONFIG)
    (tmp_path / "cache").mkdir()
    bucket.put("lib/a b/ü+%.jpg", jpeg_bytes(600, 400, seed=1))
    bucket.put("lib/text.jpg", b"not a JPEG at all")
    with running_server(tmp_path / "cache", config=tmp_path / "thumbcli.toml", source_root=bucket.url("lib")) as server:
        status, headers, body = fetch(server, "/small/a%20b/%C3%BC%2B%25.jpg")
        assert (status, headers["content-type"]) == (200, "image/webp")
        assert pyvips.Image.new_from_buffer(body, "").width == 64
        assert (tmp_path / "cache" / "v1" / "small" / "a b" / "ü+%.jpg.webp").read_bytes() == body
        assert fetch(server, "/small/absent.jpg")[0] == 404
        assert fetch(server, "/small/text.jpg")[0] == 404
        assert fetch(server, "/small/a%20b/..%2F..%2Fsecret.jpg")[0] == 404
        # A replaced object is made again (the server checks an open thumbnail's source now and then).
        bucket.put("lib/a b/ü+%.jpg", jpeg_bytes(400, 600, seed=2))
        status, _, body = fetch_until_new(server, "/small/a%20b/%C3%BC%2B%25.jpg", (status, headers, body))
        assert status == 200 and pyvips.Image.new_from_buffer(body, "").height == 64


def test_without_obstore_a_bucket_run_says_which_extra_to_install(tmp_path: Path) -> None:
    # As an install without the s3 extra: the import of obstore fails.
    script = "import sys; sys.modules['obstore'] = None; from thumbcli.cli import run; run()"
    args = ["generate", "s3://photos/lib", "-o", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "pip install 'thumbcli[s3]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_hidden_keys_filters_and_a_destination_inside_the_source_are_not_walked(bucket: Bucket) -> None:
    fill(bucket, ["lib/a.jpg", "lib/.hidden.jpg", "lib/.cache/b.jpg", "lib/raw/c.jpg", "lib/keep/d.jpg", "lib/x.txt"])
    first = run_cli("generate", bucket.url("lib"), "-o", bucket.url("lib/thumbs"), "-s", "16", "--exclude", "raw")
    assert first.rc == 0, first.stderr
    assert sorted(bucket.keys("lib/thumbs/")) == ["lib/thumbs/16/a.jpg.jpg", "lib/thumbs/16/keep/d.jpg.jpg"]
    # The thumbnails now under the source prefix are not sources of the next run.
    rerun = run_cli(
        "generate", bucket.url("lib"), "-o", bucket.url("lib/thumbs"), "-s", "16", "--exclude", "raw", "--json"
    )
    assert rerun.rc == 0, rerun.stderr
    assert (rerun.summary["found"], rerun.summary["made"]) == (2, 0)


def test_a_profile_in_the_aws_files_gives_keys_region_and_endpoint_and_no_secret_is_printed(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(bucket, ["lib/a.jpg"])
    bucket.put("lib/broken.jpg", b"garbage")
    secret = "profile-secret-never-printed"
    (tmp_path / "credentials").write_text(
        f"[thumbs]\naws_access_key_id = profile-key\naws_secret_access_key = {secret}\n"
    )
    (tmp_path / "config").write_text(f"[profile thumbs]\nregion = us-east-1\nendpoint_url = {bucket.server.endpoint}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_PROFILE", "thumbs")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    assert_secret_never_printed(bucket.url("lib"), tmp_path / "out", secret)


def test_a_bucket_is_refused_for_the_desktop_cache_and_a_bad_url_is_a_usage_error(tmp_path: Path) -> None:
    desktop = run_cli("generate", "s3://photos/lib", "--freedesktop", "normal")
    assert desktop.rc == 2 and "desktop thumbnail cache is of local files" in desktop.stderr
    no_bucket = run_cli("generate", "s3://", "-o", tmp_path / "out")
    assert no_bucket.rc == 2 and "name a bucket" in no_bucket.stderr
    # The records of a bucket destination live in a folder named after the bucket: never outside theirs.
    for name in ("..", ".", "a b"):
        bad = run_cli("generate", tmp_path, "-o", f"s3://{name}/out")
        assert bad.rc == 2 and f"s3://{name}/out: not a bucket name" in bad.stderr, bad.stderr


def test_a_key_object_store_cannot_name_costs_only_itself_and_hides_nothing_from_prune(
    bucket: Bucket, tmp_path: Path
) -> None:
    fill(bucket, ["lib/a.jpg", "lib/d/-dash.jpg", "lib/d/ok.jpg", "lib/e/f.jpg"])
    out = tmp_path / "out"
    assert run_cli("generate", bucket.url("lib"), "-o", out, "-s", "16").rc == 0
    bucket.put("lib/d//empty.jpg", jpeg_bytes())
    bucket.put("lib/x/../escape.jpg", jpeg_bytes(seed=1))
    fill(bucket, ["lib/z.jpg"])
    run = run_cli("generate", bucket.url("lib"), "-o", out, "-s", "16", "--json")
    assert run.rc == 1 and "Traceback" not in run.stderr
    assert sorted(run.failure_lines) == [
        f"failed: {bucket.url('lib/d//empty.jpg')}: key cannot be read by this client (empty path segment)",
        f"failed: {bucket.url('lib/x/../escape.jpg')}: key cannot be read by this client (a '..' path segment)",
    ]
    assert run.summary["made"] == 1  # lib/z.jpg, past them
    assert not (tmp_path / "escape.jpg.jpg").exists() and not (out / "escape.jpg.jpg").exists()
    made = sorted(path.relative_to(out / "16").as_posix() for path in output_files(out))
    assert made == ["a.jpg.jpg", "d/-dash.jpg.jpg", "d/ok.jpg.jpg", "e/f.jpg.jpg", "z.jpg.jpg"]
    # '-dash.jpg' sorts before 'd//' in its folder on the same page: the listing cannot see it, and
    # prune does not take that for gone.
    pruned = run_cli("prune", "-o", out, "--json")
    assert pruned.rc == 0, pruned.stderr
    assert json.loads(pruned.stdout)["files"] == 0
    assert len(output_files(out)) == len(made)


def test_a_key_with_a_control_character_is_named_escaped_and_the_rest_made(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, ["lib/a.jpg", "lib/s/c\x01d.jpg", "lib/s/z.jpg", "lib/t/u.jpg"])
    run = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "16")
    assert run.rc == 1 and "Traceback" not in run.stderr
    assert run.failure_lines == [
        f"failed: {bucket.url('lib/s/c')}\\x01d.jpg: key cannot be read by this client (a control character)"
    ]
    made = sorted(path.relative_to(tmp_path / "out" / "16").as_posix() for path in output_files(tmp_path / "out"))
    assert made == ["a.jpg.jpg", "s/z.jpg.jpg", "t/u.jpg.jpg"]


def test_keys_object_store_cannot_name_on_the_first_page_of_many_cost_only_themselves(
    bucket: Bucket, tmp_path: Path
) -> None:
    tiny = jpeg_bytes(16, 16)
    good = [f"many/d{i % 7}/img {i:04d}.jpg" for i in range(1_050)] + ["many/a.jpg", "many/c/x.jpg", "many/zz.jpg"]
    bad = ["many/d0//first page.jpg", "many/d5/../up.jpg", "many/zz/./later page.jpg"]
    for key in good + bad:
        bucket.put(key, tiny)
    listed = bucket.keys("many/")
    assert listed.index(bad[0]) < 1_000 and listed.index(bad[1]) < 1_000 and listed.index(bad[2]) > 1_000
    before = len(bucket.server.requests())
    run = run_cli("generate", bucket.url("many"), "-o", tmp_path / "out", "-s", "8", "--dry-run", "--json")
    assert run.rc == 1, run.stderr
    assert sorted(run.failure_lines) == sorted(
        f"failed: {bucket.url(key)}: key cannot be read by this client ({why})"
        for key, why in zip(bad, ["empty path segment", "a '..' path segment", "a '.' path segment"], strict=True)
    )
    assert run.summary["found"] == len(good) + len(bad)  # each failure among them
    assert bucket.source_gets(before) == []
    assert run.summary["planned"] == len(good)  # each good key once: none lost beside the bad ones, none twice


def test_keys_the_store_does_not_know_are_one_line_access_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("moto.server")
    # A server that checks keys against its IAM users after the first two requests (the test's own).
    server = MotoServer(tmp_path / "requests.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    try:
        guarded = fresh_bucket(server, monkeypatch)
        guarded.put("lib/a.jpg", jpeg_bytes())
        run = run_cli("generate", guarded.url("lib"), "-o", tmp_path / "out")
    finally:
        server.stop()
    assert run.rc == 1 and "Traceback" not in run.stderr
    assert run.failure_lines == [f"failed: {guarded.url('lib')}: cannot list: access denied (unknown access key)"]


def test_prune_removes_nothing_when_the_source_bucket_cannot_be_listed(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, ["lib/a.jpg"])
    assert run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "16").rc == 0
    bucket.delete("lib/a.jpg")
    bucket.s3.delete_bucket(Bucket=bucket.name)
    pruned = run_cli("prune", "-o", tmp_path / "out")
    assert pruned.rc == 3 and "Traceback" not in pruned.stderr
    assert "cannot tell which objects are gone, nothing pruned: no such bucket" in pruned.stderr
    assert len(output_files(tmp_path / "out")) == 1


def test_a_dask_worker_killed_mid_run_loses_nothing_with_buckets_on_both_sides(bucket: Bucket, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    from daskkit import dask_cluster

    keys = [f"lib/folder {i % 12}/photo {i:03d}.jpg" for i in range(120)]
    for seed, key in enumerate(keys):
        bucket.put(key, jpeg_bytes(1200, 900, seed=seed))
    with dask_cluster(tmp_path / "dask-cluster") as cluster:
        args = ("generate", bucket.url("lib"), "-o", bucket.url("out"), "-s", "64", "--json", "--dask", cluster.address)
        run = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while len(bucket.keys("out/")) < 10 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        made_when_killed = len(bucket.keys("out/"))
        victim = cluster.workers[0]
        assert victim.poll() is None and run.poll() is None
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=180)
    assert 10 <= made_when_killed < len(keys)  # the kill came mid-run
    assert run.returncode == 0, stderr.decode()
    summary = json.loads(stdout.decode().splitlines()[-1])
    assert (summary["made"], summary["failed"]) == (len(keys), 0)
    assert len(bucket.keys("out/")) == len(keys)
    assert all(load_bytes(bucket.get(key)).width == 64 for key in bucket.keys("out/"))


def test_an_object_whose_read_stalls_is_one_line_timed_out_and_the_others_are_made(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(bucket, ["lib/a.jpg", "lib/stalls.jpg", "lib/sub/b.jpg", "lib/z.jpg"])
    relay = Relay(bucket.server.port, stall=f"GET /{bucket.name}/lib/stalls.jpg ".encode())
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
    monkeypatch.setenv(bucket_module.TIMEOUT_SETTING, "1")
    try:
        run = run_cli("generate", bucket.url("lib"), "-o", tmp_path / "out", "-s", "16", "--json", timeout=50)
    finally:
        relay.stop()
    assert run.rc == 1, run.stderr
    assert run.failure_lines == [f"failed: {bucket.url('lib/stalls.jpg')}: timed out"], run.stderr
    assert sorted(p.name for p in output_files(tmp_path / "out")) == ["a.jpg.jpg", "b.jpg.jpg", "z.jpg.jpg"]
    # Retried a bounded number of times (each after a wait of the setting's second), then given up.
    assert 2 <= relay.stalled <= 1 + bucket_module.RETRIES


def test_a_timeout_setting_not_in_seconds_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in ("soon", "0", "-3", "100000"):
        monkeypatch.setenv(bucket_module.TIMEOUT_SETTING, setting)
        run = run_cli("generate", "s3://photos/lib", "-o", tmp_path / "out")
        assert run.rc == 2 and f"{bucket_module.TIMEOUT_SETTING}={setting}: give seconds" in run.stderr, setting


PRESETS = '[presets.small]\nsize = "64"\nformat = "webp"\n\n[presets.large]\nsize = "200"\nformat = "jpeg"\n'


def test_a_second_client_into_a_bucket_cache_keeps_the_presets_the_first_entered(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_photo(tmp_path / "src" / "a b.jpg")
    (tmp_path / "thumbcli.toml").write_text(PRESETS)
    cache_url = bucket.url("cdn/thumbs")
    for preset, host in (("small", "one"), ("large", "two")):
        # Each client with its own records: a fresh state home, as another machine.
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / f"state-{host}"))
        run = run_cli(
            "--config", tmp_path / "thumbcli.toml", "generate", tmp_path / "src", "--cache", cache_url, "-p", preset
        )
        assert run.rc == 0, run.stderr
    manifest = json.loads(bucket.get("cdn/thumbs/thumbcli-cache.json"))
    assert sorted(manifest["presets"]) == ["large", "small"]
    assert {name: entry["format"] for name, entry in manifest["presets"].items()} == {"large": "jpeg", "small": "webp"}
    assert sorted(bucket.keys("cdn/thumbs/v1/")) == [
        "cdn/thumbs/v1/large/a b.jpg.jpg",
        "cdn/thumbs/v1/small/a b.jpg.webp",
    ]
    # What a CDN serves from the bucket resolves both presets' URLs, as `thumbcli serve` would on a copy.
    served = tmp_path / "copy"
    for key in bucket.keys("cdn/thumbs/"):
        target = served / key.removeprefix("cdn/thumbs/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bucket.get(key))
    manifest_formats = read_manifest(served)
    for preset in ("small", "large"):
        found = resolve_url(served, url_path_for(preset, "a b.jpg"), manifest_formats)
        assert found is not None and found.path.is_file(), preset
    # The first client, back again, keeps the second's preset too.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-one"))
    again = run_cli(
        "--config",
        tmp_path / "thumbcli.toml",
        "generate",
        tmp_path / "src",
        "--cache",
        cache_url,
        "-p",
        "small",
        "--json",
    )
    assert again.rc == 0 and again.summary["made"] == 0, again.stderr
    assert sorted(json.loads(bucket.get("cdn/thumbs/thumbcli-cache.json"))["presets"]) == ["large", "small"]


def test_prune_moves_a_bucket_cache_made_before_its_sources_were_named(bucket: Bucket, tmp_path: Path) -> None:
    names = ("IMG_0001.JPG", "sub/IMG_0002.JPG")
    for seed, name in enumerate(names):
        make_photo(tmp_path / "phone" / name, seed=seed)
    cache_url = bucket.url("cdn")
    config = tmp_path / "thumbcli.toml"
    preset = '[presets.small]\nsize = "64"\nformat = "webp"\n'
    config.write_text(f'cache = "{cache_url}"\nsources = ["{tmp_path / "phone"}"]\n{preset}')
    first = run_cli("--config", config, "generate", "--cache-control", "public, max-age=60")
    assert first.rc == 0, first.stderr
    before = {key: bucket.get(key) for key in bucket.keys("cdn/v1/")}
    assert sorted(before) == [f"cdn/v1/small/{name}.webp" for name in names]
    config.write_text(f'cache = "{cache_url}"\n[sources]\nphone = "{tmp_path / "phone"}"\n{preset}')
    planned = run_cli("--config", config, "prune", "--cache", cache_url, "--dry-run")
    assert planned.rc == 0, planned.stderr
    assert sorted(planned.stdout.splitlines()) == [
        f"{bucket.url(f'cdn/v1/small/{name}.webp')}\t0\tmoved to v1/small/phone/{name}.webp" for name in names
    ]
    assert sorted(bucket.keys("cdn/v1/")) == sorted(before)
    moved = run_cli("--config", config, "prune", "--cache", cache_url)
    assert moved.rc == 0, moved.stderr
    after = {key: bucket.get(key) for key in bucket.keys("cdn/v1/")}
    assert after == {key.replace("cdn/v1/small/", "cdn/v1/small/phone/"): data for key, data in before.items()}
    head = bucket.head("cdn/v1/small/phone/IMG_0001.JPG.webp")
    assert (head["ContentType"], head["CacheControl"]) == ("image/webp", "public, max-age=60")
    again = run_cli("--config", config, "generate", "--json")
    assert (again.rc, again.summary["made"], again.summary["skipped"]) == (0, 0, len(names)), again.stderr
    assert sorted(bucket.keys("cdn/v1/")) == sorted(after)


@pytest.mark.parametrize("destination", ["-o", "--cache"])
def test_verify_destination_makes_again_a_thumbnail_deleted_from_the_bucket(
    bucket: Bucket, tmp_path: Path, destination: str
) -> None:
    make_photo(tmp_path / "src" / "kept.jpg")
    make_photo(tmp_path / "src" / "sub" / "deleted behind our back.jpg", seed=1)
    args = ("generate", tmp_path / "src", destination, bucket.url("thumbs"), "-s", "32", "--json")
    assert run_cli(*args).rc == 0
    layout = "thumbs/32/" if destination == "-o" else "thumbs/v1/32/"
    gone = f"{layout}sub/deleted behind our back.jpg.jpg"
    first = bucket.get(gone)
    bucket.delete(gone)
    trusting = run_cli(*args)
    assert (trusting.rc, trusting.summary["made"]) == (0, 0), trusting.stderr  # the records alone say it is there
    before = len(bucket.server.requests())
    verified = run_cli(*args, "--verify-destination")
    assert (verified.rc, verified.summary["made"], verified.summary["skipped"]) == (0, 1, 1), verified.stderr
    assert bucket.get(gone) == first
    listings = [path for _, path in bucket.server.requests()[before:] if "list-type=2" in path]
    assert len(listings) == 1 and "prefix=thumbs/" in listings[0]


def test_verify_destination_is_for_a_bucket_destination(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg")
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--verify-destination")
    assert run.rc == 2 and "--verify-destination is for a destination in a bucket" in run.stderr


@pytest.mark.parametrize("destination", [("-o", "--verify-destination"), ("--cache",)])
def test_a_destination_bucket_that_is_not_there_is_one_line_and_exit_3(
    bucket: Bucket, tmp_path: Path, destination: tuple[str, ...]
) -> None:
    make_photo(tmp_path / "src" / "a.jpg")
    option, *flags = destination
    run = run_cli("generate", tmp_path / "src", option, f"s3://{bucket.name}-absent/thumbs", *flags)
    assert run.rc == 3 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"thumbcli: error: s3://{bucket.name}-absent/thumbs: no such bucket"
