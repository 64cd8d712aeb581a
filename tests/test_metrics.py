"""The metrics textfile: a file that cannot be written is a warning, never the loss of the run's summary."""

from __future__ import annotations

from pathlib import Path

from imagekit import make_photo, run_cli

from thumbcli.errors import ExitCode


def test_a_metrics_file_that_cannot_be_written_is_one_warning_and_the_summary_still_printed(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 320, 240)
    (tmp_path / "not-a-folder").write_text("a file where the metrics folder should be")
    metrics = tmp_path / "not-a-folder" / "thumbcli.prom"
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--json", "--metrics-file", metrics)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.rc == ExitCode.OK, run.stderr
    assert run.summary["made"] == 1
    assert run.stderr.splitlines() == [f"thumbcli: WARNING: {metrics}: cannot write the metrics: Not a directory"]
