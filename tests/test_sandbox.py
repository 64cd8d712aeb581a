"""Issue: decoders of untrusted files run confined, and nothing a decoder sends is unpickled.

Code runs inside a real resample worker, started as thumbcli starts it and confined by the same
code, through a pyvips shim first on PYTHONPATH (as tests/test_hostile.py does): it is imported
when the worker starts, before the worker confines itself, and its probe runs when the worker
opens a JPEG whose width names the probe, so after. A probe reports by raising, which the
worker sends back as the file's failure detail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pyvips
from imagekit import cli_command, make_photo, output_files, run_cli
from servekit import REPO_ROOT, fetch, running_server, wait_until
from test_hostile import valid_files
from test_workers import SLOW_EDGE, decoding, running, worker_processes

from thumbcli import decoders, landlock, sandbox
from thumbcli.spec import Limits, SizeBox, ThumbSpec
from thumbcli.workers import FORBIDDEN_CALL, MALFORMED_REPLY, ResampleWorker, WorkerOutcome

SPECS = (ThumbSpec(SizeBox(64, 64)),)
needs_landlock = pytest.mark.skipif(landlock.abi_version() < 1, reason="this kernel has no Landlock (or it is off)")
AS_ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")
#: What the `uid` probe says of a worker that is switched to nobody: every uid and gid, no groups.
AS_NOBODY = f"{NOBODY.pw_uid}/{NOBODY.pw_uid}/{NOBODY.pw_uid}/{NOBODY.pw_gid}/{NOBODY.pw_gid}/{NOBODY.pw_gid}+"
#: The layers in force by default on this machine: every one, but Landlock where the kernel lacks it.
IN_FORCE = tuple(layer for layer in sandbox.LAYERS if layer != "landlock" or landlock.abi_version() >= 1)

#: The width of the JPEG that runs each probe inside the worker.
PROBES = {
    "write": 201,
    "read-write": 202,
    "socket-inet": 203,
    "socket-unix": 204,
    "unlink": 205,
    "mkdir": 206,
    "thread": 207,
    "fork": 208,
    "exec": 209,
    "append": 210,
    "secrets": 211,
    "status": 212,
    "read": 213,
    "list": 214,
    "network": 215,
    "caps": 216,
    "say": 217,
    "uid": 218,
    "read-private": 219,
    "thread-bomb": 220,
    "parent-memory": 227,
    "reply-pickle": 221,
    "reply-garbage": 222,
    "reply-extra-thumbnail": 223,
    "reply-over-the-box": 224,
    "reply-huge": 225,
    "reply-bad-format-name": 226,
}

PROBE_SHIM = """
import errno, os, pickle, re, signal, socket, struct, sys, threading
SCRATCH, PROBES, PARENT_NET = {scratch!r}, {probes!r}, {parent_net!r}
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
del sys.modules[__name__]
import pyvips
from thumbcli import wire
from thumbcli.spec import Thumbnail
open_jpeg = pyvips.Image.new_from_source
BY_WIDTH = {{width: name for name, width in PROBES.items()}}

class Hostile:
    # What a compromised decoder would put in a pickled reply: unpickling it runs a command.
    def __reduce__(self):
        return (os.system, ("touch " + os.path.join(SCRATCH, "pwned"),))

def outcome(call):
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok" if result is None else str(result)

def reply(body, length=None):
    # Straight into the parent's reply pipe (the one pipe this worker writes to besides its stderr), then
    # wait to be killed.
    replies = next(fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and writes_to_pipe(fd))
    os.write(replies, struct.pack("<I", len(body) if length is None else length) + body)
    signal.pause()

def writes_to_pipe(fd):
    try:
        if not os.readlink("/proc/self/fd/%d" % fd).startswith("pipe:"):
            return False
        with open("/proc/self/fdinfo/%d" % fd) as info:
            return int(info.read().split()[3], 8) & 3 == os.O_WRONLY
    except OSError:
        return False

def thumbnail(width=64, height=48, source_format="jpeg"):
    return Thumbnail(b"not a jpeg", width, height, 640, 480, source_format)

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def thread():
    done = []
    worker = threading.Thread(target=done.append, args=(1,))
    worker.start()
    worker.join()
    return "ok" if done else "not run"

