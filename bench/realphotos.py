"""Benchmark corpora cut from real photographs: Debian's plasma-workspace-wallpapers.

Drawn images flatter a decoder (smooth areas cost little entropy decoding): on camera-size
JPEGs they gave 1.30x vipsthumbnail where a real camera mix gave 1.15x. This module
downloads that Debian package (`apt-get download`: the package registry only), keeps the ten
wallpapers that are photographs (2560x1600 JPEGs: a jetty, boats at dusk, leaves, a forest
path, paper cups, ...), and makes from them

* camera JPEGs, a mix as a photo library holds them: 8, 12, 16, 20 and 24 megapixels in turn,
  mosaics of crops at native resolution (no upscaling, which would smooth them), Q90 with 4:2:0
  chroma like a camera's. About one in five is a portrait: half of those stored upright, half
  stored landscape with EXIF orientation 6 as phones do; every one carries an ICC profile and
  EXIF, as phone and camera originals do: sRGB, or for about one in four Display P3 pixels and
  profile, as an iPhone writes its JPEGs; and
* small images: 320x240 cuts of each photo shrunk by a random factor (1/2 to 1/6), half
  JPEG Q85 and half PNG, like a web shop's product pictures.

    python bench/realphotos.py DIR [--count 200] [--small 2000]

Every file is derived from a seed, so a corpus is the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PACKAGE = "plasma-workspace-wallpapers"
#: The wallpapers that are photographs (the others are drawings and renders).
PHOTOS = (
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
)
_VERSION = 3  # of the recipes below: a corpus made by another is made again
#: The camera sizes, in turn: 8, 12, 16, 20 and 24 megapixels (4:3, and 3:2 for the largest).
CAMERA_SIZES = ((3264, 2448), (4000, 3000), (4608, 3456), (5184, 3888), (6000, 4000))
#: Largest crop of a 2560x1600 wallpaper a mosaic tile may be.
_TILE = (2400, 1500)
Job = tuple[str, list[str], int]  # output path, photographs, seed


def fetch_photos(workdir: Path) -> list[Path]:
    """The photographs, downloaded and unpacked into WORKDIR/wallpapers once; [] when apt-get cannot."""
    folder = workdir / "wallpapers"
    wanted = [folder / f"{name}.jpg" for name in PHOTOS]
    if all(path.exists() for path in wanted):
        return wanted
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        command = ["apt-get", "download", PACKAGE]
        download = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=600)
        if download.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
            download = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=600)
        debs = list(Path(scratch).glob(f"{PACKAGE}_*.deb"))
        if download.returncode != 0 or not debs:
            print(f"apt-get download {PACKAGE} failed: {download.stderr.strip()[-300:]}", file=sys.stderr)
            return []
        unpacked = Path(scratch) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=600)
        for name, path in zip(PHOTOS, wanted, strict=True):
            source = unpacked / "usr/share/wallpapers" / name / "contents/images/2560x1600.jpg"
            shutil.copyfile(source, path)
    return wanted


def _camera(job: Job) -> None:
    import pyvips

    path, photos, seed = job
    rnd = random.Random(seed)
    width, height = CAMERA_SIZES[seed % len(CAMERA_SIZES)]
    across, down = -(-width // _TILE[0]), -(-height // _TILE[1])
    tile_w, tile_h = -(-width // across), -(-height // down)
    tiles = []
    for _ in range(across * down):
        photo = pyvips.Image.new_from_file(rnd.choice(photos))
        if rnd.random() < 0.5:
            photo = photo.fliphor()
        left, top = rnd.randrange(photo.width - tile_w + 1), rnd.randrange(photo.height - tile_h + 1)
        tiles.append(photo.crop(left, top, tile_w, tile_h))
    image = pyvips.Image.arrayjoin(tiles, across=across).crop(0, 0, width, height)
    orientation = 1
    if rnd.random() < 0.2:  # a portrait: upright pixels, or landscape pixels turned by EXIF as a phone stores them
        if rnd.random() < 0.5:
            image = image.rot90()
        else:
            orientation = 6
    # Attaches the profile: sRGB's, or Display P3's with the pixels converted to it (an iPhone's JPEG).
    profile = "p3" if rnd.random() < 0.25 else "srgb"
    image = image.icc_transform(profile, embedded=False, input_profile="srgb")
    image = image.copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    image.jpegsave(path + ".part", Q=90, subsample_mode="on", keep="icc,exif")
    os.replace(path + ".part", path)


def _small(job: Job) -> None:
    import pyvips

    path, photos, seed = job
    rnd = random.Random(seed)
    photo = pyvips.Image.new_from_file(rnd.choice(photos)).resize(rnd.uniform(0.16, 0.5))
    image = photo.crop(rnd.randrange(photo.width - 320 + 1), rnd.randrange(photo.height - 240 + 1), 320, 240)
    if path.endswith(".png"):
        image.pngsave(path + ".part", compression=6, keep="none")
    else:
        image.jpegsave(path + ".part", Q=85, keep="none")
    os.replace(path + ".part", path)


def _make(corpus: Path, params: dict[str, object], jobs: list[Job], work: Callable[[Job], None]) -> Path:
    marker = corpus / ".done"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(work, jobs, chunksize=8))
    marker.write_text(json.dumps(params))
    return corpus


def camera_corpus(workdir: Path, photos: list[Path], count: int) -> Path:
    """`count` camera JPEGs of 8 to 24 megapixels (Q90, EXIF and ICC, some portrait) in WORKDIR/real-mix-COUNT-q90."""
    corpus = workdir / f"real-mix-{count}-q90"
    names = [str(p) for p in photos]
    jobs = [(str(corpus / f"photo_{i:04d}.jpg"), names, 9000 + i) for i in range(count)]
    return _make(corpus, {"count": count, "version": _VERSION}, jobs, _camera)


def small_corpus(workdir: Path, photos: list[Path], count: int) -> Path:
    """`count` 320x240 images (every other one a PNG) in WORKDIR/real-small-COUNT-320x240."""
    corpus = workdir / f"real-small-{count}-320x240"
    names = [str(p) for p in photos]
    jobs = [(str(corpus / f"s_{i:05d}.{'png' if i % 2 else 'jpg'}"), names, 7000 + i) for i in range(count)]
    return _make(corpus, {"count": count, "version": _VERSION}, jobs, _small)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--count", type=int, default=200, help="camera-size JPEGs")
    ap.add_argument("--small", type=int, default=2000, help="320x240 images")
    args = ap.parse_args()
    photos = fetch_photos(args.workdir)
    if not photos:
        sys.exit(f"could not fetch {PACKAGE} (needs apt-get and dpkg-deb)")
    print(camera_corpus(args.workdir, photos, args.count))
    print(small_corpus(args.workdir, photos, args.small))


if __name__ == "__main__":
    main()
