"""Issue 25 item 5: per-format quality defaults, measured with SSIMULACRA2 on real photographs.

    nice -n 10 python bench/bench_quality.py [--workdir /tmp/thumbcli-bench] [--size 256] [--photos 24]
                                             [--reference jpeg:80]

Sources: the ten photographs `bench/realphotos.py` fetches (Debian's plasma-workspace-wallpapers,
2560x1600), each also cut into a 1600x1600 centre crop and a 4:3 crop (so that a thumbnail's
detail differs), plus the real JPEGs of /work/shared/corpus/orientation when present. Every
thumbnail is made by thumbcli's own resample path (`thumbcli.resample.make_thumbnails`) at
`--size`: once as PNG (lossless: the reference pixels) and once per format and quality. Each
is decoded with libvips and scored against the reference with SSIMULACRA2 (the `ssimulacra2`
wheel: 90 is visually lossless, 70 high quality, 50 medium). The table gives, per format and
quality, the mean score and the total bytes, and then for each format the lowest quality whose
mean score reaches the reference's (`--reference`, the fallback format at its default): the
bytes each format costs at the fallback's perceived quality.

Needs `pip install ssimulacra2` (the bench extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import pyvips
from ssimulacra2 import compute_ssimulacra2  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).parent))

from realphotos import fetch_photos

from thumbcli.resample import make_thumbnails
from thumbcli.spec import DEFAULT_QUALITY, Format, Limits, SizeBox, ThumbSpec

QUALITIES: dict[Format, tuple[int, ...]] = {
    "jpeg": (60, 65, 70, 75, 80, 85, 90),
    "webp": (65, 70, 72, 74, 76, 78, 80, 82, 84, 85),
    "avif": (40, 45, 48, 50, 52, 54, 56, 58, 60, 65),
}
CORPUS = Path("/work/shared/corpus/orientation")


def sources(workdir: Path, count: int) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of the photographs and their crops, at most `count`."""
    found: list[tuple[str, bytes]] = []
    for path in fetch_photos(workdir):
        photo = pyvips.Image.new_from_file(str(path))
        found.append((path.stem, path.read_bytes()))
        side = min(photo.width, photo.height)
        crops = {
            "square": photo.crop((photo.width - side) // 2, (photo.height - side) // 2, side, side),
            "4x3": photo.crop(0, 0, side * 4 // 3, side),
        }
        for label, crop in crops.items():
            found.append((f"{path.stem}-{label}", bytes(crop.jpegsave_buffer(Q=95))))
    found += [(path.stem, path.read_bytes()) for path in sorted(CORPUS.glob("*.jpg"))[:6]]
    return found[:count]


def score(reference_png: Path, encoded: bytes, scratch: Path) -> float:
    """SSIMULACRA2 of an encoded thumbnail against the lossless one (decoded by libvips, as a browser would)."""
    decoded = scratch / "decoded.png"
    pyvips.Image.new_from_buffer(encoded, "").pngsave(str(decoded), compression=1)
    return float(compute_ssimulacra2(str(reference_png), str(decoded)))


Cell = tuple[Format, int]


def measure(photos: list[tuple[str, bytes]], edge: int, cells: list[Cell]) -> tuple[dict[Cell, float], dict[Cell, int]]:
    """Each cell's mean SSIMULACRA2 and total bytes over `photos` at thumbnails of `edge`."""
    box = SizeBox(edge, edge)
    limits = Limits()
    specs = tuple(ThumbSpec(box, format=fmt, quality=quality) for fmt, quality in cells)
    scores: dict[Cell, list[float]] = {cell: [] for cell in cells}
    sizes: dict[Cell, int] = dict.fromkeys(cells, 0)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        for name, data in photos:
            (reference,) = make_thumbnails(data, (ThumbSpec(box, format="png"),), limits)
            reference_png = scratch / "reference.png"
            reference_png.write_bytes(reference.data)
            for cell, thumbnail in zip(cells, make_thumbnails(data, specs, limits), strict=True):
                scores[cell].append(score(reference_png, thumbnail.data, scratch))
                sizes[cell] += len(thumbnail.data)
            print(f"  {edge}: {name}: {reference.width}x{reference.height}", file=sys.stderr)
    return {cell: statistics.fmean(values) for cell, values in scores.items()}, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/thumbcli-bench"))
    parser.add_argument("--sizes", default="256,512", help="thumbnail edges, comma-separated")
    parser.add_argument("--photos", type=int, default=36)
    parser.add_argument("--reference", default="jpeg:80", help="FORMAT:QUALITY every other format is matched to")
    parser.add_argument(
        "--qualities", help="instead of the whole grid: FORMAT:Q,Q;FORMAT:Q (e.g. jpeg:80;webp:82,84;avif:60)"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = sources(args.workdir, args.photos)
    if not photos:
        sys.exit("no photographs: apt-get download plasma-workspace-wallpapers failed")
    edges = [int(edge) for edge in args.sizes.split(",")]
    grid = QUALITIES
    if args.qualities:
        grid = {}
        for part in args.qualities.split(";"):
            fmt, _, listed = part.partition(":")
            grid[cast(Format, fmt)] = tuple(int(quality) for quality in listed.split(","))
    cells = [(fmt, quality) for fmt, qualities in grid.items() for quality in qualities]
    ref_format, _, ref_quality = args.reference.partition(":")
    reference = cast(Cell, (ref_format, int(ref_quality)))
    if reference not in cells:
        sys.exit(f"--reference {args.reference} is not among the qualities measured")
    started = time.monotonic()
    measured = {edge: measure(photos, edge, cells) for edge in edges}
    took = time.monotonic() - started
    print(f"# {len(photos)} photographs, thumbnails of {', '.join(map(str, edges))} px, {took:.0f} s")
    print(f"# libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}; SSIMULACRA2 (ssimulacra2 wheel)")
    print("| format | quality | " + " | ".join(f"SSIMULACRA2 at {edge} | bytes at {edge}" for edge in edges) + " |")
    print("| --- | --- | " + " | ".join("---: | ---:" for _ in edges) + " |")
    for cell in cells:
        columns = []
        for edge in edges:
            scores, sizes = measured[edge]
            columns.append(f"{scores[cell]:.1f} | {sizes[cell]:,} ({sizes[cell] / sizes[reference]:.2f})")
        print(f"| {cell[0]} | {cell[1]} | " + " | ".join(columns) + " |")

    def pooled(cell: Cell) -> float:
        return statistics.fmean(measured[edge][0][cell] for edge in edges)

    target = pooled(reference)
    print(f"\n# lowest quality per format whose score (mean of the sizes) reaches {args.reference}'s {target:.1f}")
    for fmt, qualities in grid.items():
        enough = [quality for quality in qualities if pooled((fmt, quality)) >= target]
        if not enough:
            print(f"{fmt}: none of {qualities} reaches it")
            continue
        cell = (fmt, enough[0])
        ratios = ", ".join(f"{measured[edge][1][cell] / measured[edge][1][reference]:.2f} at {edge}" for edge in edges)
        default = DEFAULT_QUALITY[fmt]
        print(
            f"{fmt}: quality {cell[1]}, score {pooled(cell):.1f}, bytes {ratios} of the reference's; default {default}"
        )


if __name__ == "__main__":
    main()
