"""The metrics textfile: a folder it cannot be written to is refused up front; a write that fails at the end is a
warning, never the loss of the run's summary."""

from __future__ import annotations

from pathlib import Path

from imagekit import make_photo, run_cli

from thumbcli.errors import ExitCode


def test_a_metrics_file_in_a_folder_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "a.jpg", 320, 240)
    (tmp_path / "not-a-folder").write_text("a file where the metrics folder should be")
    metrics = tmp_path / "not-a-folder" / "thumbcli.prom"
    run = run_cli("generate", tmp_path / "src", "-o", tmp_path / "out", "--json", "--metrics-file", metrics)
    assert run.rc == ExitCode.CANNOT_RUN, run.stderr
    assert run.stderr.splitlines() == [
        f"thumbcli: error: {metrics}: cannot write the metrics file there: Not a directory"
    ]
    assert not (tmp_path / "out").exists()  # nothing was done
