"""`thumbcli generate` on each kind of source against the same photos as JPEG, in one run.

    python bench/bench_formats.py [--images 8] [--size 4000x3000] [--repeat 3] [--workdir DIR]

Makes `--images` photo-like images of `--size` as JPEG (Q90, the reference), HEIC (pillow-heif's
x265), JPEG XL, DNG without a preview (a half-size demosaic) and DNG with a full-size preview (no
demosaic), plus as many 4-second 1080p H.264 videos that open on black frames, with the encoders
tests/test_formats.py uses. Then times `thumbcli generate KIND -o OUT -s 256` per kind (`--force`,
the rows taking turns) and prints the median wall time, images/s and the ratio to JPEG. Nothing is
asserted: the numbers say what each decoder costs beside libvips' JPEG shrink-on-load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from imagekit import draw_photo
from test_formats import make_dng, make_heic, make_jxl, make_video

ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
KINDS = ("jpeg", "heic", "jxl", "dng-demosaic", "dng-preview", "video")


def build(root: Path, images: int, width: int, height: int) -> dict[str, Path]:
    """One folder of `images` files per kind under `root` (kept between runs)."""
    folders = {kind: root / f"{kind}-{images}-{width}x{height}" for kind in KINDS}
    for kind, folder in folders.items():
        marker = folder / ".built"
        if marker.exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"making {images} {kind} files ...", file=sys.stderr)
        for index in range(images):
            photo = draw_photo(width, height, seed=index)
            if kind == "jpeg":
                photo.write_to_file(str(folder / f"p{index:03d}.jpg"), Q=90)
            elif kind == "heic":
                make_heic(folder / f"p{index:03d}.heic", photo)
            elif kind == "jxl":
                make_jxl(folder / f"p{index:03d}.jxl", photo)
            elif kind == "dng-demosaic":
                make_dng(folder / f"p{index:03d}.dng", photo)
            elif kind == "dng-preview":
                make_dng(folder / f"p{index:03d}.dng", photo, preview=True)
            else:
                make_video(folder / f"v{index:03d}.mp4", dark_frames=12, width=1920, height=1080)
        marker.touch()
    return folders


def time_generate(folder: Path, out: Path) -> float:
    argv = [sys.executable, "-m", "thumbcli", "generate", str(folder), "-o", str(out), "-s", "256", "--force"]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=ENV)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thumbcli-bench-formats")
    args = parser.parse_args()
    width, height = (int(part) for part in args.size.split("x"))
    folders = build(args.workdir, args.images, width, height)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for kind, folder in folders.items():
        time_generate(folder, args.workdir / "out" / kind)  # untimed: warm the page cache
    for _ in range(args.repeat):
        for kind, folder in folders.items():
            times[kind].append(time_generate(folder, args.workdir / "out" / kind))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.images} files of each kind, {args.size}, -s 256")
    print(f"{'kind':14} {'median s':>9} {'files/s':>8} {'x JPEG':>7}")
    reference = statistics.median(times["jpeg"])
    for kind in KINDS:
        median = statistics.median(times[kind])
        print(f"{kind:14} {median:9.2f} {args.images / median:8.1f} {median / reference:7.2f}")


if __name__ == "__main__":
    main()
