"""Issue 20: a hostile source is that file's one-line failure, never a traceback that stops the run or the server.

Every file here is made by the test: videos with ffmpeg and PyAV, a JPEG XL with pillow-jxl-plugin,
and a few hundred mutants of one small valid file of each supported format, from a fixed seed.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pillow_heif
import pytest
import pyvips
from imagekit import assert_clean_failure, draw_photo, make_photo, output_files, run_cli, save
from PIL import Image, ImageOps
from servekit import REPO_ROOT, ServerProcess, fetch, metrics, running_server
from test_formats import make_dng, make_heic, make_jxl, make_video

from thumbcli.errors import ExitCode
from thumbcli.workers import SLOTS

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg command (apt-get install ffmpeg)")
CONFIG = '[presets.small]\nsize = "64"\nformat = "webp"\n'
#: Each mutant is a valid file with a few byte flips, cuts or insertions; a fixed seed makes the same ones each run.
SEED = 20
MUTANTS_PER_FORMAT = 30
#: Mutants keep their first bytes nine times in ten, so that most reach their format's decoder.
MAGIC_BYTES = 16


def remux(source: Path, target: Path, *options: str | bytes) -> Path:
    """`source`'s streams copied into `target` (its container from the suffix) by the ffmpeg command."""
    assert FFMPEG is not None
    command: list[str | bytes | Path] = [FFMPEG, "-loglevel", "error", "-y", "-i", source, "-c", "copy", *options]
    subprocess.run([*command, target], check=True, timeout=60)
    return target


def video_titled(folder: Path, name: str, title: bytes) -> Path:
    """A Matroska video whose title tag holds `title` as raw bytes (ffmpeg stores them unchecked)."""
    clip = make_video(folder / f".{name}.mp4", dark_frames=0)
    made = remux(clip, folder / name, b"-metadata", b"title=" + title)
    clip.unlink()
    assert title in made.read_bytes()  # the bytes themselves, not replacement characters
    return made


def video_of_unknown_codec(folder: Path, name: str) -> Path:
    """An AVI whose video stream names a codec FFmpeg does not know (its FourCC overwritten): no codec context."""
    clip = make_video(folder / f".{name}.mp4", dark_frames=0)
    avi = remux(clip, folder / name)
    clip.unlink()
    data = avi.read_bytes()
    assert b"avc1" in data  # the stream header's handler and the format's compression
    avi.write_bytes(data.replace(b"avc1", b"QQQQ"))
    return avi


def tiff_exif(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF-structured EXIF blob of one IFD: (tag, type, count, 4 bytes of value) each."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI4s", *entry) for entry in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0"


#: A Make whose text lies past the end (Pillow warns and skips it), orientation 6 (so the image is turned
#: and its EXIF written back) and an XResolution stored as the signed integer -1: Pillow reads it, then
#: cannot write it back as the unsigned rational it must be.
BAD_EXIF = tiff_exif(
    [
        (0x010F, 2, 100, struct.pack("<I", 1000)),
        (0x0112, 3, 1, struct.pack("<HH", 6, 0)),
        (0x011A, 9, 1, struct.pack("<i", -1)),
    ]
)


def jxl_with_exif(path: Path, exif: bytes) -> Path:
    """A small JPEG XL carrying `exif`, encoded by pillow-jxl-plugin."""
    import pillow_jxl  # noqa: F401 - registers JPEG XL with Pillow

    photo = draw_photo(96, 64)
    Image.frombytes("RGB", (photo.width, photo.height), photo.write_to_memory()).save(path, format="JXL", exif=exif)
    with Image.open(path) as image:
        assert image.info["exif"].endswith(exif)  # carried as given
    return path


def assert_pillow_cannot_turn(exif: bytes) -> None:
    """The case under test happens: Pillow raises something other than the errors a decoder expects."""
    image = Image.new("RGB", (8, 6))
    image.info["exif"] = exif
    # Pillow warns of the odd tag first: the warning is not the exception looked for.
    with warnings.catch_warnings(), pytest.raises(Exception) as raised:  # any exception: which one is the point
        warnings.simplefilter("ignore")
        ImageOps.exif_transpose(image)
    assert not isinstance(raised.value, (OSError, ValueError, SyntaxError, RuntimeError)), raised.value


def generate(src: Path, out: Path, *args: str) -> tuple[int, dict[str, object], list[str], str]:
    """`thumbcli generate SRC -o OUT -s 64 --json ARGS`: exit code, summary, failure lines, stderr."""
    run = run_cli("generate", str(src), "-o", str(out), "-s", "64", "--json", *args, timeout=180)
    assert "Traceback" not in run.stderr, run.stderr
    return run.rc, json.loads(run.stdout.strip().splitlines()[-1]), run.failure_lines, run.stderr


