"""Issue 10's format benchmarks: `thumbcli generate -s 256` beside the reference tools, in one run.

    nice -n 10 python bench/bench_formats.py [--sections heic,raw,video] [--repeat 2] [--workdir /tmp/fbench]
                                             [--heic 100] [--raw 20] [--videos 20] [--thumbcli CMD]

Sections (each makes its corpus once under WORKDIR and keeps it):

* heic: `--heic` phone-size (4032x3024) HEICs, pillow-heif's x265 (preset ultrafast, q70), from the
  photo-like 4000x3000 JPEGs bench_generate.py makes (`--photos DIR`; drawn ones when it is absent),
  `--distinct` different pictures repeated under other names to save encoding time. Rows: thumbcli;
  thumbcli on the same pictures as JPEG (Q90); a pillow-heif + Pillow `thumbnail()` process pool;
  `vipsthumbnail` through `xargs -P CORES` (the system libvips reading HEIC through the system libheif);
  `heif-convert` to a JPEG then `vipsthumbnail`, through `xargs -P CORES`.
* raw: `--raw` 4032x3024 DNGs with a full-size JPEG preview (as cameras write them) and as many without
  one. Rows: thumbcli on each (the preview path; the half-size demosaic); a rawpy + Pillow pool taking
  the embedded preview and one doing rawpy's default full-size (AHD) demosaic.
* video: `--videos` 1280x720 H.264 clips of 3 s at 30 fps, panning over a photo. Rows: thumbcli;
  `ffmpegthumbnailer -s 256` through `xargs -P CORES`.

Every row writes 256-pixel JPEGs. The files are read once before timing and the rows take turns,
`--repeat` times. Wall time and CPU time (user+sys of the whole process tree, from `os.wait4`) are
medians; the ratios are to the section's first row (images/s over its images/s, CPU over its CPU).
A reference tool that is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyvips

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from imagekit import draw_photo
from test_formats import as_array, bayer_mosaic, dng_with_jpeg_preview

CORES = os.cpu_count() or 2
ENV = {key: value for key, value in os.environ.items() if key not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
PHONE = (4032, 3024)
VIDEO = (1280, 720)


@dataclass(frozen=True, slots=True)
class Row:
    """One tool's command on one folder of sources."""

    name: str
    argv: list[str]
    sources: int


@dataclass(frozen=True, slots=True)
class Timing:
    """One timed run: wall seconds and CPU seconds of the whole process tree."""

    wall: float
    cpu: float


# -- corpora -------------------------------------------------------------------


def photo(index: int, photos: Path | None, width: int, height: int) -> pyvips.Image:
    """Picture `index` at width x height: one of bench_generate's photo-like JPEGs, or a drawn one."""
    if photos is not None:
        sources = sorted(photos.glob("*.jpg"))
        if sources:
            image = pyvips.Image.new_from_file(str(sources[index % len(sources)]))
            return image.resize(width / image.width, vscale=height / image.height).copy_memory()
    return draw_photo(width, height, seed=index)


def encode_heic_and_jpeg(job: tuple[int, Path | None, Path, Path]) -> None:
    """Picture `index` as a phone-size HEIC and as a JPEG of the same pixels."""
    import pillow_heif

    index, photos, heic, jpeg = job
    image = photo(index, photos, *PHONE)
    image.write_to_file(str(jpeg), Q=90)
    heif_file = pillow_heif.from_bytes(mode="RGB", size=(image.width, image.height), data=image.write_to_memory())
    heif_file.save(str(heic), quality=70, enc_params={"preset": "ultrafast"})


def encode_dngs(job: tuple[int, Path | None, Path, Path]) -> None:
    """Picture `index` as a 4032x3024 DNG with a full-size JPEG preview and as one without."""
    import tifffile

    index, photos, with_preview, without = job
    image = photo(index, photos, *PHONE)
    mosaic = bayer_mosaic(image)
    jpeg = bytes(image.jpegsave_buffer(Q=92))
    with_preview.write_bytes(dng_with_jpeg_preview(jpeg, image.width, image.height, mosaic))
    identity = (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)
    tags = [
        (50706, "B", 4, (1, 4, 0, 0), False),  # DNGVersion
        (50708, "s", 0, "thumbcli bench camera", False),  # UniqueCameraModel
        (50721, "2i", 9, identity, False),  # ColorMatrix1
        (50778, "H", 1, (21,), False),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), False),  # AsShotNeutral
        (271, "s", 0, "thumbcli", False),  # Make
        (33421, "H", 2, (2, 2), False),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), False),  # CFAPattern: RGGB
        (50717, "I", 1, (4095,), False),  # WhiteLevel
        (50714, "H", 1, (64,), False),  # BlackLevel
    ]
    with tifffile.TiffWriter(without) as tif:
        tif.write(mosaic, photometric=32803, subfiletype=0, extratags=tags)


