"""Test kit: photo-like images drawn with pyvips, the CLI run as a real subprocess, the shared corpus, `nobody`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pyvips

#: The shared real-world corpus beside the checkout; absent in a fresh clone.
CORPUS = Path(__file__).parents[1].parent / "shared" / "corpus"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"shared corpus not found at {CORPUS}")

#: A tool that runs a command as `nobody`, or None (tests needing one skip).
DROP_PRIVILEGES: list[str] | None
if os.geteuid() != 0:
    DROP_PRIVILEGES = None
elif shutil.which("setpriv"):
    DROP_PRIVILEGES = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
elif shutil.which("runuser"):
    DROP_PRIVILEGES = ["runuser", "-u", "nobody", "--"]
else:
    DROP_PRIVILEGES = None


def _why_not_as_nobody() -> str | None:
    """Why tests cannot run thumbcli as `nobody` here, or None when they can."""
    if DROP_PRIVILEGES is None:
        return "needs root and setpriv or runuser"
    probe = [*DROP_PRIVILEGES, sys.executable, "-c", "import click, pyvips, thumbcli"]
    if subprocess.run(probe, capture_output=True, cwd="/", check=False).returncode != 0:
        # A checkout under a private home (/root) is out of nobody's reach, and so is its venv.
        return "nobody cannot read this checkout or its venv: clone it outside a private home"
    return None


_NOBODY_PROBLEM = _why_not_as_nobody()
needs_nobody = pytest.mark.skipif(_NOBODY_PROBLEM is not None, reason=_NOBODY_PROBLEM or "")


def draw_photo(width: int = 600, height: int = 400, *, seed: int = 0) -> pyvips.Image:
    """A photo-like 8-bit sRGB image: gradients, noise and a few shapes, asymmetric so rotations show."""
    xy = pyvips.Image.xyz(width, height)
    x, y = xy[0] / width, xy[1] / height
    image = (x * 220 + 20).bandjoin([y * 200 + 30, (x + y) * 90 + 40 + seed * 7 % 50])
    image = image + pyvips.Image.gaussnoise(width, height, sigma=8, seed=seed)
    image = image.cast("uchar").copy(interpretation="srgb")
    short = min(width, height)
    image = image.draw_circle([230, 40, 40], width // 4, height // 3, max(1, short // 6), fill=True)
    image = image.draw_rect([30, 30, 210], width * 3 // 5, height // 2, width // 4, height // 3, fill=True)
    return image.draw_line([250, 250, 250], 0, height - 1, width // 2, 0)


def save(image: pyvips.Image, path: Path, **options: Any) -> Path:
    """Write `image` to `path` (format from the suffix) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a buffer: libvips would read `[...]` in a file name as save options.
    path.write_bytes(image.write_to_buffer(path.suffix.split("[")[0], **options))
    return path


def make_photo(path: Path, width: int = 600, height: int = 400, *, seed: int = 0, **options: Any) -> Path:
    """Draw a photo-like image and save it to `path`."""
    return save(draw_photo(width, height, seed=seed), path, **options)


def make_oriented_jpeg(path: Path, orientation: int, width: int = 600, height: int = 400) -> Path:
    """A JPEG whose stored pixels, once rotated by its EXIF `orientation`, show `draw_photo(width, height)`."""
    upright = draw_photo(width, height)
    # The inverse of what a viewer applies for each orientation.
    stored = {
        1: upright,
        2: upright.fliphor(),
        3: upright.rot180(),
        4: upright.flipver(),
        5: upright.rot90().fliphor(),
        6: upright.rot270(),
        7: upright.rot270().fliphor(),
        8: upright.rot90(),
    }[orientation].copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return save(stored, path, Q=95)


