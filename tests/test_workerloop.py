"""Issue 22: a worker switched to an account that cannot read the wheels loads only what plain JPEGs need.

A root run's workers become nobody, who cannot read an interpreter under /root: each imports
its decoders' wheels first. Only simplejpeg (with numpy) is imported up front; a file that needs
another wheel the worker then cannot import is sent again to a worker that imports it first.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from imagekit import draw_photo, make_photo, output_files, run_cli
from test_formats import make_dng, make_heic, make_jxl, make_video
from test_sandbox import SPECS, worker

from thumbcli import sandbox
from thumbcli.workers import ResampleWorker

NOBODY = pwd.getpwnam("nobody")
imports_close = pytest.mark.skipif(
    os.geteuid() != 0 or sandbox.python_readable_by((NOBODY.pw_uid, NOBODY.pw_gid)),
    reason="only a root run whose interpreter nobody cannot read imports its wheels before switching",
)
#: What each decoder's wheel maps (a folder of site-packages), and what plain JPEGs need.
WHEEL_FOLDERS = {"video": "/av.libs/", "raw": "/rawpy/", "heif": "/pillow_heif.libs/", "jxl": "/pillow_jxl/"}
JPEG_WHEEL = "/simplejpeg/"


def mapped(made: ResampleWorker) -> str:
    assert made.pid is not None
    return Path(f"/proc/{made.pid}/maps").read_text()


def make_every_kind(folder: Path) -> dict[str, Path]:
    """One small file of each kind a wheel decodes, and a JPEG: decoder name -> path."""
    folder.mkdir()
    upright = draw_photo(160, 120)
    return {
        "jpeg": make_photo(folder / "photo.jpg", 160, 120),
        "heif": make_heic(folder / "phone.heic", upright),
        "raw": make_dng(folder / "camera.dng", upright),
        "video": make_video(folder / "clip.mp4", dark_frames=0),
        "jxl": make_jxl(folder / "picture.jxl", upright),
    }


@imports_close
def test_a_worker_that_decoded_only_jpegs_has_no_other_wheel_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with worker(None, monkeypatch) as confined:
        for seed in range(3):
            made = confined.resample(make_photo(tmp_path / f"{seed}.jpg", 2000, 1500, seed=seed).read_bytes(), SPECS)
            assert made.thumbnails and not made.reason
        maps = mapped(confined)
        assert "user" in confined.confinement
        assert JPEG_WHEEL in maps
        assert [folder for folder in WHEEL_FOLDERS.values() if folder in maps] == []
        assert confined.started == 1


@imports_close
def test_a_file_whose_wheel_the_worker_could_not_import_is_made_as_an_unconfined_worker_makes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_every_kind(tmp_path / "src")
    with worker("none", monkeypatch) as unconfined:
        expected = {name: unconfined.resample(path.read_bytes(), SPECS) for name, path in files.items()}
    restarted_for = []
    with worker(None, monkeypatch) as confined:
        for name, path in files.items():
            started = confined.started
            outcome = confined.resample(path.read_bytes(), SPECS)
            assert (outcome.reason, outcome.thumbnails) == ("", expected[name].thumbnails), name
            assert outcome.thumbnails
            assert confined.started - started <= 1, name  # sent again once at most
            if confined.started > max(started, 1):
                restarted_for.append(name)
            if name in WHEEL_FOLDERS:
                assert WHEEL_FOLDERS[name] in mapped(confined), name
        # Importing PyAV late needs standard modules nothing else loaded: that one at least is a reload.
        assert "video" in restarted_for
        assert "jpeg" not in restarted_for


@imports_close
def test_a_root_generate_makes_every_kind_byte_identical_to_an_unsandboxed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "src"
    make_every_kind(source)
    for index in range(3):  # the pool's workers are busy with JPEGs before and after the odd files
        make_photo(source / f"more{index}.jpg", 640, 480, seed=index)
    monkeypatch.delenv(sandbox.SETTING, raising=False)
    confined = run_cli("generate", source, "-o", tmp_path / "confined", "-s", "96", "--workers", "2", timeout=180)
    monkeypatch.setenv(sandbox.SETTING, "none")
    unconfined = run_cli("generate", source, "-o", tmp_path / "unconfined", "-s", "96", "--workers", "2", timeout=180)
    assert (confined.rc, unconfined.rc) == (0, 0), (confined.stderr, unconfined.stderr)
    made = thumbnails_under(tmp_path / "confined")
    assert len(made) == 8
    assert made == thumbnails_under(tmp_path / "unconfined")


def thumbnails_under(root: Path) -> dict[Path, bytes]:
    return {path.relative_to(root): path.read_bytes() for path in output_files(root)}