# -- one hostile file among good ones ----------------------------------------


@needs_ffmpeg
def test_generate_makes_every_photo_and_reports_a_video_with_non_utf8_metadata_then_knows_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("a.jpg", "b.png", "c.webp"):
        make_photo(src / name, 120, 80)
    video_titled(src, "clip.mkv", b"bad\xff\xfe")
    fail_log = tmp_path / "failed.log"

    rc, summary, failures, _ = generate(src, tmp_path / "out", "--fail-log", str(fail_log))
    assert rc == ExitCode.SOME_FAILED
    assert (summary["made"], summary["failed"]) == (3, 1)
    assert len(output_files(tmp_path / "out")) == 3
    assert failures == [
        f"failed: {src / 'clip.mkv'}: could not decode: video metadata is not UTF-8 (UnicodeDecodeError)"
    ]
    # The fail log has the traceback, on the file's one line: where in PyAV it was raised.
    (logged,) = fail_log.read_text().splitlines()
    assert logged.startswith(failures[0]) and "[UnicodeDecodeError: 'utf-8' codec" in logged
    assert "av.container.core.open" in logged and "thumbcli/decoders/video.py" in logged

    # The next run knows it: not decoded again, not a failure of this run.
    rc, summary, failures, _ = generate(src, tmp_path / "out")
    assert (rc, failures) == (ExitCode.OK, [])
    assert (summary["failed"], summary["known_failed"]) == (0, 1)
    assert summary["known_failures"] == [
        {"path": str(src / "clip.mkv"), "reason": "could not decode: video metadata is not UTF-8 (UnicodeDecodeError)"}
    ]


#: A real file whose every read fails: the loopback device's link speed (sysfs answers EINVAL).
UNREADABLE = Path("/sys/class/net/lo/speed")


@pytest.mark.skipif(not UNREADABLE.is_file(), reason=f"no {UNREADABLE} to fail a read")
def test_a_file_whose_read_fails_is_its_own_one_line_failure_and_tried_again_next_run(tmp_path: Path) -> None:
    # Opened and checked (a regular file of 4096 bytes), it fails only when its bytes are copied
    # for the worker: after files queued before it, and before those queued after it.
    src = tmp_path / "src"
    for name in ("a.jpg", "c.jpg", "d.png", "e.webp"):
        make_photo(src / name, 120, 80)
    (src / "b.jpg").symlink_to(UNREADABLE)

    for _ in range(2):  # a disk's error, not the file's content: not remembered, tried again
        rc, summary, failures, _ = generate(src, tmp_path / "out", "--follow-symlinks")
        assert rc == ExitCode.SOME_FAILED
        assert failures == [f"failed: {src / 'b.jpg'}: cannot read: invalid argument"]
        assert (summary["failed"], summary["known_failed"]) == (1, 0)
    assert len(output_files(tmp_path / "out")) == 4


@needs_ffmpeg
def test_a_video_stream_of_a_codec_ffmpeg_does_not_know_fails_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_photo(src / "a.jpg", 120, 80)
    video_of_unknown_codec(src, "odd.avi")
    run = run_cli("generate", str(src), "-o", str(tmp_path / "out"), "-s", "64")
    assert run.rc == ExitCode.SOME_FAILED
    assert assert_clean_failure(run, "odd.avi").endswith("odd.avi: video: unknown or unsupported codec")
    assert len(output_files(tmp_path / "out")) == 1


def test_a_jxl_with_malformed_exif_fails_in_one_line_naming_its_exif(tmp_path: Path) -> None:
    assert_pillow_cannot_turn(BAD_EXIF)
    src = tmp_path / "src"
    make_photo(src / "a.jpg", 120, 80)
    jxl_with_exif(src / "bad-exif.jxl", BAD_EXIF)
    fail_log = tmp_path / "failed.log"
    run = run_cli("generate", str(src), "-o", str(tmp_path / "out"), "-s", "64", "--fail-log", str(fail_log))
    assert run.rc == ExitCode.SOME_FAILED
    line = assert_clean_failure(run, "bad-exif.jxl")
    assert line.endswith("bad-exif.jxl: could not decode: JPEG XL EXIF metadata is damaged (struct.error)")
    assert "PIL/TiffImagePlugin.py" in fail_log.read_text()
    # Nothing else on stderr: Pillow's warning about the Make tag stays in the worker.
    assert run.stderr.splitlines() == [line, run.stderr.splitlines()[-1]], run.stderr
    assert len(output_files(tmp_path / "out")) == 1