def make_rgba_png(path: Path, width: int = 600, height: int = 400) -> Path:
    """An RGBA PNG whose left quarter is fully transparent (and red underneath)."""
    image = draw_photo(width, height)
    alpha = (pyvips.Image.xyz(width, height)[0] >= width // 4).ifthenelse(255, 0).cast("uchar")
    image = image.draw_rect([255, 0, 0], 0, 0, width // 4, height, fill=True)
    return save(image.bandjoin(alpha).copy(interpretation="srgb"), path)


def make_cmyk_jpeg(path: Path, width: int = 600, height: int = 400) -> Path:
    """A CMYK JPEG with an embedded CMYK ICC profile."""
    return save(draw_photo(width, height).icc_transform("cmyk"), path)


def make_png16(path: Path, width: int = 600, height: int = 400) -> Path:
    """A 16-bit RGB PNG."""
    image = (draw_photo(width, height).cast("ushort") * 257).cast("ushort").copy(interpretation="rgb16")
    return save(image, path)


def make_png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny valid-looking PNG whose IHDR claims `width` x `height` 8-bit RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def load(path: Path | str) -> pyvips.Image:
    """Open an output with libvips and decode every pixel (raises on a partial file)."""
    # Through a buffer: a file name may hold `[...]` or bytes that are not UTF-8.
    with open(path, "rb") as file:
        image = pyvips.Image.new_from_buffer(file.read(), "", fail_on="truncated")
    image.avg()
    return image


def mean_abs_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    """Mean absolute pixel difference on 0..255, after resizing `b` to `a`'s size and dropping alpha."""
    a = a.flatten() if a.hasalpha() else a
    b = b.flatten() if b.hasalpha() else b
    if (b.width, b.height) != (a.width, a.height):
        b = b.resize(a.width / b.width, vscale=a.height / b.height)
    return float((a.cast("float") - b.cast("float")).abs().avg())


def output_files(root: Path) -> list[Path]:
    """Every thumbnail under an output tree (thumbcli's private folder excluded), sorted."""
    return sorted(
        path for path in root.rglob("*") if path.is_file() and ".thumbcli" not in path.relative_to(root).parts[:1]
    )


@dataclass(frozen=True)
class CliRun:
    """What one `python -m thumbcli` process did."""

    rc: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        """The `--json` summary printed on stdout."""
        return json.loads(self.stdout.strip().splitlines()[-1])

    @property
    def failure_lines(self) -> list[str]:
        """The per-file failure lines on stderr."""
        return [line for line in self.stderr.splitlines() if line.startswith("failed: ")]


def cli_command(*args: str | os.PathLike[str] | bytes, as_nobody: bool = False) -> list[Any]:
    """The argv that runs thumbcli with this interpreter (optionally as `nobody`)."""
    prefix: list[str] = []
    if as_nobody:
        assert DROP_PRIVILEGES is not None
        prefix = DROP_PRIVILEGES
    return [*prefix, sys.executable, "-m", "thumbcli", *args]


def run_cli(*args: str | os.PathLike[str] | bytes, timeout: float = 60, as_nobody: bool = False) -> CliRun:
    """Run `thumbcli ARGS` as a real subprocess and return its exit code and output."""
    env = {
        "PYTHONFAULTHANDLER": "1",
        # A decode that hangs ends well before the run's timeout, so a test can tell a hang from a slow file.
        "THUMBCLI_GENERATE_MAX_DECODE_TIME": str(max(10.0, timeout / 3)),
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "LC_ALL": "C.UTF-8",
    }
    if as_nobody:
        # What a login as nobody would have: no root home to look for configuration in.
        env = {key: value for key, value in env.items() if not key.startswith("XDG_")}
        env["HOME"] = "/nonexistent"
    proc = subprocess.Popen(
        cli_command(*args, as_nobody=as_nobody),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # faulthandler prints every thread's stack on SIGABRT: the failure shows where it hung.
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"thumbcli {' '.join(map(str, args))} did not finish in {timeout} s:\n"
            + stderr.decode("utf-8", "backslashreplace")[-8000:]
        ) from None
    return CliRun(
        proc.returncode,
        stdout.decode("utf-8", "backslashreplace"),
        stderr.decode("utf-8", "backslashreplace"),
    )


def assert_clean_failure(run: CliRun, name: str) -> str:
    """Assert one one-line failure naming `name`, no traceback; return the line."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.failure_lines if name in line]
    assert len(lines) == 1, run.stderr
    return lines[0]
