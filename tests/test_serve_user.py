"""`thumbcli serve --user`: started as root, the HTTP workers bind and then run as an unprivileged user."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from imagekit import make_photo, needs_nobody, run_cli
from servekit import fetch, get, put_thumb, running_server, write_manifest

from thumbcli.cache import cache_path
from thumbcli.errors import CannotRunError, ExitCode
from thumbcli.serve.account import account_to_become, check_account_can_serve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")

NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else -1
CONFIG = '[presets.small]\nsize = "64"\nformat = "webp"\n'
THUMB = b"RIFF\x00\x00\x00\x00WEBPVP8 not really"


@pytest.fixture
def cache(shared_tmp: Path) -> Path:
    """A cache that `nobody` may read (not write), with one thumbnail in it."""
    root = shared_tmp / "cache"
    write_manifest(root, {"small": "webp"})
    put_thumb(root, "small", "a/photo.jpg.webp", THUMB)
    for folder in (root, *(path for path in root.rglob("*") if path.is_dir())):
        folder.chmod(0o755)
    return root


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc/*/stat."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: the fields after it are split.
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def status_of(pid: int) -> dict[str, str]:
    """/proc/PID/status as {field: value}."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def assert_runs_as_nobody(pid: int) -> None:
    status = status_of(pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(pwd.getpwnam("nobody").pw_gid)] * 4, status["Gid"]
    assert status["CapEff"] == status["CapPrm"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"


def test_serve_user_runs_every_worker_as_the_user(cache: Path) -> None:
    with running_server(cache, user="nobody", workers=2) as server:
        assert get(server, "/small/a/photo.jpg").status == 200
        workers = children_of(server.process.pid)
        assert len(workers) == 2
        for pid in workers:
            assert_runs_as_nobody(pid)
        # The supervisor keeps root: a replacement worker binds the port again before it drops.
        assert status_of(server.process.pid)["Uid"].split() == ["0"] * 4


def test_serve_user_runs_a_lone_worker_as_the_user(cache: Path) -> None:
    with running_server(cache, user="nobody") as server:
        assert get(server, "/small/a/photo.jpg").status == 200
        assert_runs_as_nobody(server.process.pid)


def test_serve_user_makes_a_miss_as_the_user(shared_tmp: Path) -> None:
    source = shared_tmp / "src"
    make_photo(source / "a" / "photo.jpg")
    for folder in (source, source / "a"):
        folder.chmod(0o755)
    cache = shared_tmp / "cache"
    cache.mkdir()
    os.chown(cache, NOBODY, -1)
    config = shared_tmp / "thumbcli.toml"
    config.write_text(CONFIG)
    account = account_to_become("nobody")
    assert account is not None
    try:
        check_account_can_serve(account, cache, makes_thumbnails=True, sources=[source], access_log=None)
    except CannotRunError as exc:
        assert "cannot start a resample worker" in str(exc)
        pytest.skip(f"this interpreter cannot run as nobody (install thumbcli from a system Python): {exc}")
    with running_server(cache, config=config, source_root=source, user="nobody") as server:
        status, body = fetch(server, "/small/a/photo.jpg")
        assert status == 200, body
    made = cache_path(cache, "small", "a/photo.jpg", "webp")
    assert made.read_bytes() == body
    assert made.stat().st_uid == NOBODY


def test_serve_user_refuses_a_cache_the_user_cannot_write(shared_tmp: Path) -> None:
    source = shared_tmp / "src"
    make_photo(source / "photo.jpg")
    source.chmod(0o755)
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)
    config = shared_tmp / "thumbcli.toml"
    config.write_text(CONFIG)
    run = run_cli("--config", config, "serve", cache, "--source", source, "--user", "nobody", "--port", "0")
    assert run.rc == ExitCode.CANNOT_RUN
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {cache}: not writable by user nobody (--user), and --source makes thumbnails there"
    ]


def test_serve_user_refuses_an_access_log_the_user_cannot_write(cache: Path, tmp_path: Path) -> None:
    run = run_cli("serve", cache, "--user", "nobody", "--port", "0", "--access-log", tmp_path / "access.log")
    assert run.rc == ExitCode.CANNOT_RUN
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {tmp_path / 'access.log'}: access log not writable by user nobody (--user)"
    ]


def test_serve_user_refuses_an_unknown_user(cache: Path) -> None:
    run = run_cli("serve", cache, "--user", "no-such-user-here", "--port", "0")
    assert run.rc == ExitCode.USAGE
    assert run.stderr.splitlines() == ["thumbcli: error: --user no-such-user-here: no such user"]


def test_serve_user_takes_the_user_from_the_config(cache: Path, shared_tmp: Path) -> None:
    config = shared_tmp / "thumbcli.toml"
    config.write_text('[serve]\nuser = "no-such-user-here"\n')
    run = run_cli("--config", config, "serve", cache, "--port", "0")
    assert run.rc == ExitCode.USAGE
    assert run.stderr.splitlines() == ["thumbcli: error: --user no-such-user-here: no such user"]


@needs_nobody
def test_serve_user_needs_root_to_switch_to_another_user(cache: Path) -> None:
    run = run_cli("serve", cache, "--user", "root", "--port", "0", as_nobody=True)
    assert run.rc == ExitCode.USAGE
    assert run.stderr.splitlines() == [
        f"thumbcli: error: --user root: only root can switch to another user (this is uid {NOBODY})"
    ]
