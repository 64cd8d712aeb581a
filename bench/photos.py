"""Draw photo-like JPEGs with pyvips, for the demo and the benchmarks.

python bench/photos.py DIR [--count N] [--size 4000x3000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyvips


def make_photo(width: int, height: int, seed: int) -> pyvips.Image:
    """A camera-like image: smooth colour gradients, soft shapes and sensor noise."""
    xy = pyvips.Image.xyz(width, height)
    x, y = xy[0] / width, xy[1] / height
    phase = seed * 0.7
    red = (x * 160 + 40 + (y * 6 + phase).sin() * 30).cast("uchar")
    green = (y * 140 + 50 + (x * 9 + phase).cos() * 40).cast("uchar")
    blue = ((x + y) * 90 + 30 + ((x - y) * 12 + phase).sin() * 35).cast("uchar")
    image = red.bandjoin([green, blue]).copy(interpretation="srgb")
    for i in range(6):
        cx = int(width * (0.15 + 0.7 * ((seed * 37 + i * 53) % 100) / 100))
        cy = int(height * (0.15 + 0.7 * ((seed * 71 + i * 29) % 100) / 100))
        radius = int(min(width, height) * (0.05 + 0.02 * i))
        colour = [(seed * 40 + i * 70) % 256, (seed * 90 + i * 30) % 256, (i * 110) % 256]
        image = image.draw_circle(colour, cx, cy, radius, fill=True)
    noise = pyvips.Image.gaussnoise(width, height, sigma=12, mean=0)
    return (image + noise).cast("uchar").copy(interpretation="srgb")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    width, height = (int(edge) for edge in args.size.lower().split("x"))
    args.folder.mkdir(parents=True, exist_ok=True)
    for seed in range(args.count):
        path = args.folder / f"photo_{seed:04d}.jpg"
        if not path.exists():
            make_photo(width, height, seed).write_to_file(str(path), Q=args.quality)
    print(f"{args.count} photo-like {width}x{height} JPEGs in {args.folder}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
