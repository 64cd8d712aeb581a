"""Real-world images from ../shared/corpus (skipped where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from imagekit import CORPUS, load, mean_abs_difference, needs_corpus, output_files, run_cli

from thumbcli.discover import is_image_name

pytestmark = needs_corpus

ORIENTED = [f"{kind}_{n}.jpg" for kind in ("Landscape", "Portrait") for n in range(9)]


@pytest.fixture(scope="module")
def orientation_thumbs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("orientation")
    run = run_cli("generate", CORPUS / "orientation", "-o", out, "-s", "200", "-s", "64x", timeout=120)
    assert run.rc == 0, run.stderr
    return out


@pytest.mark.parametrize("size", ["200", "64x"])
@pytest.mark.parametrize("name", ORIENTED)
def test_corpus_every_exif_orientation_comes_out_upright(orientation_thumbs: Path, name: str, size: str) -> None:
    kind = name.split("_")[0]
    reference = load(orientation_thumbs / size / f"{kind}_1.jpg.jpg")
    thumb = load(orientation_thumbs / size / f"{name}.jpg")
    assert (thumb.width > thumb.height) == (kind == "Landscape")
    assert abs(thumb.width - reference.width) <= 1 and abs(thumb.height - reference.height) <= 1
    assert mean_abs_difference(thumb, reference) < 10


def test_corpus_whole_tree_runs_without_crash_or_hang(tmp_path: Path) -> None:
    is_image = is_image_name
    images = sorted(
        os.path.relpath(os.path.join(folder, name), CORPUS)
        for folder, dirs, names in os.walk(CORPUS)
        for name in names
        if is_image(name) and not name.startswith(".")
    )
    run = run_cli("generate", CORPUS, "-o", tmp_path / "out", "-s", "128", "--json", timeout=120)
    assert run.rc == 1, run.stderr
    assert "Traceback" not in run.stderr
    summary = run.summary
    failed = {os.path.relpath(failure["path"], CORPUS) for failure in summary["failures"]}
    made = {p.relative_to(tmp_path / "out" / "128").as_posix()[: -len(".jpg")] for p in output_files(tmp_path / "out")}
    assert summary["found"] == len(images)
    assert sorted(failed | made) == images and not failed & made
    assert summary["made"] == len(made) and summary["failed"] == len(failed)
    assert all(failure["reason"] and "\n" not in failure["reason"] for failure in summary["failures"])
    assert len(run.failure_lines) == len(failed)
    # Files plain libvips thumbnails (MANIFEST thumb_ok) and that are not truncated all got made.
    for line in (CORPUS / "MANIFEST.tsv").read_text().splitlines()[1:]:
        path, _, _, what, _, thumb_ok, *_ = line.split("\t")
        if path in images and thumb_ok == "yes" and "warning" not in what and "ojpeg" not in path:
            assert path in made, (path, [f["reason"] for f in summary["failures"] if f["path"].endswith(path)])
    for path in output_files(tmp_path / "out"):
        thumb = load(path)
        assert max(thumb.width, thumb.height) <= 128


def test_corpus_default_max_pixels_refuses_the_17000_square_avif_quickly(tmp_path: Path) -> None:
    # Refused from its header: a decoder that tried would fail on the memory ceiling or the time limit instead.
    limits = ("--max-worker-memory", str(256 << 20), "--max-decode-time", "5")
    run = run_cli("generate", CORPUS / "libvips" / "17000x17000.avif", "-o", tmp_path / "out", *limits, timeout=30)
    assert run.rc == 1
    (line,) = run.failure_lines
    assert "17000x17000.avif" in line and "max-pixels" in line