def thread_bomb():
    # As many threads as will start, up to 1000, each waiting; how many started.
    threading.stack_size(1 << 16)
    release, started = threading.Event(), []
    try:
        for _ in range(1000):
            thread = threading.Thread(target=release.wait, daemon=True)
            thread.start()
            started.append(thread)
    except RuntimeError:
        pass
    release.set()
    for thread in started:
        thread.join()
    return len(started)

def append():
    with open(os.path.join(SCRATCH, "existing"), "ab", buffering=0) as file:
        file.write(b"grown")

def caps():
    held = [line for line in open("/proc/self/status").read().splitlines() if line.startswith(("CapPrm", "CapEff"))]
    return "none" if all(int(line.split()[1], 16) == 0 for line in held) else "some"

def status():
    lines = open("/proc/self/status").read().splitlines()
    return ",".join(line.replace(":\\t", "=") for line in lines if line.startswith(("NoNewPrivs", "Seccomp:")))

RUN = {{
    "write": lambda: open(os.path.join(SCRATCH, "written"), "w").close(),
    "read-write": lambda: os.close(os.open(os.path.join(SCRATCH, "existing"), os.O_RDWR)),
    "socket-inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
    "socket-unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close(),
    "unlink": lambda: os.unlink(os.path.join(SCRATCH, "existing")),
    "mkdir": lambda: os.mkdir(os.path.join(SCRATCH, "made")),
    "thread": thread,
    "thread-bomb": thread_bomb,
    "fork": fork,
    "exec": lambda: os.execv("/bin/true", ["true"]),
    "append": append,
    "secrets": lambda: "+".join(sorted(name for name in os.environ if "SECRET" in name or "TOKEN" in name)) or "none",
    "status": status,
    "network": lambda: "shared" if os.readlink("/proc/self/ns/net") == PARENT_NET else "own",
    "caps": caps,
    "say": lambda: os.write(2, b"libfoo: bad marker 0xd9 in the scan\\n") and "said",
    "read": lambda: len(open(os.path.join(SCRATCH, "existing"), "rb").read()),
    "read-private": lambda: len(open(os.path.join(SCRATCH, "private"), "rb").read()),
    "parent-memory": lambda: os.close(os.open(f"/proc/{{os.getppid()}}/mem", os.O_RDONLY)),
    "uid": lambda: "/".join(map(str, os.getresuid() + os.getresgid())) + "+" + ",".join(map(str, os.getgroups())),
    "list": lambda: len(os.listdir(os.path.dirname(SCRATCH))),
    "reply-pickle": lambda: reply(pickle.dumps(("made", [Hostile()], "", ""))),
    "reply-garbage": lambda: reply(os.urandom(64)),
    "reply-extra-thumbnail": lambda: reply(wire.encode_reply(wire.Reply(wire.MADE, (thumbnail(), thumbnail())))[4:]),
    "reply-over-the-box": lambda: reply(wire.encode_reply(wire.Reply(wire.MADE, (thumbnail(6400, 48),)))[4:]),
    "reply-huge": lambda: reply(b"", length=0xFFFFFFF0),
    "reply-bad-format-name": lambda: reply(
        wire.encode_reply(wire.Reply(wire.MADE, (thumbnail(source_format="x"),)))[4:]
    ),
}}

def probing(*args, **kwargs):
    image = open_jpeg(*args, **kwargs)
    name = BY_WIDTH.get(image.width)
    if name is not None:
        raise RuntimeError("probe=" + outcome(RUN[name]))
    return image

pyvips.Image.new_from_source = probing
"""


@pytest.fixture
def scratch(tmp_path: Path, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder the probes try to change (with a file in it), the shim first on the workers' PYTHONPATH.

    The folder is one any user may enter (a worker switched to nobody reaches it): what stops
    it is each file's mode and the sandbox.
    """
    shim, folder = tmp_path / "shim", shared_tmp / "scratch"
    shim.mkdir()
    folder.mkdir()
    (folder / "existing").write_bytes(b"")
    (folder / "private").write_bytes(b"secret")
    (folder / "private").chmod(0o600)
    shim_text = PROBE_SHIM.format(scratch=str(folder), probes=PROBES, parent_net=os.readlink("/proc/self/ns/net"))
    (shim / "pyvips.py").write_text(shim_text)
    monkeypatch.setenv("PYTHONPATH", f"{shim}:{REPO_ROOT}")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    return folder


