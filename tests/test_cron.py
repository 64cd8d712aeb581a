"""The README's crontab line and systemd unit, run as cron and systemd would run them.

The documented install puts thumbcli in a venv at /opt/thumbcli; these tests run the same lines
with that prefix replaced by the venv the tests run in (installed the same way, by pip), and
nothing else changed.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from imagekit import make_photo

from thumbcli.errors import ExitCode

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
DOCUMENTED_PREFIX = "/opt/thumbcli"
INSTALLED = Path(sys.prefix) / "bin" / "thumbcli"

pytestmark = pytest.mark.skipif(
    not INSTALLED.is_file(), reason="the tests do not run from a venv with thumbcli installed"
)


def block_after(marker: str) -> str:
    """The fenced block right after an HTML comment marker in the README."""
    return README.split(f"<!-- {marker} -->", 1)[1].split("```", 2)[1].split("\n", 1)[1]


def crontab_command() -> str:
    lines = [line for line in block_after("crontab").splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert "%" not in fields[5], "cron turns % into a newline"
    return fields[5]


def cron_environment(home: Path) -> dict[str, str]:
    """What cron gives a job: a fixed short PATH, the user's HOME and shell, nothing else."""
    return {"HOME": str(home), "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}


def configured_home(tmp_path: Path, *, broken: bool = False) -> Path:
    home = tmp_path / "home"
    photos = tmp_path / "photos"
    for index in range(3):
        make_photo(photos / f"p{index}.jpg", 320, 240, seed=index)
    if broken:
        (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = home / ".config" / "thumbcli" / "thumbcli.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'cache = "{tmp_path / "cache"}"\nsources = ["{photos}"]\n\n[presets.small]\nsize = "64"\n')
    return home


def run_as_cron(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    line = command.replace(DOCUMENTED_PREFIX, sys.prefix)
    return subprocess.run(
        ["/bin/sh", "-c", line], env=cron_environment(home), cwd=home, capture_output=True, text=True, timeout=120
    )


def test_crontab_line_names_thumbcli_by_the_documented_absolute_path() -> None:
    command = crontab_command()
    assert command.startswith(f"{DOCUMENTED_PREFIX}/bin/thumbcli ")
    assert f"python3 -m venv {DOCUMENTED_PREFIX}" in README


def test_crontab_line_warms_the_cache_silently_in_crons_environment(tmp_path: Path) -> None:
    home = configured_home(tmp_path)
    done = run_as_cron(crontab_command(), home)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert len(list((tmp_path / "cache" / "v1" / "small").glob("*.jpg"))) == 3
    assert 'thumbcli_last_run_files{outcome="made"} 3\n' in (home / ".local" / "state" / "thumbcli.prom").read_text()


def test_crontab_line_mails_the_failure_when_a_file_fails(tmp_path: Path) -> None:
    home = configured_home(tmp_path, broken=True)
    done = run_as_cron(crontab_command(), home)
    assert done.returncode == ExitCode.SOME_FAILED
    assert "broken.jpg" in done.stderr


def service_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(block_after("systemd-service"))
    return unit


def test_systemd_unit_counts_a_cut_short_run_and_a_locked_output_as_success() -> None:
    success = {int(code) for code in service_unit()["Service"]["SuccessExitStatus"].split()}
    assert success == {ExitCode.CUT_SHORT, ExitCode.LOCKED}


def test_systemd_unit_runs_and_a_backlog_run_cut_short_exits_with_a_success_status(tmp_path: Path) -> None:
    service = service_unit()["Service"]
    home = configured_home(tmp_path)
    config_path = home / ".config" / "thumbcli" / "thumbcli.toml"
    state = tmp_path / "state"
    state.mkdir()
    key, _, value = service["Environment"].partition("=")
    environment = {
        key: value.replace("/etc/thumbcli.toml", str(config_path)),
        "PATH": "/usr/bin:/bin",
        # A budget of one file stands in for a backlog that 25 minutes cannot clear.
        "THUMBCLI_GENERATE_MAX_FILES": "1",
    }
    argv = shlex.split(service["ExecStart"].replace(DOCUMENTED_PREFIX, sys.prefix))
    done = subprocess.run(argv, env=environment, cwd=state, capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.CUT_SHORT
    assert str(done.returncode) in service["SuccessExitStatus"].split()
    assert (state / "thumbcli.prom").is_file()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name, marker in (("thumbcli-warm.service", "systemd-service"), ("thumbcli-warm.timer", "systemd-timer")):
        text = block_after(marker).replace(DOCUMENTED_PREFIX, sys.prefix)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "thumbcli-warm.timer"), str(tmp_path / "thumbcli-warm.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    assert "Failed to parse" not in done.stderr
