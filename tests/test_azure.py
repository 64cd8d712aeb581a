"""Azure Blob Storage (`az://container/prefix`) as a source and a destination, against a real Azurite on 127.0.0.1."""

from __future__ import annotations

import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvips
from azkit import ACCOUNT, ACCOUNT_KEY, Azurite, Container, account_sas, azurite_running, fresh_container
from imagekit import cli_command, draw_photo, output_files, run_cli
from s3kit import AWKWARD_KEYS, Relay, assert_secret_never_printed

from thumbcli.bucket import state_folder
from thumbcli.cache import read_manifest


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A real Azure Blob endpoint (Azurite, in memory) on 127.0.0.1 for this module's tests."""
    with azurite_running(tmp_path_factory.mktemp("azurite")) as server:
        yield server


@pytest.fixture
def container(azurite: Azurite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Container:
    """An empty container on Azurite, the Azure environment pointing at it."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where a bucket destination keeps its records
    return fresh_container(azurite, monkeypatch)


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    """A real JPEG photo's bytes."""
    data: bytes = draw_photo(width, height, seed=seed).jpegsave_buffer()
    return data


def fill(target: Container, keys: tuple[str, ...] | list[str], folder: Path | None = None) -> None:
    """The same photos as blobs and, with `folder`, as files under it (keys without their first segment)."""
    for seed, key in enumerate(keys):
        data = jpeg_bytes(seed=seed)
        target.put(key, data)
        if folder is not None:
            path = folder / key.split("/", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def files_under(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in output_files(root)}


def test_an_az_source_into_a_local_tree_is_byte_identical_to_the_same_photos_in_a_folder(
    container: Container, tmp_path: Path
) -> None:
    fill(container, AWKWARD_KEYS, tmp_path / "photos")
    remote = run_cli("generate", container.url("lib"), "-o", tmp_path / "from-az", "-s", "64", "-s", "32")
    local = run_cli("generate", tmp_path / "photos", "-o", tmp_path / "from-folder", "-s", "64", "-s", "32")
    assert remote.rc == 0 and local.rc == 0, remote.stderr + local.stderr
    made = files_under(tmp_path / "from-az")
    assert set(made) == {f"{size}/{key.removeprefix('lib/')}.jpg" for key in AWKWARD_KEYS for size in (64, 32)}
    assert made == files_under(tmp_path / "from-folder")


def test_local_photos_into_an_az_cache_have_content_types_and_the_manifest_of_a_local_cache(
    container: Container, tmp_path: Path
) -> None:
    fill(container, AWKWARD_KEYS, tmp_path / "photos")
    remote = run_cli(
        "generate", tmp_path / "photos", "--cache", container.url("cache/"), "-s", "64", "--format", "webp"
    )
    local = run_cli("generate", tmp_path / "photos", "--cache", tmp_path / "cache", "-s", "64", "--format", "webp")
    assert remote.rc == 0 and local.rc == 0, remote.stderr + local.stderr
    in_container = {key.removeprefix("cache/"): container.get(key) for key in container.keys("cache/")}
    on_disk = {
        path.relative_to(tmp_path / "cache").as_posix(): path.read_bytes()
        for path in (tmp_path / "cache").rglob("*")
        if path.is_file() and ".thumbcli" not in path.parts
    }
    assert len(in_container) == len(AWKWARD_KEYS) + 1  # and the manifest
    assert in_container == on_disk
    thumb = container.attributes("cache/v1/64/summer 2024/Ölberg + café/naïve 100%.jpg.webp")
    assert thumb == {"Content-Type": "image/webp", "Cache-Control": "public, max-age=86400"}
    assert container.attributes("cache/thumbcli-cache.json")["Content-Type"] == "application/json"
    assert read_manifest(tmp_path / "cache") is not None
    assert not (tmp_path / "az:").exists() and not Path("az:").exists()
    # The records stay with the client, in the Azure containers' own state folder.
    assert list((tmp_path / "state" / "thumbcli" / "azure-containers" / container.name).glob("*/.thumbcli"))


def test_a_no_change_rerun_from_az_into_az_makes_nothing_and_gets_no_blob(container: Container, tmp_path: Path) -> None:
    fill(container, AWKWARD_KEYS)
    args = ("generate", container.url("lib"), "-o", container.url("thumbs"), "-s", "64", "--json")
    first = run_cli(*args)
    assert first.rc == 0 and first.summary["made"] == len(AWKWARD_KEYS), first.stderr
    before = container.server.mark()
    rerun = run_cli(*args)
    assert rerun.rc == 0, rerun.stderr
    assert (rerun.summary["made"], rerun.summary["skipped"]) == (0, len(AWKWARD_KEYS))
    requests = [(method, path) for method, path, _ in container.server.requests()[before : container.server.mark() - 1]]
    assert container.blob_gets(before) == []
    assert requests == [("GET", f"/{ACCOUNT}/{container.name}?restype=container&comp=list&prefix=lib/")]
    assert len(container.keys("thumbs/")) == len(AWKWARD_KEYS)


def test_prune_deletes_the_thumbnails_of_a_deleted_blob_from_the_container(
    container: Container, tmp_path: Path
) -> None:
    fill(container, ["lib/keep.jpg", "lib/gone/away.jpg", "lib/gone/too.jpg"])
    assert run_cli("generate", container.url("lib"), "-o", container.url("out"), "-s", "64").rc == 0
    assert run_cli("generate", container.url("lib"), "-o", tmp_path / "out", "-s", "64").rc == 0
    container.delete("lib/gone/away.jpg")
    container.delete("lib/gone/too.jpg")
    pruned = run_cli("prune", "-o", container.url("out"))
    assert pruned.rc == 0, pruned.stderr
    assert container.keys("out/") == ["out/64/keep.jpg.jpg"]
    pruned_locally = run_cli("prune", "-o", tmp_path / "out")
    assert pruned_locally.rc == 0, pruned_locally.stderr
    assert list(files_under(tmp_path / "out")) == ["64/keep.jpg.jpg"]
    again = run_cli("prune", "-o", container.url("out"))  # nothing left to delete: no error either
    assert again.rc == 0, again.stderr


def test_one_garbage_blob_is_one_failure_line_and_exit_1(container: Container, tmp_path: Path) -> None:
    fill(container, ["lib/good.jpg", "lib/sub/good too.jpg"])
    container.put("lib/sub/not a photo.jpg", b"just some text, not a JPEG\n")
    run = run_cli("generate", container.url("lib"), "-o", tmp_path / "out", "-s", "64")
    assert run.rc == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.failure_lines) == 1, run.stderr
    assert run.failure_lines[0].startswith(f"failed: az://{container.name}/lib/sub/not a photo.jpg: ")
    assert len(output_files(tmp_path / "out")) == 2


def test_a_missing_container_is_one_line_and_exit_3(container: Container, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(jpeg_bytes())
    run = run_cli("generate", tmp_path / "src", "-o", f"az://{container.name}-absent/t", "--verify-destination")
    assert run.rc == 3, run.stderr
    assert run.stderr.strip() == f"thumbcli: error: az://{container.name}-absent/t: no such container"


def test_the_endpoint_stopping_mid_run_exits_3_and_a_rerun_resumes(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"lib/photo {i:02d}.jpg" for i in range(40)]
    for seed, key in enumerate(keys):
        container.put(key, jpeg_bytes(1200, 900, seed=seed))
    relay = Relay(container.server.port, cut_after_puts=3)  # the endpoint goes away after 3 thumbnails
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", relay.endpoint)
    args = ("generate", container.url("lib"), "-o", container.url("out"), "-s", "64", "-j", "1", "--json")
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert relay.cut.is_set()
    assert proc.returncode == 3, stderr.decode()
    assert b"Traceback" not in stderr and b"object store not reachable" in stderr
    first = container.keys("out/")
    assert 3 <= len(first) < len(keys)
    assert all(pyvips.Image.new_from_buffer(container.get(key), "").width == 64 for key in first)
    relay.restart()
    rerun = run_cli(*args)
    assert rerun.rc == 0, rerun.stderr
    assert len(keys) - len(first) <= rerun.summary["made"] <= len(keys) - 3
    assert len(container.keys("out/")) == len(keys)


def test_an_account_key_and_endpoint_from_the_environment_work_and_are_never_printed(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(container, ["lib/a.jpg"])
    container.put("lib/broken.jpg", b"garbage")
    monkeypatch.delenv("AZURE_STORAGE_USE_EMULATOR")
    monkeypatch.delenv("AZURITE_BLOB_STORAGE_URL")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", f"{container.server.endpoint}/{ACCOUNT}")
    assert_secret_never_printed(container.url("lib"), tmp_path / "out", ACCOUNT_KEY)
    # A wrong key is one line, `access denied`, and says nothing of the key.
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "d3Jvbmcta2V5LW5ldmVyLXByaW50ZWQ=")
    denied = run_cli("generate", container.url("lib"), "-o", tmp_path / "denied", "-s", "16", "--debug")
    assert denied.rc == 1 and "Traceback" not in denied.stderr, denied.stderr
    assert denied.failure_lines == [f"failed: {container.url('lib')}: cannot list: access denied"]
    assert "d3Jvbmcta2V5" not in denied.stderr + denied.stdout


def test_a_sas_token_from_the_environment_works_and_is_never_printed(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(container, ["lib/a.jpg"])
    container.put("lib/broken.jpg", b"garbage")
    token = account_sas()
    signature = urllib.parse.parse_qs(token)["sig"][0]
    monkeypatch.delenv("AZURE_STORAGE_USE_EMULATOR")
    monkeypatch.delenv("AZURITE_BLOB_STORAGE_URL")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", token)
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", f"{container.server.endpoint}/{ACCOUNT}")
    run = run_cli("generate", container.url("lib"), "--cache", container.url("cache"), "-s", "16", "--debug")
    assert run.rc == 1, run.stderr
    assert len(run.failure_lines) == 1 and container.keys("cache/v1/") == ["cache/v1/16/a.jpg.jpg"]
    # A request refused (a container not there) says so in one line, without the token.
    absent = f"az://{container.name}-absent/t"
    missing = run_cli("generate", container.url("lib"), "-o", absent, "--verify-destination", "--debug")
    assert missing.rc == 3 and "no such container" in missing.stderr, missing.stderr
    for output in (run.stderr, run.stdout, missing.stderr, missing.stdout):
        assert signature not in output and urllib.parse.quote(signature, safe="") not in output


def test_an_s3_bucket_and_an_az_container_of_one_name_keep_separate_records(tmp_path: Path) -> None:
    assert state_folder("s3://photos/thumbs") != state_folder("az://photos/thumbs")
    assert "/thumbcli/buckets/photos/" in state_folder("s3://photos/thumbs")
    assert "/thumbcli/azure-containers/photos/" in state_folder("az://photos/thumbs")


def test_gs_urls_are_refused_in_one_line_rather_than_taken_for_a_folder(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for args in (("gs://photos/lib", "-o", tmp_path / "out"), (tmp_path / "src", "-o", "gs://thumbs/t")):
        run = run_cli("generate", *args, "-s", "16")
        assert run.rc == 2, run.stderr
        assert "Google Cloud Storage is not supported yet" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "out").exists()
    no_container = run_cli("generate", "az://", "-o", tmp_path / "out")
    assert no_container.rc == 2 and "name a container (az://container/prefix)" in no_container.stderr


def test_a_dask_run_from_az_into_az_is_byte_identical_to_a_local_one(container: Container, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    keys = [*AWKWARD_KEYS, "lib/more/deeper/three.jpg"]
    fill(container, keys)
    container.put("lib/more/broken.jpg", b"\xff\xd8\xff garbage")
    local = run_cli("generate", container.url("lib"), "-o", container.url("local"), "-s", "64")
    args = ("generate", container.url("lib"), "-o", container.url("dask"), "-s", "64", "--dask", "local:2", "--json")
    cluster = run_cli(*args, timeout=180)
    assert local.rc == 1 and cluster.rc == 1, local.stderr + cluster.stderr
    assert len(cluster.failure_lines) == 1 and "lib/more/broken.jpg" in cluster.failure_lines[0]
    made_locally = {key.removeprefix("local/"): container.get(key) for key in container.keys("local/")}
    made_by_dask = {key.removeprefix("dask/"): container.get(key) for key in container.keys("dask/")}
    assert len(made_by_dask) == len(keys)
    assert made_by_dask == made_locally
    before = container.server.mark()
    again = run_cli(*args, timeout=180)
    assert again.summary["made"] == 0, again.stderr
    assert container.blob_gets(before) == []


def test_serve_makes_thumbnails_of_a_container_on_a_miss_into_a_local_cache(
    container: Container, tmp_path: Path
) -> None:
    from servekit import running_server
    from test_serve_on_demand import CONFIG, fetch

    (tmp_path / "thumbcli.toml").write_text(CONFIG)
    (tmp_path / "cache").mkdir()
    container.put("lib/a b/ü+%.jpg", jpeg_bytes(600, 400, seed=1))
    container.put("lib/text.jpg", b"not a JPEG at all")
    source = container.url("lib")
    with running_server(tmp_path / "cache", config=tmp_path / "thumbcli.toml", source_root=source) as server:
        status, headers, body = fetch(server, "/small/a%20b/%C3%BC%2B%25.jpg")
        assert (status, headers["content-type"]) == (200, "image/webp")
        assert pyvips.Image.new_from_buffer(body, "").width == 64
        assert (tmp_path / "cache" / "v1" / "small" / "a b" / "ü+%.jpg.webp").read_bytes() == body
        assert fetch(server, "/small/absent.jpg")[0] == 404
        assert fetch(server, "/small/text.jpg")[0] == 404


def test_watch_makes_a_blob_added_to_a_container_at_the_next_rescan(container: Container, tmp_path: Path) -> None:
    from test_watch import Watcher, wait_for

    out = tmp_path / "out"
    container.put("lib/first.jpg", jpeg_bytes(seed=1))
    watcher = Watcher(container.url("lib"), "-o", out, "-s", "64", "--rescan", "1s")
    try:
        assert watcher.caught_up()["made"] == 1
        container.put("lib/trip/added.jpg", jpeg_bytes(seed=2))
        container.delete("lib/first.jpg")
        wait_for(lambda: list(files_under(out)) == ["64/trip/added.jpg.jpg"], "the added blob made, the deleted gone")
        assert watcher.stop() == 0
    finally:
        watcher.kill()
    assert "Traceback" not in watcher.stderr and watcher.of("failed") == []