@pytest.fixture
def photos(tmp_path: Path) -> Callable[[str], bytes]:
    """The bytes of a JPEG that runs probe `name` in the worker that opens it."""

    def photo(name: str) -> bytes:
        return make_photo(tmp_path / f"{name}.jpg", PROBES[name], 40).read_bytes()

    return photo


@contextlib.contextmanager
def worker(layers: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[ResampleWorker]:
    """A resample worker as the pool makes one, its layers chosen by THUMBCLI_SANDBOX (None: unset)."""
    if layers is None:
        monkeypatch.delenv(sandbox.SETTING, raising=False)
    else:
        monkeypatch.setenv(sandbox.SETTING, layers)
    made = ResampleWorker(Limits(), strict=False, memory_ceiling=1 << 34)
    try:
        yield made
    finally:
        made.close()


def probe_result(outcome: WorkerOutcome) -> str:
    """What the probe reported, or the file's reason when it reported nothing (its worker was killed)."""
    found = re.search(r"probe=(\S*)", outcome.detail)
    return found[1] if found else outcome.reason


def good_photo(tmp_path: Path) -> bytes:
    return make_photo(tmp_path / "good.jpg", 120, 80).read_bytes()


# -- a confined worker ----------------------------------------------------------------


def test_a_confined_worker_may_not_open_a_file_to_write_or_read_and_write(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("write"), SPECS)) == "EPERM"
        assert probe_result(confined.resample(photos("read-write"), SPECS)) == "EPERM"
        assert confined.confinement == IN_FORCE
        assert confined.started == 1
    assert sorted(path.name for path in scratch.iterdir()) == ["existing", "private"]


@needs_landlock
def test_a_confined_worker_may_not_read_or_list_the_users_files(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("read"), SPECS)) == "EACCES"
        assert probe_result(confined.resample(photos("list"), SPECS)) == "EACCES"
    with worker("none", monkeypatch) as unconfined:
        assert probe_result(unconfined.resample(photos("read"), SPECS)) == "0"


def test_a_confined_worker_that_makes_a_socket_of_any_kind_is_killed_and_the_call_named(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("socket-inet"), SPECS)) == f"{FORBIDDEN_CALL} (socket)"
        assert probe_result(confined.resample(photos("socket-unix"), SPECS)) == f"{FORBIDDEN_CALL} (socket)"
        assert confined.started == 2


def test_a_confined_worker_may_not_remove_or_make_files(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("unlink"), SPECS)) == "EPERM"
        assert probe_result(confined.resample(photos("mkdir"), SPECS)) == "EPERM"
    assert sorted(path.name for path in scratch.iterdir()) == ["existing", "private"]


def test_a_confined_worker_still_starts_threads(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("thread"), SPECS)) == "ok"
        assert confined.started == 1


@pytest.mark.parametrize(("call", "system_call"), [("fork", "clone"), ("exec", "execve")])
def test_a_worker_that_starts_a_process_is_killed_its_file_reported_with_the_call_and_the_worker_replaced(
    scratch: Path,
    photos: Callable[[str], bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    call: str,
    system_call: str,
) -> None:
    with worker(None, monkeypatch) as confined:
        outcome = confined.resample(photos(call), SPECS)
        assert (outcome.reason, outcome.thumbnails) == (f"{FORBIDDEN_CALL} ({system_call})", [])
        assert outcome.detail == f"the seccomp filter stopped {system_call}"
        made = confined.resample(good_photo(tmp_path), SPECS)
        assert made.thumbnails and not made.reason
        assert confined.started == 2


@pytest.mark.skipif(not AS_ROOT, reason="only a run started as root switches its workers to another user")
def test_a_worker_of_a_root_run_decodes_as_nobody_with_no_groups(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(sandbox.USER_SETTING, raising=False)
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("uid"), SPECS)) == AS_NOBODY
        assert probe_result(confined.resample(photos("read-private"), SPECS)) == "EACCES"
        made = confined.resample(good_photo(tmp_path), SPECS)  # its source still reaches it, in a memory file
        assert made.thumbnails and not made.reason
        assert "user" in confined.confinement
        assert confined.started == 1
    with worker("none", monkeypatch) as unconfined:
        assert probe_result(unconfined.resample(photos("uid"), SPECS)).startswith("0/0/0/0/0/0+")


