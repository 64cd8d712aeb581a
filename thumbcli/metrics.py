"""Run metrics as a Prometheus node_exporter textfile, written atomically."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from thumbcli.discover import display_path
from thumbcli.errors import ExitCode
from thumbcli.fsutil import write_atomically

if TYPE_CHECKING:
    from thumbcli.run import GenerateSummary

log = logging.getLogger(__name__)

_LAST_SUCCESS = "thumbcli_last_success_timestamp_seconds"


def _previous_success(path: Path) -> float | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.search(rf"^{_LAST_SUCCESS}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def write_run_metrics(path: Path, summary: GenerateSummary, *, now: float | None = None) -> None:
    """Write the metrics of one run; the last-success time carries over from earlier runs when this one failed.

    A run whose only failures are known ones (failed before, not tried again) succeeded: its time is the last success.
    """
    now = time.time() if now is None else now
    last_success = now if summary.exit_code == ExitCode.OK else _previous_success(path)
    lines = [
        "# HELP thumbcli_last_run_files Source files handled by the last run, by outcome.",
        "# TYPE thumbcli_last_run_files gauge",
    ]
    for outcome, count in (("made", summary.made), ("skipped", summary.skipped), ("failed", summary.failed)):
        lines.append(f'thumbcli_last_run_files{{outcome="{outcome}"}} {count}')
    lines += [
        "# HELP thumbcli_last_run_degraded_files Files made from what decodes of a damaged source (among those made).",
        "# TYPE thumbcli_last_run_degraded_files gauge",
        f"thumbcli_last_run_degraded_files {summary.degraded}",
        "# HELP thumbcli_last_run_known_failures Files that failed in an earlier run, unchanged and not tried again.",
        "# TYPE thumbcli_last_run_known_failures gauge",
        f"thumbcli_last_run_known_failures {summary.known_failures}",
        "# HELP thumbcli_last_run_thumbnails Thumbnails written by the last run.",
        "# TYPE thumbcli_last_run_thumbnails gauge",
        f"thumbcli_last_run_thumbnails {summary.thumbnails}",
        "# HELP thumbcli_last_run_seconds Wall time of the last run.",
        "# TYPE thumbcli_last_run_seconds gauge",
        f"thumbcli_last_run_seconds {round(summary.seconds, 3)}",
        "# HELP thumbcli_last_run_cut_short 1 if the last run stopped early (budget or signal).",
        "# TYPE thumbcli_last_run_cut_short gauge",
        f"thumbcli_last_run_cut_short {1 if summary.stopped else 0}",
        "# HELP thumbcli_last_run_exit_code Exit code of the last run.",
        "# TYPE thumbcli_last_run_exit_code gauge",
        f"thumbcli_last_run_exit_code {int(summary.exit_code)}",
        "# HELP thumbcli_last_run_timestamp_seconds When the last run finished.",
        "# TYPE thumbcli_last_run_timestamp_seconds gauge",
        f"thumbcli_last_run_timestamp_seconds {now:.3f}",
    ]
    if last_success is not None:
        lines += [
            "# HELP thumbcli_last_success_timestamp_seconds When a run last finished with nothing failed.",
            "# TYPE thumbcli_last_success_timestamp_seconds gauge",
            f"{_LAST_SUCCESS} {last_success:.3f}",
        ]
    try:
        # The folder is the user's to choose (symlinks and all); only the file's own name is never followed.
        write_atomically(path.parent, path.name, ("\n".join(lines) + "\n").encode())
    except OSError as exc:
        # The run's summary is still printed after this (a full disk must not hide it); a scraper
        # sees the metrics go stale.
        log.warning("%s: cannot write the metrics: %s", display_path(path), exc.strerror or exc)
