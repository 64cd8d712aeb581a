"""The unprivileged account `serve --user` runs its HTTP workers as: resolved once, checked, then switched to.

A process started as root binds its ports, then becomes the account for good (every
uid and gid, supplementary groups, no capabilities, no new privileges), as nginx's and
gunicorn's workers do.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from thumbcli.cache import PRIVATE_DIR
from thumbcli.errors import CannotRunError, SpecError

_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_NO_CAPABILITIES = "0000000000000000"
#: How long the start-up check may take to start an interpreter as the account, on a loaded machine.
_PROBE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Account:
    """A user to run as: name, ids, and the groups it belongs to (looked up while /etc is still readable)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def account_to_become(name: str) -> Account | None:
    """The account `--user NAME` names; None when this process already runs as it (nothing to switch).

    SpecError for a user that does not exist, or for another user when not started as root.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SpecError(f"--user {name}: no such user") from None
    if entry.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise SpecError(f"--user {name}: only root can switch to another user (this is uid {os.geteuid()})")
    if entry.pw_uid == 0:
        raise SpecError(f"--user {name}: a user with uid 0 keeps every privilege; name an unprivileged one")
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    return Account(name, entry.pw_uid, entry.pw_gid, groups)


def become(account: Account) -> None:
    """Switch this process to `account` for good, and check that nothing of root is left.

    Groups first and the uid last: once the uid is not 0, the groups can no longer change.
    """
    os.setgroups(list(account.groups))
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise CannotRunError(f"could not switch to user {account.name}")
    status = Path("/proc/self/status").read_text()
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("CapEff", "CapPrm") and value.strip() != _NO_CAPABILITIES:
            raise CannotRunError(f"user {account.name} kept capabilities ({name} {value.strip()})")
    # Nothing executed from here on (a decoder's helper, a setuid binary) can gain privileges back.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise CannotRunError(f"could not set no-new-privileges after switching to user {account.name}")


def check_account_can_serve(
    account: Account,
    cache_root: Path,
    *,
    makes_thumbnails: bool,
    sources: Iterable[Path],
    access_log: str | None,
) -> None:
    """CannotRunError, one line, if `account` could not do what the server will do as it.

    Checked in a child switched to the account, so the kernel judges (modes, ACLs, groups)
    rather than a guess from mode bits; called before any port is bound.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's verdict reaches the parent through the pipe
        code = 1
        try:
            os.close(reader)
            become(account)
            why = _what_account_cannot_do(account, cache_root, makes_thumbnails, list(sources), access_log)
            os.write(writer, why.encode("utf-8", "replace"))
            code = 0
        except BaseException as exc:
            os.write(writer, str(exc).encode("utf-8", "replace"))
        finally:
            os._exit(code)
    os.close(writer)
    chunks = []
    with os.fdopen(reader, "rb") as answers:
        chunks.append(answers.read())
    os.waitpid(pid, 0)
    why = b"".join(chunks).decode("utf-8", "replace")
    if why:
        raise CannotRunError(why)


def _what_account_cannot_do(
    account: Account, cache_root: Path, makes_thumbnails: bool, sources: list[Path], access_log: str | None
) -> str:
    """Why `account` (this process now) cannot serve; "" when it can."""
    user = f"user {account.name}"
    if not os.access(cache_root, os.R_OK | os.X_OK):
        return f"{cache_root}: not readable by {user} (--user)"
    if access_log not in (None, "-"):
        log_path = Path(access_log)
        exists = os.path.exists(log_path)  # False, too, for a path the user cannot reach
        if not os.access(log_path if exists else log_path.parent, os.W_OK if exists else os.W_OK | os.X_OK):
            return f"{access_log}: access log not writable by {user} (--user)"
    if not makes_thumbnails:
        return ""
    for source in sources:
        if not os.access(source, os.R_OK | os.X_OK):
            return f"{source}: source not readable by {user} (--user)"
    # The cache's own files too: its state store and lock live in the private folder.
    private = cache_root / PRIVATE_DIR
    for path in (cache_root, private):
        if os.path.exists(path) and not os.access(path, os.W_OK | os.X_OK):
            return f"{path}: not writable by {user} (--user), and --source makes thumbnails there"
    for path in private.iterdir() if os.path.isdir(private) else ():
        if not os.access(path, os.R_OK | os.W_OK | (os.X_OK if os.path.isdir(path) else 0)):
            return f"{path}: not writable by {user} (--user), and --source makes thumbnails there"
    return _why_no_resample_worker(user)


def _why_no_resample_worker(user: str) -> str:
    """Why a resample worker could not start as this process's user; "" when it can.

    A worker is a new interpreter started from our own binary (/proc/self/exe), which must
    then import the standard library and pyvips as the account: an interpreter installed
    under a private home (/root/.pyenv) cannot.
    """
    self_exe = "/proc/self/exe"
    package_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {package_root!r}); import pyvips, thumbcli.workers"
    try:
        run = subprocess.run(
            [sys.executable, "-c", code],
            executable=self_exe if os.path.exists(self_exe) else None,
            cwd="/",
            capture_output=True,
            timeout=_PROBE_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    else:
        if run.returncode == 0:
            return ""
        lines = run.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {run.returncode}"
    return (
        f"{user} (--user) cannot start a resample worker ({reason}): install thumbcli in a venv "
        "made from a Python every user can read (a system Python, not one under /root)"
    )