@pytest.mark.skipif(not AS_ROOT, reason="only a run started as root switches its workers to another user")
@pytest.mark.parametrize("user", ["daemon", "4242"])
def test_thumbcli_sandbox_user_chooses_the_workers_user_by_name_or_number(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    uid, gid = (4242, 4242) if user.isdigit() else (pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    monkeypatch.setenv(sandbox.USER_SETTING, user)
    with worker("user", monkeypatch) as switched:
        assert probe_result(switched.resample(photos("uid"), SPECS)) == f"{uid}/{uid}/{uid}/{gid}/{gid}/{gid}+"


@pytest.mark.skipif(not AS_ROOT, reason="THUMBCLI_SANDBOX_USER is looked up only by a run started as root")
@pytest.mark.parametrize(
    ("user", "message"),
    [("no-such-user", "no such user"), ("root", "that is root's uid or group"), ("0", "that is root's uid")],
)
def test_thumbcli_sandbox_user_that_is_root_or_nobody_known_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str, message: str
) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 120, 80)
    monkeypatch.setenv(sandbox.USER_SETTING, user)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "-s", "64")
    assert run.rc == 2, run.stderr
    assert f"THUMBCLI_SANDBOX_USER={user}: {message}" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not AS_ROOT, reason="RLIMIT_NPROC binds a worker that is not root: here, one switched to nobody")
def test_a_worker_that_is_not_root_may_start_its_threads_but_not_a_thousand(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("thread"), SPECS)) == "ok"
        started = int(probe_result(confined.resample(photos("thread-bomb"), SPECS)))
    assert 0 < started <= sandbox.SPARE_TASKS
    with worker("user", monkeypatch) as unbounded:
        assert probe_result(unbounded.resample(photos("thread-bomb"), SPECS)) == "1000"