def encode_video(job: tuple[int, Path | None, Path]) -> None:
    """A 3-second 1280x720 H.264 clip at 30 fps panning across picture `index`."""
    import av

    index, photos, path = job
    width, height = VIDEO
    wide = as_array(photo(index, photos, width + 180, height))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame_index in range(90):
            shift = frame_index * 2
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(wide[:, shift : shift + width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build(folder: Path, encode: Callable[[Any], None], jobs: Sequence[Any], what: str) -> None:
    """Run `encode` over `jobs` in a pool once; a `.built` marker keeps the folder for later runs."""
    marker = folder / ".built"
    if marker.exists():
        return
    print(f"making {what} in {folder} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with multiprocessing.Pool(CORES) as pool:
        pool.map(encode, jobs, chunksize=1)
    marker.touch()
    print(f"  {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def fresh(*folders: Path) -> None:
    """Empty the folders (a half-made corpus is made again)."""
    for folder in folders:
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)


def heic_corpus(root: Path, count: int, distinct: int, photos: Path | None) -> tuple[Path, Path]:
    """`count` HEICs and the same pictures as JPEG: `distinct` pictures, the rest copies under other names."""
    heic, jpeg = root / f"heic-{count}-{distinct}", root / f"heic-as-jpeg-{count}-{distinct}"
    if (heic / ".built").exists() and (jpeg / ".built").exists():
        return heic, jpeg
    shutil.rmtree(heic, ignore_errors=True)
    shutil.rmtree(jpeg, ignore_errors=True)
    heic.mkdir(parents=True)
    jpeg.mkdir(parents=True)
    jobs = [(index, photos, heic / f"p{index:03d}.heic", jpeg / f"p{index:03d}.jpg") for index in range(distinct)]
    build(heic, encode_heic_and_jpeg, jobs, f"{distinct} phone-size HEICs and JPEGs")
    for index in range(distinct, count):
        # Copies, not links: every file is read and decoded on its own.
        shutil.copyfile(heic / f"p{index % distinct:03d}.heic", heic / f"p{index:03d}.heic")
        shutil.copyfile(jpeg / f"p{index % distinct:03d}.jpg", jpeg / f"p{index:03d}.jpg")
    (jpeg / ".built").touch()
    return heic, jpeg


def raw_corpus(root: Path, count: int, photos: Path | None) -> tuple[Path, Path]:
    """`count` DNGs with a full-size JPEG preview and the same without a preview."""
    with_preview, without = root / f"dng-preview-{count}", root / f"dng-no-preview-{count}"
    fresh(with_preview)
    if not (with_preview / ".built").exists():
        shutil.rmtree(without, ignore_errors=True)
        without.mkdir(parents=True)
    jobs = [
        (index, photos, with_preview / f"r{index:03d}.dng", without / f"r{index:03d}.dng") for index in range(count)
    ]
    build(with_preview, encode_dngs, jobs, f"{count} DNGs with and without a preview")
    return with_preview, without


def video_corpus(root: Path, count: int, photos: Path | None) -> Path:
    """`count` short 720p clips."""
    folder = root / f"video-{count}"
    fresh(folder)
    build(folder, encode_video, [(index, photos, folder / f"v{index:03d}.mp4") for index in range(count)], "clips")
    return folder


# -- the Pillow / rawpy pools (run as `bench_formats.py --pool KIND SRC OUT`) ---------------


def pillow_heic(job: tuple[Path, Path]) -> None:
    """pillow-heif opens, Pillow's thumbnail() shrinks, JPEG q80."""
    from PIL import Image

    source, out = job
    with Image.open(source) as image:
        image.thumbnail((256, 256))
        image.convert("RGB").save(out / f"{source.name}.jpg", quality=80)


def rawpy_preview(job: tuple[Path, Path]) -> None:
    """rawpy's embedded preview, Pillow's thumbnail()."""
    import rawpy
    from PIL import Image

    source, out = job
    with rawpy.imread(str(source)) as raw:
        thumb = raw.extract_thumb()
    if thumb.format == rawpy.ThumbFormat.JPEG:
        image = Image.open(io.BytesIO(thumb.data))
        image.draft("RGB", (256, 256))
    else:
        image = Image.fromarray(thumb.data)
    image.thumbnail((256, 256))
    image.convert("RGB").save(out / f"{source.name}.jpg", quality=80)


def rawpy_demosaic(job: tuple[Path, Path]) -> None:
    """rawpy's default full-size demosaic (AHD), Pillow's thumbnail()."""
    import rawpy
    from PIL import Image

    source, out = job
    with rawpy.imread(str(source)) as raw:
        rgb = raw.postprocess(use_camera_wb=True, output_bps=8)
    image = Image.fromarray(rgb)
    image.thumbnail((256, 256))
    image.save(out / f"{source.name}.jpg", quality=80)


POOLS: dict[str, Callable[[tuple[Path, Path]], None]] = {
    "pillow-heic": pillow_heic,
    "rawpy-preview": rawpy_preview,
    "rawpy-demosaic": rawpy_demosaic,
}


def run_pool(kind: str, source: Path, out: Path) -> None:
    """One of POOLS over every file in `source`, in multiprocessing.Pool(CORES)."""
    if kind == "pillow-heic":
        import pillow_heif

        pillow_heif.register_heif_opener()
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(path for path in source.iterdir() if not path.name.startswith("."))
    with multiprocessing.Pool(CORES) as pool:
        pool.map(POOLS[kind], [(path, out) for path in files], chunksize=1)


# -- timing --------------------------------------------------------------------


def time_run(argv: list[str], cwd: Path) -> Timing:
    """Run argv; its wall time and the CPU time of its process tree (every descendant it reaped)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    errors = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{errors.decode(errors='replace')[-2000:]}")
    return Timing(wall, usage.ru_utime + usage.ru_stime)


def shell(script: str) -> list[str]:
    """argv running `script` in /bin/sh."""
    return ["/bin/sh", "-c", script]


def xargs(source: Path, pattern: str, command: str) -> list[str]:
    """`command` over the files named `pattern` in `source`, CORES at a time; {} is the file name."""
    return shell(
        f"find {shlex.quote(str(source))} -name {shlex.quote(pattern)} -printf '%f\\0' "
        f"| xargs -0 -P {CORES} -I{{}} {command}"
    )


def read_all(folders: Sequence[Path]) -> None:
    """Read every source once, so every row sees a warm page cache."""
    for folder in folders:
        for path in folder.iterdir():
            if path.is_file():
                path.read_bytes()


def measure(title: str, rows: list[Row], repeat: int, workdir: Path) -> None:
    """Time the rows taking turns and print the table."""
    timings: dict[str, list[Timing]] = {row.name: [] for row in rows}
    for round_index in range(repeat):
        for row in rows:
            timing = time_run(row.argv, workdir)
            timings[row.name].append(timing)
            print(f"  {title} round {round_index + 1} {row.name}: {timing.wall:.1f} s", file=sys.stderr, flush=True)
    print(f"\n{title}   (load average {os.getloadavg()[0]:.1f}, {CORES} cores, median of {repeat})")
    print(f"{'tool':44} {'images/s':>9} {'CPU ms/img':>11} {'ratio':>6} {'CPU ratio':>9}")
    first_rate = first_cpu = 0.0
    for row in rows:
        rate = row.sources / statistics.median(timing.wall for timing in timings[row.name])
        cpu = 1000 * statistics.median(timing.cpu for timing in timings[row.name]) / row.sources
        first_rate, first_cpu = (rate, cpu) if not first_rate else (first_rate, first_cpu)
        print(f"{row.name:44} {rate:9.2f} {cpu:11.0f} {rate / first_rate:6.2f} {cpu / first_cpu:9.2f}")
    for row in rows:
        command = row.argv[2] if row.argv[:2] == ["/bin/sh", "-c"] else shlex.join(row.argv)
        print(f"  {row.name}: {command}")
    sys.stdout.flush()


def pool_argv(kind: str, source: Path, out: Path) -> list[str]:
    """argv running one of POOLS in a fresh interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), "--pool", kind, str(source), str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="heic,raw,video")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fbench"))
    parser.add_argument("--heic", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=25)
    parser.add_argument("--raw", type=int, default=20)
    parser.add_argument("--videos", type=int, default=20)
    parser.add_argument("--photos", type=Path, default=Path("/tmp/wk/bench/corpus-200-4000x3000-q90"))
    parser.add_argument("--thumbcli", default=f"{sys.executable} -m thumbcli", help="the command to time")
    parser.add_argument("--pool", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pool:
        run_pool(args.pool[0], Path(args.pool[1]), Path(args.pool[2]))
        return
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    photos = args.photos if args.photos.is_dir() else None
    thumbcli = shlex.split(args.thumbcli)
    out = workdir / "out"
    sections = args.sections.split(",")
    vipsthumbnail = "vipsthumbnail -s 256 -o {out}/%s.jpg[Q=80]"

    def generate(source: Path, name: str) -> list[str]:
        return [*thumbcli, "generate", str(source), "-o", str(out / name), "-s", "256", "--force"]

    started = time.perf_counter()
    plans: list[tuple[str, list[Row], list[Path]]] = []
    if "heic" in sections:
        heic, jpeg = heic_corpus(workdir, args.heic, args.distinct, photos)
        n = args.heic
        rows = [
            Row("thumbcli generate (HEIC)", generate(heic, "thumbcli-heic"), n),
            Row("thumbcli generate (same pictures as JPEG)", generate(jpeg, "thumbcli-jpeg"), n),
            Row(f"pillow-heif + Pillow thumbnail, Pool({CORES})", pool_argv("pillow-heic", heic, out / "pillow"), n),
        ]
        if shutil.which("vipsthumbnail"):
            target = out / "vips"
            target.mkdir(parents=True, exist_ok=True)
            command = f"{vipsthumbnail.format(out=target)} {heic}/{{}}"
            rows.append(Row(f"vipsthumbnail (system libheif), xargs -P{CORES}", xargs(heic, "*.heic", command), n))
        else:
            print("note: vipsthumbnail not installed (apt-get install libvips-tools): row skipped", file=sys.stderr)
        if shutil.which("vipsthumbnail") and shutil.which("heif-convert"):
            target, scratch = out / "heif-convert", out / "heif-convert-tmp"
            target.mkdir(parents=True, exist_ok=True)
            scratch.mkdir(parents=True, exist_ok=True)
            step = (
                f"heif-convert -q 90 {heic}/$1 {scratch}/$1.jpg >/dev/null"
                f" && {vipsthumbnail.format(out=target)} {scratch}/$1.jpg && rm {scratch}/$1.jpg"
            )
            command = f"sh -c {shlex.quote(step)} _ {{}}"
            rows.append(Row(f"heif-convert + vipsthumbnail, xargs -P{CORES}", xargs(heic, "*.heic", command), n))
        else:
            print("note: heif-convert not installed (apt-get install libheif-examples): row skipped", file=sys.stderr)
        plans.append(
            (f"HEIC: {n} phone-size 4032x3024 files ({args.distinct} distinct pictures), -s 256", rows, [heic, jpeg])
        )
    if "raw" in sections:
        with_preview, without = raw_corpus(workdir, args.raw, photos)
        n = args.raw
        rows = [
            Row("thumbcli generate (DNG with preview)", generate(with_preview, "thumbcli-dng-preview"), n),
            Row("thumbcli generate (DNG, half-size demosaic)", generate(without, "thumbcli-dng-demosaic"), n),
            Row(f"rawpy preview + Pillow, Pool({CORES})", pool_argv("rawpy-preview", with_preview, out / "rp"), n),
            Row(f"rawpy full demosaic + Pillow, Pool({CORES})", pool_argv("rawpy-demosaic", without, out / "rd"), n),
        ]
        plans.append((f"RAW: {n} DNGs 4032x3024 (JPEG preview full size), -s 256", rows, [with_preview, without]))
    if "video" in sections:
        clips = video_corpus(workdir, args.videos, photos)
        n = args.videos
        rows = [Row("thumbcli generate (video)", generate(clips, "thumbcli-video"), n)]
        if shutil.which("ffmpegthumbnailer"):
            target = out / "ffmpegthumbnailer"
            target.mkdir(parents=True, exist_ok=True)
            command = f"ffmpegthumbnailer -i {clips}/{{}} -o {target}/{{}}.jpg -s 256 -q 8"
            rows.append(Row(f"ffmpegthumbnailer, xargs -P{CORES}", xargs(clips, "*.mp4", command), n))
        else:
            print("note: ffmpegthumbnailer not installed (apt-get install ffmpegthumbnailer): skipped", file=sys.stderr)
        plans.append((f"Video: {n} clips 1280x720 H.264, 3 s at 30 fps, -s 256", rows, [clips]))
    print(f"corpora ready after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    for title, rows, folders in plans:
        read_all(folders)
        measure(title, rows, args.repeat, workdir)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