# -- serve --source --------------------------------------------------------------


def generations(server: ServerProcess) -> dict[str, float]:
    values = metrics(server)
    counts = {event: values[f'thumbcli_generations_total{{event="{event}"}}'] for event in ("started", "failed")}
    counts["broken"] = values["thumbcli_generation_broken"]
    return counts


def serve_source(
    tmp_path: Path, src: Path, env: dict[str, str] | None = None, **options: object
) -> contextlib.AbstractContextManager[ServerProcess]:
    """`thumbcli serve CACHE --source SRC` with one preset, `small` (64, WebP)."""
    config = tmp_path / "thumbcli.toml"
    config.write_text(CONFIG)
    return running_server(tmp_path / "cache", env=env, config=config, source_root=src, **options)


def test_serve_answers_a_good_photo_after_more_bad_sources_than_a_worker_has_slots(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_photo(src / "good.jpg", 120, 80)
    bad = [jxl_with_exif(src / f"exif-{index}.jxl", BAD_EXIF) for index in range(2 * SLOTS)]
    # One generator thread: every request goes to the same resample worker and its SLOTS slots.
    with serve_source(tmp_path, src, generators=1) as server:
        for path in bad:
            assert fetch(server, f"/small/{path.name}")[0] == 404
        status, body = fetch(server, "/small/good.jpg")
        assert status == 200
        assert pyvips.Image.new_from_buffer(body, "").width == 64
        assert generations(server) == {"started": len(bad) + 1, "failed": len(bad), "broken": 0}
        assert fetch(server, "/healthz") == (200, b"ok\n")
        # Each is a known failure now: answered without decoding it again.
        assert fetch(server, f"/small/{bad[0].name}")[0] == 404
        assert generations(server)["started"] == len(bad) + 1
        log = "".join(server.stderr_lines)
    assert "Traceback" not in log, log
    assert log.count("could not decode: JPEG XL EXIF metadata is damaged (struct.error)") == len(bad), log


#: A `pyvips` found before the real one, broken while FLAG exists: with BREAK "start" it cannot be imported
#: (a broken install), with "decode" the worker process exits (status 3) on opening a JPEG. Else the real one.
PYVIPS_SHIM = """
import os, sys
FLAG, BREAK = {flag!r}, {breakage!r}
if BREAK == "start" and os.path.exists(FLAG):
    raise ImportError("pyvips made unloadable by the test")
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
del sys.modules[__name__]
import pyvips
open_jpeg = pyvips.Image.new_from_source
def exit_instead(*args, **kwargs):
    if os.path.exists(FLAG):
        os._exit(3)
    return open_jpeg(*args, **kwargs)
if BREAK == "decode":
    pyvips.Image.new_from_source = exit_instead
"""


@pytest.mark.parametrize(
    ("breakage", "logged"),
    [
        ("start", "a resample worker could not start: it ended (status 1) before it was ready"),
        ("decode", "a resample worker exited with status 3 while decoding"),
    ],
)
def test_serve_healthz_is_not_ok_while_its_decoder_pool_cannot_decode_and_recovers_with_it(
    tmp_path: Path, shared_tmp: Path, breakage: str, logged: str
) -> None:
    src = tmp_path / "src"
    photos = [make_photo(src / f"p{index}.jpg", 120, 80, seed=index) for index in range(2 * SLOTS)]
    # The flag where a worker switched to nobody can see it.
    shim, flag = tmp_path / "shim", shared_tmp / "pyvips-broken"
    shim.mkdir()
    (shim / "pyvips.py").write_text(PYVIPS_SHIM.format(flag=str(flag), breakage=breakage))
    flag.touch()
    env = {"PYTHONPATH": f"{shim}:{REPO_ROOT}"}
    with serve_source(tmp_path, src, env=env, generators=1) as server:
        assert fetch(server, "/healthz") == (200, b"ok\n")
        # More misses than the worker has slots: each one's slot is given back after its failure.
        for photo in photos:
            assert fetch(server, f"/small/{photo.name}")[0] == 500
        status, body = fetch(server, "/healthz")
        assert (status, body) == (503, b"not ok: thumbnails cannot be made on a miss (see the server's log)\n")
        assert generations(server) == {"started": len(photos), "failed": len(photos), "broken": 1}
        assert "".join(server.stderr_lines).count(logged) == len(photos)
        flag.unlink()  # mended: the next miss gets a worker that decodes
        status, body = fetch(server, f"/small/{photos[0].name}")
        assert status == 200
        assert pyvips.Image.new_from_buffer(body, "").width == 64
        assert fetch(server, "/healthz") == (200, b"ok\n")
        assert generations(server) == {"started": len(photos) + 1, "failed": len(photos), "broken": 0}


# -- fuzz: mutants of one valid file of each format -------------------------------


def valid_files(folder: Path) -> list[Path]:
    """One small valid file of each supported format (HEIC when pillow-heif has an encoder)."""
    folder.mkdir(parents=True)
    photo = draw_photo(96, 64)
    files = [save(photo, folder / f"a.{suffix}") for suffix in ("jpg", "png", "gif", "webp", "tif", "avif")]
    if pillow_heif.libheif_info().get("HEIF"):
        files.append(make_heic(folder / "a.heic", photo))
    files += [make_dng(folder / "a.dng", photo), make_jxl(folder / "a.jxl", photo)]
    files.append(make_video(folder / "a.mp4", dark_frames=0))
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to three damages: bytes flipped, the end cut off, or random bytes inserted."""
    mutant = bytearray(data)
    keep = MAGIC_BYTES if rng.random() < 0.9 else 0
    for _ in range(rng.randint(1, 3)):
        if len(mutant) <= keep:
            break
        damage = rng.choice(("flip", "flip", "cut", "insert"))
        if damage == "flip":
            for _ in range(rng.randint(1, 8)):
                mutant[rng.randrange(keep, len(mutant))] ^= rng.randrange(1, 256)
        elif damage == "cut":
            del mutant[rng.randrange(keep, len(mutant)) :]
        else:
            at = rng.randrange(keep, len(mutant) + 1)
            mutant[at:at] = rng.randbytes(rng.randint(1, 64))
    return bytes(mutant)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source folder: `valid/` one valid file of each format, `mutants/` MUTANTS_PER_FORMAT mutants of each."""
    root = tmp_path_factory.mktemp("fuzzed")
    rng = random.Random(SEED)
    (root / "mutants").mkdir()
    for valid in valid_files(root / "valid"):
        data = valid.read_bytes()
        for index in range(MUTANTS_PER_FORMAT):
            (root / "mutants" / f"{valid.stem}-{index:03d}{valid.suffix}").write_bytes(mutate(data, rng))
    return root


def test_every_mutant_becomes_a_thumbnail_or_a_one_line_failure_in_one_generate_run(
    fuzzed: Path, tmp_path: Path
) -> None:
    mutants = sorted(path.name for path in (fuzzed / "mutants").iterdir())
    valid = sorted(path.name for path in (fuzzed / "valid").iterdir())
    assert len(mutants) == MUTANTS_PER_FORMAT * len(valid) >= 270
    out = tmp_path / "out"
    fail_log = tmp_path / "failed.log"
    rc, summary, failures, stderr = generate(fuzzed, out, "--max-decode-time", "2", "--fail-log", str(fail_log))
    assert rc == ExitCode.SOME_FAILED
    made = sorted(path.relative_to(out / "64").with_suffix("").as_posix() for path in output_files(out))
    failed = sorted(line.removeprefix(f"failed: {fuzzed}/").split(": ", 1)[0] for line in failures)
    # Every valid file is made, and every mutant is made or failed, once.
    assert sorted(made + failed) == sorted(
        [f"valid/{name}" for name in valid] + [f"mutants/{name}" for name in mutants]
    )
    assert (summary["made"], summary["failed"]) == (len(made), len(failed))
    assert made and failed
    # One line each, and nothing else on stderr: no decoder's own dump.
    other = [line for line in stderr.splitlines() if not line.startswith(("failed: ", "warning: "))]
    assert len(other) == 1 and other[0].startswith("thumbcli: made"), stderr
    assert all(len(line) < 400 for line in failures)
    assert len(fail_log.read_text().splitlines()) == len(failed)


def test_serve_answers_every_sampled_mutant_with_a_thumbnail_or_404_and_a_valid_file_after(
    fuzzed: Path, tmp_path: Path
) -> None:
    sample = sorted(path.name for path in (fuzzed / "mutants").iterdir())[::3]
    with serve_source(tmp_path, fuzzed, max_decode_time=2) as server:
        statuses = [fetch(server, f"/small/mutants/{name}")[0] for name in sample]
        assert set(statuses) <= {200, 404}, dict(zip(sample, statuses, strict=True))
        status, body = fetch(server, "/small/valid/a.jpg")
        assert status == 200
        assert pyvips.Image.new_from_buffer(body, "").width == 64
        assert generations(server) == {"started": len(sample) + 1, "failed": statuses.count(404), "broken": 0}
        assert fetch(server, "/healthz") == (200, b"ok\n")
        log = "".join(server.stderr_lines)
    assert statuses.count(200) and statuses.count(404)
    assert "Traceback" not in log, log