def test_a_confined_worker_sees_no_credentials_of_the_parent(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("GITHUB_TOKEN", "hunter2")
    with worker(None, monkeypatch) as confined:
        assert probe_result(confined.resample(photos("secrets"), SPECS)) == "none"
    with worker("none", monkeypatch) as unconfined:
        assert probe_result(unconfined.resample(photos("secrets"), SPECS)) == "AWS_SECRET_ACCESS_KEY+GITHUB_TOKEN"


def test_what_a_decoder_writes_on_stderr_goes_with_its_file_not_to_the_terminal(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    with worker(None, monkeypatch) as confined:
        failed = confined.resample(photos("say"), SPECS)
    assert probe_result(failed) == "said"
    assert "[the decoder said: libfoo: bad marker 0xd9 in the scan]" in failed.detail
    assert "bad marker" not in capfd.readouterr().err


def test_a_confined_worker_has_a_network_of_its_own_and_no_capabilities(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        got = {probe: probe_result(confined.resample(photos(probe), SPECS)) for probe in ("network", "caps")}
        assert {"netns", "caps"} <= set(confined.confinement)
    assert got == {"network": "own", "caps": "none"}


#: Each layer alone: what each probe gets. `seccomp` and `landlock` bring `nonewprivs` (the kernel wants it).
LAYER_ALONE = {
    "none": {
        "status": "NoNewPrivs=0,Seccomp=0",
        "write": "ok",
        "socket-inet": "ok",
        "fork": "ok",
        "append": "ok",
        "network": "shared",
        "caps": "some" if AS_ROOT else "none",  # CI and this machine run as root
        "read-private": "6",
        **({"parent-memory": "ok"} if AS_ROOT else {}),  # elsewhere Yama may refuse it
    },
    "nonewprivs": {"status": "NoNewPrivs=1,Seccomp=0", "write": "ok", "socket-inet": "ok", "fork": "ok"},
    "seccomp": {
        "status": "NoNewPrivs=1,Seccomp=2",
        "write": "EPERM",
        "socket-inet": f"{FORBIDDEN_CALL} (socket)",
        "fork": f"{FORBIDDEN_CALL} (clone)",
    },
    "landlock": {"status": "NoNewPrivs=1,Seccomp=0", "read": "EACCES", "write": "EACCES", "socket-unix": "ok"},
    "rlimits": {"status": "NoNewPrivs=0,Seccomp=0", "write": "ok", "append": "EFBIG", "fork": "ok"},
    "environment": {"status": "NoNewPrivs=0,Seccomp=0", "write": "ok", "secrets": "none"},
    "netns": {"status": "NoNewPrivs=0,Seccomp=0", "network": "own", "socket-inet": "ok", "write": "ok"},
    "caps": {"status": "NoNewPrivs=0,Seccomp=0", "caps": "none", "network": "shared", "write": "ok"},
    # A worker of a run that is not root is unprivileged already: reading its own file stays allowed.
    "user": {
        "status": "NoNewPrivs=0,Seccomp=0",
        "read-private": "EACCES" if AS_ROOT else "6",
        **({"parent-memory": "EACCES"} if AS_ROOT else {}),
        "caps": "none",
        "network": "shared",
        "write": "EACCES" if AS_ROOT else "ok",
    },
}


@pytest.mark.parametrize(
    "layer", [pytest.param(layer, marks=[needs_landlock] if layer == "landlock" else []) for layer in LAYER_ALONE]
)
def test_each_layer_alone_through_thumbcli_sandbox(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch, layer: str
) -> None:
    monkeypatch.setenv("MY_SECRET", "hunter2")
    with worker(layer, monkeypatch) as alone:
        got = {probe: probe_result(alone.resample(photos(probe), SPECS)) for probe in LAYER_ALONE[layer]}
        assert set(alone.confinement) == set(sandbox.chosen_layers(layer))
    assert got == LAYER_ALONE[layer]


def test_thumbcli_sandbox_none_warns_loudly_and_an_unknown_layer_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    make_photo(src / "a.jpg", 120, 80)
    monkeypatch.setenv(sandbox.SETTING, "none")
    run = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64", "--workers", "2")
    assert run.rc == 0, run.stderr
    assert run.stderr.count("THUMBCLI_SANDBOX=none: resample workers decode untrusted files UNSANDBOXED") == 1
    monkeypatch.setenv(sandbox.SETTING, "seccomp,chroot")
    run = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64")
    assert run.rc == 2
    assert "THUMBCLI_SANDBOX=seccomp,chroot: unknown layer chroot" in run.stderr
    assert "Traceback" not in run.stderr


def test_every_supported_format_decodes_in_a_confined_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = valid_files(tmp_path / "valid")
    assert {path.suffix for path in files} >= {".jpg", ".png", ".webp", ".avif", ".dng", ".jxl", ".mp4"}
    with worker(None, monkeypatch) as confined:
        outcomes = {path.name: confined.resample(path.read_bytes(), SPECS) for path in files}
        assert confined.confinement == IN_FORCE
        # Replaced only to import a wheel its account could not import late: once per wheel at most.
        assert confined.started <= 1 + len(set(decoders.EVERY_DECODER) - decoders.COMMON_DECODERS)
    assert {name: outcome.reason for name, outcome in outcomes.items()} == dict.fromkeys(outcomes, "")
    assert all(len(outcome.thumbnails) == 1 for outcome in outcomes.values())


# -- nothing the worker sends is unpickled ---------------------------------------------


@pytest.mark.parametrize("probe", [name for name in PROBES if name.startswith("reply-")])
def test_a_crafted_reply_is_the_files_failure_runs_no_code_and_the_worker_is_replaced(
    scratch: Path, photos: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, probe: str
) -> None:
    with worker(None, monkeypatch) as confined:
        outcome = confined.resample(photos(probe), SPECS)
        assert (outcome.reason, outcome.thumbnails) == (MALFORMED_REPLY, [])
        made = confined.resample(good_photo(tmp_path), SPECS)
        assert made.thumbnails and not made.reason
        assert confined.started == 2
    assert not (scratch / "pwned").exists()


# -- through thumbcli --------------------------------------------------------------------


def test_generate_reports_the_files_that_trip_the_sandbox_and_makes_every_other(
    scratch: Path, photos: Callable[[str], bytes], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for index in range(6):
        make_photo(src / f"good{index}.jpg", 120, 80, seed=index)
    for name in ("fork", "reply-pickle"):
        (src / f"{name}.jpg").write_bytes(photos(name))
    run = run_cli("generate", src, "-o", tmp_path / "out", "-s", "64", "--workers", "1", "--json", timeout=120)
    assert run.rc == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(run.failure_lines) == [
        f"failed: {src / 'fork.jpg'}: {FORBIDDEN_CALL} (clone)",
        f"failed: {src / 'reply-pickle.jpg'}: {MALFORMED_REPLY}",
    ]
    assert len(output_files(tmp_path / "out")) == 6
    assert not (scratch / "pwned").exists()


def confinement_of_decoding_workers(root: int) -> dict[int, str]:
    """Resample workers below `root` that have a source mapped (they are decoding): pid -> their status lines."""
    found = {}
    for pid in worker_processes(root):
        with contextlib.suppress(OSError):
            if not decoding(pid):
                continue
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            found[pid] = ",".join(line.replace(":\t", "=") for line in lines if line.startswith(STATUS_FIELDS))
    return found


STATUS_FIELDS = ("Uid:", "NoNewPrivs", "Seccomp:")


def statuses_while_decoding(root: int) -> set[str]:
    seen: dict[int, str] = {}
    assert wait_until(lambda: bool(seen.update(confinement_of_decoding_workers(root)) or seen), timeout=120)
    return set(seen.values())


@pytest.fixture
def slow_source(tmp_path: Path) -> Path:
    """A folder of PNGs each slow enough to decode to be seen decoding."""
    src = tmp_path / "slow"
    src.mkdir()
    xy = pyvips.Image.xyz(SLOW_EDGE, SLOW_EDGE)
    a = ((xy[0] * xy[1]) & 255).cast("uchar")
    a.bandjoin([a, a]).copy(interpretation="srgb").pngsave(str(src / "slow0.png"), compression=6, filter="paeth")
    for index in range(1, 3):
        os.link(src / "slow0.png", src / f"slow{index}.png")
    return src


def test_generate_and_serve_source_workers_decode_as_nobody_with_no_new_privileges_under_seccomp(
    tmp_path: Path, slow_source: Path
) -> None:
    uid = NOBODY.pw_uid if AS_ROOT else os.getuid()
    confined = {f"Uid={uid}\t{uid}\t{uid}\t{uid},NoNewPrivs=1,Seccomp=2"}
    local = cli_command("generate", slow_source, "-o", tmp_path / "local", "-s", "64", "--workers", "2", "--quiet")
    with running(local) as process:
        assert statuses_while_decoding(process.pid) == confined
    (tmp_path / "thumbcli.toml").write_text('[presets.small]\nsize = "64"\n')
    with running_server(tmp_path / "cache", config=tmp_path / "thumbcli.toml", source_root=slow_source) as server:
        miss = threading.Thread(target=fetch, args=(server, "/small/slow0.png"), daemon=True)
        miss.start()
        assert statuses_while_decoding(server.process.pid) == confined
        miss.join(120)


needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def call_inside(pid: int, call: str) -> subprocess.CompletedProcess[str]:
    """Attach gdb to process `pid` and make C call `call` inside it, as a compromised library in it would."""
    command = ["gdb", "-p", str(pid), "-batch", "-nx", "-ex", f"call {call}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@needs_gdb
@pytest.mark.parametrize(("call", "named"), [("(int)socket(2, 1, 0)", "socket"), ("(int)fork()", "clone")])
def test_generate_names_the_call_a_compromised_decoder_made_on_its_file_and_makes_every_other(
    tmp_path: Path, slow_source: Path, call: str, named: str
) -> None:
    for index in range(4):
        make_photo(slow_source / f"fine{index}.jpg", 120, 80, seed=index)
    slow_bytes = (slow_source / "slow0.png").stat().st_size
    out = tmp_path / "out"
    command = cli_command("generate", slow_source, "-o", out, "-s", "64", "--workers", "1", "--json", "--quiet")
    with running(command) as process:
        found: list[int] = []
        # The call is made while the worker has a slow file (stopped by gdb as it attaches).
        assert wait_until(
            lambda: bool(
                found.extend(pid for pid in worker_processes(process.pid) if decoding(pid, slow_bytes)) or found
            ),
            timeout=120,
        )
        gdb = call_inside(found[0], call)
        stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, (stderr, gdb.stdout, gdb.stderr)
    summary = json.loads(stdout)
    failures = {Path(failure["path"]).name: failure["reason"] for failure in summary["failures"]}
    assert list(failures.values()) == [f"{FORBIDDEN_CALL} ({named})"], (failures, gdb.stdout, gdb.stderr)
    assert next(iter(failures)).startswith("slow")
    assert (summary["made"], summary["failed"]) == (6, 1)
    assert len(output_files(out)) == 6
    assert "Traceback" not in stderr


def errno_after(call: str, gdb: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """What a `call_inside(pid, call)` that also printed errno returned: (result, errno)."""
    values = re.findall(r"^\$\d+ = (-?\d+)$", gdb.stdout, re.MULTILINE)
    assert len(values) == 2, (call, gdb.stdout, gdb.stderr)
    return int(values[0]), int(values[1])


def open_inside(pid: int, path: Path) -> tuple[int, int]:
    """open(path, O_WRONLY | O_CREAT, 0644) made inside process `pid` through gdb: (its result, errno)."""
    call = f'(int)open("{path}", {os.O_WRONLY | os.O_CREAT}, 420)'
    command = ["gdb", "-p", str(pid), "-batch", "-nx", "-ex", f"call {call}", "-ex", "call *(int*)__errno_location()"]
    gdb = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    return errno_after(call, gdb)


@needs_gdb
@needs_landlock
@pytest.mark.parametrize("sandboxed", [True, False])
def test_a_serve_worker_may_create_files_only_beneath_the_cache_and_still_generates_on_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandboxed: bool
) -> None:
    if sandboxed:
        monkeypatch.delenv(sandbox.SETTING, raising=False)
    else:
        monkeypatch.setenv(sandbox.SETTING, "none")
    src, cache = tmp_path / "src", tmp_path / "cache"
    for name in ("a", "b"):
        make_photo(src / f"{name}.jpg", 120, 80)
    (tmp_path / "thumbcli.toml").write_text('[presets.small]\nsize = "64"\n')
    outside = tmp_path / "outside"
    with running_server(cache, config=tmp_path / "thumbcli.toml", source_root=src) as server:
        assert fetch(server, "/small/a.jpg")[0] == 200
        # What a flaw in the server's HTTP code could be made to do, inside the serving process.
        opened_outside = open_inside(server.process.pid, outside)
        opened_inside = open_inside(server.process.pid, cache / "inside")
        assert fetch(server, "/small/b.jpg")[0] == 200
    assert opened_inside[0] >= 0
    assert (cache / "inside").exists()
    if sandboxed:
        assert opened_outside == (-1, errno.EACCES)
        assert not outside.exists()
    else:
        assert opened_outside[0] >= 0
        assert outside.exists()
    made = sorted(path.name for path in (cache / "v1" / "small").iterdir())
    assert made == ["a.jpg.jpg", "b.jpg.jpg"]


def test_formats_names_the_sandbox_layers_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sandbox.SETTING, raising=False)
    run = run_cli("formats")
    assert run.rc == 0, run.stderr
    assert f"sandbox of the resample workers: {', '.join(IN_FORCE)}" in run.stdout.splitlines()
    monkeypatch.setenv(sandbox.SETTING, "none")
    run = run_cli("formats")
    assert "sandbox of the resample workers: none (THUMBCLI_SANDBOX=none)" in run.stdout.splitlines()


def test_the_environment_layer_keeps_what_decoders_need_and_drops_credentials() -> None:
    environ = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "VIPS_WARNING": "1",
        "PYTHONPATH": "/x",
        "MALLOC_ARENA_MAX": "2",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "GITHUB_TOKEN": "c",
        "DB_PASSWORD": "d",
        "SIGNING_KEY": "e",
        "PYTHON_API_TOKEN": "f",
        "AZURE_STORAGE_ACCOUNT_KEY": "g",
        "AZURE_STORAGE_SAS_TOKEN": "h",
        "AZURE_STORAGE_ACCOUNT_NAME": "i",
        "SSH_AUTH_SOCK": "/tmp/agent",
        "DISPLAY": ":0",
    }
    kept = sandbox.worker_environment(environ, ("environment",))
    assert sorted(kept) == ["LANG", "LC_ALL", "MALLOC_ARENA_MAX", "PATH", "PYTHONPATH", "VIPS_WARNING"]
    assert sandbox.worker_environment(environ, ()) == environ


def test_no_sandbox_is_for_debugging_and_says_so_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sandbox.SETTING, raising=False)
    make_photo(tmp_path / "src" / "a.jpg", 120, 80)
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--no-sandbox")
    assert run.rc == 0
    (warning,) = run.stderr.splitlines()
    assert "UNSANDBOXED" in warning
    assert "--no-sandbox" in run_cli("serve", "--help").stdout
